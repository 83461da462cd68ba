"""The transfers of O_DIRECT images go through each queue's io_uring (blk_kernel.c,
"io_uring"): data, errors, suspend and disconnect with transfers in flight, and the same
on the I/O threads when io_uring is not used (bk_set_uring(0)). Real image files on the
real disk, opened O_DIRECT; also run under AddressSanitizer and UBSan by
tests/test_dataplane.py."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import resource
from collections.abc import Iterator

import pytest

from backendd.dataplane import kernel as K
from backendd.dataplane.rounds import POLL
from backendd.guest.blkfront import BlkIOError
from rings.consts import BlkifStatus
from tests.test_blk_device import MiB, Rig, file_bytes, make_image, random_workload

MODES = ("uring", "pool")


@contextlib.contextmanager
def transfers_through(mode: str) -> Iterator[K.Kernel]:
    """Queues set up inside go through their io_uring ("uring") or the I/O threads."""
    k = K.load()
    assert k is not None and k.set_uring is not None, "the blk kernel is not built"
    was = k.set_uring(int(mode == "uring"))
    try:
        yield k
    finally:
        k.set_uring(was)


@contextlib.contextmanager
def not_watched() -> Iterator[None]:
    """Rings served without being watched after a batch: every completion is reaped by
    the loop on the ring's wake eventfd, so transfers stay in flight between turns."""
    was = POLL.ns
    POLL.ns = 0
    try:
        yield
    finally:
        POLL.ns = was


def uring_stats(dev) -> dict[str, int]:
    total = {"on": 0, "submitted": 0, "in_flight": 0}
    for q in dev.queues:
        for k, v in q.uring().items():
            total[k] += v
    return total


def sha256(path: str) -> str:
    return hashlib.sha256(file_bytes(path)).hexdigest()


