"""nk_serve_poll: a polled call serves a queue, then waits (asleep in ppoll) for the
queue's next kick or frame for `[daemon] poll_us` and serves it again in the same call,
signalling the guest's events itself, with Python once per call. The guest is a thread
writing the shared ring in guest RAM while the loop's thread is in the kernel (GIL
released); the event channel is a real pair of eventfds and the tap a socket pair."""

from __future__ import annotations

import asyncio
import gc
import os
import select
import threading
import time

import pytest

from backendd.dataplane import net as net_plane
from backendd.dataplane import netkernel as nk
from backendd.dataplane.rounds import POLL
from backendd.devices.net.vif import Features
from backendd.evtchn import EventChannel
from bench import netdiff, netdiff_rx
from rings.netif import RX_REQUEST, TX_REQUEST
from rings.sring import REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD

FRAME_PAGE = 6


@pytest.fixture(scope="module")
def kernel() -> nk.NetKernel:
    k = nk.load()
    assert k is not None, "the net kernel is not built: `make test` builds it"
    want = os.environ.get("BACKENDD_NET_KERNEL")  # the sanitizer build, when asked for
    assert want is None or k.path == want
    return k


@pytest.fixture
def polling(monkeypatch):
    # 30 ms, and a budget of 1 s: a guest thread's pace
    for name in ("ns", "net_ns"):
        monkeypatch.setattr(POLL, name, 30_000_000)
    for name in ("budget_ns", "net_budget_ns"):
        monkeypatch.setattr(POLL, name, 1_000_000_000)


def _udp_frame(n: int) -> bytes:
    eth = bytes.fromhex("00163e000002") + bytes.fromhex("00163e000001") + b"\x08\x00"
    return (eth + bytes.fromhex("4500") + (n - 14).to_bytes(2, "big")).ljust(n, b"x")


def _channel(path) -> EventChannel:
    ch = EventChannel(1, os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC))
    path.channel = ch
    path.notify = ch.notify
    return ch


def _counter(fd: int) -> int:
    """An eventfd's counter, reset (0 when it was not written)."""
    if not select.select([fd], [], [], 0)[0]:
        return 0
    return os.eventfd_read(fd)


class TxGuest:
    """The frontend of one tx ring: one 100-byte frame per packet, kicks when ring.h's
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY says so."""

    def __init__(self, w: netdiff.World, ch: EventChannel) -> None:
        self.w, self.ch = w, ch
        w.ram.write(FRAME_PAGE * 4096, _udp_frame(100))
        self.gref = w.gt.grant_access(FRAME_PAGE)
        self.prod = w.shared.idx[REQ_PROD]
        self.kicks = 0

    def publish(self, n: int = 1) -> None:
        shared, old = self.w.shared, self.prod
        for k in range(n):
            shared.write_slot(self.prod + k, TX_REQUEST.pack(self.gref, 0, 0,
                                                             (self.prod + k) & 0xFFFF, 100))
        self.prod += n
        shared.idx[REQ_PROD] = self.prod
        event = shared.idx[REQ_EVENT]
        if (self.prod - event) % 2**32 < (self.prod - old) % 2**32:
            os.eventfd_write(self.ch.kick_fd, 1)
            self.kicks += 1

    def wait_answered(self, n: int, stop: threading.Event) -> bool:
        shared = self.w.shared
        while shared.idx[RSP_PROD] < n:
            if stop.is_set():
                return False
            time.sleep(0.0002)
        shared.idx[RSP_EVENT] = shared.idx[RSP_PROD] + 1  # the next response signals
        return True

    def kicked_before(self) -> None:
        """The kick that made the loop serve the queue, read as the loop does."""
        _counter(self.ch.kick_fd)
        self.kicks = 0


def _serve_beside(served, paths, guest_side) -> None:
    """One call of `served` for `paths` while `guest_side(stop)` plays the guest on a
    thread of its own; `stop` is set and the thread joined once the call returns."""
    stop = threading.Event()
    t = threading.Thread(target=guest_side, args=(stop,))
    t.start()
    try:
        served.serve(paths)
    finally:
        stop.set()
        t.join()


def test_what_the_guest_publishes_while_watched_is_served_in_the_same_call(
        kernel, polling):
    """The guest publishes a packet once the first is answered, while the call waits:
    its kick wakes the call, which reads it and serves the packet; both answers are
    signalled on the call eventfd by the kernel, and the loop did one call."""
    w = netdiff._world(kernel, 1, None, 4 << 20, mcast_control=False)
    ch = _channel(w.path)
    served = w.path.round
    try:
        guest = TxGuest(w, ch)
        guest.publish()
        guest.kicked_before()

        def second(stop: threading.Event) -> None:
            if guest.wait_answered(1, stop):
                guest.publish()

        polled = served.polled
        _serve_beside(served, [w.path], second)
        assert served.polled == polled + 1
        assert w.shared.idx[RSP_PROD] == 2  # both answered by that one call
        assert len(netdiff._frames(w)) == 2
        assert guest.kicks == 1  # req_event was set after the first batch: it kicked
        assert ch.kicks == 1 and _counter(ch.kick_fd) == 0  # read by the kernel
        assert ch.notifies == 2 and _counter(ch.call_fd) == 2  # one per batch
        assert w.notifies[0] == 0  # not by Python
        assert w.vif.counters["tx_packets"] == 2
    finally:
        w.close()
        ch.close()


