"""The long fuzz run: seeded plain-random inputs against everything a guest or a VMM
controls, each checked against the invariant "valid result or a guest-protocol error,
nothing else" (docs/hardening.md says what each target checks).

    python -m bench.fuzz --inputs 1000000 [--seed 1] [--jobs 2] [--targets blk,net,...]

Not part of `python -m bench`: it runs for minutes. Exits 1 on any invariant violation.
The suite's tests/test_fuzz_*.py check the same invariants with hypothesis on a few
hundred inputs each; this command trades shrinking for volume.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import io
import mmap
import multiprocessing
import os
import random
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backendd.guest import VmmClient

U32, U64 = (1 << 32) - 1, (1 << 64) - 1
PAGE = 4096
MAX_REPORTED = 5  # violations kept per target and worker, with the input that caused them


@dataclass
class Result:
    target: str
    inputs: int = 0
    violations: int = 0
    examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def violate(self, what: str) -> None:
        self.violations += 1
        if len(self.examples) < MAX_REPORTED:
            self.examples.append(what)


class Violation(AssertionError):
    pass


def need(cond: bool, what: str) -> None:
    if not cond:
        raise Violation(what)


# --- blkif requests ------------------------------------------------------------------


def fuzz_blk(n: int, seed: int) -> Result:
    from backendd.devices.blk.request import (
        BadRequest,
        Geometry,
        parse_indirect_segments,
        parse_request,
    )
    from rings.blkif import BLKIF_CODECS
    from rings.consts import BlkifAbi, BlkifOp, BlkifStatus

    rng = random.Random(seed)
    res = Result("blk requests")
    entry = BLKIF_CODECS[BlkifAbi.X86_64].entry_size
    id_off = {BlkifAbi.X86_64: 8, BlkifAbi.X86_32: 4}
    direct = (0, 1, 2, 3)
    geos = [Geometry(sectors=s, sector_size=ss, readonly=ro, discard=d, discard_secure=ds,
                     max_indirect_segments=mi)
            for s in (0, 8, 1 << 21, U64) for ss in (512, 4096) for ro in (False, True)
            for d, ds in ((False, False), (True, False), (True, True)) for mi in (32, 256)]

    def field_u64() -> int:
        r = rng.random()
        return rng.getrandbits(64) if r < 0.3 else rng.randrange(4096) & ~7 if r < 0.9 \
            else rng.choice([U64, U64 - 7, 1 << 63])

    def slot(abi: BlkifAbi) -> bytes:
        codecs = BLKIF_CODECS[abi]
        noise = rng.randbytes(entry)
        kind = rng.randrange(4)
        if kind == 0:
            return noise
        rid = rng.getrandbits(64)
        if kind == 1:
            nseg = rng.randrange(12) if rng.random() < 0.9 else rng.randrange(256)
            segs = []
            for _ in range(11):
                if rng.random() < 0.8:
                    first = rng.choice((0, 0, rng.randrange(8)))
                    segs += [rng.getrandbits(32), first, rng.randrange(first, 8)]
                else:
                    segs += [rng.getrandbits(32), rng.randrange(256), rng.randrange(256)]
            op = rng.choice(direct) if rng.random() < 0.9 else rng.randrange(256)
            body = codecs.request.struct.pack(op, nseg, 0, rid, field_u64(), *segs)
        elif kind == 2:
            inner = rng.randrange(2) if rng.random() < 0.9 else rng.randrange(256)
            nseg = rng.randrange(1, 300) if rng.random() < 0.9 else rng.randrange(1 << 16)
            body = codecs.indirect.struct.pack(BlkifOp.INDIRECT, inner, nseg, rid,
                                               field_u64(), 0,
                                               *[rng.getrandbits(32) for _ in range(8)])
        else:
            body = codecs.discard.struct.pack(BlkifOp.DISCARD, rng.randrange(4), 0, rid,
                                              field_u64(), field_u64())
        return body + noise[len(body):]

    def page() -> bytes:
        if rng.random() < 0.3:
            return rng.randbytes(PAGE)
        first = rng.choice((0, rng.randrange(8)))
        seg = struct.pack("<IBBxx", rng.getrandbits(32), first, rng.randrange(first, 8))
        return seg * (PAGE // 8)

    abis = list(BlkifAbi)
    start = time.perf_counter()
    for _ in range(n):
        abi = rng.choice(abis)
        geo = rng.choice(geos)
        raw = slot(abi)
        res.inputs += 1
        try:
            (rid,) = struct.unpack_from("<Q", raw, id_off[abi])
            try:
                req = parse_request(raw, BLKIF_CODECS[abi], geo)
                if req.indirect_grefs:
                    npages = -(-req.nr_segments // 512)
                    need(len(req.indirect_grefs) == npages, "indirect page count")
                    need(1 <= req.nr_segments <= geo.max_indirect_segments, "indirect nseg")
                    req = parse_indirect_segments(req, [page() for _ in range(npages)],
                                                  BLKIF_CODECS[abi], geo)
                    need(len(req.segments) == req.nr_segments, "indirect segments")
            except BadRequest as bad:
                need(bad.id == rid, "error response for another id")
                need(bad.status in (BlkifStatus.ERROR, BlkifStatus.EOPNOTSUPP), "status")
                continue
            need(req.id == rid, "request id")
            need(not (req.writes and geo.readonly), "write to a read-only disk")
            align = geo.sector_size // 512
            if req.op == BlkifOp.DISCARD:
                need(geo.discard and (geo.discard_secure or not req.secure), "discard")
            else:
                need(req.indirect_grefs != () or len(req.segments) <= 11, "nseg")
                need(req.segments or req.op in (2, 3), "data-less read/write")
                total = 0
                for _g, first, last in req.segments:
                    need(0 <= first <= last < 8, "segment outside its page")
                    need(first % align == 0 and (last - first + 1) % align == 0, "alignment")
                    total += last - first + 1
                need(total == req.nr_sectors, "sector count")
            need(req.nr_sectors == 0 or req.sector + req.nr_sectors <= geo.sectors,
                 "beyond the disk")
        except Exception as exc:
            res.violate(f"{exc!r} on abi={abi.name} geo={geo} slot={raw.hex()}")
    res.seconds = time.perf_counter() - start
    return res


# --- netif tx chains -----------------------------------------------------------------


def fuzz_net_tx(n: int, seed: int) -> Result:
    from backendd.devices.net.tx import (
        FATAL_SKB_SLOTS,
        LEGACY_SLOTS_MAX,
        TxFatal,
        TxKind,
        decode_slot,
        parse_packet,
    )
    from rings.netif import TX_REQUEST

    rng = random.Random(seed)
    res = Result("net tx chains")

    def u16() -> int:
        return rng.randrange(4200) if rng.random() < 0.7 else rng.getrandbits(16)

    def chain() -> tuple[list[bytes], int]:
        flags = rng.choice((0, 4, 8, 12)) if rng.random() < 0.8 else rng.getrandbits(16)
        out = [TX_REQUEST.pack(rng.getrandbits(32), u16(), flags, rng.getrandbits(16), u16())]
        for _ in range(rng.randrange(4) if flags & 8 else 0):
            etype = rng.randrange(6) if rng.random() < 0.9 else rng.getrandbits(8)
            eflags = rng.randrange(2) if rng.random() < 0.9 else rng.getrandbits(8)
            body = struct.pack("<HB", rng.choice((0, 1448, rng.getrandbits(16))),
                               rng.randrange(4)) + rng.randbytes(7)
            out.append(bytes([etype, eflags]) + body)
        for _ in range(rng.randrange(24)):
            more = 4 if rng.random() < 0.85 else 0
            out.append(TX_REQUEST.pack(7, u16(), more if rng.random() < 0.9 else
                                       rng.getrandbits(16), rng.getrandbits(16), u16()))
        return out, rng.randrange(1, len(out) + 1)

    start = time.perf_counter()
    for _ in range(n):
        slots, avail = chain()
        res.inputs += 1
        try:
            top = [-1]

            def read(i: int, slots: list[bytes] = slots, avail: int = avail,
                     top: list[int] = top) -> bytes:
                need(0 <= i < avail, f"read slot {i} of {avail} published")
                top[0] = max(top[0], i)
                return slots[i]

            try:
                p = parse_packet(read, avail)
            except TxFatal:
                continue
            need(p.nslots <= avail and top[0] < p.nslots, "slots beyond the packet")
            need(p.first == decode_slot(slots[0]), "first slot")
            need(len(p.frags) < FATAL_SKB_SLOTS, "chain length")
            if p.kind in (TxKind.MCAST_ADD, TxKind.MCAST_DEL):
                need(len(p.mcast) == 6 and not p.frags, "mcast")
                continue
            for f in p.frags:
                need(f.offset + f.size <= PAGE, "frag crosses its page")
            if p.kind is TxKind.ERROR:
                need(bool(p.reason), "error without a reason")
                continue
            need(len(p.frags) <= LEGACY_SLOTS_MAX, "too many frags sent")
            need(p.first_len >= 14 and p.first.offset + p.first_len <= PAGE, "first slot")
            need(p.first_len + sum(f.size for f in p.frags) == p.first.size, "sizes")
            need(p.gso is None or (p.gso[0] > 0 and p.gso[1] in (1, 2)), "gso")
        except Exception as exc:
            res.violate(f"{exc!r} on avail={avail} slots={[s.hex() for s in slots]}")
    res.seconds = time.perf_counter() - start
    return res


# --- shared rings --------------------------------------------------------------------


def fuzz_rings(n: int, seed: int) -> Result:
    from rings.blkif import BLKIF_CODECS
    from rings.consts import BlkifAbi
    from rings.netif import RX_ENTRY_SIZE, TX_ENTRY_SIZE
    from rings.ring import BackRing, RingCorrupted, SharedRing
    from rings.sring import REQ_PROD, RSP_EVENT, RSP_PROD, SRING_HEADER_SIZE

    rng = random.Random(seed)
    res = Result("ring indices and slots")
    sizes = [BLKIF_CODECS[BlkifAbi.X86_64].entry_size, TX_ENTRY_SIZE, RX_ENTRY_SIZE]
    start = time.perf_counter()
    while res.inputs < n:
        nr_pages = rng.choice((1, 1, 2, 4))
        esize = rng.choice(sizes)
        # Pages with a canary page around each, inside one buffer.
        buf = bytearray(b"\xc5") * ((2 * nr_pages + 1) * PAGE)
        offs = [(2 * i + 1) * PAGE for i in range(nr_pages)]
        for o in offs:
            buf[o:o + PAGE] = bytes(PAGE)
        view = memoryview(buf)
        pages = [view[o:o + PAGE] for o in offs]
        shared = SharedRing.over_pages(pages, esize)
        shared.init()
        size = shared.size
        mask = size - 1
        hdr = offs[0]

        def logical(off: int, k: int, offs: list[int] = offs, buf: bytearray = buf) -> bytes:
            out = b""
            while k:
                p, w = divmod(off, PAGE)
                take = min(k, PAGE - w)
                out += bytes(buf[offs[p] + w:offs[p] + w + take])
                off, k = off + take, k - take
            return out

        def spots(index: int, esize: int = esize, mask: int = mask,
                  offs: list[int] = offs) -> list[tuple[int, int]]:
            off = SRING_HEADER_SIZE + (index & mask) * esize
            p, w = divmod(off, PAGE)
            first = min(esize, PAGE - w)
            out = [(offs[p] + w, offs[p] + w + first)]
            if first < esize:
                out.append((offs[p + 1], offs[p + 1] + esize - first))
            return out

        start_idx = rng.getrandbits(32)
        struct.pack_into("<I", buf, hdr + 4 * RSP_PROD, start_idx)
        back = BackRing.attach(shared)
        try:
            for _ in range(rng.randrange(1, 40)):
                if res.inputs >= n:
                    break
                res.inputs += 1
                r = rng.random()
                prod = (back.rsp_prod_pvt + rng.randrange(size + 2)) & U32 if r < 0.8 \
                    else rng.getrandbits(32)
                struct.pack_into("<II", buf, hdr + 4 * REQ_PROD, prod, 0)
                struct.pack_into("<I", buf, hdr + 4 * RSP_EVENT, rng.getrandbits(32))
                for _ in range(rng.randrange(4)):
                    data = rng.randbytes(esize)
                    at = back.req_cons + rng.randrange(size)
                    pos = 0
                    for a, b in spots(at):
                        buf[a:b] = data[pos:pos + b - a]
                        pos += b - a
                before = bytes(buf)
                cons0, rsp0 = back.req_cons, back.rsp_prod_pvt
                budget = rng.randrange(1, 2 * size + 2)
                try:
                    taken = back.take_requests(budget)
                except RingCorrupted:
                    need((prod - rsp0) & U32 > size, "RingCorrupted on a legal req_prod")
                    need(bytes(buf) == before, "wrote while refusing")
                    break
                need((prod - rsp0) & U32 <= size, "overflowing req_prod accepted")
                need(len(taken) <= min(budget, size), "took more than the ring holds")
                need(back.pending_responses() <= size, "pending beyond the ring")
                for k, s in enumerate(taken):
                    off = SRING_HEADER_SIZE + ((cons0 + k) & mask) * esize
                    need(s == logical(off, esize), "slot copied from the wrong place")
                need(bytes(buf) == before, "taking requests wrote to the ring")
                pushed = back.rsp_prod_pvt
                for _ in range(rng.randrange(back.pending_responses() + 1)):
                    back.put_response(b"\x11" * esize)
                back.push_responses()
                back.final_check_for_requests()
                # Everything outside req_event, rsp_prod and the new responses unchanged.
                a, b = bytearray(before), bytearray(buf)
                for lo, hi in [(hdr + 4, hdr + 12)] + [
                        sp for i in range(pushed, pushed + ((back.rsp_prod_pvt - pushed) & U32))
                        for sp in spots(i)]:
                    a[lo:hi] = b[lo:hi]
                need(a == b, "back end wrote outside its words and response slots")
        except Violation as exc:
            res.violate(f"{exc} (pages={nr_pages} entry={esize} start={start_idx})")
        except Exception as exc:
            res.violate(f"{exc!r} (pages={nr_pages} entry={esize}): "
                        f"{traceback.format_exc(limit=3)}")
        finally:
            shared.release()
            for p in pages:
                p.release()
            view.release()
    res.seconds = time.perf_counter() - start
    return res


# --- grant table ---------------------------------------------------------------------


def _guest(version: int):
    from backendd.grants import GrantTable
    from backendd.guest import GuestGrantTable, GuestRAM
    from backendd.memory import GuestMemory

    layout = [(0, 16 * PAGE), (32 * PAGE, 16 * PAGE)]
    ram = GuestRAM(32 * PAGE, layout)
    gt = GuestGrantTable(nr_frames=1, version=version)
    mem = GuestMemory()
    frames = [*range(16), *range(32, 48)]
    image = {f: bytearray(bytes((f * PAGE + i) * 7 + 0x5A & 0xFF for i in range(PAGE)))
             for f in frames}
    for f in frames:
        ram.write(f * PAGE, image[f])
    for gpa, size, fd, off in ram.regions:
        mem.add_region(gpa, size, fd, off)
    table = GrantTable(mem)
    table.set_table(gt.fd, 0, 1, version)
    return ram, gt, mem, table, image


def fuzz_grants(n: int, seed: int) -> Result:
    from backendd.grants import GrantError
    from rings.consts import GTF_READING, GTF_READONLY, GTF_SUB_PAGE, GTF_WRITING

    rng = random.Random(seed)
    res = Result("grant entries")
    in_use = GTF_READING | GTF_WRITING
    start = time.perf_counter()
    while res.inputs < n:
        version = rng.choice((1, 2))
        ram, gt, mem, table, image = _guest(version)
        held = []
        written: dict[int, bytes] = {}

        def raw(gref: int, gt=gt) -> bytes:
            return os.pread(gt.fd, gt.entry_size, gref * gt.entry_size)

        try:
            for _ in range(rng.randrange(10, 200)):
                if res.inputs >= n:
                    break
                res.inputs += 1
                op = rng.random()
                gref = rng.randrange(6)
                if op < 0.35:
                    if any(m.gref == gref for m in held):
                        continue
                    flags = rng.choice((1, 1 | GTF_READONLY, 1 | GTF_SUB_PAGE, 0, 2, 3)) \
                        if rng.random() < 0.7 else rng.getrandbits(16)
                    domid = 0 if rng.random() < 0.8 else rng.getrandbits(16)
                    frame = rng.choice((rng.randrange(48), rng.randrange(1 << 32)))
                    sub = (rng.randrange(4200), rng.randrange(4200))
                    gt.set_entry(gref, flags & ~in_use, domid, frame, sub)
                    written[gref] = raw(gref)
                elif op < 0.75:
                    if rng.random() < 0.05:
                        gref = rng.choice((-1, gt.entries, 1 << 40))
                    writable = rng.random() < 0.5
                    flags, domid, frame = gt.entry(gref) if 0 <= gref < gt.entries \
                        else (0, 0, 0)
                    window = (0, PAGE)
                    if version == 2 and flags & GTF_SUB_PAGE:
                        off, length = struct.unpack_from("<HH", raw(gref), 4)
                        window = (off, off + length)
                    ok = (0 <= gref < gt.entries and flags & 3 == 1 and domid == 0
                          and not (writable and flags & GTF_READONLY) and frame in image
                          and window[1] <= PAGE)
                    try:
                        m = table.map(gref, writable)
                    except GrantError:
                        need(not ok, f"valid grant {gref} refused")
                    else:
                        need(ok, f"gref {gref} mapped against its entry")
                        need((m.frame, m.window, m.writable) == (frame, window, writable),
                             "mapping of the wrong frame, window or permission")
                        lo, hi = window
                        need(bytes(m.page_view(lo, hi - lo)) == image[frame][lo:hi],
                             "mapped bytes differ from the guest page")
                        held.append(m)
                elif op < 0.9 and held:
                    held.pop(rng.randrange(len(held))).release()
                elif held:
                    m = rng.choice(held)
                    lo, hi = m.window
                    if m.writable and hi > lo:
                        data = rng.randbytes(rng.randrange(1, hi - lo + 1))
                        m.page_view(lo, len(data))[:] = data
                        image[m.frame][lo:lo + len(data)] = data
                # Flags: the guest's entry plus exactly our in-use bits.
                for g, w in written.items():
                    mine = [m for m in held if m.gref == g]
                    want = (GTF_READING if mine else 0) | (
                        GTF_WRITING if any(m.writable for m in mine) else 0)
                    now = bytearray(raw(g))
                    bits = gt.status(g) if version == 2 else now[0] & in_use
                    need(bits == want, f"gref {g}: in-use bits {bits:#x}, expected {want:#x}")
                    if version == 1:
                        now[0] &= ~in_use
                    need(bytes(now) == w, f"gref {g}: entry changed by the daemon")
                for f, img in image.items():
                    need(ram.read(f * PAGE, PAGE) == img, f"frame {f}: canary overwritten")
        except Exception as exc:
            res.violate(f"v{version}: {exc!r}")
        finally:
            for m in held:
                m.release()
            table.close()
            mem.close()
            gt.close()
            ram.close()
    res.seconds = time.perf_counter() - start
    return res


def fuzz_grant_races(n: int, seed: int) -> Result:
    """Map attempts while a second thread rewrites the entry (flags or domid)."""
    from backendd.grants import GrantError

    rng = random.Random(seed)
    res = Result("grant entries rewritten during map")
    start = time.perf_counter()
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        while res.inputs < n:
            version = rng.choice((1, 2))
            ram, gt, mem, table, image = _guest(version)
            shared = mmap.mmap(gt.fd, gt.size)
            words = memoryview(shared).cast("H")
            gref, frame = 9, 3
            gt.set_entry(gref, 1, 0, frame)
            first = gref * gt.entry_size // 2
            values = [(first, v) for v in (1, 1 | 4, 0, 3, 1 | 0x100)] + [
                (first + 1, d) for d in (0, 7, 0xFFFF)]
            stop = threading.Event()
            last = [(first, 1)]

            flip_seed = rng.getrandbits(32)

            def flip(words=words, values=values, stop=stop, last=last,
                     seed=flip_seed) -> None:
                r = random.Random(seed)
                while not stop.is_set():
                    w, v = r.choice(values)
                    words[w] = v
                    last[0] = (w, v)

            th = threading.Thread(target=flip)
            th.start()
            try:
                for _ in range(min(500, n - res.inputs)):
                    res.inputs += 1
                    try:
                        with table.map(gref, rng.random() < 0.5) as m:
                            need(m.frame == frame, "mapped another frame")
                    except GrantError:
                        pass
            except Exception as exc:
                res.violate(f"v{version}: {exc!r}")
            finally:
                stop.set()
                th.join()
            try:
                bits = gt.status(gref) if version == 2 else gt.entry(gref)[0] & 0x18
                need(bits == 0, f"v{version}: in-use bits {bits:#x} left behind")
                w, v = last[0]
                need(words[w] == v, f"v{version}: guest's last store {v:#x} changed to "
                     f"{words[w]:#x}")
                need(ram.read(frame * PAGE, PAGE) == image[frame], "canary overwritten")
            except Violation as exc:
                res.violate(str(exc))
            words.release()
            shared.close()
            table.close()
            mem.close()
            gt.close()
            ram.close()
    finally:
        sys.setswitchinterval(old_interval)
    res.seconds = time.perf_counter() - start
    return res


# --- control socket ------------------------------------------------------------------


def _control_message(rng: random.Random) -> tuple[int, int, int, bytes, int]:
    """(code, flags, size, payload, nfds) with mostly sound headers."""
    code = rng.choice([*range(13), 0x100, 0x101, 0x102]) if rng.random() < 0.9 \
        else rng.getrandbits(32)
    fields = {1: "<IQ", 2: "<QQQ", 3: "<QQ", 4: "<IIQHH", 5: "<II", 6: "<I", 7: "<II",
              8: "<I", 9: "<I", 11: "<III", 12: "<IIQQ"}
    fmt = fields.get(code)
    r = rng.random()
    if fmt and r < 0.7:
        vals = []
        for ch in fmt[1:]:
            bits = {"Q": 64, "I": 32, "H": 16}[ch]
            vals.append(rng.choice((0, 1, 2, 4096, 1 << 20, (1 << bits) - 1,
                                    rng.getrandbits(bits), rng.randrange(4) * 4096))
                        & ((1 << bits) - 1))
        payload = struct.pack(fmt, *vals)
        if code in (5, 7):
            pairs = [(rng.choice((b"path", b"tap", b"ring-ref", b"", b"a\0", b"\xff")),
                      rng.randbytes(rng.randrange(8))) for _ in range(rng.randrange(3))]
            count = len(pairs) if rng.random() < 0.9 else rng.getrandbits(32)
            payload += struct.pack("<I", count) + b"".join(
                struct.pack("<HH", len(k), len(v)) + k + v for k, v in pairs)
        if code == 7:
            ports = [rng.randrange(64) for _ in range(rng.randrange(3))]
            payload += struct.pack(f"<I{len(ports)}I", len(ports) if rng.random() < 0.9
                                   else rng.getrandbits(32), *ports)
        m = rng.random()
        if m < 0.15 and payload:
            payload = payload[:rng.randrange(len(payload))]
        elif m < 0.3:
            payload += rng.randbytes(rng.randrange(1, 9))
    else:
        payload = rng.randbytes(rng.randrange(64))
    flags = 1 if rng.random() < 0.97 else rng.getrandbits(32)
    size = len(payload)
    if rng.random() < 0.02:
        size = rng.randrange(65537, 1 << 32)
    nfds = {2: 1, 4: 1, 12: 1}.get(code, 0) if rng.random() < 0.8 else rng.randrange(4)
    return code, flags, size, payload, nfds


def _open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


async def _fd_baseline() -> set[int]:
    """The fds open before the fuzzing, once the daemon started here has finished what it
    began in the background at start (the netlink thread's import of pyroute2, whose
    files would otherwise come and go under the leak check)."""
    from backendd.devices.net.tap import run_netlink_async

    await run_netlink_async(lambda: None)  # one thread: runs after the import
    return _open_fds()


async def _daemon_unharmed(baseline: set[int], good: VmmClient, log: io.StringIO) -> None:
    """What a hostile peer must leave behind, the daemon running in this process: no fd
    open beyond `baseline`, the well-behaved peer `good` still served, and no request
    that reached the local-bug path in the daemon's `log`."""
    leaked = _open_fds() - baseline
    need(not leaked, f"fds left open in the daemon: {sorted(leaked)}")
    need(isinstance(await good.stats(), dict), "well-behaved peer not served")
    text = log.getvalue()
    need("request_crashed" not in text and "worker_crashed" not in text,
         "a request reached the local-bug path: " +
         next((ln for ln in text.splitlines() if "crashed" in ln), ""))


