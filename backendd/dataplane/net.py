"""The netif tx and rx paths on the compiled data plane: TxPath's scheduling, credit, multicast
list and counters stay in Python; each wake-up is one call into net_kernel.c, which
takes every packet it can, validates it, writes the frames to the tap, answers and
applies ring.h's notify rule. Python then adds the counters, logs the guest errors,
arms the credit timer or the writer, and signals the event channel once.

A multicast control packet is left on the ring by the kernel: Python answers that one
packet with the reference code (the vif's list is Python's) and calls in again.

The wake-ups due in one loop turn (every kicked tx ring and readable rx tap queue of
every nic on the loop) go to one kernel call, `nk_serve_many` (NetRound): with two or
more, the kernel serves them on helper threads in parallel while the loop waits with the
GIL released, so the queues of a multi-queue nic use the cores. Each wake-up touches
only its own queue's state; what the queues share (the vif's counters and multicast
list, the grant table, the regions) is read before the call and written after it, by
Python.

On a loop with at most POLL_QUEUES queues, a round is one `nk_serve_poll` call instead:
every queue is served and then watched (asleep in ppoll on its kicks and tap, and on the
loop's own poll set) and served again in the same call, its events signalled by the
kernel, until the loop or a queue needs Python, every queue is idle or the budget is
spent: Python runs once per call rather than once per wake-up.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import threading
import weakref

from backendd.devices.net.ratelimit import CreditScheduler
from backendd.devices.net.rx import BUDGET as RX_BUDGET
from backendd.devices.net.rx import RxPath
from backendd.devices.net.tx import TxFatal
from backendd.devices.net.txpath import BUDGET, TxPath
from backendd.devices.net.vif import VifState
from backendd.evtchn import EventChannel
from backendd.grants import GrantTable
from rings.ring import BackRing

from . import netkernel as nk
from .rounds import POLL, LoopRound, loop_round

log = logging.getLogger(__name__)

# After each batch a queue is watched for its next one (rounds.POLL, nk_serve_poll). Each
# queue watched takes a thread for the call: a loop with more than POLL_QUEUES compiled
# queues is served one wake-up round at a time, as without polling.
POLL_QUEUES = 4


class NetRound(LoopRound["CompiledTxPath | CompiledRxPath"]):
    """The compiled tx and rx wake-ups due in one loop turn, served by one kernel call."""

    k: nk.NetKernel

    def __init__(self, kernel: nk.NetKernel, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(kernel, loop)
        self.shared = 0  # kernel calls that served two or more wake-ups
        self.helped = 0  # wake-ups served on a helper thread
        self.apart = 0  # calls that served two queues (by name) on two threads
        # The compiled paths on this loop, by queue (tap fd): what a polled call watches.
        self.members: dict[int, list[CompiledTxPath | CompiledRxPath]] = {}
        self.polled = 0  # nk_serve_poll calls
        self.batches = 0  # batches they served (a queue served again counts again)
        # Queues whose watch ended idle, by the budget, for their own Python work, for
        # the loop's (or another queue's).
        self.ends = [0, 0, 0, 0]
        self._deferred = False  # this round went to the back of the loop's queue once
        # Written by a polled call's thread to end the other queues' waits too.
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        weakref.finalize(self, os.close, self._wake_fd)

    def _loop_watch(self) -> tuple[int, int, bool]:
        """The loop's own poll set (an epoll fd: uvloop's libuv backend, or the
        selector's), or -1 when it has none or has callbacks queued (a base asyncio
        loop says so); the budget, cut to the first timer due that this round knows of
        (its paths': the credit, an rx poll; and a base loop's own); and whether to go
        to the back of the loop's queue first (a running loop that does not say what
        it has queued: uvloop)."""
        loop = self.loop
        if not POLL.net_ns:
            return -1, POLL.budget_ns, False
        backend = getattr(loop, "_get_backend_id", None)
        defer = backend is not None and loop.is_running()
        if backend is not None:
            fd = backend()
        else:
            selector = getattr(loop, "_selector", None)
            fd = selector.fileno() if hasattr(selector, "fileno") else -1
            if getattr(loop, "_ready", None):
                fd = -1
        if fd < 0:
            return -1, POLL.budget_ns, False
        now = loop.time()
        first = now + POLL.net_budget_ns / 1e9
        timers = [h for paths in self.members.values() for path in paths
                  for h in (getattr(path, "_timer", None), getattr(path, "_poll", None))
                  if h is not None]
        scheduled = getattr(loop, "_scheduled", None)
        if scheduled:
            timers.append(scheduled[0])
        for h in timers:
            first = min(first, h.when())
        return fd, max(0, int((first - now) * 1e9)), defer

    def join(self, path: CompiledTxPath | CompiledRxPath) -> None:
        paths = self.members.setdefault(path.fd, [])
        if path not in paths:
            paths.append(path)

    def leave(self, path: CompiledTxPath | CompiledRxPath) -> None:
        paths = self.members.get(path.fd, [])
        if path in paths:
            paths.remove(path)
        if not paths:
            self.members.pop(path.fd, None)

    def serve(self, due: list[CompiledTxPath | CompiledRxPath]) -> None:
        if POLL.ns and self.members and len(self.members) <= POLL_QUEUES and all(
                p.channel is not None for paths in self.members.values() for p in paths):
            self._serve_poll(due)
            return
        ready = []
        for path in due:
            try:
                if path._prepare():
                    ready.append(path)
            except Exception:  # one path's bug must not leave the others unserved
                log.exception("%s: before the kernel call", path.name)
        if not ready:
            return
        # The tx and rx wake-ups of one queue (one tap fd) are one group, served in
        # order on one thread; the groups (queues) in parallel.
        ready.sort(key=lambda p: p.fd)
        n = len(ready)
        works = (nk.Work * n)()
        starts = (ctypes.c_uint32 * (n + 1))()
        groups = 0
        for k, (w, path) in enumerate(zip(works, ready, strict=True)):
            path._work(w)
            if not k or path.fd != ready[k - 1].fd:
                starts[groups] = k
                groups += 1
        starts[groups] = n
        try:
            helped = self.k.serve_groups(works, starts, groups)
        finally:
            for path in ready:
                path._released()
        if n > 1:
            self.shared += 1
            self.helped += helped
            if helped and len({p.name for p in ready}) > 1 \
                    and len({w.thread for w in works}) > 1:
                self.apart += 1
        caller = threading.get_native_id()
        for w, path in zip(works, ready, strict=True):
            path.served_on.add(w.thread)
            if w.thread != caller:
                path.vif.counters["parallel"] += 1  # GET_STATS: served on a helper
            try:
                path._finish()
            except Exception:  # one path's bug must not leave the others unanswered
                log.exception("%s: after the kernel call", path.name)


    def _serve_poll(self, due: list[CompiledTxPath | CompiledRxPath]) -> None:
        """Every queue on the loop in one nk_serve_poll call, on a thread of its own:
        what is due is served, and every queue is then watched and served again once
        ready (its kicks read and its events signalled by the kernel). The call also
        watches the loop's own poll set, with this call's fds kept out of it meanwhile,
        and stays in the kernel until the loop or a queue needs Python, every queue has
        been idle for POLL.net_ns, or POLL.net_budget_ns. A path the call did not serve
        is left as it was."""
        loop_fd, budget_ns, defer = self._loop_watch()
        if defer and not self._deferred:
            # Once to the back of the loop's queue: callbacks queued before this round
            # run first, not after a call that may last the budget.
            self._deferred = True
            for path in due:
                self.add(path)
            return
        self._deferred = False
        due_ids = {id(path) for path in due}
        groups: list[tuple[CompiledTxPath | None, CompiledRxPath | None,
                           list[CompiledTxPath | CompiledRxPath]]] = []
        for fd in sorted(self.members):
            paths = list(self.members[fd])
            tx: CompiledTxPath | None = None
            rx: CompiledRxPath | None = None
            for path in paths:
                try:
                    ready = path._prepare(polled=True)
                except Exception:  # one path's bug must not leave the others unserved
                    log.exception("%s: before the kernel call", path.name)
                    ready = False
                if ready and isinstance(path, CompiledTxPath):
                    tx = path
                elif ready and isinstance(path, CompiledRxPath):
                    rx = path
            if tx is not None or rx is not None:
                groups.append((tx, rx, paths))
        if not groups:
            return
        polls = (nk.Poll * len(groups))()
        muted: list[EventChannel] = []
        readers: list[CompiledRxPath] = []
        for p, (tx, rx, _) in zip(polls, groups, strict=True):
            p.tx_kick = p.rx_kick = p.tx_call = p.rx_call = p.rx_wake = -1
            if tx is not None and tx.channel is not None:
                tx._work(p.tx)
                p.tx_call, p.tx_kick = tx.channel.call_fd, tx.channel.kick_fd
                p.tx_due = id(tx) in due_ids
                muted.append(tx.channel)
            if rx is not None and rx.channel is not None:
                rx._work(p.rx)
                p.rx_call, p.rx_kick = rx.channel.call_fd, rx.channel.kick_fd
                p.rx_stalled = int(rx._stalled and not rx._reading)
                p.rx_due = id(rx) in due_ids and not p.rx_stalled
                if loop_fd >= 0:
                    # Muted even while it reads: the call watches the rx kick itself
                    # once it runs short of buffers.
                    p.rx_wake = rx.wake_fd()
                    muted.append(rx.channel)
                    if rx._reading:
                        readers.append(rx)
        if loop_fd >= 0:
            # What the call watches itself stays out of the loop's watch meanwhile, so
            # that the loop's poll set becomes ready only for other work.
            muted = [ch for ch in dict.fromkeys(muted) if ch.mute()]
            for rx in readers:
                self.loop.remove_reader(rx.fd)
        else:
            muted = []
        try:
            helped = self.k.serve_poll(polls, len(groups), POLL.net_ns if loop_fd >= 0
                                       else POLL.ns, budget_ns, loop_fd, self._wake_fd)
        finally:
            for ch in muted:
                ch.unmute()
            for rx in readers:
                if rx._reading:
                    self.loop.add_reader(rx.fd, rx._readable)
            for tx, rx, _ in groups:
                for path in (tx, rx):
                    if path is not None:
                        path._released()
        self.polled += 1
        if sum(bool(p.tx_batches) + bool(p.rx_batches) for p in polls) > 1:
            self.shared += 1
        if len(groups) > 1:
            self.helped += helped
            names = {path.name for (tx, rx, _), p in zip(groups, polls, strict=True)
                     for path, n in ((tx, p.tx_batches), (rx, p.rx_batches)) if path and n}
            if helped and len(names) > 1 and len({p.tx.thread for p in polls
                                                   if p.batches}) > 1:
                self.apart += 1
        caller = threading.get_native_id()
        for p, (tx, rx, paths) in zip(polls, groups, strict=True):
            self.batches += p.batches
            self.ends[min(p.ended, nk.END_LOOP)] += 1
            served = []
            for path, work, notified, saturated, kicks, batches in (
                    (tx, p.tx, p.tx_notified, p.tx_saturated, p.tx_kicks, p.tx_batches),
                    (rx, p.rx, p.rx_notified, p.rx_saturated, p.rx_kicks, p.rx_batches)):
                if path is None or path.channel is None:
                    continue
                path.channel.count_notifies(notified, saturated)
                path.channel.count_kicks(kicks)
                if kicks:
                    # A kick read here may be for a path of the same channel that was
                    # not served (an rx waiting for buffers): it is given its kick.
                    for other in paths:
                        if other is not tx and other is not rx \
                                and other.channel is path.channel:
                            other.kick()
                if not batches:
                    continue  # not served: as it was
                served.append(path)
                path.served_on.add(work.thread)
                if work.thread != caller:
                    path.vif.counters["parallel"] += 1
            for path in served:
                try:
                    path._finish()
                except Exception:  # one path's bug must not leave the others unanswered
                    log.exception("%s: after the kernel call", path.name)


def net_round(kernel: nk.NetKernel, loop: asyncio.AbstractEventLoop) -> NetRound:
    return loop_round(NetRound, kernel, loop)


class CompiledTxPath(TxPath):
    def __init__(self, kernel: nk.NetKernel, ring: BackRing, grants: GrantTable, fd: int,
                 vif: VifState, loop: asyncio.AbstractEventLoop, name: str,
                 credit: CreditScheduler | None = None) -> None:
        super().__init__(ring, grants, fd, vif, loop, name, credit)
        self.kernel = kernel
        self.native = nk.NativeEnv(grants.memory, grants)
        self.q = nk.TxQueue()
        self._ring_anchor = nk.ctypes.c_char.from_buffer(ring.ring.area)
        self.q.r.attach(ring)
        self.q.r.page = nk.ctypes.addressof(self._ring_anchor)
        self.q.fd = fd
        self.out = nk.TxOut()
        self.round = net_round(kernel, loop)
        self._in_round = False
        self.served_on: set[int] = set()  # thread ids that served its wake-ups
        # Its event channel (set by the device): a polled call reads its kicks and
        # signals its events itself.
        self.channel: EventChannel | None = None
        self.round.join(self)

    def stop(self) -> None:
        super().stop()
        self.round.leave(self)
        self._ring_anchor = None  # the ring mapping may go now

    def kick(self) -> None:
        if not self._scheduled and not self.stopped and not self.suspended:
            self._scheduled = True
            self.round.add(self)

    def _run(self) -> None:
        """One wake-up on its own (the round serves them together)."""
        if self._prepare():
            self._call_prepared()

    def _prepare(self, polled: bool = False) -> bool:
        """A wake-up is due: False if it has nothing to do, else the queue is loaded."""
        self._scheduled = False
        if self.stopped or self.suspended or self.vif.halted or self._waiting_writable:
            return False
        credit = self.credit
        if credit is not None and credit.waiting:
            return False
        self._before(BUDGET)  # packets per wake-up, shared with multicast packets
        return True

    def _work(self, w: nk.Work) -> None:
        w.kind = nk.WORK_TX
        w.q, w.env, w.out = (ctypes.addressof(self.q), ctypes.addressof(self.native.env),
                             ctypes.addressof(self.out))

    def _released(self) -> None:
        self.native.release()

    def _call_prepared(self) -> None:
        try:
            self.kernel.tx(self.q, self.native.env, self.out)
        finally:
            self.native.release()
        self._finish()

    def _finish(self) -> None:
        flags, budget = self._after()
        while flags & nk.MCAST:
            # The multicast packet at req_cons, answered by the reference code, then
            # the kernel again: it publishes the responses of the whole wake-up.
            try:
                self._step()
            except TxFatal as e:  # not reached: the kernel parsed it already
                self.vif.counters["tx_fatal"] += 1
                self.vif.fatal(f"{self.name}: {e}")
                return
            budget -= 1
            if not budget:
                if self.ring.push_responses():
                    self.notify()
                flags = nk.MORE
                break
            flags, budget = self._call(budget)
        if flags & nk.MORE:
            self.kick()

    def _call(self, budget: int) -> tuple[int, int]:
        """One kernel call of its own; its flags and the budget left."""
        self._before(budget)
        try:
            self.kernel.tx(self.q, self.native.env, self.out)
        finally:
            self.native.release()
        return self._after()

    def _before(self, budget: int) -> None:
        ring, q, credit = self.ring, self.q, self.credit
        q.r.load(ring)
        q.budget = budget
        if credit is not None:
            credit.admit(0, self.loop.time())  # the refill due now, as the first admit
            q.credit_on, q.credit = 1, credit.remaining
            q.charged_valid = self._charged is not None
            q.charged_cons = self._charged or 0
        self.native.refresh()

    def _after(self) -> tuple[int, int]:
        """What the call did, applied: its flags and the budget left."""
        ring, q, out, credit = self.ring, self.q, self.out, self.credit
        q.r.store(ring)
        flags = out.flags
        counters = self.vif.counters
        for name in nk.OUT_COUNTERS:
            value = getattr(out, name)
            if value:
                counters[name] += value
        for k in range(out.nerrors):
            e = out.errors[k]
            self.vif.guest_error("tx_error", f"{self.name}: request id {e.id} answered "
                                 f"ERROR: {_reason(e.reason, e.detail, e.grant)}")
        if credit is not None:
            credit.remaining -= out.charged
            if q.charged_valid:
                self._charged = q.charged_cons
        if flags & nk.FATAL:
            counters["tx_fatal"] += 1
            self.vif.fatal(f"{self.name}: {_reason(out.fatal_reason, out.fatal_detail)}")
            return 0, q.budget
        if flags & nk.CREDIT and credit is not None:
            # What CreditScheduler.admit does when a packet does not fit.
            credit.window_start = credit.next_credit
            credit.waiting = True
            self._timer = self.loop.call_at(credit.resume_at, self._on_credit)
        if flags & nk.TAP_FULL:
            self._waiting_writable = True
            self.loop.add_writer(self.fd, self._on_writable)
        if flags & nk.NOTIFY:
            self.notify()
        return flags, q.budget


def _reason(code: int, detail: int, grant: int = 0) -> str:
    return nk.REASONS.get(code, f"tx: reason {code}").format(
        detail=detail, grant=nk.GRANT_REASONS.get(grant, f"refused ({grant})"))


class NativeSteer:
    """A vif's steering configuration as its compiled queues see it (struct nk_steer),
    and the inboxes of frames steered between them; one per vif, shared by its queues.
    The configuration is copied in when the vif's `hash_generation` moved."""

    def __init__(self) -> None:
        self.steer = nk.Steer()
        self.generation = -1
        self._buffers: list[object] = []

    @classmethod
    def of(cls, vif: VifState) -> NativeSteer:
        if vif.native_steer is None:
            vif.native_steer = cls()
        native = vif.native_steer
        assert isinstance(native, cls)
        return native

    def sync(self, vif: VifState) -> None:
        if vif.hash_generation == self.generation:
            return
        self.generation = vif.hash_generation
        st, h = self.steer, vif.hash
        st.on, st.flags = int(h.steering), h.flags
        st.nq = vif.num_queues
        st.msize = len(h.mapping)
        st.key[:] = list(h.key)
        st.mapping[:len(h.mapping)] = h.mapping
        if h.steering and vif.num_queues > 1 and not self._buffers:
            for k in range(min(vif.num_queues, nk.MAX_QUEUES)):
                buf = (ctypes.c_uint8 * nk.INBOX_BYTES)()
                self._buffers.append(buf)
                st.inbox[k].data = ctypes.addressof(buf)


