"""The two netif tx data planes side by side: the same random and hostile tx slot
chains and grant tables (v1 and v2) go through the pure-Python path
(backendd/devices/net/txpath.py, the reference) and the compiled kernel
(backendd/dataplane/net.py over net_kernel.c); everything the guest or the host can
see must come out identical.

Compared after each round: the whole tx ring page (responses, indices, req_event), the
frames that reached the tap (a SOCK_SEQPACKET socketpair stands in for it, so frame
boundaries survive), the grant table with its in-use bits and the backend's use
counts, guest RAM, the counters, the credit left, the multicast list, whether the vif
was halted, and whether the event channel was signalled. Each plane runs in its own
world (memfds, sockets), both built from the same seed.

Used by tests/test_net_dataplane.py (a quick subset, and under the sanitizer build) and
by `python -m bench.fuzz --targets net-diff` (inputs are slot chains).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from backendd.dataplane import netkernel as nk
from backendd.dataplane.net import CompiledTxPath
from backendd.devices.net.ratelimit import CreditScheduler
from backendd.devices.net.txpath import TxPath
from backendd.devices.net.vif import Features, VifState
from backendd.dirtylog import DirtyBitmap, RingLog, log_size
from backendd.grants import GrantTable
from backendd.guest import GuestGrantTable, GuestRAM
from backendd.memory import GuestMemory
from rings.consts import GrantType
from rings.netif import TX_ENTRY_SIZE, TX_REQUEST
from rings.ring import BackRing, SharedRing
from rings.sring import REQ_PROD

PAGE = 4096
RAM_PAGES = 25
# The last page, frame 48, is the shared ring's: in guest memory, so that both planes
# log their ring writes (the dirty log is on in both and compared).
RING_FRAME = 48
LAYOUT = [(0, 16 * PAGE), (32 * PAGE, 8 * PAGE), (RING_FRAME * PAGE, PAGE)]
FRAMES = [*range(16), *range(32, 40)]
MORE, EXTRA, CSUM, VALID = 4, 8, 1, 2


@dataclass
class Difference(Exception):
    what: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.what}: {self.detail}"[:2000]


PathT = TypeVar("PathT")


@dataclass
class World(Generic[PathT]):
    """One plane's private copy of the guest, the ring and the tap; peer is the tap's
    other end (tx frames land there, rx frames are sent from it)."""

    ram: GuestRAM
    gt: GuestGrantTable
    mem: GuestMemory
    table: GrantTable
    ring_map: memoryview
    shared: SharedRing
    path: PathT
    vif: VifState
    peer: socket.socket
    tap: socket.socket
    loop: asyncio.AbstractEventLoop
    notifies: list[int] = field(default_factory=lambda: [0])
    fatal: list[str] = field(default_factory=list)

    def close(self) -> None:
        self.path.stop()
        self.shared.release()
        self.ring_map.release()
        self.table.close()
        self.mem.close()
        self.gt.close()
        self.ram.close()
        self.peer.close()
        self.tap.close()
        self.loop.close()


def guest(version: int, entry_size: int) -> tuple[GuestRAM, GuestGrantTable, GuestMemory,
                                                   GrantTable, memoryview, SharedRing]:
    """A plane's guest RAM, grant table (of this version) and initialised shared ring."""
    ram = GuestRAM(RAM_PAGES * PAGE, LAYOUT)
    gt = GuestGrantTable(nr_frames=1, version=version)
    mem = GuestMemory()
    for gpa, size, fd, off in ram.regions:
        mem.add_region(gpa, size, fd, off)
    table = GrantTable(mem)
    table.set_table(gt.fd, 0, 1, version)
    log_fd = os.memfd_create("diff-log", os.MFD_CLOEXEC)
    size = log_size(RING_FRAME + 1, gt.size // PAGE)
    os.ftruncate(log_fd, size)
    mem.set_log(DirtyBitmap(log_fd, 0, size, RING_FRAME + 1))
    os.close(log_fd)
    ring_map = mem.view(RING_FRAME * PAGE, PAGE)
    ring_map[:] = bytes(PAGE)
    shared = SharedRing(ring_map, entry_size)
    shared.init()
    return ram, gt, mem, table, ring_map, shared


def _world(kernel: nk.NetKernel | None, version: int, rate: tuple[int, int] | None,
           sndbuf: int, mcast_control: bool) -> World[TxPath]:
    ram, gt, mem, table, ring_map, shared = guest(version, TX_ENTRY_SIZE)
    tap, sink = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    tap.setblocking(False)
    loop = asyncio.new_event_loop()
    fatal: list[str] = []
    vif = VifState(0, Features(sg=True, gso_tcpv4=True, gso_tcpv6=True, ipv6_csum=True,
                               multicast_control=mcast_control), 1500, fatal.append)
    credit = CreditScheduler(*rate, loop.time()) if rate else None
    ring = BackRing.attach(shared)
    ring.log = RingLog(mem, [RING_FRAME])
    if kernel is None:
        path = TxPath(ring, table, tap.fileno(), vif, loop, "net0/queue-0", credit)
    else:
        path = CompiledTxPath(kernel, ring, table, tap.fileno(), vif, loop, "net0/queue-0",
                              credit)
    w: World[TxPath] = World(ram, gt, mem, table, ring_map, shared, path, vif, sink, tap,
                             loop, fatal=fatal)
    path.notify = lambda: w.notifies.__setitem__(0, w.notifies[0] + 1)
    return w


class Case:
    """A world's guest side: random grants and pages, then rounds of tx chains. Built
    twice from one seed, it writes the same bytes into both worlds."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        rng = random.Random(seed)
        self.version = rng.choice((1, 2))
        self.rate = ((rng.choice((2000, 20000, 200000)), 3_600_000_000)
                     if rng.random() < 0.2 else None)
        self.sndbuf = rng.choice((4096, 32768)) if rng.random() < 0.1 else 4 << 20
        self.mcast_control = rng.random() < 0.5

    def build(self, kernel: nk.NetKernel | None) -> World:
        return _world(kernel, self.version, self.rate, self.sndbuf, self.mcast_control)


def _grants(rng: random.Random, w: World) -> list[int]:
    """Grant most frames; some grants are hostile (revoked, foreign, sub-page, beyond
    memory, transitive). Same rng state -> same table in both worlds."""
    grefs = []
    for f in FRAMES:
        data = rng.randbytes(PAGE)
        w.ram.write(f * PAGE, data)
    for _ in range(40):
        f = rng.choice(FRAMES)
        r = rng.random()
        if w.gt.version == 2 and r < 0.08:
            off = rng.randrange(0, PAGE, 2)
            gref = w.gt.grant_access(f, sub_page=(off, rng.randrange(0, PAGE - off + 1)))
        elif r < 0.12:
            gref = w.gt.grant_access(f, domid=rng.choice((1, 7)))
        elif r < 0.15:
            gref = w.gt.grant_access(f)
            w.gt.end_access(gref)
            w.gt._free.remove(gref) if gref in w.gt._free else None
        elif r < 0.18:
            gref = w.gt.grant_access(rng.choice((20, 28, 1 << 20, (1 << 32) - 1)))
        elif r < 0.20:
            gref = w.gt.grant_access(f)
            flags, domid, frame = w.gt.entry(gref)
            w.gt.set_entry(gref, GrantType.TRANSITIVE | (flags & ~3), domid, frame)
        else:
            gref = w.gt.grant_access(f, readonly=rng.random() < 0.3)
        grefs.append(gref)
    return grefs


def _headers(rng: random.Random, frame_len: int, gso: int | None) -> bytes:
    dst = rng.choice((b"\x00\x16\x3e\x00\x00\x02", b"\x01\x00\x5e\x00\x00\x01",
                      b"\xff" * 6, rng.randbytes(6)))
    eth = dst + b"\x00\x16\x3e\x00\x00\x01"
    v6 = gso == 2 if gso else rng.random() < 0.4
    if rng.random() < 0.1:
        eth += b"\x81\x00" + rng.randbytes(2)
    r = rng.random()
    if r < 0.05:
        return eth + rng.randbytes(rng.randrange(2, 80))
    proto = 6 if gso or rng.random() < 0.6 else rng.choice((17, 17, 1, 58))
    if rng.random() < 0.03:
        proto = rng.getrandbits(8)
    l4 = (rng.randbytes(12) + bytes([rng.choice((0x50, 0x50, 0x80, 0xF0, 0x40))])
          + rng.randbytes(7) + rng.randbytes(40)) if proto == 6 else rng.randbytes(8)
    if v6:
        l3 = len(eth) + 40
        ext = b""
        nh = proto
        if rng.random() < 0.15:
            ext = bytes([proto, rng.randrange(3)]) + rng.randbytes(6)
            ext += rng.randbytes(ext[1] * 8)
            nh = rng.choice((0, 43, 60, 44))
        plen = max(0, frame_len - l3) if rng.random() < 0.9 else rng.getrandbits(16)
        ip = (b"\x86\xdd" + bytes([0x60 if rng.random() < 0.95 else rng.getrandbits(8)])
              + rng.randbytes(3) + struct.pack("!HBB", plen & 0xFFFF, nh, 64)
              + rng.randbytes(32) + ext)
    else:
        ihl = 5 if rng.random() < 0.85 else rng.randrange(16)
        tot = max(0, frame_len - len(eth) - 2) if rng.random() < 0.9 else rng.getrandbits(16)
        frag = 0 if rng.random() < 0.9 else rng.getrandbits(16)
        ip = (b"\x08\x00" + bytes([0x40 | ihl, 0]) + struct.pack("!HHHBB", tot & 0xFFFF, 0,
                                                                 frag, 64, proto)
              + b"\0\0" + rng.randbytes(8) + rng.randbytes(max(0, ihl * 4 - 20)))
    return eth[:12] + ip + l4


def _packet(rng: random.Random, grefs: list[int], ident: int) -> tuple[list[bytes], bytes]:
    """One tx chain: a mostly plausible packet, sometimes hostile in one field."""
    r = rng.random()
    if r < 0.04:  # multicast control
        etype = rng.choice((2, 3))
        addr = rng.choice((b"\x01\x00\x5e\x00\x00\x01", b"\x33\x33\x00\x00\x00\x01",
                           rng.randbytes(6)))
        return [TX_REQUEST.pack(rng.choice(grefs), 0, EXTRA, ident, 0),
                bytes([etype, 0]) + addr + bytes(4)], b""
    if r < 0.06:  # raw random slots
        n = rng.randrange(1, 6)
        return [TX_REQUEST.pack(rng.choice(grefs), rng.getrandbits(16),
                                rng.getrandbits(16) & 0xF, rng.getrandbits(16),
                                rng.getrandbits(16)) for _ in range(n)], b""
    gso = None
    if rng.random() < 0.3:
        gso = rng.choice((1, 2)) if rng.random() < 0.95 else rng.choice((0, 3, 255))
    big = gso is not None or rng.random() < 0.2
    frame_len = rng.randrange(14, 65535 if big else 1515)
    if rng.random() < 0.05:
        frame_len = rng.randrange(0, 20)
    # Slots: the first slot, then data slots, each inside its page.
    sizes = [min(frame_len, rng.choice((14, 54, 128, 1514, PAGE, rng.randrange(PAGE + 1))))]
    left = frame_len - sizes[0]
    cap = 19 if rng.random() < 0.97 else 22
    while left > 0 and len(sizes) < cap:
        sz = min(left, rng.choice((PAGE,) * 8 + (rng.randrange(1, PAGE + 1), 1)))
        if rng.random() < 0.03:
            sz = 0
        sizes.append(sz)
        left -= sz
    head = _headers(rng, frame_len, gso)
    flags = 0
    if rng.random() < 0.6:
        flags |= CSUM
    if rng.random() < 0.3:
        flags |= VALID
    out_extras = []
    if gso is not None:
        flags |= EXTRA
        gsize = rng.choice((1448, 536)) if rng.random() < 0.97 else 0
        out_extras.append(bytes([1, 0]) + struct.pack("<HBBH", gsize, gso, 0, 0)
                          + bytes(4))
        if rng.random() < 0.05:
            out_extras[-1] = bytes([1, 1]) + out_extras[-1][2:]
            out_extras.append(bytes([rng.choice((1, 4, 0, 9)), 0]) + rng.randbytes(10))
    slots = []
    for k, sz in enumerate(sizes):
        off = rng.randrange(0, PAGE - sz + 1)
        more = MORE if k < len(sizes) - 1 else 0
        fl = (flags | more) if k == 0 else more
        slots.append([rng.choice(grefs), off, fl, (ident + k) & 0xFFFF,
                      frame_len if k == 0 else sz, sz])
    if rng.random() < 0.08:  # one hostile field
        victim = slots[rng.randrange(len(slots))]
        what = rng.randrange(5)
        if what == 0:
            victim[0] = rng.getrandbits(rng.choice((10, 32)))
        elif what == 1:
            victim[1] = rng.getrandbits(12)
        elif what == 2:
            victim[4] = rng.getrandbits(rng.choice((12, 16)))
        elif what == 3:
            victim[2] ^= MORE
        else:
            victim[2] ^= rng.choice((EXTRA, CSUM, VALID))
    return _emit(slots, out_extras, head)


def _emit(slots: list[list[int]], extras: list[bytes],
          head: bytes) -> tuple[list[bytes], bytes]:
    out = []
    for k, (gref, off, fl, rid, size, _s) in enumerate(slots):
        out.append(TX_REQUEST.pack(gref & 0xFFFFFFFF, off & 0xFFFF, fl & 0xFFFF, rid,
                                   size & 0xFFFF))
        if k == 0:
            out.extend(extras)
    return out, head


def _place(w: World, chain: tuple[list[bytes], bytes]) -> list[bytes]:
    """Write the packet's headers where its first slot points (as a guest fills the
    page before it posts the request); return the slots."""
    slots, head = chain
    if head:
        gref, off, _fl, _rid, _size = TX_REQUEST.unpack(slots[0])
        if 0 <= gref < w.gt.entries:
            _flags, _domid, frame = w.gt.entry(gref)
            n = max(0, min(len(head), PAGE - off))
            if frame in FRAMES and n:
                w.ram.write(frame * PAGE + off, head[:n])
    return slots


def _chains(rng: random.Random, grefs: list[int], n: int) -> list[tuple[list[bytes], bytes]]:
    out = []
    ident = rng.getrandbits(16)
    for _ in range(n):
        out.append(_packet(rng, grefs, ident))
        ident = (ident + 32) & 0xFFFF
    return out


def _publish(w: World, rng: random.Random, chains: list[tuple[list[bytes], bytes]],
             tail: int) -> int:
    """Put the chains on the ring (and `tail` random trailing slots that are published
    but not part of them); returns the number of slots."""
    shared = w.shared
    prod = shared.idx[REQ_PROD]
    n = 0
    for c in chains:
        for s in _place(w, c):
            shared.write_slot(prod + n, s)
            n += 1
    for _ in range(tail):
        shared.write_slot(prod + n, rng.randbytes(12))
        n += 1
    shared.idx[REQ_PROD] = (prod + n) & 0xFFFFFFFF
    return n


def _drive(w: World) -> None:
    w.path.kick()
    for _ in range(10000):
        if not w.path._scheduled:
            return
        w.loop.run_until_complete(asyncio.sleep(0))
    raise Difference("a path never settles")


def _frames(w: World) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(w.peer.recv(1 << 17, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return out


def _state(w: World, frames: list[bytes]) -> dict[str, object]:
    credit = w.path.credit
    uses = w.table._uses
    return {
        "ring": bytes(w.ring_map),
        "frames": frames,
        "gnttab": os.pread(w.gt.fd, w.gt.size, 0),
        "uses": [i for i in range(len(uses)) if uses[i]],
        "ram": b"".join(w.ram.read(f * PAGE, PAGE) for f in FRAMES),
        "counters": {k: v for k, v in w.vif.counters.items() if v},
        "credit": None if credit is None else (credit.remaining, credit.waiting),
        "mcast": sorted(w.vif.mcast),
        "halted": (w.vif.halted, len(w.fatal)),
        "notified": w.notifies[0] > 0,
        "cons": (w.path.ring.req_cons, w.path.ring.rsp_prod_pvt),
        "dirty_log": dirty_log(w.mem),
    }


def dirty_log(mem: GuestMemory) -> tuple[list[int], list[int]]:
    """(guest frames, grant-table pages) the plane logged as written."""
    assert mem.log is not None
    bits, g = mem.log.bits(), mem.log.gnt_offset
    return ([n for n in range(mem.log.ram_pages) if bits[n >> 3] >> (n & 7) & 1],
            [k for k in range(mem.log.gnt_pages) if bits[g + (k >> 3)] >> (k & 7) & 1])


def run_case(kernel: nk.NetKernel, seed: int, rounds: int, per_round: int) -> int:
    """Both planes through `rounds` rounds of tx chains; returns the chains fed to each.
    Raises Difference at the first difference."""
    case = Case(seed)
    worlds = [case.build(None), case.build(kernel)]
    inputs = 0
    try:
        rngs = [random.Random(seed * 7919 + 1), random.Random(seed * 7919 + 1)]
        grefs = [_grants(r, w) for r, w in zip(rngs, worlds, strict=True)]
        if grefs[0] != grefs[1]:
            raise Difference("setup", "worlds differ")
        for rnd in range(rounds):
            states = []
            for r, w, g in zip(rngs, worlds, grefs, strict=True):
                n = r.randrange(1, per_round + 1)
                chains = _chains(r, g, n)
                used = sum(len(c[0]) for c in chains)
                free = w.shared.size - ((w.shared.idx[REQ_PROD] - w.path.ring.rsp_prod_pvt)
                                        & 0xFFFFFFFF)
                if used > free:
                    chains = chains[:1] if len(chains[0][0]) <= free else []
                tail = r.randrange(3) if r.random() < 0.1 else 0
                tail = max(0, min(tail, free - sum(len(c[0]) for c in chains)))
                _publish(w, r, chains, tail)
                if w is worlds[0]:
                    inputs += len(chains)
                _drive(w)
                states.append(_state(w, _frames(w)))
            a, b = states
            for key in a:
                if a[key] != b[key]:
                    raise Difference(f"seed {seed} round {rnd}: {key}",
                                     f"python {_short(a[key])} compiled {_short(b[key])}")
            if worlds[0].vif.halted or worlds[0].path._waiting_writable or (
                    worlds[0].path.credit is not None and worlds[0].path.credit.waiting):
                break
    finally:
        for w in worlds:
            w.close()
    return inputs


def _short(v: object) -> str:
    if isinstance(v, bytes):
        return f"<{len(v)} bytes {v[:64].hex()}>"
    if isinstance(v, list) and v and isinstance(v[0], bytes):
        return f"<{len(v)} frames, sizes {[len(x) for x in v][:20]}>"
    return repr(v)[:600]


def run(kernel: nk.NetKernel, n: int, seed: int) -> tuple[int, list[str]]:
    """At least n chains through both planes; returns (inputs, differences)."""
    rng = random.Random(seed)
    done = 0
    bad: list[str] = []
    while done < n:
        try:
            done += run_case(kernel, rng.getrandbits(48), rounds=rng.randrange(1, 30),
                             per_round=rng.choice((1, 4, 16, 40)))
        except Difference as e:
            bad.append(str(e))
            done += 1
            if len(bad) >= 5:
                break
    return done, bad