@pytest.mark.parametrize("mode", MODES)
async def test_direct_io_reads_and_writes(tmp_path, mode):
    """Random reads and writes (direct and indirect requests) and flushes on two queues
    of an O_DIRECT image: every read checked against a model, the image against it at
    the end; with io_uring, every transfer went through the queues' rings."""
    with transfers_through(mode):
        rig = Rig(dataplane="compiled")
        try:
            image = make_image(tmp_path / "disk.img", 16 * MiB)
            dev, front = await rig.attach({"path": image, "direct-io": "1"}, queues=2,
                                          ring_order=1)
            done = await random_workload(front, image, 16 * MiB, workers=8, ops=20, seed=3)
            # Whole-image checks through the guest: one 1 MiB indirect write, a flush,
            # and the image read back in 256 KiB requests.
            data = os.urandom(MiB)
            await front.write(2 * MiB // 512, data)
            await front.flush()
            back = await asyncio.gather(*(front.read(i * 512, 256 * 1024)
                                          for i in range(16 * MiB // (256 * 1024))))
            whole = b"".join(back)
            assert whole[2 * MiB:3 * MiB] == data
            assert hashlib.sha256(whole).hexdigest() == sha256(image)
            stats = dev.stats()
            assert stats["errors"] == stats["invalid"] == stats["inline_io"] == 0
            assert stats["pooled"] == done + 2 + 64 and stats["flushes"] == 1
            ur = uring_stats(dev)
            if mode == "uring":
                assert ur["on"] == 2  # both queues moved data
                assert ur["submitted"] >= done + 1 + 64  # every transfer; the flush not
            else:
                assert ur == {"on": 0, "submitted": 0, "in_flight": 0}
            assert ur["in_flight"] == 0
        finally:
            await rig.close()  # asserts no grant is left in use


@pytest.mark.parametrize("mode", MODES)
async def test_a_short_transfer_is_finished_or_fails_as_on_the_io_threads(tmp_path,
                                                                         mode):
    """The image shrinks under the device (its geometry stays): a read that starts
    before the new end and reaches past it moves what there is, then meets the end (a
    transfer of 0 bytes) and is answered BLKIF_RSP_ERROR, as is one wholly beyond it;
    reads before the end are unaffected. Both paths answer the same."""
    with transfers_through(mode):
        rig = Rig(dataplane="compiled")
        try:
            image = make_image(tmp_path / "disk.img", 4 * MiB)
            dev, front = await rig.attach({"path": image, "direct-io": "1"})
            end = MiB + 2048
            os.truncate(image, end)
            statuses = []
            for sector, n in ((end // 512 - 4, 8192), (2 * MiB // 512, 4096),
                              (end // 512 - 4, 4 * 4096)):
                with pytest.raises(BlkIOError) as info:
                    await front.read(sector, n)
                statuses.append(info.value.status)
            assert statuses == [BlkifStatus.ERROR] * 3
            assert await front.read(0, 64 * 1024) == file_bytes(image, 0, 64 * 1024)
            assert await front.read(end // 512 - 4, 2048) == file_bytes(image, end - 2048)
            stats = dev.stats()
            assert stats["errors"] == 3 and stats["reads"] == 2
            assert uring_stats(dev)["on"] == (mode == "uring")
        finally:
            await rig.close()


async def _burst(front, n: int, size: int) -> list[asyncio.Future]:
    return [asyncio.ensure_future(front.read(i * size // 512, size)) for i in range(n)]


async def _until_in_flight(dev, taken: int) -> int:
    """Loop turns until the kernel has taken `taken` requests and transfers are in the
    io_uring (the burst's first completions are reaped only in a later turn)."""
    for _ in range(100000):
        await asyncio.sleep(0)
        n = uring_stats(dev)["in_flight"]
        if n and dev.queues[0].state()["req_cons"] == taken:
            return n
    return 0


async def test_suspend_waits_for_transfers_in_the_io_uring(tmp_path):
    """SUSPEND while 256 KiB O_DIRECT reads are in the io_uring: it returns only once
    every one is reaped, unpinned, answered and published; nothing is in flight or in
    the pool then, and the ring serves again after RESUME."""
    with transfers_through("uring"), not_watched():
        rig = Rig(dataplane="compiled")
        try:
            size = 256 * 1024
            image = make_image(tmp_path / "disk.img", 16 * MiB)
            dev, front = await rig.attach({"path": image, "direct-io": "1"}, ring_order=1)
            reads = await _burst(front, 48, size)
            assert await _until_in_flight(dev, 48) > 0
            await asyncio.wait_for(dev.suspend(), timeout=60)
            q = dev.queues[0]
            assert uring_stats(dev)["in_flight"] == 0
            assert q.state()["in_pool"] == 0 and q.state()["waiting"] == 0
            # all it took answered and published before suspend returned
            st = q.state()
            assert st["req_cons"] == st["rsp_prod_pvt"] == st["pushed"] == 48
            got = await asyncio.wait_for(asyncio.gather(*reads), timeout=60)
            assert got == [file_bytes(image, i * size, size) for i in range(48)]
            await dev.resume()
            assert await front.read(8, 4096) == file_bytes(image, 4096, 4096)
        finally:
            await rig.close()


async def test_disconnect_with_transfers_in_the_io_uring(tmp_path):
    """The device goes away while O_DIRECT writes and reads are in the io_uring: they
    complete and are answered first, no grant stays in use, the image holds the
    writes, and the queue's io_uring is let go."""
    with transfers_through("uring"), not_watched():
        rig = Rig(dataplane="compiled")
        try:
            size = 128 * 1024
            image = make_image(tmp_path / "disk.img", 16 * MiB)
            dev, front = await rig.attach({"path": image, "direct-io": "1"}, ring_order=1)
            data = [os.urandom(size) for _ in range(24)]
            writes = [asyncio.ensure_future(front.write((i + 64) * size // 512, d))
                      for i, d in enumerate(data)]
            reads = await _burst(front, 24, size)
            assert await _until_in_flight(dev, 48) > 0
            queues = list(dev.queues)
            await asyncio.wait_for(dev.disconnect(), timeout=60)
            assert all(q._q is None for q in queues)  # freed: nothing was in flight
            await asyncio.wait_for(asyncio.gather(*writes), timeout=60)
            got = await asyncio.wait_for(asyncio.gather(*reads), timeout=60)
            assert got == [file_bytes(image, i * size, size) for i in range(24)]
            assert file_bytes(image, 64 * size, 24 * size) == b"".join(data)
            assert rig.grants_in_use() == []
        finally:
            await rig.close()


@contextlib.contextmanager
def no_file_descriptor_left() -> Iterator[None]:
    """Every descriptor the open-file limit allows is taken (the limit lowered to just
    above those open now), so the next one asked for fails with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
    try:
        with pytest.raises(OSError) as info:
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        assert info.value.errno == errno.EMFILE
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_queue_that_cannot_get_an_io_uring_uses_the_io_threads(tmp_path):
    """io_uring_setup fails at the queue's first transfer (here for want of a file
    descriptor; likewise without io_uring in the kernel or under a seccomp filter):
    that transfer and every later one of the queue go to the I/O threads, and are
    answered right."""
    with transfers_through("uring"):
        rig = Rig(dataplane="compiled")
        try:
            image = make_image(tmp_path / "disk.img", 4 * MiB)
            want = file_bytes(image, 0, 2 * MiB)
            dev, front = await rig.attach({"path": image, "direct-io": "1"})
            with no_file_descriptor_left():
                got = await asyncio.wait_for(front.read(0, 64 * 1024), timeout=60)
                assert uring_stats(dev)["on"] == 0
            assert got == want[:64 * 1024]
            data = os.urandom(4096)
            await front.write(8, data)  # a descriptor could be had now: not tried again
            got = await asyncio.gather(*(front.read(i * 128, 64 * 1024) for i in range(32)))
            assert b"".join(got) == want[:4096] + data + want[8192:]
            stats = dev.stats()
            assert stats["pooled"] == 34 and stats["errors"] == 0
            assert uring_stats(dev) == {"on": 0, "submitted": 0, "in_flight": 0}
        finally:
            await rig.close()