def _run_async(name: str, body: Callable[[int, int, Result], Awaitable[None]], n: int,
               seed: int) -> Result:
    """A Result named `name` for `body(n, seed, result)` run on uvloop, and its time."""
    import uvloop

    res = Result(name)
    start = time.perf_counter()
    uvloop.run(body(n, seed, res))
    res.seconds = time.perf_counter() - start
    return res


async def _control(n: int, seed: int, res: Result) -> None:
    from backendd.config import Config, DaemonSection
    from backendd.guest import SimGuest, VmmClient, sealed_memfd
    from backendd.log import EventLog
    from backendd.protocol.framing import Framer, Role
    from backendd.server import Server

    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    where = tempfile.mkdtemp(prefix="backendd-fuzz-")
    path = os.path.join(where, "s.sock")
    log = io.StringIO()
    server = Server(Config(daemon=DaemonSection(socket=path, log_level="info")),
                    EventLog("info", log))
    await server.start()
    memfd = sealed_memfd("fuzz", 1 << 20)
    good = await VmmClient.connect(path)
    guest = SimGuest(ram_size=1 << 20, gnttab_frames=1)
    await guest.attach(good)

    async def settle() -> None:
        for _ in range(1000):
            if len(server.connections) <= 1:
                return
            await asyncio.sleep(0.002)
        raise Violation("a closed connection was not torn down")

    baseline = await _fd_baseline()
    s = None
    framer = None
    seq = 0
    sent: list[tuple[int, int]] = []

    async def reconnect() -> None:
        nonlocal s, framer, sent
        if s is not None:
            s.close()
        await settle()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        await loop.sock_connect(s, path)
        framer = Framer(Role.VMM)
        sent = []
        if rng.random() < 0.9:
            await loop.sock_sendall(s, struct.pack("<IIII", 1, 1, 12, 0) +
                                    struct.pack("<IQ", 1, 0))
            sent.append((1, 0))

    async def replies(until_seq: int | None) -> bool:
        """Read and check replies; True if the daemon closed the connection."""
        while True:
            try:
                data = await asyncio.wait_for(loop.sock_recv(s, 1 << 17), 10)
            except ConnectionResetError:
                return True
            if not data:
                return True
            for frame in framer.feed(data):
                h = frame.header
                if h.flags & 0x8:
                    continue
                need(bool(sent), f"reply {h.code}/{h.seq} to nothing")
                code, sq = sent.pop(0)
                need((h.code, h.seq) == (code, sq), f"reply {h.code}/{h.seq} for {code}/{sq}")
                (result,) = struct.unpack_from("<i", frame.payload)
                need(result <= 0 and (result == 0 or -result in errno.errorcode),
                     f"result {result}")
                if until_seq is not None and h.seq == until_seq:
                    return False

    try:
        await reconnect()
        while res.inputs < n:
            res.inputs += 1
            code, flags, size, payload, nfds = _control_message(rng)
            seq = (seq + 1) & U32
            data = struct.pack("<IIII", code, flags, size, seq) + payload
            fatal = flags != 1 or size > 65536
            try:
                fds = [os.dup(memfd) if rng.random() < 0.5 else os.eventfd(0)
                       for _ in range(nfds)]
                try:
                    cut = rng.randrange(1, len(data) + 1)
                    if fds:
                        s.sendmsg([data[:cut]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                  struct.pack(f"{nfds}i", *fds))])
                    else:
                        await loop.sock_sendall(s, data[:cut])
                finally:
                    for fd in fds:
                        os.close(fd)
                await asyncio.sleep(0)
                await loop.sock_sendall(s, data[cut:])
                if not fatal:
                    sent.append((code, seq))
                if fatal:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_WR)
                    need(await replies(None), "fatal header did not close the connection")
                    await reconnect()
                elif len(sent) >= 16 or rng.random() < 0.05:
                    seq = (seq + 1) & U32
                    await loop.sock_sendall(s, struct.pack("<IIIII", 9, 1, 4, seq, U32))
                    sent.append((9, seq))
                    need(not await replies(seq), "connection closed on a sound header")
                    need(not sent, "replies missing")
                    if rng.random() < 0.1:
                        await reconnect()
            except (BrokenPipeError, ConnectionResetError):
                if not fatal:
                    res.violate(f"connection lost on sound code={code} payload={payload.hex()}")
                await reconnect()
            except Violation as exc:
                res.violate(f"{exc} (last code={code:#x} flags={flags:#x} size={size} "
                            f"payload={payload.hex()[:200]})")
                await reconnect()
            if res.inputs % 2000 == 0:
                need(isinstance(await good.stats(), dict), "well-behaved peer not served")
        s.close()
        s = None
        await settle()
        await _daemon_unharmed(baseline, good, log)
    except Violation as exc:
        res.violate(str(exc))
    finally:
        if s is not None:
            s.close()
        await good.close()
        guest.close()
        os.close(memfd)
        await server.close()
        with contextlib.suppress(OSError):
            os.rmdir(where)


