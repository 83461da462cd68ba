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

For callers that think in bytes, read_at/write_at take any offset and length, split them
into requests and read-modify-write partly covered sectors. At most max_inflight requests
hold pages and grants at once; when the grant table or RAM is full a request waits for
one in flight to end. watch(client) makes pending requests fail with ConnectionLost when
the daemon goes away, instead of waiting for a response that will never come.
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
from .vmm import ConnectionLost, VmmClient

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
                 persistent: bool = False, max_inflight: int | None = None) -> None:
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
        self.events = 0  # events (call eventfd wake-ups) received
        self._watched: VmmClient | None = None
        self._free_pages: list[int] = []
        self._next_id = 0
        self._rr = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._init_bounds(max_inflight)
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

    @property
    def started(self) -> bool:
        """Whether start() ran: responses are being collected."""
        return self._loop is not None

    def start(self) -> None:
        """Begin collecting responses (call once, on the running loop)."""
        self._loop = asyncio.get_running_loop()
        for q in self.queues:
            q.space.set()
            self._loop.add_reader(q.call_fd, self._on_call, q)

    def new_channels(self) -> list[tuple[int, int, int]]:
        """Fresh event channels for every queue, as a VMM makes for a restarted daemon
        (the old daemon's eventfds died with it) or for the destination of a migration.
        Returns the daemon's ends, like channels(); the rings, grants and requests in
        flight are kept. A notification pending on an old channel is carried over to
        the new one, as a VMM carries an event channel's pending bit."""
        for q in self.queues:
            if self._loop is not None:
                self._loop.remove_reader(q.call_fd)
            try:
                pending = os.eventfd_read(q.call_fd)
            except BlockingIOError:
                pending = 0
            os.close(q.call_fd)
            q.port.close()
            port, kick, call = new_channel_pair(q.port.port)
            q.port, q.call_fd, q.daemon_fds = port, os.dup(call), (kick, call)
            if pending:
                os.eventfd_write(q.call_fd, 1)
            if self._loop is not None:
                self._loop.add_reader(q.call_fd, self._on_call, q)
        return self.channels()

    # --- responses ---------------------------------------------------------------------

    def _on_call(self, q: _Queue) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(q.call_fd)
            self.events += 1
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
            self._check_lost()
            q.space.clear()
            await q.space.wait()
        self._check_lost()
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
            return self._grant_page(gfn, readonly), gfn
        if not q.pool_free:
            try:
                gfn = self._page()
                q.pool.append((self._grant_page(gfn, False), gfn))
            except MemoryError:
                q.pool.append(self._borrow_pooled(q))
            q.pool_free.append(q.pool[-1])
        return q.pool_free.pop()

    def _borrow_pooled(self, q: _Queue) -> tuple[int, int]:
        """Grant table or RAM full: move an idle persistent grant from another queue's
        pool into q's (a grant may be used on any ring). MemoryError if none is idle."""
        for other in self.queues:
            if other is not q and other.pool_free:
                entry = other.pool_free.pop()
                other.pool.remove(entry)
                return entry
        raise MemoryError("grant table or guest RAM full, no idle persistent grant")

    def _grant_page(self, gfn: int, readonly: bool) -> int:
        try:
            return self.gnttab.grant_access(gfn, self.domid, readonly=readonly)
        except MemoryError:  # grant table full: the page is not lost
            self._free_pages.append(gfn)
            raise

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
        async with self._slot():
            return await self._data_request_in_slot(op, sector, data, queue, use_indirect,
                                                    layout)

    async def _data_request_in_slot(self, op: int, sector: int, data: bytes | None,
                                    queue: int | None, use_indirect: bool,
                                    layout: list[tuple[int, int]]) -> bytes:
        readonly = op == BlkifOp.WRITE  # the backend only reads pages we write from
        q = self._pick(queue)
        pool = q if self.use_persistent else None
        while True:
            grants: list[tuple[int, int]] = []
            segs: list[tuple[int, int, int]] = []
            slices: list[tuple[int, int, int]] = []  # (gfn, byte offset, length)
            pos = 0
            rid = self.new_id()
            try:
                for first, n in layout:
                    gref, gfn = self._grant(pool, readonly)
                    if data is not None:
                        self.ram.write(gfn * PAGE_SIZE + first * SECTOR_SIZE,
                                       data[pos:pos + n * SECTOR_SIZE])
                    grants.append((gref, gfn))
                    segs.append((gref, first, first + n - 1))
                    slices.append((gfn, first * SECTOR_SIZE, n * SECTOR_SIZE))
                    pos += n * SECTOR_SIZE
                if use_indirect:
                    raw = self._indirect(op, rid, sector, segs, grants, pool)
                else:
                    flat = [v for s in segs for v in s]
                    flat += [0, 0, 0] * (BLKIF_MAX_SEGMENTS_PER_REQUEST - len(segs))
                    raw = self.codecs.request.pack(op, len(segs), self.devid & 0xFFFF, rid,
                                                   sector, *flat)
            except MemoryError:
                # Grant table or RAM full: give back what we took and wait for a request
                # in flight to end (raises if none is, so nothing could ever free them).
                self._done(pool, grants)
                await self._wait_for_resources()
                continue
            break
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
        async with self._slot():
            rop, status = await self.send_raw(raw, rid, queue)
        if status != BlkifStatus.OKAY:
            raise BlkIOError(rop, status)

    async def discard(self, sector: int, nsectors: int, *, secure: bool = False,
                      queue: int | None = None) -> None:
        rid = self.new_id()
        raw = self.codecs.discard.pack(BlkifOp.DISCARD, int(secure), self.devid & 0xFFFF,
                                       rid, sector, nsectors)
        async with self._slot():
            rop, status = await self.send_raw(raw, rid, queue)
        if status != BlkifStatus.OKAY:
            raise BlkIOError(rop, status)

    # --- bounds: requests in flight, grant table and RAM --------------------------------

    def _init_bounds(self, max_inflight: int | None) -> None:
        # At most this many requests between taking their resources and their response;
        # None: as many as the rings hold. Callers beyond it wait their turn.
        self.max_inflight = max_inflight
        self._slots: asyncio.Semaphore | None = None
        self._holding = 0  # requests holding grants and pages
        self._released = asyncio.Event()
        self._lost: BaseException | None = None

    @contextlib.asynccontextmanager
    async def _slot(self):
        if self._slots is None:
            bound = self.max_inflight or sum(q.front.size for q in self.queues)
            self._slots = asyncio.Semaphore(max(1, bound))
        async with self._slots:
            self._check_lost()
            self._holding += 1
            try:
                yield
            finally:
                self._holding -= 1
                self._released.set()

    async def _wait_for_resources(self) -> None:
        """The grant table or RAM is full: wait until a request in flight gives some back.
        With none in flight nothing ever will: the guest is too small for the request."""
        self._check_lost()
        if self._holding <= 1:  # only the caller itself
            raise MemoryError("grant table or guest RAM too small for one request")
        self._released.clear()
        await self._released.wait()
        self._check_lost()

    # --- losing the daemon ----------------------------------------------------------------

    def _check_lost(self) -> None:
        if self._lost is not None:
            raise self._lost

    def fail_pending(self, exc: BaseException) -> None:
        """The daemon is gone and will not answer: every request waiting for a response,
        for ring space or for resources fails with `exc`, and so do new ones until
        resume(). Their grants stay with the requests' pages until the guest revokes."""
        self._lost = exc
        for q in self.queues:
            waiters, q.waiters = q.waiters, {}
            for fut in waiters.values():
                if not fut.done():
                    fut.set_exception(exc)
            q.space.set()
        self._released.set()

    def resume(self) -> None:
        """Accept requests again (after reconnecting to a daemon)."""
        self._lost = None

    def watch(self, client: VmmClient, keep_pending: bool = False) -> None:
        """Tie this frontend to the control connection that serves it. When that
        connection is lost: with keep_pending False, pending requests fail with
        ConnectionLost instead of waiting forever; with True (an in-flight table was
        given with SET_INFLIGHT), they stay pending for the daemon that takes over.
        Only the connection watched last counts: after a migration the source's may go."""
        self._watched = client

        def lost() -> None:
            if not keep_pending and self._watched is client:
                self.fail_pending(ConnectionLost(f"blk {self.devid}: connection to the "
                                                 "daemon lost"))
        client.add_lost_callback(lost)

    # --- byte-granular I/O ------------------------------------------------------------

    @property
    def max_request_bytes(self) -> int:
        """The largest read or write one request carries (whole pages per segment)."""
        segs = self.max_indirect_segments or BLKIF_MAX_SEGMENTS_PER_REQUEST
        return segs * PAGE_SIZE // self.sector_size * self.sector_size

    async def _chunked(self, op: int, offset: int, buf: bytearray) -> None:
        """Read into, or write from, `buf` at sector-aligned `offset`, in requests no
        larger than max_request_bytes, all in flight at once (within the bound)."""
        step = self.max_request_bytes

        async def one(pos: int) -> None:
            n = min(step, len(buf) - pos)
            sector = (offset + pos) // SECTOR_SIZE
            if op == BlkifOp.WRITE:
                await self.write(sector, bytes(buf[pos:pos + n]))
            else:
                buf[pos:pos + n] = await self.read(sector, n)

        tasks = [asyncio.ensure_future(one(pos)) for pos in range(0, len(buf), step)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def read_at(self, offset: int, length: int) -> bytes:
        """`length` bytes at byte `offset`, any alignment and size: split into requests,
        the sectors around an unaligned range read and trimmed."""
        if offset < 0 or length < 0:
            raise ValueError(f"range {offset}+{length}")
        if length == 0:
            return b""
        ss = self.sector_size
        start = offset // ss * ss
        end = -(-(offset + length) // ss) * ss
        buf = bytearray(end - start)
        await self._chunked(BlkifOp.READ, start, buf)
        return bytes(buf[offset - start:offset - start + length])

    async def write_at(self, offset: int, data: bytes) -> None:
        """Write `data` at byte `offset`, any alignment and size. Partly covered sectors
        at either end are read first and written back whole (read-modify-write), so two
        concurrent unaligned writes that share a sector must be ordered by the caller,
        as a filesystem orders writes to one block."""
        if offset < 0:
            raise ValueError(f"offset {offset}")
        if not data:
            return
        ss = self.sector_size
        start = offset // ss * ss
        end = -(-(offset + len(data)) // ss) * ss
        buf = bytearray(end - start)
        if start != offset:
            buf[:ss] = await self.read(start // SECTOR_SIZE, ss)
        if end != offset + len(data) and (end - ss > start or start == offset):
            buf[-ss:] = await self.read((end - ss) // SECTOR_SIZE, ss)
        buf[offset - start:offset - start + len(data)] = data
        await self._chunked(BlkifOp.WRITE, start, buf)

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
