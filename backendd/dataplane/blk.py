"""A blkif ring served by the compiled kernel (blk_kernel.c): Python calls in once per
wake-up, never per request or per segment.

The kernel takes the batch, checks, pins grants, does the reads that the page cache can
serve without blocking (preadv2 with RWF_NOWAIT), answers and publishes. What would
block goes to the kernel's own I/O threads: writes, flush and discard, and any read that
met EAGAIN; the reads and writes of O_DIRECT images and block devices go to the queue's
io_uring instead. Neither enters Python; when a ring's jobs are done its wake eventfd is
written, and the event loop reaps them all with one call (`bk_reap`), which unpins,
answers and starts what waited behind a flush.

With persistent grants (both ends said feature-persistent=1) the kernel keeps the ring's
cache of pinned grants itself, with persistent.py's rules; `KernelGrantCache` is the
control plane's view of it (counters, the grefs a migrated state carries, close).

Same interface and same behaviour as backendd/devices/blk/queue.py's RingQueue (the
reference, tested against this one by tests/test_dataplane_differential.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from backendd.grants import GrantError
from rings.sring import REQ_PROD

from . import kernel as K
from .build import set_log
from .netkernel import GRANT_REASONS
from .rounds import POLL, LoopRound, loop_round

if TYPE_CHECKING:
    from backendd.devices.blk.image import Image
    from backendd.devices.blk.queue import Counters
    from backendd.devices.blk.request import Geometry
    from backendd.evtchn import EventChannel
    from backendd.grants import GrantMapping, GrantTable
    from backendd.inflight import InflightQueue, Recovery
    from rings.blkif import BlkifCodecs
    from rings.ring import BackRing

log = logging.getLogger(__name__)


# Beyond this many rings on one loop, a turn serves only the rings due (looking at every
# ring's shared index each turn would cost more than it gains).
ROUND_MEMBERS = 16

class ServiceRound(LoopRound["CompiledRingQueue"]):
    """The compiled rings due in one loop turn (kicked, or with work left), served by one
    kernel call: with two or more, the kernel serves them on its helper threads in
    parallel while the loop waits with the GIL released, so queues use the cores and
    nothing in the control plane changes under them. The call also serves, beside them,
    every other ring of this loop whose guest has already published requests (its kick
    not read yet): frontends kick independently, so a turn seldom finds two kicks."""

    k: K.Kernel

    def __init__(self, kernel: K.Kernel, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(kernel, loop)
        self.members: list[CompiledRingQueue] = []  # rings started and not stopped
        self._arrays: tuple | None = None  # the members as C arrays, built when they change

    def join(self, q: CompiledRingQueue) -> None:
        self.members.append(q)
        self._arrays = None

    def leave(self, q: CompiledRingQueue) -> None:
        if q in self.members:
            self.members.remove(q)
            self._arrays = None

    def serve(self, due: list[CompiledRingQueue]) -> None:
        due = [q for q in due if q._may_serve()]
        members = self.members
        if len(members) > ROUND_MEMBERS or any(q not in members for q in due):
            self._serve_list(due)
            return
        if len(members) == 1:
            if due:
                self._serve_list(due)
            return
        if not due:
            return
        for q in due:
            q._in_due = True
        if self._arrays is None:
            n = len(members)
            self._arrays = (
                n, (ctypes.c_void_p * n)(*(q._q for q in members)),
                (ctypes.POINTER(K.Env) * n)(*(ctypes.pointer(q._env) for q in members)),
                (ctypes.POINTER(K.Out) * n)(*(ctypes.pointer(q._out) for q in members)),
                (ctypes.c_uint8 * n)(), (ctypes.c_uint8 * n)(), (ctypes.c_uint32 * n)(),
                (ctypes.c_int32 * n)(*(q.channel.call_fd for q in members)),
                n <= K.POLL_MAX and not any(q.image_external for q in members))
        n, qs, envs, outs, due_mask, served, parallel, call_fds, pollable = self._arrays
        for k, q in enumerate(members):
            # 1: kicked; 2: served if its guest has published requests; 0: not at all
            due_mask[k] = 1 if q._in_due else 2 if q._may_serve() else 0
            if due_mask[k]:
                q._refresh()
        if POLL.ns and pollable:
            self.k.serve_round_poll(qs, envs, outs, n, due_mask, served, parallel, call_fds,
                                    POLL.ns, POLL.budget_ns)
            for k, q in enumerate(members):
                q._in_due = False
                if served[k]:
                    q.counters.parallel += parallel[k]
                    q.channel.count_notifies(q._out.notified, q._out.saturated)
                    q._after(q._out)
            return
        helped = self.k.serve_round(qs, envs, outs, n, due_mask, served)
        j = 0  # the kernel serves the first ring it takes itself, the next `helped` on helpers
        for k, q in enumerate(members):
            q._in_due = False
            if served[k]:
                if 0 < j <= helped:
                    q.counters.parallel += 1
                j += 1
                q._after(q._out)

    def _serve_list(self, queues: list[CompiledRingQueue]) -> None:
        for q in queues:
            q._refresh()
        if len(queues) == 1:
            q = queues[0]
            if POLL.ns and not q.image_external:
                self.k.serve_poll(q._q, ctypes.byref(q._env), ctypes.byref(q._out),
                                  q.channel.call_fd, POLL.ns, POLL.budget_ns)
                q.channel.count_notifies(q._out.notified, q._out.saturated)
            else:
                self.k.serve(q._q, ctypes.byref(q._env), ctypes.byref(q._out))
        elif queues:
            n = len(queues)
            qs = (ctypes.c_void_p * n)(*(q._q for q in queues))
            envs = (ctypes.POINTER(K.Env) * n)(*(ctypes.pointer(q._env) for q in queues))
            outs = (ctypes.POINTER(K.Out) * n)(*(ctypes.pointer(q._out) for q in queues))
            helped = self.k.serve_many(qs, envs, outs, n)
            for q in queues[1:1 + helped]:
                q.counters.parallel += 1
        for q in queues:
            q._after(q._out)


def service_round(kernel: K.Kernel, loop: asyncio.AbstractEventLoop) -> ServiceRound:
    return loop_round(ServiceRound, kernel, loop)


class KernelGrantCache:
    """A ring's persistent-grant cache kept by the kernel, as PersistentGrants looks to
    the device: stats(), len(), saved(), restore(), close(). The counters stay readable
    after the ring is freed."""

    def __init__(self, ring: CompiledRingQueue, limit: int) -> None:
        self._ring: CompiledRingQueue | None = ring
        self.limit = limit
        self._last = (ctypes.c_uint64 * 6)()

    def _read(self) -> ctypes.Array:
        r = self._ring
        if r is not None and r._q:
            r.k.pg_stats(r._q, self._last)
        return self._last

    def __len__(self) -> int:
        return int(self._read()[5])

    def stats(self) -> dict[str, int]:
        return dict(zip(K.PG_STAT_NAMES, self._read()[:5], strict=True))

    def saved(self) -> list[tuple[int, bool]]:
        r = self._ring
        if r is None or not r._q:
            return []
        n = len(self)
        grefs, writable = (ctypes.c_uint32 * max(n, 1))(), (ctypes.c_uint8 * max(n, 1))()
        n = min(n, r.k.pg_saved(r._q, grefs, writable, n))
        return [(grefs[k], bool(writable[k])) for k in range(n)]

    def restore(self, gref: int, writable: bool) -> None:
        """Pin and cache `gref`, idle, as a migrated cache had it. Raises GrantError
        like GrantTable.map."""
        r = self._ring
        if r is None or not r._q:
            return
        if not 0 <= gref <= 0xFFFFFFFF:
            raise GrantError(f"gref {gref}: beyond the grant table")
        r._refresh()
        rc = r.k.pg_restore(r._q, ctypes.byref(r._env), gref, int(writable))
        if rc:
            why = GRANT_REASONS.get(-rc, f"refused ({rc})")
            raise GrantError(f"gref {gref}: {why}")

    def close(self) -> None:
        """Release every cached pin; nothing is cached afterwards."""
        r = self._ring
        if r is None or not r._q:
            return
        r._refresh()
        r.k.pg_close(r._q, ctypes.byref(r._env))
        self._read()

    def detach(self) -> None:
        """The ring's kernel state is about to be freed: keep the last counters."""
        self._read()
        self._ring = None