def fuzz_control(n: int, seed: int) -> Result:
    return _run_async("control messages", _control, n, seed)


# --- fd kinds, seals and per-connection bounds ----------------------------------------

# The fds target's guest RAM ends at 1 GiB + 1 MiB: a dirty log needs this many frames.
LOG_RAM_PAGES = ((1 << 30) + (1 << 20)) >> 12
FD_KINDS = ("eventfd", "eventfd-blocking", "eventfd-full", "sealed", "sealed-short",
            "unsealed", "grow-sealed", "pipe", "socket", "file", "devnull")


def _fd_of_kind(kind: str, size: int, where: str) -> tuple[int, list[int]]:
    """(fd to send, other fds to close afterwards)."""
    import fcntl

    from backendd.guest import sealed_memfd

    if kind.startswith("eventfd"):
        fd = os.eventfd(0, os.EFD_CLOEXEC | (0 if kind != "eventfd" else os.EFD_NONBLOCK))
        if kind == "eventfd-full":
            os.eventfd_write(fd, U64 - 1)
        return fd, []
    if kind == "sealed":
        return sealed_memfd("fuzz", size), []
    if kind == "sealed-short":
        return sealed_memfd("fuzz", max(0, size - PAGE)), []
    if kind in ("unsealed", "grow-sealed"):
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        if kind == "grow-sealed":  # sealed, but not against shrinking
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
        return fd, []
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)  # readable for ever
        return r, []
    if kind == "socket":
        a, b = socket.socketpair()
        return a.detach(), [b.detach()]
    if kind == "file":
        fd = os.open(os.path.join(where, "plain"), os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, size)
        return fd, []
    return os.open("/dev/null", os.O_RDWR), []