class CompiledRxPath(RxPath):
    """The rx path with each wake-up one call into net_kernel.c (nk_rx): the posted
    buffers (pinned writable) live in the kernel's queue; reading the tap, the
    multicast filter, the responses and the notify rule are done there."""

    def __init__(self, kernel: nk.NetKernel, ring: BackRing, grants: GrantTable, fd: int,
                 vif: VifState, loop: asyncio.AbstractEventLoop, name: str,
                 gso_offload: bool, index: int = 0) -> None:
        super().__init__(ring, grants, fd, vif, loop, name, gso_offload, index)
        self.kernel = kernel
        self.steer = NativeSteer.of(vif)
        self.native = nk.NativeEnv(grants.memory, grants)
        self.q = q = nk.RxQueue()
        self._ring_anchor: object = nk.ctypes.c_char.from_buffer(ring.ring.area)
        q.r.attach(ring)
        q.r.page = nk.ctypes.addressof(self._ring_anchor)
        q.fd = fd
        q.need = self.need
        q.index = index
        q.steer = ctypes.addressof(self.steer.steer)
        q.gso_offload = gso_offload
        f = vif.features
        q.gso_tcpv4, q.gso_tcpv6, q.mcast_control = (f.gso_tcpv4, f.gso_tcpv6,
                                                     f.multicast_control)
        self.out = nk.RxOut()
        self.round = net_round(kernel, loop)
        self._in_round = False
        self.served_on: set[int] = set()  # thread ids that served its wake-ups
        self.channel: EventChannel | None = None  # as CompiledTxPath.channel
        self._stalled = False  # paused by the last call: too few buffers posted
        self._wake: int | None = None  # wake_fd()
        self.round.join(self)

    @property
    def posted_count(self) -> int:
        return self.q.count

    def wake_fd(self) -> int:
        """While steering is on: an eventfd that another queue's thread of a polled call
        writes when it steers a frame into this queue's inbox, so that this queue's
        wait ends and delivers it in the same call; -1 otherwise."""
        if not self.steer.steer.on:
            return -1
        if self._wake is None:
            self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        return self._wake

    def stop(self) -> None:
        super().stop()
        self.round.leave(self)
        if self._wake is not None:
            os.close(self._wake)
            self._wake = None
        if self._ring_anchor is None:
            return
        self.native.refresh()
        try:
            self.kernel.rx_release(self.q, self.native.env)
        finally:
            self.native.release()  # no buffer is posted any more
        self._ring_anchor = None  # the ring mapping may go now

    def _readable(self) -> None:
        self.round.add(self)

    def posted_buffers(self) -> list[tuple[int, bool, int]]:
        q = self.q
        out = []
        for k in range(q.count):
            p = q.posted[(q.head + k) % nk.RX_MAX_POSTED]
            out.append((p.id, bool(p.ok), p.gref))
        return out

    def adopt(self, posted: list[tuple[int, bool, int]]) -> None:
        """As RxPath.adopt, into the kernel's queue: each buffer is pinned here and its
        pin handed to the kernel, which lets it go by gref (nk_rx_release, or once used)."""
        q = self.q
        native = self.grants.memory.native()
        for req_id, usable, gref in posted:
            if q.count >= nk.RX_MAX_POSTED:
                raise ValueError(f"{self.name}: more posted buffers than a ring holds")
            p = q.posted[(q.head + q.count) % nk.RX_MAX_POSTED]
            p.id, p.gref, p.ok, p.page = req_id, gref, 0, None
            mapping = self._pin(req_id, gref) if usable else None
            if mapping is not None:
                p.page = native.host_address(mapping.frame << 12, 4096)
                p.ok = 1
                mapping.hand_over()
            q.count += 1
        self.native.refresh()  # posted buffers keep the regions exported

    def _prepare(self, polled: bool = False) -> bool:
        """A wake-up is due: False if it has nothing to do, else the queue is loaded. In
        a polled call, a reader paused for want of posted buffers is watched too: it
        resumes once a call finds enough of them."""
        if self.stopped or self.suspended or self.vif.halted \
                or not (self._reading or (polled and self._stalled)):
            return False
        ring, q, vif = self.ring, self.q, self.vif
        q.r.load(ring)
        self.steer.sync(vif)
        q.need, q.reserve = self.need, self.reserve
        if q.mcast_control:
            addrs = list(vif.mcast)[:nk.MCAST_MAX]
            q.nmcast = len(addrs)
            for k, a in enumerate(addrs):
                q.mcast[k][:] = list(a)
        self.native.refresh()
        return True

    def _work(self, w: nk.Work) -> None:
        w.kind, w.budget = nk.WORK_RX, RX_BUDGET
        w.q, w.env, w.out = (ctypes.addressof(self.q), ctypes.addressof(self.native.env),
                             ctypes.addressof(self.out))

    def _released(self) -> None:
        # Posted buffers are host pointers into guest RAM: while any is posted, the
        # regions stay exported, so the VMM cannot unmap them (EBUSY), as a Python
        # GrantMapping's view keeps them.
        if not self.q.count:
            self.native.release()

    def _finish(self) -> None:
        ring, q, out, vif = self.ring, self.q, self.out, self.vif
        q.r.store(ring)
        counters = vif.counters
        for name in nk.RX_COUNTERS:
            value = getattr(out, name)
            if value:
                counters[name] += value
        for k in range(out.nbad):
            b = out.bad[k]
            why = (nk.GRANT_REASONS.get(b.grant, f"refused ({b.grant})") if b.grant else
                   "an rx buffer must be granted as a whole page, not as the sub-page "
                   f"{b.lo}..{b.hi}")
            vif.guest_error("rx_bad_grant", f"{self.name}: rx request id {b.id}: "
                            f"gref {b.gref}: {why}")
        woke = out.woke
        for k in range(vif.num_queues):
            if woke & (1 << k):
                vif.wake_rx(k)
        flags = out.flags
        self._stalled = bool(flags & nk.RX_STALL) and not flags & nk.FATAL
        if not flags & (nk.RX_STALL | nk.FATAL) and not self._reading:
            self._resume()  # paused for buffers, which a polled call found posted
        if flags & nk.FATAL:
            counters["rx_fatal"] += 1
            vif.fatal(f"{self.name}: rx: req_prod {out.fatal_prod} is more than a ring "
                      f"ahead of rsp_prod {ring.rsp_prod_pvt}")
        if flags & nk.RX_STALL:
            self._pause()
            if not (vif.halted or self.stopped):
                if flags & nk.RX_MORE:
                    self.kick()
                elif not vif.features.rx_notify:
                    self._poll = self.loop.call_later(0.01, self._polled)
        if flags & nk.NOTIFY:
            self.notify()
