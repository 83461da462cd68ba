"""One blkif ring: take requests, validate, map grants, hand I/O to the pool, answer.

Pipeline per request (all on the event loop except the system calls):
  take (private copy) -> parse/validate -> map grants -> queued -> pool job -> completed
  -> release grants -> response -> push (notify only when the ring's rule says so).

Back-pressure: at most `max_pending` requests are taken and not yet answered; when the
pool is full we stop consuming and the next completion resumes us. Work per wakeup is
bounded (`BUDGET`); a busy guest gets the rest on a later loop turn, not all at once.

Flush and barrier requests drain: they start only when everything taken before them has
completed, and nothing taken after them starts until they have completed.

A guest that corrupts the ring (producer index overflow) halts this ring only: we stop
listening to its event channel, report it, let in-flight I/O finish and release its
grants, but write nothing more into the ring.

With an in-flight table (SET_INFLIGHT, backendd/inflight.py) every request taken is
recorded before the recorded req_cons moves past it, and the slot of its response before
that response is published; a restarted daemon replays what the table says was never
visibly answered, before taking anything new.

Without a table, responses are published in ring order (a request that completes early
waits for those taken before it), so the shared rsp_prod alone says what was answered: a
restarted daemon resumes at it and reads everything past it again from the ring.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from backendd.errors import GuestError
from rings.blkif import BlkifCodecs
from rings.consts import SECTOR_SIZE, BlkifOp, BlkifStatus
from rings.ring import BackRing, RingCorrupted

from .engine import IoItem, execute_batch
from .request import (
    SEGMENT_SIZE,
    BadRequest,
    Geometry,
    Request,
    pack_response,
    parse_indirect_segments,
    parse_request,
)

if TYPE_CHECKING:
    from backendd.evtchn import EventChannel
    from backendd.grants import GrantMapping, GrantTable
    from backendd.inflight import InflightQueue, Recovery

    from .image import Image
    from .persistent import PersistentGrants

log = logging.getLogger(__name__)

BUDGET = 64  # requests taken per loop turn
MAX_PENDING = 64
BATCH = 4  # requests per pool job (see docs/blk.md for the measurement)

Submit = Callable[..., "asyncio.Future[list[IoItem]]"]


class Counters:
    # inline_io / pooled: requests served on the event loop / handed to the I/O pool;
    # parallel: ring batches the compiled kernel served on a helper thread.
    __slots__ = ("bytes_read", "bytes_written", "discards", "errors", "flushes",
                 "inline_io", "invalid", "parallel", "pooled", "reads", "replayed",
                 "requests", "rings_halted", "unsupported", "writes")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class RingQueue:
    def __init__(self, *, index: int, back: BackRing, ring_maps: list[GrantMapping],
                 channel: EventChannel, codecs: BlkifCodecs, geometry: Geometry,
                 image: Image, grants: GrantTable, submit: Submit,
                 loop: asyncio.AbstractEventLoop, counters: Counters,
                 on_corrupt: Callable[[str], None], batch: int = BATCH,
                 on_refused: Callable[[str], None] | None = None,
                 inflight: InflightQueue | None = None,
                 recovery: Recovery | None = None,
                 pgrants: PersistentGrants | None = None) -> None:
        self.index = index
        self.back = back
        self.ring_maps = ring_maps
        self.channel = channel
        self.codecs = codecs
        self.geo = geometry
        self.image = image
        self.grants = grants
        # With persistent grants (both ends said feature-persistent=1) data and indirect
        # pages are pinned through the ring's cache; ring pages never are.
        self.pgrants = pgrants
        self._pin = pgrants.acquire if pgrants is not None else grants.map
        self.submit = submit
        self.loop = loop
        self.counters = counters
        self.on_corrupt = on_corrupt
        # A request refused for the guest's own fault (rate-limited by the caller).
        self.on_refused = on_refused or (lambda message: log.debug("%s", message))
        self.batch = batch
        self.max_pending = min(MAX_PENDING, back.size)
        self.halted = False
        self._stopping = False
        # SUSPEND: take nothing, write nothing into the guest's memory until resume().
        self.suspended = False
        # Connected from a migrated state: the source signalled its responses already.
        self.migrated = False
        self.started = False
        self._scheduled = False
        self._blocked = False  # stopped taking because the pending pool is full
        self._waiting: collections.deque[IoItem] = collections.deque()
        self._inflight = 0  # items handed to the pool, not yet back
        self._draining = False  # a flush/barrier is in flight: start nothing else
        self._idle = asyncio.Event()
        self._idle.set()
        self.inflight = inflight
        self._recovery = recovery
        self._unpublished: list[int] = []  # ring indices answered, response not pushed
        # Without a table: responses that wait for an earlier request's, by ring index.
        self._held: dict[int, bytes] = {}

    # --- taking requests -----------------------------------------------------------

    def start(self) -> None:
        self.started = True
        resumed = self.back.rsp_prod_pvt != 0 and not self.migrated
        replay: list[tuple[int, bytes]] = []
        if self.inflight is not None and self._recovery is not None:
            # A new generation, or the live one resumed (see backendd/inflight.py).
            self.inflight.begin(self._recovery)
            replay = self._recovery.replay
        self._recovery = None
        if replay:
            # Requests an earlier daemon took and never visibly answered go first, in
            # ring order; the table's req_cons is already past them. Each is recorded
            # again (in_flight) so that a second crash replays it again.
            for index, raw in replay:
                if self.inflight is not None:
                    self.inflight.in_flight(index, raw)
                self._accept(raw, index)
            self.counters.replayed += len(replay)
            self._dispatch()
            self._push()
        self.channel.start(self.loop, self._kick)
        if resumed:
            # An earlier daemon may have died between publishing responses and signalling
            # them: one event, so the guest looks at its ring (a spurious one is harmless).
            self.channel.notify()
        # Requests may have been queued before we listened (the frontend does not kick
        # for them again).
        self._schedule()

    def _kick(self) -> None:
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._service)

    def _service(self) -> None:
        self._scheduled = False
        if self.halted or self._stopping or self.suspended:
            return
        try:
            self._take()
        except RingCorrupted as e:
            self._halt(str(e))
            return
        except Exception:  # a local bug: stop this ring, never the event loop
            log.exception("blk ring %d: stopped on an internal error", self.index)
            self._halt("internal error while taking requests")
            return
        self._dispatch()
        self._push()

    def _take(self) -> None:
        budget = BUDGET
        while budget > 0:
            room = self.max_pending - self.back.pending_responses()
            if room <= 0:
                self._blocked = True  # a completion resumes us
                return
            first = self.back.req_cons
            raws = self.back.take_requests(min(room, budget))
            budget -= len(raws)
            if self.inflight is not None and raws:
                for k, raw in enumerate(raws):
                    self.inflight.in_flight(first + k, raw)
                self.inflight.consumed_up_to(self.back.req_cons)
            for k, raw in enumerate(raws):
                self._accept(raw, (first + k) & 0xFFFFFFFF)
            if not raws and not self.back.final_check_for_requests():
                return
        self._schedule()  # budget spent, more may be waiting: continue next turn

    def _accept(self, raw: bytes, index: int) -> None:
        self.counters.requests += 1
        req: Request | None = None
        try:
            req = parse_request(raw, self.codecs, self.geo)
            if req.indirect_grefs:
                self._read_indirect(req)
            item = self._map(req)
        except BadRequest as bad:
            if bad.status == BlkifStatus.EOPNOTSUPP:
                self.counters.unsupported += 1
            else:
                self.counters.invalid += 1
            self.on_refused(f"blk ring {self.index}: request {bad.id} refused: {bad.reason}")
            self._answer(bad.id, bad.op, bad.status, index)
            return
        except GuestError as e:  # a bad grant: this request fails, the ring goes on
            assert req is not None
            self.on_refused(f"blk ring {self.index}: request {req.id} refused: {e}")
            self.counters.invalid += 1
            self._answer(req.id, req.op, BlkifStatus.ERROR, index)
            return
        item.ring_index = index
        self._idle.clear()
        self._waiting.append(item)

    def _read_indirect(self, req: Request) -> None:
        pages = []
        left = req.nr_segments * SEGMENT_SIZE
        for gref in req.indirect_grefs:
            with self._pin(gref, False) as m:
                n = min(left, 4096)
                pages.append(bytes(m.page_view(0, n)))  # a private copy, then let go
                left -= n
        parse_indirect_segments(req, pages, self.codecs, self.geo)

    def _map(self, req: Request) -> IoItem:
        item = IoItem(req)
        # A read fills guest pages, so it needs them writable; a write only reads them.
        writable = req.op == BlkifOp.READ
        try:
            for gref, first, last in req.segments:
                m = self._pin(gref, writable)
                item.mappings.append(m)
                item.views.append(m.page_view(first * SECTOR_SIZE,
                                              (last - first + 1) * SECTOR_SIZE))
        except BaseException:
            item.release()
            raise
        return item

    # --- running I/O -----------------------------------------------------------------

    def _dispatch(self) -> None:
        batch: list[IoItem] = []
        while self._waiting and not self._draining:
            item = self._waiting[0]
            if item.is_flush:
                if batch or self._inflight:
                    break  # the flush waits for everything before it
                self._draining = True
            self._waiting.popleft()
            batch.append(item)
            if len(batch) >= self.batch or self._draining:
                self._run(batch)
                batch = []
        if batch:
            self._run(batch)

    def _run(self, batch: list[IoItem]) -> None:
        self._inflight += len(batch)
        self.counters.pooled += len(batch)
        fut = self.submit(execute_batch, self.image, batch)
        fut.add_done_callback(lambda f, b=batch: self._completed(f, b))

    def _completed(self, fut: asyncio.Future[list[IoItem]], batch: list[IoItem]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            # The pool failed, not the disk (e.g. shut down): still answer every request.
            if not fut.cancelled():
                log.error("blk ring %d: I/O job failed", self.index, exc_info=fut.exception())
            for item in batch:
                item.status = BlkifStatus.ERROR
        self._inflight -= len(batch)
        for item in batch:
            if item.is_flush:
                self._draining = False
            if self.grants.memory.log is not None and item.req.op == BlkifOp.READ:
                # The pages this read filled, logged before the response shows them.
                for m in item.mappings:
                    self.grants.memory.log.mark(m.frame)
            # Grants go back before the response: once answered, the guest may revoke
            # and reuse the pages, and we must not touch them again (XSA-396).
            item.release()
            self._account(item)
            self._answer(item.req.id, item.req.op, item.status, item.ring_index)
        if not self.halted:
            self._dispatch()
            self._push()
            if self._blocked:
                self._blocked = False
                self._schedule()
        self._check_idle()

    def _account(self, item: IoItem) -> None:
        c, req = self.counters, item.req
        if item.status != BlkifStatus.OKAY:
            c.errors += 1
            log.debug("blk ring %d: request %d failed: errno %d", self.index, req.id,
                      item.error)
            return
        if item.is_flush:
            c.flushes += 1
        if req.op == BlkifOp.DISCARD:
            c.discards += 1
        elif req.op == BlkifOp.READ:
            c.reads += 1
            c.bytes_read += req.nbytes
        elif req.nr_sectors:
            c.writes += 1
            c.bytes_written += req.nbytes

    # --- responses -------------------------------------------------------------------

    def _answer(self, rid: int, op: int, status: int, index: int) -> None:
        if self.halted:
            return  # the ring is corrupt: write nothing more into it
        rsp = pack_response(self.codecs, rid, op, status)
        if self.inflight is not None:
            self.inflight.answering(index, self.back.rsp_prod_pvt)
            self._unpublished.append(index)
            self.back.put_response(rsp)
            return
        # In ring order: the response to ring index i goes out only after those to every
        # index before it, so that rsp_prod never passes an unanswered request.
        self._held[index & 0xFFFFFFFF] = rsp
        back, held = self.back, self._held
        while back.rsp_prod_pvt in held:
            back.put_response(held.pop(back.rsp_prod_pvt))

    def _push(self) -> None:
        if self.halted:
            return
        notify = self.back.push_responses()
        if self._unpublished and self.inflight is not None:
            # Published now: a restarted daemon must not run these again.
            for index in self._unpublished:
                self.inflight.answered(index)
            self._unpublished.clear()
            self.inflight.published(self.back.rsp_prod_pvt)
        if notify:
            self.channel.notify()

    # --- suspending ------------------------------------------------------------------

    async def suspend(self) -> None:
        """Stop taking requests; those taken complete and are answered, published and
        signalled before this returns. From then on nothing is written into the ring or
        the guest's pages, and no event is sent, until resume(). Kicks meanwhile stay
        counted in the kick eventfd, which resume() listens to again."""
        self.suspended = True
        self.channel.stop()
        await self._idle.wait()
        self._push()

    def resume(self) -> None:
        """Serve again, looking at the ring first (requests posted while suspended)."""
        self.suspended = False
        if not self.started:
            self.start()
            return
        if self.halted or self._stopping:
            return
        self.channel.start(self.loop, self._kick)
        self._schedule()

    def saved_indices(self) -> tuple[int, int, int]:
        """req_cons, rsp_prod_pvt and the rsp_prod last published."""
        back = self.back
        return back.req_cons, back.rsp_prod_pvt, back._pushed

    # --- stopping --------------------------------------------------------------------

    def _halt(self, message: str) -> None:
        self.halted = True
        self.counters.rings_halted += 1
        self.channel.stop()
        while self._waiting:  # never started: nothing to wait for, just let go
            self._waiting.popleft().release()
        self._check_idle()
        self.on_corrupt(f"blk ring {self.index}: {message}")

    def _check_idle(self) -> None:
        if self.halted:
            while self._waiting:
                self._waiting.popleft().release()
        if not self._waiting and not self._inflight:
            self._idle.set()

    async def stop(self) -> None:
        """Stop taking requests, let what was taken complete and be answered."""
        self._stopping = True
        self.channel.stop()
        await self._idle.wait()
        self._push()
        if self.inflight is not None:
            # Everything taken is answered (or the ring is halted): whatever ring comes
            # next, even on these pages, starts a new generation of the table.
            self.inflight.close()

    def release(self) -> None:
        """After stop(): let go of the ring pages, the persistent grants and the event
        channel."""
        if self.pgrants is not None:
            self.pgrants.close()
        ring = self.back.ring
        ring.release()
        for view in getattr(ring, "pages", [ring.area]):
            view.release()
        for m in self.ring_maps:
            m.release()
        self.ring_maps.clear()
        self.channel.close()