async def _fds(n: int, seed: int, res: Result) -> None:
    import fcntl

    from backendd.config import Config, DaemonSection
    from backendd.dirtylog import log_size
    from backendd.guest import RequestFailed, SimGuest, VmmClient
    from backendd.guest.blkfront import BlkFront
    from backendd.inflight import region_size
    from backendd.log import EventLog
    from backendd.protocol.messages import (
        AddDevice,
        AddMemRegion,
        ClearLog,
        DeviceType,
        FrontendState,
        RemoveDevice,
        RemoveMemRegion,
        SetGrantTable,
        SetInflight,
        SetLog,
    )
    from backendd.server import Server
    from backendd.session import MAX_DEVICES, MAX_MEM_REGIONS
    from rings.consts import XenbusState

    rng = random.Random(seed)
    where = tempfile.mkdtemp(prefix="backendd-fuzz-")
    path = os.path.join(where, "s.sock")
    image = os.path.join(where, "disk.img")
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    log = io.StringIO()
    server = Server(Config(daemon=DaemonSection(socket=path, log_level="info")),
                    EventLog("info", log))
    await server.start()
    good = await VmmClient.connect(path)
    good_guest = SimGuest(ram_size=1 << 20, gnttab_frames=1)
    await good_guest.attach(good)

    baseline = await _fd_baseline()
    hostile: VmmClient | None = None
    guest: SimGuest | None = None
    devices: set[int] = set()
    regions: set[tuple[int, int]] = set()

    async def fresh() -> None:
        nonlocal hostile, guest
        if hostile is not None:
            await hostile.close()
        if guest is not None:
            guest.close()
        hostile = await VmmClient.connect(path)
        # A real guest high up, so rings can connect; random regions go below it.
        guest = SimGuest(ram_size=1 << 20, gnttab_frames=1, layout=[(1 << 30, 1 << 20)])
        await guest.attach(hostile)
        devices.clear()
        regions.clear()

    async def ask(msg, fds: list[int]) -> int:
        try:
            await hostile.request(msg, fds)
        except RequestFailed as exc:
            if exc.code == errno.EBADF:
                need("fd rule" in exc.message, f"EBADF without naming the rule: {exc.message}")
            return exc.code
        return 0

    try:
        await fresh()
        while res.inputs < n:
            res.inputs += 1
            op = "fill" if rng.random() < 0.01 else rng.choice(
                ("region", "region", "unregion", "gnttab", "device", "undevice", "inflight",
                 "connect", "connect", "connect", "log"))
            kinds = [rng.choice(FD_KINDS[:3] if op == "connect" and rng.random() < 0.7
                                else FD_KINDS) for _ in range(2)]
            size = rng.choice((1, 2, 4)) * PAGE
            if op == "log":  # room for the guest's frames (up to 1 GiB + 1 MiB), then more
                size = log_size(LOG_RAM_PAGES, 1) + rng.choice((0, 1, 3)) * PAGE
            made = [_fd_of_kind(k, max(size, region_size(1)) if op == "inflight" else size,
                                where) for k in kinds]
            sent = [fd for fd, _ in made]
            flags = [fcntl.fcntl(fd, fcntl.F_GETFL) for fd in sent]
            memfd_ok = kinds[0] in ("sealed", "sealed-short")
            try:
                if op == "region":
                    gpa = rng.randrange(MAX_MEM_REGIONS + 16) * 4 * PAGE
                    full = len(regions) >= MAX_MEM_REGIONS
                    rc = await ask(AddMemRegion(gpa, size, 0), sent[:1])
                    if full:
                        need(rc == errno.ENOSPC, f"region beyond the bound: rc {rc}")
                    elif not memfd_ok:
                        need(rc == errno.EBADF, f"{kinds[0]} as memory: rc {rc}")
                    elif kinds[0] == "sealed-short":
                        need(rc == errno.EINVAL, f"short memfd as memory: rc {rc}")
                    else:
                        need(rc in (0, errno.EEXIST), f"sealed memfd as memory: rc {rc}")
                    if rc == 0:
                        regions.add((gpa, size))
                elif op == "unregion" and regions:
                    gpa, rsize = rng.choice(sorted(regions))
                    need(await ask(RemoveMemRegion(gpa, rsize), []) == 0, "remove failed")
                    regions.discard((gpa, rsize))
                elif op == "fill":
                    # Up to and past both bounds at once, then back.
                    for i in range(MAX_MEM_REGIONS + 2):
                        gpa = (1 << 29) + i * PAGE
                        rc = await ask(AddMemRegion(gpa, PAGE, 0), [guest.ram.fd])
                        if len(regions) >= MAX_MEM_REGIONS:
                            need(rc == errno.ENOSPC, f"region {len(regions) + 1}: rc {rc}")
                        elif rc == 0:
                            regions.add((gpa, PAGE))
                    for devid in range(1000, 1000 + MAX_DEVICES + 2):
                        rc = await ask(AddDevice(devid, DeviceType.BLK,
                                                 {"path": image, "mode": "r"}), [])
                        if len(devices) >= MAX_DEVICES:
                            need(rc == errno.ENOSPC, f"device {len(devices) + 1}: rc {rc}")
                        elif rc == 0:
                            devices.add(devid)
                    status = await hostile.daemon_status()
                    conn = max(server.connections)
                    need(int(status[f"conn.{conn}.memory_regions"]) <= MAX_MEM_REGIONS and
                         int(status[f"conn.{conn}.devices"]) <= MAX_DEVICES,
                         "a bound was exceeded")
                    for gpa, rsize in sorted(regions):
                        if gpa >= 1 << 29 and gpa < 1 << 30:
                            need(await ask(RemoveMemRegion(gpa, rsize), []) == 0, "remove")
                            regions.discard((gpa, rsize))
                    for devid in sorted(d for d in devices if d >= 1000):
                        need(await ask(RemoveDevice(devid), []) == 0, "remove device")
                        devices.discard(devid)
                elif op == "gnttab":
                    if kinds[0] == "sealed":  # mostly the guest's own table, kept valid
                        sent[0:1] = [guest.gnttab.fd]
                    rc = await ask(SetGrantTable(1, size // PAGE if kinds[0] != "sealed"
                                                 else guest.gnttab.nr_frames, 0, 0),
                                   sent[:1])
                    if not memfd_ok:
                        need(rc == errno.EBADF, f"{kinds[0]} as grant table: rc {rc}")
                    else:
                        need(rc != errno.EBADF, f"sealed memfd as grant table: rc {rc}")
                elif op == "device":
                    devid = rng.randrange(MAX_DEVICES + 8)
                    rc = await ask(AddDevice(devid, DeviceType.BLK,
                                             {"path": image, "mode": "r"}), [])
                    if devid in devices:
                        need(rc == errno.EEXIST, f"device twice: rc {rc}")
                    elif len(devices) >= MAX_DEVICES:
                        need(rc == errno.ENOSPC, f"device beyond the bound: rc {rc}")
                    else:
                        need(rc == 0, f"device refused: rc {rc}")
                        devices.add(devid)
                elif op == "undevice" and devices:
                    devid = rng.choice(sorted(devices))
                    need(await ask(RemoveDevice(devid), []) == 0, "remove device failed")
                    devices.discard(devid)
                elif op == "inflight" and devices:
                    devid = rng.choice(sorted(devices))
                    rc = await ask(SetInflight(devid, 0, region_size(1)), sent[:1])
                    if not memfd_ok:
                        need(rc in (errno.EBADF, errno.EBUSY), f"{kinds[0]} as in-flight: "
                             f"rc {rc}")
                    else:
                        need(rc != errno.EBADF, f"sealed memfd as in-flight: rc {rc}")
                elif op == "log":
                    # The dirty log: with it set, the other ops must go on as before (every
                    # region here lies below LOG_RAM_PAGES), and rings served with it.
                    if rng.random() < 0.3:
                        need(await ask(ClearLog(), []) == 0, "CLEAR_LOG refused")
                    else:
                        pages = rng.choice((LOG_RAM_PAGES, LOG_RAM_PAGES - 1))
                        rc = await ask(SetLog(0, size, pages), sent[:1])
                        if not memfd_ok:
                            need(rc == errno.EBADF, f"{kinds[0]} as the dirty log: rc {rc}")
                        elif kinds[0] == "sealed-short" or pages < LOG_RAM_PAGES:
                            need(rc == errno.EINVAL, f"log short or below RAM: rc {rc}")
                        else:
                            need(rc == 0, f"a good dirty log refused: rc {rc}")
                elif op == "connect" and devices:
                    devid = rng.choice(sorted(devices))
                    front = BlkFront(guest.ram, guest.gnttab, devid)
                    for fd in front.queues[0].daemon_fds:
                        os.close(fd)
                    rc = await ask(FrontendState(devid, XenbusState.CONNECTED,
                                                 front.frontend_keys(), (1,)), sent)
                    channels_ok = all(k.startswith("eventfd") for k in kinds)
                    if not channels_ok:
                        need(rc == errno.EBADF, f"channels {kinds}: rc {rc}")
                    else:
                        need(rc != errno.EBADF, f"eventfd channels refused: rc {rc}")
                    if rc == 0:
                        # Kick through the VMM's copy, then close: the daemon must stay
                        # responsive whatever the eventfds' flags and counters.
                        if kinds[0] != "eventfd-full":  # that one the daemon drains
                            os.eventfd_write(sent[0], 1)
                        need(await ask(FrontendState(devid, XenbusState.CLOSED, {}, ()),
                                       []) == 0, "CLOSED not answered")
                    front.close()
                for fd, before in zip(sent, flags, strict=True):
                    need(fcntl.fcntl(fd, fcntl.F_GETFL) == before,
                         f"the daemon changed the flags of a {kinds} fd")
            except Violation as exc:
                res.violate(f"{exc} (op={op} kinds={kinds})")
                await fresh()
            finally:
                for fd, extra in made:
                    for x in (fd, *extra):
                        os.close(x)
            if res.inputs % 500 == 0:
                need(isinstance(await good.stats(), dict), "well-behaved peer not served")
                await fresh()
        await hostile.close()
        hostile = None
        guest.close()
        guest = None
        for _ in range(1000):
            if len(server.connections) <= 1:
                break
            await asyncio.sleep(0.002)
        await _daemon_unharmed(baseline, good, log)
    except Violation as exc:
        res.violate(str(exc))
    finally:
        if hostile is not None:
            await hostile.close()
        if guest is not None:
            guest.close()
        await good.close()
        good_guest.close()
        await server.close()
        with contextlib.suppress(OSError):
            os.unlink(image)
            os.unlink(os.path.join(where, "plain"))
        with contextlib.suppress(OSError):
            os.rmdir(where)