def test_an_idle_queue_ends_the_call_with_req_event_set(kernel, monkeypatch):
    """Nothing published while it waits: the call ends after poll_us, and req_event asks
    for a kick at the next request, so nothing the guest publishes later is missed."""
    monkeypatch.setattr(POLL, "ns", 100_000)
    monkeypatch.setattr(POLL, "net_ns", 100_000)
    # only idleness may end this call: a budget a busy machine could outrun (a thread
    # descheduled for longer than it) would end it first
    monkeypatch.setattr(POLL, "budget_ns", 1_000_000_000)
    monkeypatch.setattr(POLL, "net_budget_ns", 1_000_000_000)
    w = netdiff._world(kernel, 1, None, 4 << 20, mcast_control=False)
    ch = _channel(w.path)
    try:
        guest = TxGuest(w, ch)
        guest.publish(3)
        guest.kicked_before()
        w.path.round.serve([w.path])
        assert w.shared.idx[RSP_PROD] == 3
        assert w.shared.idx[REQ_EVENT] == guest.prod + 1
        assert w.path.round.ends[nk.END_IDLE] == 1 and not w.path._scheduled
        assert guest.kicks == 0
        guest.publish()
        assert guest.kicks == 1  # the next request asks for a kick
    finally:
        w.close()
        ch.close()


def test_a_guest_that_never_stops_still_lets_the_call_end(kernel, polling, monkeypatch):
    """A guest that publishes again as soon as it is answered keeps the queue busy: the
    call ends after POLL.budget_ns all the same (20 ms here, for a guest thread's pace),
    what it served answered and counted."""
    monkeypatch.setattr(POLL, "budget_ns", 20_000_000)
    monkeypatch.setattr(POLL, "net_budget_ns", 20_000_000)
    w = netdiff._world(kernel, 1, None, 4 << 20, mcast_control=False)
    ch = _channel(w.path)
    served = w.path.round
    try:
        guest = TxGuest(w, ch)
        guest.publish()
        guest.kicked_before()

        def forever(stop: threading.Event) -> None:
            while not stop.is_set():
                if guest.wait_answered(guest.prod, stop):
                    guest.publish()

        batches = served.batches
        _serve_beside(served, [w.path], forever)
        assert served.batches - batches > 2
        assert served.ends[nk.END_BUDGET] == 1
        answered = w.shared.idx[RSP_PROD]
        assert 2 < answered <= guest.prod
        assert w.vif.counters["tx_packets"] == answered
    finally:
        w.close()
        ch.close()


def test_a_reader_waiting_for_buffers_is_served_when_the_guest_posts_them(
        kernel, polling):
    """An rx queue with a frame in its tap and no buffers posted: the call waits on the
    rx kick; the guest posts buffers (and kicks, as req_event asks), the frame is
    delivered in the same call, and the reader is back to reading the tap."""
    case = netdiff_rx.RxCase(1, Features(sg=True), 1500, False, None, 1)
    w = netdiff_rx.build(kernel, case)
    path = w.path
    assert isinstance(path, net_plane.CompiledRxPath)
    ch = _channel(path)
    try:
        path.start()
        w.peer.send(bytes(10) + _udp_frame(200))  # a virtio-net header, then the frame
        path.round.serve([path])  # nothing posted: the reader pauses for buffers
        assert not path._reading and path._stalled
        assert w.vif.counters["rx_stalls"] == 1
        # one frame's buffers and one more, so the reader does not stall again after it
        grefs = [w.gt.grant_access(f) for f in netdiff_rx.FRAMES[:path.need + 1]]
        kicked = []

        def post(_stop: threading.Event) -> None:
            time.sleep(0.005)  # let the call reach its wait (either way it is served)
            shared = w.shared
            prod = shared.idx[REQ_PROD]
            for k, gref in enumerate(grefs):
                shared.write_slot(prod + k, RX_REQUEST.pack(k, gref))
            shared.idx[REQ_PROD] = prod + len(grefs)
            event = shared.idx[REQ_EVENT]
            if (prod + len(grefs) - event) % 2**32 < len(grefs):
                os.eventfd_write(ch.kick_fd, 1)
                kicked.append(True)

        _serve_beside(path.round, [path], post)
        assert kicked == [True]  # the stalled reader asked for a kick
        assert w.vif.counters["rx_packets"] == 1
        assert w.vif.counters["rx_stalls"] == 1  # the stall looked at again is the same
        assert path._reading and not path._stalled
        assert ch.notifies == 1 and _counter(ch.call_fd) == 1
    finally:
        w.close()
        ch.close()


