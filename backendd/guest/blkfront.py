"""The simulated guest's block frontend (what Linux's xen-blkfront does, in asyncio).

It lays out requests the way a real guest may: each segment a random slice of a granted
page (random first_sect/last_sect), indirect requests for anything that does not fit in
11 segments (up to 1 MiB), data pages granted read-only for writes and writable for
reads, many requests in flight on every queue. After each response it revokes the
request's grants; a refused revoke (the backend still holds the page) is recorded in
`refused_revokes` and the page is never reused.

With persistent grants (`persistent=True` and the backend's feature-persistent=1), as
Linux's blkfront does, each queue keeps a pool of pages granted once (writable) and
copies data through them: a write is copied into pool pages before the request, a read
copied out after the response, and the grants go back to the pool instead of being
revoked. The pool grows when a request needs more pages than are free; its grants are
revoked only by close().

Responses are collected without blocking the loop: each queue's call eventfd is watched
with loop.add_reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from rings.blkif import BLKIF_CODECS
from rings.consts import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_PROTOCOL_NAMES,
    PAGE_SIZE,
    SECTOR_SIZE,
    BlkifOp,
    BlkifStatus,
)
from rings.ring import FrontRing, SharedRing

from .evtchn import GuestPort, new_channel_pair
from .gnttab import GuestGrantTable
from .memory import GuestRAM

_ABI_BY_NAME = {name: abi for abi, name in BLKIF_PROTOCOL_NAMES.items()}
SEGS_PER_INDIRECT_PAGE = PAGE_SIZE // 8


class BlkIOError(Exception):
    def __init__(self, op: int, status: int) -> None:
        super().__init__(f"operation {op}: status {status}")
        self.op = op
        self.status = status


@dataclass
class _Queue:
    index: int
    pages: list[int]
    grefs: list[int]
    shared: SharedRing
    front: FrontRing
    port: GuestPort
    call_fd: int  # our own duplicate of the call eventfd, watched by the loop
    daemon_fds: tuple[int, int]  # (kick, call) for the daemon
    waiters: dict[int, asyncio.Future] = field(default_factory=dict)
    space: asyncio.Event = field(default_factory=asyncio.Event)
    # Persistent grants: (gref, gfn) free for the next request, and every one granted.
    pool_free: list[tuple[int, int]] = field(default_factory=list)
    pool: list[tuple[int, int]] = field(default_factory=list)


class BlkFront:
    def __init__(self, ram: GuestRAM, gnttab: GuestGrantTable, devid: int, *,
                 queues: int = 1, ring_order: int = 0, abi: str = "x86_64-abi",
                 backend_keys: Mapping[str, str] | None = None, first_port: int = 1,
                 seed: int = 0, domid: int = 0, random_layout: bool = True,
                 persistent: bool = False) -> None:
        self.ram = ram
        self.gnttab = gnttab
        self.devid = devid
        self.abi_name = abi
        self.codecs = BLKIF_CODECS[_ABI_BY_NAME[abi]]
        self.ring_order = ring_order
        self.domid = domid
        self.rng = random.Random(seed)
        # False: whole pages, one segment per 4 KiB, as Linux lays out page-cache I/O.
        self.random_layout = random_layout
        self.persistent = persistent  # we say feature-persistent=1
        self.backend_keys: dict[str, str] = dict(backend_keys or {})
        self.refused_revokes: list[int] = []
        self.stray_responses: list[bytes] = []
        self._free_pages: list[int] = []
        self._next_id = 0
        self._rr = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.queues: list[_Queue] = []
        for q in range(queues):
            pages = [ram.alloc_page() for _ in range(1 << ring_order)]
            grefs = [gnttab.grant_access(gfn, domid) for gfn in pages]
            shared = SharedRing.over_pages([ram.page(gfn) for gfn in pages],
                                           self.codecs.entry_size)
            shared.init()
            port, kick, call = new_channel_pair(first_port + q)
            self.queues.append(_Queue(q, pages, grefs, shared, FrontRing(shared), port,
                                      os.dup(call), (kick, call)))

    # --- xenbus side -------------------------------------------------------------------

    def frontend_keys(self) -> dict[str, str]:
        keys = {"protocol": self.abi_name,
                "feature-persistent": "1" if self.persistent else "0"}
        multi = len(self.queues) > 1
        if multi:
            keys["multi-queue-num-queues"] = str(len(self.queues))
        if self.ring_order:
            keys["ring-page-order"] = str(self.ring_order)
        for q in self.queues:
            prefix = f"queue-{q.index}/" if multi else ""
            if self.ring_order:
                for i, gref in enumerate(q.grefs):
                    keys[f"{prefix}ring-ref{i}"] = str(gref)
            else:
                keys[f"{prefix}ring-ref"] = str(q.grefs[0])
            keys[f"{prefix}event-channel"] = str(q.port.port)
        return keys

    def channels(self) -> list[tuple[int, int, int]]:
        """(port, kick_fd, call_fd): the daemon's ends; whoever takes them owns them."""
        return [(q.port.port, *q.daemon_fds) for q in self.queues]

    def update_backend_keys(self, keys: Mapping[str, str]) -> None:
        self.backend_keys.update(keys)

    @property
    def sector_size(self) -> int:
        return int(self.backend_keys.get("sector-size", SECTOR_SIZE))

    @property
    def use_persistent(self) -> bool:
        """Persistent grants in use: both ends said 1."""
        return self.persistent and self.backend_keys.get("feature-persistent") == "1"

    @property
    def pool_size(self) -> int:
        return sum(len(q.pool) for q in self.queues)

    @property
    def max_indirect_segments(self) -> int:
        return int(self.backend_keys.get("feature-max-indirect-segments", 0))

    def start(self) -> None:
        """Begin collecting responses (call once, on the running loop)."""
        self._loop = asyncio.get_running_loop()
        for q in self.queues:
            q.space.set()
            self._loop.add_reader(q.call_fd, self._on_call, q)

    def new_channels(self) -> list[tuple[int, int, int]]:
        """Fresh event channels for every queue, as a VMM makes for a restarted daemon
        (the old daemon's eventfds died with it). Returns the daemon's ends, like
        channels(); the rings, grants and requests in flight are kept."""
        for q in self.queues:
            if self._loop is not None:
                self._loop.remove_reader(q.call_fd)
            os.close(q.call_fd)
            q.port.close()
            port, kick, call = new_channel_pair(q.port.port)
            q.port, q.call_fd, q.daemon_fds = port, os.dup(call), (kick, call)
            if self._loop is not None:
                self._loop.add_reader(q.call_fd, self._on_call, q)
        return self.channels()

    # --- responses ---------------------------------------------------------------------

    def _on_call(self, q: _Queue) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(q.call_fd)
        while True:
            for raw in q.front.take_responses():
                rid, op, status = self.codecs.response.unpack_from(raw)
                fut = q.waiters.pop(rid, None)
                if fut is None:
                    self.stray_responses.append(raw)
                elif not fut.done():
                    fut.set_result((op, status))
            if not q.front.final_check_for_responses():
                break
        q.space.set()

    # --- requests ----------------------------------------------------------------------

    def new_id(self) -> int:
        # Spread ids over 64 bits so a backend that truncates them is caught.
        self._next_id += 1
        return (self._next_id * 0x9E3779B97F4A7C15) & (2**64 - 1)

    def _pick(self, queue: int | None) -> _Queue:
        if queue is None:
            queue = self._rr
            self._rr = (self._rr + 1) % len(self.queues)
        return self.queues[queue]

    async def send_raw(self, raw: bytes, rid: int, queue: int | None = 0) -> tuple[int, int]:
        """Put one request slot as given and wait for the response to `rid`:
        (operation, status). Tests use it to send malformed requests."""
        return await self._send(raw, rid, self._pick(queue))

    async def _send(self, raw: bytes, rid: int, q: _Queue) -> tuple[int, int]:
        while q.front.free_requests() == 0:
            q.space.clear()
            await q.space.wait()
        assert self._loop is not None, "start() first"
        fut = self._loop.create_future()
        q.waiters[rid] = fut
        q.front.put_request(raw)
        if q.front.push_requests():
            q.port.send()
        return await fut

    def _page(self) -> int:
        return self._free_pages.pop() if self._free_pages else self.ram.alloc_page()

    def _grant(self, q: _Queue | None, readonly: bool) -> tuple[int, int]:
        """(gref, gfn) for one page of a request: from the queue's persistent pool (granted
        writable once, as Linux's blkfront does), or a fresh page and grant."""
        if q is None:
            gfn = self._page()
            return self.gnttab.grant_access(gfn, self.domid, readonly=readonly), gfn
        if not q.pool_free:
            gfn = self._page()
            q.pool.append((self.gnttab.grant_access(gfn, self.domid), gfn))
            q.pool_free.append(q.pool[-1])
        return q.pool_free.pop()

    def _done(self, q: _Queue | None, grants: list[tuple[int, int]]) -> None:
        if q is None:
            self._revoke(grants)
        else:
            q.pool_free.extend(grants)  # kept granted for the next request

    def _revoke(self, grants: list[tuple[int, int]]) -> None:
        for gref, gfn in grants:
            if self.gnttab.end_access(gref):
                self._free_pages.append(gfn)
            else:
                self.refused_revokes.append(gref)  # leak the page: the backend has it

    def _layout(self, nsectors: int, max_segs: int) -> list[tuple[int, int]]:
        """(first_sect, nr_sectors) per segment: random slices of pages that still fit in
        max_segs segments."""
        segs: list[tuple[int, int]] = []
        left = nsectors
        whole_pages = self.sector_size > SECTOR_SIZE or not self.random_layout
        while left:
            budget = max_segs - len(segs) - 1
            first = 0 if whole_pages else self.rng.randint(0, 7)
            n = min(8, left) if whole_pages else self.rng.randint(1, min(8 - first, left))
            if -(-(left - n) // 8) > budget:  # random choice would not fit: use a page
                first, n = 0, min(8, left)
            segs.append((first, n))
            left -= n
        return segs

    async def _data_request(self, op: int, sector: int, nbytes: int,
                            data: bytes | None, queue: int | None,
                            indirect: bool | None) -> bytes:
        if nbytes <= 0 or nbytes % self.sector_size:
            raise ValueError(f"{nbytes} bytes: not whole {self.sector_size}-byte sectors")
        nsectors = nbytes // SECTOR_SIZE
        limit = self.max_indirect_segments
        use_indirect = indirect if indirect is not None else \
            -(-nsectors // 8) > BLKIF_MAX_SEGMENTS_PER_REQUEST or bool(
                limit and self.random_layout and self.rng.random() < 0.2)
        max_segs = limit if use_indirect else BLKIF_MAX_SEGMENTS_PER_REQUEST
        if use_indirect and not limit:
            raise ValueError("backend does not offer indirect requests")
        if -(-nsectors // 8) > max_segs:
            raise ValueError(f"{nbytes} bytes do not fit one request")
        layout = self._layout(nsectors, max_segs)
        readonly = op == BlkifOp.WRITE  # the backend only reads pages we write from
        q = self._pick(queue)
        pool = q if self.use_persistent else None
        grants: list[tuple[int, int]] = []
        segs: list[tuple[int, int, int]] = []
        slices: list[tuple[int, int, int]] = []  # (gfn, byte offset, length)
        pos = 0
        for first, n in layout:
            gref, gfn = self._grant(pool, readonly)
            if data is not None:
                self.ram.write(gfn * PAGE_SIZE + first * SECTOR_SIZE,
                               data[pos:pos + n * SECTOR_SIZE])
            grants.append((gref, gfn))
            segs.append((gref, first, first + n - 1))
            slices.append((gfn, first * SECTOR_SIZE, n * SECTOR_SIZE))
            pos += n * SECTOR_SIZE
        rid = self.new_id()
        if use_indirect:
            raw = self._indirect(op, rid, sector, segs, grants, pool)
        else:
            flat = [v for s in segs for v in s]
            flat += [0, 0, 0] * (BLKIF_MAX_SEGMENTS_PER_REQUEST - len(segs))
            raw = self.codecs.request.pack(op, len(segs), self.devid & 0xFFFF, rid, sector,
                                           *flat)
        try:
            rop, status = await self._send(raw, rid, q)
        except BaseException:
            # No response: the backend may still use the pages. Fresh grants are revoked
            # (refused ones leak, see _revoke); pool grants stay out of the free pool.
            if pool is None:
                self._revoke(grants)
            raise
        out = b""
        if status == BlkifStatus.OKAY and op == BlkifOp.READ:
            out = b"".join(self.ram.read(gfn * PAGE_SIZE + off, n) for gfn, off, n in slices)
        self._done(pool, grants)
        if status != BlkifStatus.OKAY or rop != op:
            raise BlkIOError(rop, status)
        return out

    def _indirect(self, op: int, rid: int, sector: int, segs: list[tuple[int, int, int]],
                  grants: list[tuple[int, int]], pool: _Queue | None) -> bytes:
        seg_codec = self.codecs.segment
        igrefs = []
        for start in range(0, len(segs), SEGS_PER_INDIRECT_PAGE):
            gref, gfn = self._grant(pool, True)
            page = bytearray(PAGE_SIZE)
            for i, seg in enumerate(segs[start:start + SEGS_PER_INDIRECT_PAGE]):
                seg_codec.pack_into(page, i * 8, *seg)
            self.ram.write(gfn * PAGE_SIZE, page)
            grants.append((gref, gfn))
            igrefs.append(gref)
        igrefs += [0] * (8 - len(igrefs))
        return self.codecs.indirect.pack(BlkifOp.INDIRECT, op, len(segs), rid, sector,
                                         self.devid & 0xFFFF, *igrefs)

    async def read(self, sector: int, nbytes: int, *, queue: int | None = None,
                   indirect: bool | None = None) -> bytes:
        return await self._data_request(BlkifOp.READ, sector, nbytes, None, queue, indirect)

    async def write(self, sector: int, data: bytes, *, queue: int | None = None,
                    indirect: bool | None = None) -> None:
        await self._data_request(BlkifOp.WRITE, sector, len(data), data, queue, indirect)

    async def flush(self, *, queue: int | None = None,
                    op: int = BlkifOp.FLUSH_DISKCACHE) -> None:
        rid = self.new_id()
        raw = self.codecs.request.pack(op, 0, self.devid & 0xFFFF, rid, 0, *[0] * 33)
        rop, status = await self.send_raw(raw, rid, queue)
        if status != BlkifStatus.OKAY:
            raise BlkIOError(rop, status)

    async def discard(self, sector: int, nsectors: int, *, secure: bool = False,
                      queue: int | None = None) -> None:
        rid = self.new_id()
        raw = self.codecs.discard.pack(BlkifOp.DISCARD, int(secure), self.devid & 0xFFFF,
                                       rid, sector, nsectors)
        rop, status = await self.send_raw(raw, rid, queue)
        if status != BlkifStatus.OKAY:
            raise BlkIOError(rop, status)

    # --- teardown ----------------------------------------------------------------------

    def close(self) -> None:
        for q in self.queues:
            if self._loop is not None:
                self._loop.remove_reader(q.call_fd)
            for fut in q.waiters.values():
                fut.cancel()
            os.close(q.call_fd)
            q.port.close()
            q.shared.release()
            self._revoke(list(zip(q.grefs, q.pages, strict=True)))
            self._revoke(q.pool)  # persistent grants end only here, as in Linux
            q.pool, q.pool_free = [], []
        self.queues = []
        # Pages go back to the guest's allocator (those the backend still holds do not).
        for gfn in self._free_pages:
            self.ram.free_page(gfn)
        self._free_pages.clear()
