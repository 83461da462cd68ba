"""The two blk data planes side by side: the same random and hostile rings, grant
tables (v1 and v2), indirect pages, in-flight tables and backing files go through the
pure-Python path (devices/blk/queue.py, the reference) and the compiled kernel
(backendd/dataplane); everything the guest or the VMM can see must come out identical.

Persistent rings (feature-persistent, each plane's own cache: persistent.py and the
kernel's) run in phases: after the first batch is served, the guest may rewrite grant
entries (revoke them, point them elsewhere, make them read-only, also those cached) and
posts another batch, which is served in turn; random cache limits, down to none, make
the purge, overflow and upgrade paths run. Each phase fits one batch (at most
max_pending requests), so both planes take, pin and release in the same order and their
caches must agree entry for entry (the purge order included).

Compared after each case: all of guest RAM (ring pages included; the order in which
responses sit in the ring may differ, so response slots are compared as a multiset and
the rest of the ring byte for byte), the grant table with its in-use bits (with
persistent grants also before the cache is let go, and the cache's entries in purge
order and its counters), the image
file's bytes and size, the in-flight table (headers, and its live entries as a
multiset), the counters, rsp_prod and whether the ring
was halted. Each plane runs in its own world (memfds, files), both filled alike.

Used by tests/test_dataplane_differential.py (a quick subset, and under the sanitizer
build) and by `python -m bench.fuzz --targets blk-diff` (>= 1,000,000 requests).
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import tempfile
from dataclasses import dataclass

from backendd.dataplane import kernel as K
from backendd.dataplane.blk import CompiledRingQueue
from backendd.devices.blk.config import BlkConfig
from backendd.devices.blk.image import Image
from backendd.devices.blk.persistent import PersistentGrants
from backendd.devices.blk.queue import Counters, RingQueue
from backendd.devices.blk.request import Geometry
from backendd.dirtylog import DirtyBitmap, RingLog, gnttab_offset, log_size
from backendd.evtchn import EventChannel
from backendd.grants import GrantTable
from backendd.guest import GuestGrantTable
from backendd.inflight import MAGIC, VERSION, InflightRegion, region_size, ring_id
from backendd.memory import GuestMemory
from rings.blkif import BLKIF_CODECS
from rings.consts import (
    GTF_READING,
    GTF_READONLY,
    GTF_SUB_PAGE,
    GTF_WRITING,
    BlkifAbi,
    BlkifOp,
)
from rings.ring import BackRing, SharedRing
from rings.sring import ring_entries

PAGE = 4096
U32, U64 = (1 << 32) - 1, (1 << 64) - 1
# Guest RAM: two regions with a hole between (frames 16..31 are not guest memory).
LAYOUT = [(0, 16), (32, 16)]
FRAMES = [f for start, n in LAYOUT for f in range(start, start + n)]
RAM_BYTES = len(FRAMES) * PAGE
IMAGE_SECTORS = 256
RING_GREF = 8            # grefs 8.. name the ring pages
DATA_GREFS = range(16, 48)  # random entries: data and indirect pages
INDIRECT_GREFS = (48, 49)   # well-formed indirect pages
IGNORED_STATS = ("inline_io", "pooled")  # where the I/O ran differs by design
LOG_RAM_PAGES = LAYOUT[-1][0] + LAYOUT[-1][1]  # the dirty log's frames: up to RAM's end
PGRANT_LIMITS = (0, 1, 2, 3, 5, 8, 16, 1056)  # cache bounds of persistent rings


def _fd_offset(frame: int) -> int:
    base = 0
    for start, n in LAYOUT:
        if start <= frame < start + n:
            return base + (frame - start) * PAGE
        base += n * PAGE
    raise ValueError(frame)


class World:
    """One guest and one disk for one plane."""

    def __init__(self, version: int, tmpdir: str, name: str) -> None:
        self.version = version
        self.ram_fd = os.memfd_create("diff-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.ram_fd, RAM_BYTES)
        self.gt = GuestGrantTable(nr_frames=1, version=version)
        self.mem = GuestMemory()
        off = 0
        for start, n in LAYOUT:
            self.mem.add_region(start * PAGE, n * PAGE, self.ram_fd, off)
            off += n * PAGE
        self.grants = GrantTable(self.mem)
        self.grants.set_table(self.gt.fd, 0, 1, version)
        # Logging on in both planes: the bitmaps must come out the same.
        self.log_fd = os.memfd_create("diff-log", os.MFD_CLOEXEC)
        self.log_size = log_size(LOG_RAM_PAGES, self.gt.size // PAGE)
        os.ftruncate(self.log_fd, self.log_size)
        self.mem.set_log(DirtyBitmap(self.log_fd, 0, self.log_size, LOG_RAM_PAGES))
        self.path = os.path.join(tmpdir, f"{name}.img")
        with open(self.path, "wb") as f:
            f.write(bytes(IMAGE_SECTORS * 512))
        self.image = Image(BlkConfig(self.path))
        self.if_fd = os.memfd_create("diff-inflight", os.MFD_CLOEXEC)
        os.ftruncate(self.if_fd, region_size(1))
        import mmap
        self.if_map = mmap.mmap(self.if_fd, region_size(1))

    def load(self, case: Case) -> None:
        os.pwrite(self.ram_fd, case.ram, 0)
        os.pwrite(self.gt.fd, case.gnttab, 0)
        os.pwrite(self.log_fd, bytes(self.log_size), 0)
        os.ftruncate(self.image.fd, 0)
        os.pwrite(self.image.fd, case.image, 0)
        self.if_map[:] = bytes(len(self.if_map))
        self.if_map[:len(case.table)] = case.table

    def close(self) -> None:
        self.image.close()
        self.grants.close()
        self.mem.close()
        os.close(self.log_fd)
        self.gt.close()
        self.if_map.close()
        os.close(self.if_fd)
        os.close(self.ram_fd)
        os.unlink(self.path)


@dataclass
class Case:
    version: int
    abi: BlkifAbi
    ring_frames: list[int]
    size: int
    start: int
    nreq: int  # requests the ring claims (req_prod - start); may exceed the ring
    ram: bytes
    gnttab: bytes
    image: bytes
    geometry: Geometry
    inflight: bool
    table: bytes  # the in-flight region as the VMM hands it over
    # Persistent grants: the cache's bound (None: not negotiated), and the phases after
    # the first: grant entries rewritten (gref, entry bytes, keep the in-use bits), then
    # request slots posted.
    pgrant_limit: int | None = None
    phases: list[tuple[list[tuple[int, bytes, bool]], list[bytes]]] | None = None


def _segment(rng: random.Random, grefs: list[int]) -> tuple[int, int, int]:
    gref = rng.choice(grefs) if rng.random() < 0.9 else rng.getrandbits(32)
    if rng.random() < 0.85:
        if rng.random() < 0.3:
            return gref, 0, 7
        first = rng.randrange(8)
        return gref, first, rng.randrange(first, 8)
    return gref, rng.randrange(256), rng.randrange(256)


def _sector(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.8:
        return rng.randrange(IMAGE_SECTORS + 8) & (~7 if rng.random() < 0.3 else ~0)
    return rng.choice((U64, U64 - 7, 1 << 63, rng.getrandbits(64)))


def make_case(rng: random.Random) -> Case:
    version = rng.choice((1, 2))
    abi = rng.choice((BlkifAbi.X86_64, BlkifAbi.X86_32))
    codecs = BLKIF_CODECS[abi]
    npages = rng.choice((1, 1, 1, 2, 4))
    size = ring_entries(npages * PAGE, codecs.entry_size)
    ring_frames = rng.sample(FRAMES, npages)
    others = [f for f in FRAMES if f not in ring_frames]
    indirect_frames = rng.sample(others, 2)
    data_frames = [f for f in others if f not in indirect_frames]

    ram = bytearray(rng.randbytes(RAM_BYTES))
    # Grant table: the ring pages; random data entries; two indirect pages.
    entry = 16 if version == 2 else 8
    gnt = bytearray(PAGE * (2 if version == 2 else 1))

    def pack(flags: int, domid: int, frame: int, sub: tuple[int, int] = (0, 0)) -> bytes:
        if version == 2:
            return struct.pack("<HHHHQ", flags, domid, *sub, frame)
        return struct.pack("<HHI", flags, domid, frame & U32)

    def put(gref: int, flags: int, domid: int, frame: int, sub: tuple[int, int] = (0, 0)
            ) -> None:
        gnt[gref * entry:(gref + 1) * entry] = pack(flags, domid, frame, sub)

    def data_entry() -> bytes:
        r = rng.random()
        frame = rng.choice(data_frames)
        if r < 0.6:
            return pack(1, 0, frame)
        if r < 0.7:
            return pack(1 | GTF_READONLY, 0, frame)
        if r < 0.8 and version == 2:
            off = rng.randrange(0, PAGE, 512)
            return pack(1 | GTF_SUB_PAGE, 0, frame,
                        (off, rng.choice((PAGE - off, 512, rng.randrange(PAGE + 200)))))
        if r < 0.85:
            return pack(1, 0, rng.choice((20, 100, 1 << 31)))  # not guest memory
        if r < 0.9:
            return pack(1, rng.randrange(1, 5), frame)  # another domain's grant
        return pack(rng.getrandbits(16) & ~0x18, rng.choice((0, 0, 7)), frame)

    for k, f in enumerate(ring_frames):
        put(RING_GREF + k, 1, 0, f)
    for g in DATA_GREFS:
        gnt[g * entry:(g + 1) * entry] = data_entry()
    grefs = list(DATA_GREFS)
    for g, f in zip(INDIRECT_GREFS, indirect_frames, strict=True):
        put(g, 1 | (GTF_READONLY if rng.random() < 0.5 else 0), 0, f)
        segs = b"".join(struct.pack("<IBBxx", *_segment(rng, grefs)) for _ in range(512))
        o = _fd_offset(f)
        ram[o:o + PAGE] = segs

    # The ring: header, then request slots (a few pages of it may straddle).
    start = rng.choice((0, rng.getrandbits(32), U32 - rng.randrange(40)))
    persistent = rng.random() < 0.4
    # A persistent ring's phases fit one batch each (see the module's docstring).
    most = min(64, size) if persistent else size
    # Now and then a producer index beyond the ring (corruption: the ring halts).
    beyond = rng.random() < 0.05
    nreq = size + rng.randrange(1, 1 << 16) if beyond else rng.randrange(most + 1)
    ring = bytearray(rng.randbytes(npages * PAGE))
    struct.pack_into("<IIII", ring, 0, (start + nreq) & U32, (start + 1) & U32,
                     start, (start + rng.randrange(3)) & U32)
    esize = codecs.entry_size
    for k in range(min(nreq, size)):
        slot = _request(rng, codecs, grefs) if rng.random() < 0.95 else rng.randbytes(esize)
        off = 64 + ((start + k) & (size - 1)) * esize
        ring[off:off + esize] = slot.ljust(esize, b"\0")[:esize]
    for k, f in enumerate(ring_frames):
        o = _fd_offset(f)
        ram[o:o + PAGE] = ring[k * PAGE:(k + 1) * PAGE]
    limit, phases = None, None
    if persistent:
        limit = rng.choice(PGRANT_LIMITS)
        phases = []
        for _ in range(rng.randrange(1, 5)):
            rewrites = []
            for _ in range(rng.choice((0, 0, 1, 2, 4))):
                g = rng.choice((*DATA_GREFS, *INDIRECT_GREFS, rng.randrange(64)))
                if g in INDIRECT_GREFS and rng.random() < 0.7:
                    body = pack(rng.choice((0, 1, 1 | GTF_READONLY)), 0,
                                indirect_frames[INDIRECT_GREFS.index(g)])
                else:
                    body = data_entry()
                rewrites.append((g, body, rng.random() < 0.5))
            # a few grefs again and again, as a frontend's pool of persistent pages
            pool = rng.sample(grefs, rng.choice((2, 4, 8, len(grefs))))
            slots = [_request(rng, codecs, pool) if rng.random() < 0.95
                     else rng.randbytes(esize) for _ in range(rng.randrange(most + 1))]
            if rng.random() < 0.4:
                # reads only: grefs cached read-only by the writes before are upgraded
                slots = [_as_read(slot) for slot in slots]
            phases.append((rewrites, slots))

    geo = Geometry(
        sectors=rng.choice((IMAGE_SECTORS, IMAGE_SECTORS, 200, IMAGE_SECTORS + 64, 0)),
        sector_size=rng.choice((512, 512, 4096)), readonly=rng.random() < 0.2,
        discard=rng.random() < 0.7, discard_secure=rng.random() < 0.2,
        max_indirect_segments=rng.choice((32, 256)))
    # The in-flight region: empty, or left by an earlier ring (no live generation, its
    # entries of random states and generations, which must be voided before reuse).
    table = b""
    if rng.random() < 0.5:
        t = bytearray(64 + 64 + 2 * size * 128)
        struct.pack_into("<8sII", t, 0, MAGIC, VERSION, 1)
        struct.pack_into("<IIIIII", t, 64, 0, size, rng.getrandbits(32), rng.randrange(5),
                         rng.getrandbits(32), rng.getrandbits(32))
        for k in range(2 * size):
            off = 128 + k * 128
            t[off:off + 128] = rng.randbytes(128)
            t[off] = rng.randrange(3)
            struct.pack_into("<I", t, off + 12, rng.randrange(5))
        table = bytes(t)
    return Case(version, abi, ring_frames, size, start, nreq, bytes(ram), bytes(gnt),
                rng.randbytes(IMAGE_SECTORS * 512), geo, rng.random() < 0.5, table,
                limit, phases)


def _request(rng: random.Random, codecs, grefs: list[int]) -> bytes:
    rid = rng.getrandbits(64)
    kind = rng.random()
    if kind < 0.45:
        op = rng.choice((0, 0, 1, 1, 2, 3)) if rng.random() < 0.95 else rng.randrange(256)
        nseg = rng.randrange(1, 12) if rng.random() < 0.9 else rng.randrange(256)
        segs = [x for _ in range(11) for x in _segment(rng, grefs)]
        if op in (2, 3) and rng.random() < 0.5:
            nseg = 0
        return codecs.request.struct.pack(op, nseg, 0, rid, _sector(rng), *segs)
    if kind < 0.7:
        inner = rng.randrange(2) if rng.random() < 0.9 else rng.randrange(256)
        nseg = rng.randrange(1, 40) if rng.random() < 0.8 else rng.randrange(1 << 16)
        ig = [rng.choice(INDIRECT_GREFS) if rng.random() < 0.9 else rng.choice(grefs)
              for _ in range(8)]
        return codecs.indirect.struct.pack(BlkifOp.INDIRECT, inner, nseg, rid,
                                           _sector(rng), 0, *ig)
    if kind < 0.85:
        n = rng.randrange(64) if rng.random() < 0.9 else rng.getrandbits(64)
        return codecs.discard.struct.pack(BlkifOp.DISCARD, rng.randrange(3), 0, rid,
                                          _sector(rng), n)
    if kind < 0.92:
        return codecs.request.struct.pack(rng.choice((2, 3)), 0, 0, rid, _sector(rng),
                                          *([0] * 33))
    op = rng.choice((4, 7, 8, 255, rng.randrange(256)))
    return codecs.discard.struct.pack(op, 0, 0, rid, 0, 0)


def _as_read(slot: bytes) -> bytes:
    """A WRITE slot made a READ (an indirect one's inner operation too)."""
    if slot[0] == BlkifOp.WRITE:
        return bytes((BlkifOp.READ,)) + slot[1:]
    if slot[0] == BlkifOp.INDIRECT and slot[1] == BlkifOp.WRITE:
        return slot[:1] + bytes((BlkifOp.READ,)) + slot[2:]
    return slot


def _sync_submit(loop: asyncio.AbstractEventLoop):
    """The Python plane's I/O pool, run in place, in ring order."""
    def submit(fn, *args) -> asyncio.Future:
        fut = loop.create_future()
        try:
            fut.set_result(fn(*args))
        except Exception as e:  # handed to the queue, as a pool does
            fut.set_exception(e)
        return fut
    return submit


async def _settle(q) -> None:
    while True:
        for _ in range(3):
            await asyncio.sleep(0)
        if q._idle.is_set() and not q._scheduled:
            return


def run_plane(world: World, case: Case, plane: str, loop: asyncio.AbstractEventLoop,
              kernel: K.Kernel | None) -> dict:
    world.load(case)
    codecs = BLKIF_CODECS[case.abi]
    grants = world.grants
    maps = [grants.map(RING_GREF + k, writable=True) for k in range(len(case.ring_frames))]
    shared = SharedRing.over_pages([m.page_view() for m in maps], codecs.entry_size)
    assert shared.size == case.size
    table, rec = None, None
    if case.inflight:
        region = InflightRegion(memoryview(world.if_map), 1)
        table = region.queue(0, shared.size)
        rec = table.plan(shared.idx[0], shared.idx[2], ring_id([RING_GREF], 0))
    if rec is not None and not rec.fresh:
        back = BackRing(shared, rec.rsp_prod)
        back.req_cons = rec.req_cons
    else:
        back = BackRing.attach(shared)
    back.log = RingLog(world.mem, [m.frame for m in maps])  # as the device sets it
    counters = Counters()
    corrupt: list[str] = []
    channel = EventChannel(0, os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
                           os.eventfd(0, os.EFD_CLOEXEC))
    args = dict(index=0, back=back, ring_maps=maps, channel=channel, codecs=codecs,
                geometry=case.geometry, image=world.image, grants=grants,
                submit=_sync_submit(loop), loop=loop, counters=counters,
                on_corrupt=corrupt.append, inflight=table, recovery=rec)
    limit = case.pgrant_limit
    if plane == "compiled":
        q = CompiledRingQueue(kernel=kernel, **args, pgrant_limit=limit)
    else:
        q = RingQueue(**args, pgrants=None if limit is None
                      else PersistentGrants(grants, limit))

    def rsp_prod() -> int:
        return q.state()["rsp_prod_pvt"] if plane == "compiled" else back.rsp_prod_pvt

    q.start()
    loop.run_until_complete(_settle(q))
    responses = []
    seen, prod = case.start, (case.start + case.nreq) & U32
    for rewrites, slots in case.phases or []:
        # The guest takes the responses (their slots may take requests now), rewrites
        # grant entries, posts the next batch and kicks.
        responses.append(_take_responses(world, case, seen, rsp_prod()))
        seen = rsp_prod()
        _rewrite_grants(world, case, rewrites)
        prod = _post(world, case, prod, slots)
        q._schedule()
        loop.run_until_complete(_settle(q))
    loop.run_until_complete(q.stop())
    rsp_prod_pvt = rsp_prod()
    pg = {}
    if q.pgrants is not None:
        pg = {"pgrants": q.pgrants.saved(), "pgrant_stats": q.pgrants.stats(),
              "pgrants_cached": len(q.pgrants),
              "gnttab_cached": os.pread(world.gt.fd, world.gt.size, 0)}
    q.release()
    table = None
    if case.inflight:
        del region
    in_use = grants.grefs_in_use()
    responses.append(_take_responses(world, case, seen, rsp_prod_pvt))
    ram = os.pread(world.ram_fd, RAM_BYTES, 0)
    stats = {k: v for k, v in counters.as_dict().items() if k not in IGNORED_STATS}
    size = os.fstat(world.image.fd).st_size
    return {
        "ram": bytes(ram), "responses": responses, "rsp_prod_pvt": rsp_prod_pvt,
        "gnttab": os.pread(world.gt.fd, world.gt.size, 0), "grefs_in_use": in_use,
        "image": os.pread(world.image.fd, size, 0), "image_size": size,
        "inflight": _inflight_bytes(world, case), "stats": stats, "halted": q.halted,
        "corrupt": len(corrupt),
        "dirty_log": _dirty(world),
    } | pg


def _rewrite_grants(world: World, case: Case, rewrites: list[tuple[int, bytes, bool]]
                    ) -> None:
    """A guest rewriting entries, cached ones included; `keep`: the in-use bits the
    backend set in a v1 entry's flags stay as they are (v2 keeps them in the status
    words, which the guest does not write here)."""
    esize = 16 if case.version == 2 else 8
    for gref, body, keep in rewrites:
        off = gref * esize
        if keep and case.version == 1:
            (flags,) = struct.unpack("<H", os.pread(world.gt.fd, 2, off))
            inuse = flags & (GTF_READING | GTF_WRITING)
            body = struct.pack("<H", struct.unpack_from("<H", body)[0] | inuse) + body[2:]
        os.pwrite(world.gt.fd, body, off)


def _post(world: World, case: Case, prod: int, slots: list[bytes]) -> int:
    """Write request slots at req_prod onwards and publish them; the new req_prod."""
    esize = BLKIF_CODECS[case.abi].entry_size
    for k, slot in enumerate(slots):
        _ring_write(case, world, 64 + ((prod + k) & (case.size - 1)) * esize,
                    slot.ljust(esize, b"\0")[:esize])
    prod = (prod + len(slots)) & U32
    _ring_write(case, world, 0, struct.pack("<I", prod))
    return prod


def _ring_write(case: Case, world: World, off: int, data: bytes) -> None:
    for k, b in enumerate(data):
        page, pos = divmod(off + k, PAGE)
        os.pwrite(world.ram_fd, bytes((b,)), _fd_offset(case.ring_frames[page]) + pos)


def _dirty(world: World) -> tuple[list[int], list[int]]:
    """The guest frames and grant-table pages the plane logged as written."""
    bits = os.pread(world.log_fd, world.log_size, 0)
    g = gnttab_offset(LOG_RAM_PAGES)
    ram = [n for n in range(LOG_RAM_PAGES) if bits[n >> 3] >> (n & 7) & 1]
    gnt = [k for k in range((world.log_size - g) * 8) if bits[g + (k >> 3)] >> (k & 7) & 1]
    return ram, gnt


def _inflight_bytes(world: World, case: Case) -> tuple:
    """The region and queue headers byte for byte, and the entries of the current
    generation that are not FREE as a multiset: which free entry a request lands in
    depends on the order earlier responses were published, and recovery ignores FREE
    entries and those of older generations."""
    if not case.inflight:
        return ()
    table = bytes(world.if_map[:64 + 64 + 2 * case.size * 128])
    gen = table[64 + 12:64 + 16]
    live = sorted(table[off:off + 128] for off in range(128, len(table), 128)
                  if table[off] != 0 and table[off + 12:off + 16] == gen)
    return table[:128], live


def _take_responses(world: World, case: Case, first: int, end: int) -> list[bytes]:
    """Cut the response slots first..end out of the ring (zeroed in guest memory);
    returns them sorted."""
    ram = bytearray(os.pread(world.ram_fd, RAM_BYTES, 0))
    out = _mask_responses(ram, case, first, end)
    os.pwrite(world.ram_fd, ram, 0)
    return out


def _mask_responses(ram: bytearray, case: Case, first: int, end: int) -> list[bytes]:
    """Cut the response slots out of the ring (zeroed in `ram`); returns them sorted."""
    codecs = BLKIF_CODECS[case.abi]
    esize, rsize = codecs.entry_size, codecs.response.size
    out = []
    for k in range((end - first) & U32):
        off = 64 + ((first + k) & (case.size - 1)) * esize
        chunk = bytearray()
        for b in range(off, off + rsize):
            page, pos = divmod(b, PAGE)
            o = _fd_offset(case.ring_frames[page]) + pos
            chunk.append(ram[o])
            ram[o] = 0
        out.append(bytes(chunk))
    return sorted(out)


def differences(a: dict, b: dict) -> list[str]:
    diff = []
    for key in a:
        if a[key] != b[key]:
            if isinstance(a[key], bytes) and len(a[key]) == len(b[key]):
                first = next(i for i, (x, y) in enumerate(zip(a[key], b[key], strict=True))
                             if x != y)
                diff.append(f"{key} differs first at byte {first}")
            else:
                diff.append(f"{key}: python {str(a[key])[:300]} / compiled "
                            f"{str(b[key])[:300]}")
    return diff


class Differ:
    """Worlds for both planes (per grant table version), reused across cases."""

    def __init__(self, kernel: K.Kernel) -> None:
        self.kernel = kernel
        self.tmp = tempfile.TemporaryDirectory(prefix="blkdiff-")
        self.loop = asyncio.new_event_loop()
        self.worlds = {(v, p): World(v, self.tmp.name, f"{p}{v}")
                       for v in (1, 2) for p in ("python", "compiled")}

    def run(self, case: Case) -> list[str]:
        a = run_plane(self.worlds[case.version, "python"], case, "python", self.loop, None)
        b = run_plane(self.worlds[case.version, "compiled"], case, "compiled", self.loop,
                      self.kernel)
        return differences(a, b)

    def close(self) -> None:
        for w in self.worlds.values():
            w.close()
        self.loop.close()
        self.tmp.cleanup()


def run(n_requests: int, seed: int, kernel: K.Kernel | None = None) -> tuple[int, int, list]:
    """Cases until `n_requests` request slots went through both planes. Returns
    (requests, cases, [(case seed, differences), ...])."""
    kernel = kernel or K.load()
    if kernel is None:
        raise RuntimeError("the blk kernel is not built (make kernel)")
    differ = Differ(kernel)
    done = cases = 0
    bad = []
    # One I/O thread runs a ring's jobs in ring order, as the in-place pool above does
    # for the Python plane, so overlapping writes land in the same order on both.
    threads = kernel.io_threads(0)
    kernel.io_threads(1)
    try:
        while done < n_requests:
            case_seed = seed * 1_000_003 + cases
            case = make_case(random.Random(case_seed))
            d = differ.run(case)
            if d:
                bad.append((case_seed, d))
            done += max(1, min(case.nreq, case.size)) + sum(
                len(slots) for _, slots in case.phases or [])
            cases += 1
    finally:
        kernel.io_threads(threads)
        differ.close()
    return done, cases, bad


if __name__ == "__main__":
    import sys
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    requests, ncases, failures = run(n, int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    print(f"{requests} requests in {ncases} cases, {len(failures)} with differences")
    for s, d in failures[:10]:
        print(s, d)
    sys.exit(1 if failures else 0)