def test_poll_us_zero_serves_one_wake_up_per_call(kernel, monkeypatch):
    monkeypatch.setattr(POLL, "ns", 0)
    w = netdiff._world(kernel, 1, None, 4 << 20, mcast_control=False)
    ch = _channel(w.path)
    try:
        guest = TxGuest(w, ch)
        guest.publish(2)
        polled = w.path.round.polled
        w.path.round.serve([w.path])
        assert w.path.round.polled == polled
        assert w.shared.idx[RSP_PROD] == 2
        assert ch.notifies == 1  # by Python, as before
    finally:
        w.close()
        ch.close()



def test_the_call_stays_in_the_kernel_until_the_loop_has_work(kernel, polling):
    """The loop's own poll set is watched by the call, with the queue's kick fd kept out
    of it meanwhile: a kick (the channel watched by the loop, as in the daemon) is read
    and served by the call itself, after a pause in which the queue was idle; then
    another fd of the loop becomes readable and the call ends for Python's turn, its
    kick fd watched by the loop again."""
    w = netdiff._world(kernel, 1, None, 4 << 20, mcast_control=False)
    ch = _channel(w.path)
    served = w.path.round
    other_r, other_w = os.pipe()
    loop_kicks: list[None] = []
    try:
        ch.start(w.loop, lambda: loop_kicks.append(None))
        w.loop.add_reader(other_r, lambda: None)
        guest = TxGuest(w, ch)
        guest.publish()
        guest.kicked_before()

        def guest_then_loop(stop: threading.Event) -> None:
            if not guest.wait_answered(1, stop):
                return
            time.sleep(0.002)  # idle meanwhile, less than POLL.net_ns
            guest.publish()
            if guest.wait_answered(2, stop):
                os.write(other_w, b"x")  # the loop has other work

        polled = served.polled
        _serve_beside(served, [w.path], guest_then_loop)
        assert served.polled == polled + 1
        assert w.shared.idx[RSP_PROD] == 2  # both served by that one call
        assert served.ends[nk.END_LOOP] == 1  # ended for the loop's work
        assert guest.kicks == 1 and ch.kicks == 1  # the kick was the call's to read
        assert loop_kicks == []
        # The kick fd is the loop's to watch again.
        guest.publish()
        assert guest.kicks == 2
        w.loop.remove_reader(other_r)
        w.loop.run_until_complete(asyncio.sleep(0))
        assert loop_kicks == [None]
    finally:
        w.loop.remove_reader(other_r)
        ch.stop()
        w.close()
        ch.close()
        os.close(other_r)
        os.close(other_w)


def test_a_queue_that_needs_python_ends_the_other_queues_watch(kernel, polling):
    """Two queues in one call: the first runs out of credit (Python arms the timer),
    which ends the call for both at once, so the second's watch does not hold Python
    up for the budget; and the credit timer's time is the call's budget at most."""
    limited = netdiff._world(kernel, 1, (50, 100_000), 4 << 20, mcast_control=False)
    other = netdiff._world(kernel, 1, None, 4 << 20, mcast_control=False)
    channels = [_channel(limited.path), _channel(other.path)]
    served = limited.path.round
    other.path.round.leave(other.path)
    other.path.round = served
    served.join(other.path)
    try:
        guest = TxGuest(limited, channels[0])
        guest.publish()  # 100 bytes: more than the credit of 50
        guest.kicked_before()
        polled = served.polled
        served.serve([limited.path])
        assert served.polled == polled + 1
        assert limited.vif.counters["tx_rate_limited"] == 1
        assert limited.path._timer is not None  # armed by Python after the call
        assert served.ends[nk.END_CALLER] == 1  # the first queue needed Python
        assert served.ends[nk.END_LOOP] == 1  # and the other left with it
        assert limited.shared.idx[RSP_PROD] == 0
        # While the first waits for its credit, a call serving the other lasts until
        # the credit timer at most (the next 100 ms window), not the 1 s budget.
        fd, budget_ns, _ = served._loop_watch()
        assert fd >= 0
        assert budget_ns <= 100_000_000 < POLL.net_budget_ns
    finally:
        served.leave(other.path)
        limited.close()
        other.close()
        for ch in channels:
            ch.close()


def test_a_dropped_loop_takes_its_nic_round_and_eventfd_with_it(kernel):
    """The nic round of a loop owns an eventfd; once the loop is closed and dropped, the
    round and that fd go too (many loops, as in tests and the fuzz, used to keep every
    round and its fd for the life of the process)."""
    from backendd.dataplane.rounds import loop_round

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    gc.collect()
    before = open_fds()
    for _ in range(20):
        loop = asyncio.new_event_loop()
        served = loop_round(net_plane.NetRound, kernel, loop)
        assert served.loop is loop
        loop.close()
        del loop, served
    gc.collect()
    assert open_fds() == before