def fuzz_fds(n: int, seed: int) -> Result:
    return _run_async("fd kinds and bounds", _fds, n, seed)


# --- driver --------------------------------------------------------------------------

def _net_diff(what: str, run: Callable[..., tuple[int, list[str]]], n: int, seed: int
              ) -> Result:
    """run(kernel, n, seed) (netdiff's or netdiff_rx's) against the built net kernel;
    each difference it reports is a violation."""
    from backendd.dataplane import netkernel

    res = Result(what)
    kernel = netkernel.load()
    if kernel is None:
        res.violate("the net kernel is not built (make netkernel)")
        return res
    start = time.perf_counter()
    res.inputs, differences = run(kernel, n, seed)
    for d in differences:
        res.violate(d)
    res.seconds = time.perf_counter() - start
    return res


def fuzz_net_diff(n: int, seed: int) -> Result:
    """Tx chains through the Python and the compiled tx data planes (bench/netdiff.py):
    any difference in what the guest or the host sees is a violation."""
    from bench import netdiff

    return _net_diff("net tx differential", netdiff.run, n, seed)


def fuzz_net_rx_diff(n: int, seed: int) -> Result:
    """Posted rx buffers and tap frames through the Python and the compiled rx data
    planes (bench/netdiff_rx.py): any difference the guest could see is a violation."""
    from bench import netdiff_rx

    return _net_diff("net rx differential", netdiff_rx.run, n, seed)


