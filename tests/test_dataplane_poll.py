"""bk_serve_poll and bk_serve_round_poll: after a batch the compiled blk kernel watches
the ring (or the rings of a round) and serves what the guest publishes meanwhile in the
same call, without asking for kicks; when the call ends, req_event is set again and a
stale kick is read. The guest is a thread writing the shared rings in guest RAM while the
loop's thread is in the kernel (GIL released)."""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import struct
import threading
import time

import pytest

from backendd.dataplane import kernel as K
from backendd.dataplane.blk import CompiledRingQueue
from backendd.devices.blk.queue import Counters
from backendd.devices.blk.request import Geometry
from backendd.evtchn import EventChannel
from bench import blkdiff
from rings.blkif import BLKIF_CODECS
from rings.consts import BlkifAbi, BlkifOp
from rings.ring import BackRing, SharedRing

PAGE = 4096
DATA_GREF, DATA_FRAME = 16, 2  # ring r's data: grefs 16 + 4r + k name frames 2 + 4r + k
DATA_PAGES = 4  # per ring
REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT = 0, 4, 8, 12
CODECS = BLKIF_CODECS[BlkifAbi.X86_64]


@pytest.fixture(scope="module")
def kernel() -> K.Kernel:
    k = K.load()
    assert k is not None, "the blk kernel is not built: `make test` builds it"
    return k