class CompiledRingQueue:
    def __init__(self, *, kernel: K.Kernel, index: int, back: BackRing,
                 ring_maps: list[GrantMapping], channel: EventChannel, codecs: BlkifCodecs,
                 geometry: Geometry, image: Image, grants: GrantTable,
                 submit: Callable[..., asyncio.Future], loop: asyncio.AbstractEventLoop,
                 counters: Counters, on_corrupt: Callable[[str], None], batch: int = 4,
                 on_refused: Callable[[str], None] | None = None,
                 inflight: InflightQueue | None = None,
                 recovery: Recovery | None = None,
                 pgrant_limit: int | None = None) -> None:
        self.k = kernel
        self.index = index
        self.back = back
        self.ring_maps = ring_maps
        self.channel = channel
        self.codecs = codecs
        self.image = image
        self.grants = grants
        self.memory = grants.memory
        # submit and batch: RingQueue's signature; the kernel's I/O threads do that work.
        self.submit = submit
        self.loop = loop
        self.counters = counters
        self.on_corrupt = on_corrupt
        # Requests refused for the guest's own fault: the kernel counts them, one line
        # per batch says how many (rate-limited by the caller).
        self.on_refused = on_refused or (lambda message: log.debug("%s", message))
        self.batch = batch
        self.inflight = inflight
        # With persistent grants (both ends said feature-persistent=1: a limit given)
        # the kernel pins data and indirect pages through the ring's cache.
        self.pgrants: KernelGrantCache | None = None
        if pgrant_limit is not None and not 0 <= pgrant_limit <= K.PG_MAX:
            raise ValueError(f"persistent grants: a limit of {pgrant_limit} per ring (the "
                             f"kernel takes 0..{K.PG_MAX})")
        self.halted = False
        self._stopping = False
        self.suspended = False  # as RingQueue's
        self.migrated = False
        self.started = False
        self._in_round = False
        self._in_due = False  # kicked, in the round being served
        self._round = service_round(kernel, loop)
        self._blocked = False
        self._inpool = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._recovery = recovery
        self._out = K.Out()
        self._env = K.Env()
        self._env_key: tuple[int, int] | None = None
        self._uses_anchor: ctypes.Array | None = None
        self._pool_pin: object | None = None  # the memory snapshot, while I/O is out
        self._geo = geometry
        cfg = K.Config()
        native = self.memory.native()
        for k, m in enumerate(ring_maps):
            cfg.pages[k] = native.host_address(m.frame << 12, 4096)
        cfg.nr_pages = len(ring_maps)
        cfg.size = back.size
        cfg.abi = int(codecs.abi)
        cfg.max_pending = min(K.MAX_PENDING, back.size)
        cfg.start = back.rsp_prod_pvt
        self._resumed = back.rsp_prod_pvt != 0  # taken over from an earlier daemon
        cfg.req_cons = back.req_cons
        self._inflight_anchor = None
        if inflight is not None:
            self._inflight_anchor = (ctypes.c_char * len(inflight.view)).from_buffer(
                inflight.view)
            cfg.inflight = ctypes.addressof(self._inflight_anchor)
        cfg.disk = self._disk(geometry)
        # NbdRingQueue's disk: its jobs come back to Python, so its ring is not polled
        self.image_external = bool(cfg.disk.external)
        # The kernel's I/O threads write it when jobs of this ring are done.
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        cfg.wake_fd = self._wake_fd
        cfg.kick_fd = channel.kick_fd
        if pgrant_limit is not None:
            cfg.persistent = 1
            cfg.pg_limit = pgrant_limit
        q = self.k.queue_new(ctypes.byref(cfg))
        if not q:
            os.close(self._wake_fd)
            raise ValueError(f"blk ring {index}: the kernel refused the ring geometry")
        self._q = q
        if pgrant_limit is not None:
            self.pgrants = KernelGrantCache(self, pgrant_limit)
        loop.add_reader(self._wake_fd, self._reap)

    # --- configuration -------------------------------------------------------------

    def _disk(self, geo: Geometry) -> K.Disk:
        img = self.image
        if geo.max_indirect_segments > K.MAX_SEGS:
            raise ValueError(f"{geo.max_indirect_segments} indirect segments: the kernel "
                             f"takes at most {K.MAX_SEGS}")
        return K.Disk(fd=img.fd, sector_size=geo.sector_size, sectors=geo.sectors,
                      readonly=geo.readonly, discard=geo.discard,
                      discard_secure=geo.discard_secure, is_block=img.is_block,
                      max_indirect=geo.max_indirect_segments,
                      inline_io=not (img.is_block or img.cfg.direct_io))

    @property
    def geo(self) -> Geometry:
        return self._geo

    @geo.setter
    def geo(self, geo: Geometry) -> None:
        self._geo = geo
        self.k.queue_set_disk(self._q, ctypes.byref(self._disk(geo)))

    def _refresh(self) -> None:
        """Point the kernel at the current memory regions and grant table."""
        mem, gt = self.memory, self.grants
        key = (mem.generation, gt.generation)
        if key == self._env_key:
            return
        native = mem.native()
        env = self._env
        env.regions = native.array
        env.nr_regions = native.count
        pin = gt._pin
        if pin is None or not gt.entries:
            env.gnt_version = 0
            env.gnt_entries = 0
            self._uses_anchor = None
        else:
            env.gnt_version = gt.version
            env.gnt_entries = gt.entries
            env.backend_domid = gt.backend_domid
            env.gnt_shared = pin.address
            env.gnt_status = pin.address + gt._status_base
            self._uses_anchor = (ctypes.c_uint32 * len(gt._uses)).from_buffer(gt._uses)
            env.gnt_uses = ctypes.addressof(self._uses_anchor)
        set_log(env, mem.log)
        self._env_key = key

    # --- serving ---------------------------------------------------------------------

    def start(self) -> None:
        self.started = True
        if self.migrated:
            self._resumed = False  # the source signalled its responses already
        replay: list[tuple[int, bytes]] = []
        if self.inflight is not None and self._recovery is not None:
            # A new generation, or the live one resumed (see backendd/inflight.py); the
            # kernel then learns which entries are free.
            self.inflight.begin(self._recovery)
            self.k.inflight_scan(self._q)
            replay = self._recovery.replay
        self._recovery = None
        if replay:
            raws = b"".join(raw[:K.SLOT_MAX].ljust(K.SLOT_MAX, b"\0") for _, raw in replay)
            idx = (ctypes.c_uint32 * len(replay))(*(i for i, _ in replay))
            self._refresh()
            self.k.replay(self._q, ctypes.byref(self._env), raws, idx, len(replay),
                          ctypes.byref(self._out))
            self.counters.replayed += len(replay)
            self._after(self._out)
        self.channel.start(self.loop, self._schedule)
        self._round.join(self)
        if self._resumed:
            # An earlier daemon may have died between publishing responses and signalling
            # them: one event, so the guest looks at its ring (a spurious one is harmless).
            self.channel.notify()
        self._schedule()  # requests queued before we listened

    def _may_serve(self) -> bool:
        """Whether a round may take requests from this ring (it is listening)."""
        return not (self.halted or self._stopping or self.suspended or self._q is None)

    def _schedule(self) -> None:
        self._round.add(self)

    @property
    def _scheduled(self) -> bool:
        return self._in_round

    def _after(self, out: K.Out) -> None:
        c, st = self.counters, out.stats
        for name in K.STAT_NAMES:
            value = getattr(st, name)
            if value:
                setattr(c, name, getattr(c, name) + value)
        refused = st.invalid + st.unsupported
        if refused:
            why = K.WHY[out.refused_why] if out.refused_why < len(K.WHY) else "?"
            more = f" (and {refused - 1} more in this batch)" if refused > 1 else ""
            self.on_refused(f"blk ring {self.index}: request {out.refused_id} refused: "
                            f"{why}{more}")
        flags = out.flags
        if flags & K.INTERNAL:
            log.error("blk ring %d: stopped on an internal error (no free request slot "
                      "or in-flight entry)", self.index)
            self._halt("internal error while taking requests")
        if flags & K.CORRUPT:
            prod = self.back.ring.idx[REQ_PROD]
            self._halt(f"req_prod {prod} is more than a ring ({self.back.size}) ahead "
                       "of the responses")
        if out.njobs:
            self._run_jobs(out)
        if out.inpool and self._pool_pin is None:
            # guest pages are being read or written by the I/O threads: no region goes
            self._pool_pin = self.memory.native()
            self._idle.clear()
        self._inpool = out.inpool
        if flags & K.NOTIFY:
            self.channel.notify()
        if flags & K.BLOCKED:
            self._blocked = True
        if flags & K.MORE and not self.halted:
            self._schedule()
        self._check_idle()

    def _run_jobs(self, out: K.Out) -> None:
        """Jobs handed back for a caller that moves the data itself (`Disk.external`,
        NbdRingQueue); a queue on a file never gets any."""
        raise NotImplementedError

    def _reap(self) -> None:
        """The ring's wake eventfd: I/O threads have finished jobs of this ring."""
        if self._q is None:
            return
        self._refresh()
        self.k.reap(self._q, ctypes.byref(self._env), ctypes.byref(self._out))
        self._after(self._out)
        if self._blocked and not self.halted:
            self._blocked = False
            self._schedule()

    def _halt(self, message: str) -> None:
        self.halted = True
        self.counters.rings_halted += 1
        self.channel.stop()
        self.on_corrupt(f"blk ring {self.index}: {message}")

    def _check_idle(self) -> None:
        if not self._inpool:
            self._pool_pin = None
            self._idle.set()

    def state(self) -> dict[str, int]:
        st = (ctypes.c_uint32 * 7)()
        self.k.queue_state(self._q, st)
        names = ("req_cons", "rsp_prod_pvt", "pushed", "waiting", "in_pool", "halted",
                 "draining")
        return dict(zip(names, st, strict=True))

    def uring(self) -> dict[str, int]:
        """The queue's io_uring: whether it has one (an O_DIRECT image or a block device
        that has moved data), transfers submitted to it, transfers in flight there."""
        st = (ctypes.c_uint64 * 3)()
        if self.k.queue_uring is not None and self._q is not None:
            self.k.queue_uring(self._q, st)
        return dict(zip(("on", "submitted", "in_flight"), st, strict=True))

    # --- suspending ------------------------------------------------------------------

    async def suspend(self) -> None:
        """As RingQueue.suspend: what the kernel took (inline, in the pool, waiting
        behind a flush) is answered, published and signalled before this returns."""
        self.suspended = True
        self.channel.stop()
        await self._idle.wait()
        if self._q is None:
            return
        self._refresh()
        self.k.push(self._q, ctypes.byref(self._env), ctypes.byref(self._out))
        if self._out.flags & K.NOTIFY:
            self.channel.notify()

    def resume(self) -> None:
        self.suspended = False
        if not self.started:
            self.start()
            return
        if self.halted or self._stopping:
            return
        self.channel.start(self.loop, self._schedule)
        self._schedule()

    def saved_indices(self) -> tuple[int, int, int]:
        """req_cons, rsp_prod_pvt and the rsp_prod last published, from the kernel."""
        st = self.state()
        return st["req_cons"], st["rsp_prod_pvt"], st["pushed"]

    # --- stopping --------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop taking requests, let what was taken complete and be answered."""
        self._stopping = True
        self._round.leave(self)
        self.channel.stop()
        await self._idle.wait()
        self._refresh()
        self.k.push(self._q, ctypes.byref(self._env), ctypes.byref(self._out))
        if self._out.flags & K.NOTIFY:
            self.channel.notify()
        if self.inflight is not None:
            # Everything taken is answered (or the ring is halted): whatever ring comes
            # next, even on these pages, starts a new generation of the table.
            self.inflight.close()

    def release(self) -> None:
        """After stop(): let go of the persistent grants, free the kernel's state, let go
        of the ring and the channel."""
        self._round.leave(self)
        if self.pgrants is not None:
            self.pgrants.close()
            self.pgrants.detach()
        if self._q:
            self.loop.remove_reader(self._wake_fd)
            self.k.queue_free(self._q)
            self._q = None
            os.close(self._wake_fd)
        self._inflight_anchor = None
        self._uses_anchor = None
        self._env_key = None
        ring = self.back.ring
        ring.release()
        for view in getattr(ring, "pages", [ring.area]):
            view.release()
        for m in self.ring_maps:
            m.release()
        self.ring_maps.clear()
        self.channel.close()