def fuzz_blk_diff(n: int, seed: int) -> Result:
    """The compiled blk kernel against the Python data plane (bench/blkdiff.py): the same
    rings, grant tables, indirect pages and images; any difference is a violation."""
    from bench import blkdiff

    res = Result("blk planes differential")
    start = time.perf_counter()
    try:
        res.inputs, _cases, bad = blkdiff.run(n, seed)
        for case_seed, diffs in bad:
            res.violate(f"case seed {case_seed}: {'; '.join(diffs)}")
    except Exception as exc:
        res.violate(f"harness: {exc!r}")
    res.seconds = time.perf_counter() - start
    return res


def fuzz_devstate(n: int, seed: int) -> Result:
    """Mutated device state blobs (blk and net, with and without persistent grants and
    posted rx buffers) through the daemon's decoding and connect-time validation
    (bench/devstatefuzz.py): refused with EINVAL, or accepted and consistent."""
    from bench import devstatefuzz

    res = Result("device state blobs")
    start = time.perf_counter()
    res.inputs, _counts, bad = devstatefuzz.run(n, seed)
    for b in bad:
        res.violate(b)
    res.seconds = time.perf_counter() - start
    return res


TARGETS: dict[str, tuple[Callable[[int, int], Result], float]] = {
    "blk": (fuzz_blk, 0.30),
    "net": (fuzz_net_tx, 0.25),
    "rings": (fuzz_rings, 0.20),
    "grants": (fuzz_grants, 0.13),
    "grant-races": (fuzz_grant_races, 0.02),
    "control": (fuzz_control, 0.08),
    "fds": (fuzz_fds, 0.02),
    "net-diff": (fuzz_net_diff, 0.10),
    "net-rx-diff": (fuzz_net_rx_diff, 0.05),
    "devstate": (fuzz_devstate, 0.05),
    # Not in the default mix (its own run: --targets blk-diff --inputs 1000000).
    "blk-diff": (fuzz_blk_diff, 0.0),
}
DEFAULT_TARGETS = [t for t, (_, w) in TARGETS.items() if w > 0]


