"""bk_serve_poll: after a batch the compiled blk kernel watches the ring and serves what
the guest publishes meanwhile in the same call, without asking for kicks; when the call
ends, req_event is set again and a stale kick is read. The guest is a thread writing the
shared ring in guest RAM while the loop's thread is in the kernel (GIL released)."""

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
RING_FRAME = 0
DATA_GREF, DATA_FRAME = 16, 2  # gref 16 + k names frame 2 + k
REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT = 0, 4, 8, 12
CODECS = BLKIF_CODECS[BlkifAbi.X86_64]


@pytest.fixture(scope="module")
def kernel() -> K.Kernel:
    k = K.load()
    assert k is not None, "the blk kernel is not built: `make test` builds it"
    return k


class Guest:
    """The frontend's side of one ring, written straight into guest RAM."""

    def __init__(self, ram: mmap.mmap, size: int) -> None:
        self.ram = ram
        self.size = size
        self.prod = 0
        self.kicks_asked: list[bool] = []

    def _word(self, field: int) -> ctypes.c_uint32:
        # one aligned 32-bit load or store, as the kernel sees a real frontend's (a
        # struct.pack_into of "<I" writes byte by byte: the kernel could see half of it)
        return ctypes.c_uint32.from_buffer(self.ram, RING_FRAME * PAGE + field)

    def idx(self, field: int) -> int:
        return self._word(field).value

    def set_idx(self, field: int, value: int) -> None:
        self._word(field).value = value & 0xFFFFFFFF

    def publish_read(self, k: int) -> None:
        """A 4 KiB read of sectors 8k.. into the page of gref 16 + k (mod 8)."""
        segs = [DATA_GREF + k % 8, 0, 7] + [0] * 30
        raw = CODECS.request.struct.pack(BlkifOp.READ, 1, 0, 100 + k, 8 * k, *segs)
        off = RING_FRAME * PAGE + 64 + (self.prod % self.size) * CODECS.entry_size
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
    def __init__(self, kernel: K.Kernel, tmpdir: str) -> None:
        self.world = w = blkdiff.World(1, tmpdir, "poll")
        gnt = bytearray(PAGE)
        struct.pack_into("<HHI", gnt, blkdiff.RING_GREF * 8, 1, 0, RING_FRAME)
        for k in range(8):
            struct.pack_into("<HHI", gnt, (DATA_GREF + k) * 8, 1, 0, DATA_FRAME + k)
        ram = bytearray(blkdiff.RAM_BYTES)
        struct.pack_into("<IIII", ram, RING_FRAME * PAGE, 0, 1, 0, 1)
        self.image = os.urandom(blkdiff.IMAGE_SECTORS * 512)
        geo = Geometry(sectors=blkdiff.IMAGE_SECTORS, sector_size=512, readonly=False,
                       discard=False, discard_secure=False, max_indirect_segments=32)
        case = blkdiff.Case(1, BlkifAbi.X86_64, [RING_FRAME], 0, 0, 0, bytes(ram),
                            bytes(gnt), self.image, geo, False, b"")
        w.load(case)
        self.loop = asyncio.new_event_loop()
        ring_map = w.grants.map(blkdiff.RING_GREF, writable=True)
        shared = SharedRing.over_pages([ring_map.page_view()], CODECS.entry_size)
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.channel = EventChannel(0, self.kick_fd, self.call_fd)
        self.q = CompiledRingQueue(
            kernel=kernel, index=0, back=BackRing.attach(shared), ring_maps=[ring_map],
            channel=self.channel, codecs=CODECS, geometry=geo, image=w.image,
            grants=w.grants, submit=blkdiff._sync_submit(self.loop), loop=self.loop,
            counters=Counters(), on_corrupt=lambda m: None)
        self.k = kernel
        self.ram = mmap.mmap(w.ram_fd, blkdiff.RAM_BYTES)
        self.guest = Guest(self.ram, shared.size)

    def serve_poll(self, poll_ns: int, budget_ns: int) -> K.Out:
        q, out = self.q, K.Out()
        q._refresh()
        self.k.serve_poll(q._q, ctypes.byref(q._env), ctypes.byref(out), self.call_fd,
                          poll_ns, budget_ns)
        return out

    def calls(self) -> int:
        try:
            return os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return 0

    def page(self, k: int) -> bytes:
        return bytes(self.ram[(DATA_FRAME + k) * PAGE:(DATA_FRAME + k + 1) * PAGE])

    def close(self) -> None:
        self.loop.run_until_complete(self.q.stop())
        self.q.release()
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
    assert out.notified == out.stats.requests


def test_an_idle_ring_ends_the_call_with_req_event_set(rig):
    out = rig.serve_poll(poll_ns=1_000_000, budget_ns=100_000_000)
    assert out.stats.requests == 0 and out.notified == 0 and not out.flags
    assert rig.guest.idx(REQ_EVENT) == 1
    rig.guest.publish_read(0)
    assert rig.guest.kicks_asked == [True]  # a sleeping backend is kicked as usual