class Guest:
    """The frontend's side of one ring, written straight into guest RAM."""

    def __init__(self, ram: mmap.mmap, size: int, ring: int = 0) -> None:
        self.ram = ram
        self.size = size
        self.frame = ring  # ring r's page is frame r
        self.first_gref = DATA_GREF + DATA_PAGES * ring
        self.prod = 0
        self.kicks_asked: list[bool] = []

    def _word(self, field: int) -> ctypes.c_uint32:
        # one aligned 32-bit load or store, as the kernel sees a real frontend's (a
        # struct.pack_into of "<I" writes byte by byte: the kernel could see half of it)
        return ctypes.c_uint32.from_buffer(self.ram, self.frame * PAGE + field)

    def idx(self, field: int) -> int:
        return self._word(field).value

    def set_idx(self, field: int, value: int) -> None:
        self._word(field).value = value & 0xFFFFFFFF

    def publish_read(self, k: int, op: int = BlkifOp.READ) -> None:
        """A 4 KiB read (or write) of sectors 8k.. into (from) the ring's data page k
        (mod 4)."""
        segs = [self.first_gref + k % DATA_PAGES, 0, 7] + [0] * 30
        raw = CODECS.request.struct.pack(op, 1, 0, 100 + k, 8 * k, *segs)
        off = self.frame * PAGE + 64 + (self.prod % self.size) * CODECS.entry_size
        self.ram[off:off + len(raw)] = raw
        old, self.prod = self.prod, self.prod + 1
        self.set_idx(REQ_PROD, self.prod)
        # RING_PUSH_REQUESTS_AND_CHECK_NOTIFY
        event = self.idx(REQ_EVENT)
        self.kicks_asked.append((self.prod - event) % 2**32 < (self.prod - old) % 2**32)

    def wait_response(self, n: int, stop: threading.Event | None = None,
                      timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.idx(RSP_PROD) < n:
            if stop is not None and stop.is_set():
                return False
            if time.monotonic() > deadline:
                raise TimeoutError(f"no response {n}")
            time.sleep(0.0002)
        self.set_idx(RSP_EVENT, n + 1)  # RING_FINAL_CHECK_FOR_RESPONSES
        return True


class PollRig:
    def __init__(self, kernel: K.Kernel, tmpdir: str, rings: int = 1) -> None:
        self.world = w = blkdiff.World(1, tmpdir, "poll")
        gnt = bytearray(PAGE)
        ram = bytearray(blkdiff.RAM_BYTES)
        for r in range(rings):
            struct.pack_into("<HHI", gnt, (blkdiff.RING_GREF + r) * 8, 1, 0, r)
            struct.pack_into("<IIII", ram, r * PAGE, 0, 1, 0, 1)
        for k in range(DATA_PAGES * rings):
            struct.pack_into("<HHI", gnt, (DATA_GREF + k) * 8, 1, 0, DATA_FRAME + k)
        self.image = os.urandom(blkdiff.IMAGE_SECTORS * 512)
        geo = Geometry(sectors=blkdiff.IMAGE_SECTORS, sector_size=512, readonly=False,
                       discard=False, discard_secure=False, max_indirect_segments=32)
        case = blkdiff.Case(1, BlkifAbi.X86_64, list(range(rings)), 0, 0, 0, bytes(ram),
                            bytes(gnt), self.image, geo, False, b"")
        w.load(case)
        self.loop = asyncio.new_event_loop()
        self.k = kernel
        self.ram = mmap.mmap(w.ram_fd, blkdiff.RAM_BYTES)
        self.qs: list[CompiledRingQueue] = []
        self.guests: list[Guest] = []
        for r in range(rings):
            ring_map = w.grants.map(blkdiff.RING_GREF + r, writable=True)
            shared = SharedRing.over_pages([ring_map.page_view()], CODECS.entry_size)
            channel = EventChannel(r, os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
                                   os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            self.qs.append(CompiledRingQueue(
                kernel=kernel, index=r, back=BackRing.attach(shared), ring_maps=[ring_map],
                channel=channel, codecs=CODECS, geometry=geo, image=w.image,
                grants=w.grants, submit=blkdiff._sync_submit(self.loop), loop=self.loop,
                counters=Counters(), on_corrupt=lambda m: None))
            self.guests.append(Guest(self.ram, shared.size, r))
        self.q, self.guest = self.qs[0], self.guests[0]
        self.kick_fd, self.call_fd = self.q.channel.kick_fd, self.q.channel.call_fd

    def serve_poll(self, poll_ns: int, budget_ns: int) -> K.Out:
        q, out = self.q, K.Out()
        q._refresh()
        self.k.serve_poll(q._q, ctypes.byref(q._env), ctypes.byref(out), self.call_fd,
                          poll_ns, budget_ns)
        return out

    def serve_round_poll(self, due: list[int], poll_ns: int, budget_ns: int
                         ) -> tuple[list[K.Out], list[int], list[int]]:
        n = len(self.qs)
        outs = [K.Out() for _ in range(n)]
        for q in self.qs:
            q._refresh()
        served, parallel = (ctypes.c_uint8 * n)(), (ctypes.c_uint32 * n)()
        self.k.serve_round_poll(
            (ctypes.c_void_p * n)(*(q._q for q in self.qs)),
            (ctypes.POINTER(K.Env) * n)(*(ctypes.pointer(q._env) for q in self.qs)),
            (ctypes.POINTER(K.Out) * n)(*(ctypes.pointer(o) for o in outs)), n,
            (ctypes.c_uint8 * n)(*due), served, parallel,
            (ctypes.c_int32 * n)(*(q.channel.call_fd for q in self.qs)), poll_ns, budget_ns)
        return outs, list(served), list(parallel)

    def calls(self, ring: int = 0) -> int:
        try:
            return os.eventfd_read(self.qs[ring].channel.call_fd)
        except BlockingIOError:
            return 0

    def page(self, k: int) -> bytes:
        return bytes(self.ram[(DATA_FRAME + k) * PAGE:(DATA_FRAME + k + 1) * PAGE])

    def close(self) -> None:
        for q in self.qs:
            self.loop.run_until_complete(q.stop())
            q.release()
        self.ram.close()
        self.loop.close()
        self.world.close()


@pytest.fixture
def rig(kernel, tmp_path):
    r = PollRig(kernel, str(tmp_path))
    yield r
    r.close()


def test_requests_published_while_watched_are_served_in_the_same_call(rig):
    g = rig.guest
    g.publish_read(0)  # the request whose kick woke the loop ...
    os.eventfd_write(rig.kick_fd, 1)  # ... and a stale kick left unread

    def frontend() -> None:
        for k in range(3):
            g.wait_response(k + 1)
            if k < 2:
                g.publish_read(k + 1)

    t = threading.Thread(target=frontend)
    t.start()
    out = rig.serve_poll(poll_ns=2_000_000_000, budget_ns=4_000_000_000)
    t.join()
    assert out.stats.requests == out.stats.reads == 3 and out.stats.errors == 0
    # One event per published batch, written by the kernel itself.
    assert out.notified == 3 and rig.calls() == 3 and not out.flags & K.NOTIFY
    # req_event stayed behind while the kernel watched: no kick was asked for ...
    assert g.kicks_asked == [True, False, False]
    # ... and is set again when the call ends, the stale kick read.
    assert g.idx(REQ_EVENT) == 4 and g.idx(RSP_PROD) == 3
    with pytest.raises(BlockingIOError):
        os.eventfd_read(rig.kick_fd)
    for k in range(3):
        assert rig.page(k) == rig.image[k * PAGE:(k + 1) * PAGE]
    assert set(rig.world.grants.grefs_in_use()) <= {blkdiff.RING_GREF}


def test_jobs_of_the_io_threads_are_answered_in_the_same_call(rig):
    """A write goes to the kernel's I/O threads; the call reaps it when it is done (as
    bk_reap would on the ring's wake eventfd) and goes on with the ring. (Had the write
    taken longer than the spin, the ring would have been waited for asleep with
    req_event set: the guest's next request would then ask for a kick, sent here.)"""
    g = rig.guest
    rig.ram[DATA_FRAME * PAGE:(DATA_FRAME + 1) * PAGE] = b"w" * PAGE
    g.publish_read(0, BlkifOp.WRITE)

    def frontend() -> None:
        g.wait_response(1)
        g.publish_read(1)
        if g.kicks_asked[-1]:
            os.eventfd_write(rig.kick_fd, 1)
        g.wait_response(2)

    t = threading.Thread(target=frontend)
    t.start()
    out = rig.serve_poll(poll_ns=2_000_000_000, budget_ns=4_000_000_000)
    t.join()
    assert out.stats.writes == 1 and out.stats.reads == 1 and out.stats.pooled >= 1
    assert out.notified == 2 and out.inpool == 0 and not out.flags
    assert g.kicks_asked[0] and len(g.kicks_asked) == 2
    assert os.pread(rig.world.image.fd, PAGE, 0) == b"w" * PAGE


def test_a_guest_that_never_stops_does_not_hold_the_loop(rig):
    """However long the guest keeps asking, one call ends after its budget, so the loop's
    other work runs: here the call returns while the guest is still asking (it would go
    on for 20 s, and the ring is watched for 2 s after each request)."""
    g = rig.guest
    g.publish_read(0)
    stop = threading.Event()

    def frontend() -> None:
        n, until = 1, time.monotonic() + 20
        while time.monotonic() < until and g.wait_response(n, stop):
            g.publish_read(n)
            n += 1

    t = threading.Thread(target=frontend)
    t.start()
    try:
        out = rig.serve_poll(poll_ns=2_000_000_000, budget_ns=100_000_000)
        still_asking = t.is_alive()
    finally:
        stop.set()
        t.join()
    assert still_asking
    assert out.stats.requests >= 1 and out.stats.errors == 0
    assert not out.flags & (K.CORRUPT | K.INTERNAL)
    # the answers signalled (one event may cover two answers published together, and a
    # read the page cache could not serve may be with the I/O threads at the end)
    assert 0 < out.notified <= out.stats.requests


def test_an_idle_ring_ends_the_call_with_req_event_set(rig):
    out = rig.serve_poll(poll_ns=1_000_000, budget_ns=100_000_000)
    assert out.stats.requests == 0 and out.notified == 0 and not out.flags
    assert rig.guest.idx(REQ_EVENT) == 1
    rig.guest.publish_read(0)
    assert rig.guest.kicks_asked == [True]  # a sleeping backend is kicked as usual


def test_a_round_watches_every_ring_it_may_serve(kernel, tmp_path):
    """Ring 0 is kicked; ring 1's guest starts asking only once ring 0's first answer is
    out and sends no kick (its first request would ask for one, req_event being as at
    connect): both rings are served in the same call."""
    rig = PollRig(kernel, str(tmp_path), rings=2)
    try:
        g0, g1 = rig.guests
        g0.publish_read(0)

        def frontend() -> None:
            g0.wait_response(1)
            for k in range(3):
                g1.publish_read(k)
                g1.wait_response(k + 1)
            g0.publish_read(1)
            g0.wait_response(2)

        t = threading.Thread(target=frontend)
        t.start()
        outs, served, _ = rig.serve_round_poll([1, 2], poll_ns=2_000_000_000,
                                               budget_ns=4_000_000_000)
        t.join()
        assert served == [1, 1]
        assert [o.stats.reads for o in outs] == [2, 3]
        assert [o.notified for o in outs] == [2, 3] and [rig.calls(0), rig.calls(1)] == [2, 3]
        assert g1.kicks_asked == [True, False, False]  # then req_event stayed behind
        assert g0.kicks_asked == [True, False]
        assert g0.idx(REQ_EVENT) == 3 and g1.idx(REQ_EVENT) == 4
        assert not any(o.flags for o in outs)
        assert rig.page(DATA_PAGES + 2) == rig.image[2 * PAGE:3 * PAGE]  # ring 1's third
    finally:
        rig.close()


def test_a_round_leaves_alone_the_rings_it_may_not_serve(kernel, tmp_path):
    """A ring the loop does not serve (due 0: suspended, halted, stopping) is neither
    served nor has its req_event touched."""
    rig = PollRig(kernel, str(tmp_path), rings=2)
    try:
        g0, g1 = rig.guests
        g1.set_idx(REQ_EVENT, 7)
        g1.publish_read(0)
        g0.publish_read(0)
        outs, served, _ = rig.serve_round_poll([1, 0], poll_ns=1_000_000,
                                               budget_ns=100_000_000)
        assert served == [1, 0] and outs[0].stats.reads == 1 and outs[1].stats.reads == 0
        assert g1.idx(REQ_EVENT) == 7 and g1.idx(RSP_PROD) == 0
    finally:
        rig.close()


def _place(kernel: K.Kernel, ring: list[int], nthreads: int, front: list[int],
           cpu: list[int]) -> tuple[list[int], int]:
    fn = ctypes.CDLL(kernel.path).bk_place_rings
    fn.restype = ctypes.c_uint32
    n = len(ring)
    order = (ctypes.c_uint32 * n)(*ring)
    swaps = fn(order, n, nthreads, (ctypes.c_int32 * len(front))(*front),
               (ctypes.c_int32 * len(cpu))(*cpu))
    return list(order), swaps


def test_each_thread_of_a_round_gets_the_ring_whose_guest_is_on_its_cpu(kernel):
    """bk_place_rings, which orders a round's rings among its threads (ring i to thread
    i % nthreads) from where each ring's guest was seen running and where each thread
    is: a ring goes to the thread on its guest's CPU when that takes it from nowhere
    better."""
    # crossed: ring 0's guest is on thread 1's CPU and ring 1's on thread 0's
    assert _place(kernel, [0, 1], 2, front=[1, 0], cpu=[0, 1]) == ([1, 0], 1)
    # already together, or nothing known: as it was
    assert _place(kernel, [0, 1], 2, front=[0, 1], cpu=[0, 1]) == ([0, 1], 0)
    assert _place(kernel, [0, 1], 2, front=[-1, -1], cpu=[0, 1]) == ([0, 1], 0)
    assert _place(kernel, [0, 1], 2, front=[1, 0], cpu=[-1, -1]) == ([0, 1], 0)
    # both guests on one CPU: the ring already with its guest keeps its thread
    assert _place(kernel, [0, 1], 2, front=[0, 0], cpu=[1, 0]) == ([0, 1], 0)
    assert _place(kernel, [0, 1], 2, front=[0, 0], cpu=[0, 1]) == ([0, 1], 0)
    # every ring with its guest already (ring 2 is thread 0's second): as it was
    assert _place(kernel, [0, 1, 2], 2, front=[1, 0, 1], cpu=[1, 0]) == ([0, 1, 2], 0)
    # more rings than threads: each thread's first ring is the one with its guest there
    assert _place(kernel, [0, 1, 2, 3], 2, front=[5, 5, 0, 1], cpu=[1, 0]) == \
        ([3, 2, 1, 0], 2)
    assert _place(kernel, [2, 0, 1], 3, front=[7, 7, 8], cpu=[7, 9, 8]) == ([0, 1, 2], 2)
    # a ring with its guest at its own thread is not taken from it (two threads on one
    # CPU: thread 0 gets nothing better)
    assert _place(kernel, [0, 1], 2, front=[1, 0], cpu=[0, 0]) == ([0, 1], 0)