def _run(job: tuple[str, int, int]) -> Result:
    name, n, seed = job
    result = TARGETS[name][0](n, seed)
    result.target = name
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=int, default=1_000_000,
                    help="guest/VMM-controlled inputs in total, split across targets")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                    help=f"comma-separated, of: {', '.join(TARGETS)}")
    args = ap.parse_args(argv)
    chosen = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    weights = {t: TARGETS[t][1] or 0.3 for t in chosen}
    weight = sum(weights.values())
    jobs = []
    for t in chosen:
        total = round(args.inputs * weights[t] / weight)
        # Several chunks per target so two workers stay busy; each chunk its own seed.
        chunks = max(1, min(8, total // 5000))
        for c in range(chunks):
            share = total // chunks + (1 if c < total % chunks else 0)
            if share:
                jobs.append((t, share, args.seed * 1000 + len(jobs)))
    start = time.perf_counter()
    results: dict[str, Result] = {t: Result(t) for t in chosen}
    ctx = multiprocessing.get_context("spawn")
    # The control target runs a daemon; give it a worker alone first, it is the slowest.
    jobs.sort(key=lambda j: j[0] not in ("control", "fds"))
    with ctx.Pool(args.jobs) as pool:
        for r in pool.imap_unordered(_run, jobs):
            agg = results[r.target]
            agg.inputs += r.inputs
            agg.violations += r.violations
            agg.seconds += r.seconds
            agg.examples += r.examples[:MAX_REPORTED - len(agg.examples)]
    elapsed = time.perf_counter() - start
    print(f"{'target':<14}{'inputs':>10}{'violations':>12}{'cpu s':>9}{'inputs/s':>11}")
    for t in chosen:
        r = results[t]
        rate = r.inputs / r.seconds if r.seconds else 0
        print(f"{t:<14}{r.inputs:>10}{r.violations:>12}{r.seconds:>9.1f}{rate:>11.0f}")
    total_in = sum(r.inputs for r in results.values())
    total_bad = sum(r.violations for r in results.values())
    print(f"{'total':<14}{total_in:>10}{total_bad:>12}   elapsed {elapsed:.1f} s "
          f"on {args.jobs} worker(s), seed {args.seed}")
    for t in chosen:
        for ex in results[t].examples:
            print(f"VIOLATION {t}: {ex}")
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
