"""The blk device in-process: real image files, real guest RAM and grant table memfds,
real eventfds; the simulated guest's blkfront drives it."""

from __future__ import annotations

import asyncio
import functools
import os
import random
import subprocess
from collections.abc import Mapping

import pytest
from procstat import fdinfo

from backendd.config import BlockSection, Config
from backendd.devices.base import DEVICE_TYPES, DeviceContext, NoticeSink
from backendd.devices.blk.device import BlkDevice
from backendd.errors import ConfigError
from backendd.evtchn import EventChannel
from backendd.grants import GrantTable
from backendd.guest import GuestGrantTable, GuestRAM
from backendd.guest.blkfront import BlkFront, BlkIOError
from backendd.iopool import FairPool
from backendd.memory import GuestMemory
from rings.consts import GTF_READING, GTF_WRITING, BlkifOp, BlkifStatus
from rings.sring import REQ_PROD

MiB = 1 << 20


class Notices(NoticeSink):
    def __init__(self) -> None:
        self.misbehaved: list[tuple[int, str]] = []
        self.failed: list[tuple[int, int, str]] = []
        self.keys: list[tuple[int, dict[str, str]]] = []

    def device_failed(self, devid: int, code: int, message: str) -> None:
        self.failed.append((devid, code, message))

    def frontend_misbehaved(self, devid: int, message: str) -> None:
        self.misbehaved.append((devid, message))

    def keys_changed(self, devid: int, keys: Mapping[str, str]) -> None:
        self.keys.append((devid, dict(keys)))


class Rig:
    """One guest (RAM + grant table) wired to the daemon-side memory and grant table."""

    def __init__(self, ram_size: int = 48 * MiB, extras: dict | None = None,
                 dataplane: str = "python") -> None:
        self.dataplane = dataplane  # what attach() asks for unless the test says
        self.ram = GuestRAM(ram_size)
        self.gt = GuestGrantTable(nr_frames=8)  # 4096 grefs: enough for 12 MiB in flight
        self.mem = GuestMemory()
        for gpa, size, fd, offset in self.ram.regions:
            self.mem.add_region(gpa, size, fd, offset)
        self.grants = GrantTable(self.mem)
        self.grants.set_table(self.gt.fd, 0, self.gt.nr_frames)
        # The daemon's own I/O pool, keyed per device as the session keys it.
        self.pool = FairPool(4)
        self.notices = Notices()
        self.extras = extras or {}
        self.ctx = self.context(0)
        self.pairs: list[tuple[BlkDevice, BlkFront]] = []

    def context(self, devid: int) -> DeviceContext:
        return DeviceContext(self.mem, self.grants, asyncio.get_running_loop(), self.notices,
                             functools.partial(self.pool.submit, devid), self.extras)

    async def attach(self, config: dict[str, str], *, devid: int = 51712, queues: int = 1,
                     ring_order: int = 0, abi: str = "x86_64-abi", seed: int = 0,
                     persistent: bool = False) -> tuple[BlkDevice, BlkFront]:
        config = {"dataplane": self.dataplane, **config}
        dev = BlkDevice(devid, config, self.context(devid))
        front = BlkFront(self.ram, self.gt, devid, queues=queues, ring_order=ring_order,
                         abi=abi, backend_keys=dev.backend_keys(),
                         first_port=1 + 16 * len(self.pairs), seed=seed,
                         persistent=persistent)
        channels = {port: EventChannel(port, kick, call)
                    for port, kick, call in front.channels()}
        front.update_backend_keys(await dev.connect(front.frontend_keys(), channels))
        front.start()
        self.pairs.append((dev, front))
        return dev, front

    def grants_in_use(self) -> list[int]:
        return [g for g in range(8, self.gt.entries)
                if self.gt.entry(g)[0] & (GTF_READING | GTF_WRITING)]

    async def close(self) -> None:
        if self.ram.fd < 0:
            return
        for dev, front in self.pairs:
            await dev.close()
            front.close()
            assert front.refused_revokes == []
            assert front.stray_responses == []
        assert self.grants_in_use() == []
        self.pool.shutdown()
        self.grants.close()
        self.mem.close()
        self.gt.close()
        self.ram.close()


@pytest.fixture(params=["compiled", "python"])
async def rig(request):
    """Every device test runs on both data planes: the compiled kernel and the
    pure-Python reference."""
    r = Rig(dataplane=request.param)
    yield r
    await r.close()


def taken(queue) -> int:
    """Requests the backend has taken off the ring so far."""
    return queue.state()["req_cons"] if hasattr(queue, "state") else queue.back.req_cons


def make_image(path, size: int, fill: bool = True) -> str:
    with open(path, "wb") as f:
        f.write(random.Random(size).randbytes(size) if fill else b"")
        f.truncate(size)
    return str(path)


def file_bytes(path: str, offset: int = 0, n: int = -1) -> bytes:
    """The image as seen through a fresh descriptor, independent of the device's."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


SIZES = [512, 1024, 4096, 4608, 8192, 32768, 45056, 65536, 131072, 1 * MiB, 512 * 1024]


async def random_workload(front: BlkFront, image: str, disk: int, *, workers: int = 8,
                          ops: int = 30, seed: int = 1, align: int = 512) -> int:
    """Workers each own a region and do random reads and writes in it, concurrently;
    every read is checked against a model, and the model against the file at the end."""
    model = bytearray(file_bytes(image))
    region = disk // workers // align * align
    done = 0

    async def worker(w: int) -> None:
        nonlocal done
        rng = random.Random(seed * 100 + w)
        base = w * region
        for _ in range(ops):
            n = min(rng.choice(SIZES), region)
            n = max(align, n - n % align)
            off = base + rng.randrange(0, region - n + 1, align)
            if rng.random() < 0.5:
                data = rng.randbytes(n)
                await front.write(off // 512, data)
                model[off:off + n] = data
            else:
                assert await front.read(off // 512, n) == model[off:off + n]
            done += 1

    await asyncio.gather(*(worker(w) for w in range(workers)))
    assert file_bytes(image) == model
    return done


async def test_random_reads_and_writes_across_wraparound(rig, tmp_path):
    image = make_image(tmp_path / "disk.img", 16 * MiB)
    dev, front = await rig.attach({"path": image})
    done = await random_workload(front, image, 16 * MiB, workers=12, ops=20)
    ring = front.queues[0].front
    assert done > 4 * ring.size and ring.req_prod_pvt == done  # wrapped many times
    stats = dev.stats()
    assert stats["reads"] + stats["writes"] == done
    assert stats["errors"] == stats["invalid"] == 0
    assert stats["bytes_read"] + stats["bytes_written"] > 4 * MiB


async def test_four_queues_multi_page_rings(rig, tmp_path):
    image = make_image(tmp_path / "disk.img", 16 * MiB)
    dev, front = await rig.attach({"path": image}, queues=4, ring_order=2)
    keys = front.frontend_keys()
    assert keys["multi-queue-num-queues"] == "4" and "queue-3/ring-ref3" in keys
    await random_workload(front, image, 16 * MiB, workers=16, ops=12, seed=2)
    assert len(dev.queues) == 4
    assert all(q.front.req_prod_pvt > 0 for q in front.queues)  # every queue was used
    assert all(q.back.size == 128 for q in dev.queues)


@pytest.mark.parametrize("ring_order", [0, 4])
async def test_x86_32_abi(rig, tmp_path, ring_order):
    image = make_image(tmp_path / "disk.img", 8 * MiB)
    dev, front = await rig.attach({"path": image}, abi="x86_32-abi", ring_order=ring_order)
    assert dev.queues[0].codecs.entry_size == 108
    (snap,) = dev.ring_snapshots()
    assert snap.layout == "blkif-x86_32" and len(snap.data) == 4096 << ring_order
    await random_workload(front, image, 8 * MiB, workers=8, ops=10, seed=3)


async def test_indirect_and_direct_layouts(rig, tmp_path):
    image = make_image(tmp_path / "disk.img", 4 * MiB)
    _dev, front = await rig.attach({"path": image})
    data = random.Random(9).randbytes(MiB)
    await front.write(2048, data, indirect=True)
    assert file_bytes(image, MiB, MiB) == data
    assert await front.read(2048, 4096, indirect=True) == data[:4096]
    assert await front.read(2048 + 3, 5 * 512, indirect=False) == data[1536:4096]
    with pytest.raises(ValueError):
        await front.read(0, 64 * 1024, indirect=False)  # needs more than 11 segments


async def test_flush_and_barrier(rig, tmp_path):
    image = make_image(tmp_path / "disk.img", 2 * MiB)
    dev, front = await rig.attach({"path": image})
    assert front.backend_keys["feature-flush-cache"] == "1"
    data = b"durable!" * 512
    writes = [front.write(8 * i, data) for i in range(16)]
    await asyncio.gather(*writes, front.flush(), front.flush(op=BlkifOp.WRITE_BARRIER))
    await front.flush()
    assert dev.stats()["flushes"] == 3
    fd = os.open(image, os.O_RDONLY)  # opened after the flush
    try:
        assert os.pread(fd, len(data) * 16, 0) == data * 16
    finally:
        os.close(fd)
    # A barrier may carry data: written after the flush, answered with its own op.
    rid = front.new_id()
    gfn = front.ram.alloc_page()
    front.ram.write(gfn * 4096, b"B" * 4096)
    gref = front.gnttab.grant_access(gfn, readonly=True)
    raw = front.codecs.request.pack(BlkifOp.WRITE_BARRIER, 1, 0, rid, 64, gref, 0, 7,
                                    *[0] * 30)
    assert await front.send_raw(raw, rid) == (BlkifOp.WRITE_BARRIER, BlkifStatus.OKAY)
    assert front.gnttab.end_access(gref)
    assert file_bytes(image, 64 * 512, 4096) == b"B" * 4096


async def test_discard_punches_holes(rig, tmp_path):
    image = make_image(tmp_path / "disk.img", 4 * MiB)
    os.sync()
    dev, front = await rig.attach({"path": image})
    keys = front.backend_keys
    assert keys["feature-discard"] == "1" and keys["discard-secure"] == "0"
    assert int(keys["discard-granularity"]) >= 512
    before = os.stat(image).st_blocks
    await front.discard(2048, 4096)  # 2 MiB from 1 MiB on
    assert os.stat(image).st_blocks <= before - (2 * MiB // 512)
    assert file_bytes(image, MiB, 2 * MiB) == bytes(2 * MiB)
    assert await front.read(2048, 65536) == bytes(65536)
    with pytest.raises(BlkIOError) as info:
        await front.discard(0, 8, secure=True)
    assert info.value.status == BlkifStatus.EOPNOTSUPP
    with pytest.raises(BlkIOError) as info:
        await front.discard(8190, 8)
    assert info.value.status == BlkifStatus.ERROR
    assert dev.stats()["discards"] == 1


async def test_discard_disabled_by_config(rig, tmp_path):
    image = make_image(tmp_path / "disk.img", MiB)
    _dev, front = await rig.attach({"path": image, "discard": "0"})
    assert front.backend_keys["feature-discard"] == "0"
    assert "discard-granularity" not in front.backend_keys
    with pytest.raises(BlkIOError) as info:
        await front.discard(0, 8)
    assert info.value.status == BlkifStatus.EOPNOTSUPP


async def test_read_only_disk(rig, tmp_path):
    image = make_image(tmp_path / "disk.img", MiB)
    _dev, front = await rig.attach({"path": image, "mode": "r", "device-type": "cdrom"})
    assert int(front.backend_keys["info"]) == 4 | 1 | 2  # READONLY | CDROM | REMOVABLE
    assert front.backend_keys["feature-discard"] == "0"
    original = file_bytes(image)
    with pytest.raises(BlkIOError) as info:
        await front.write(0, b"x" * 4096)
    assert (info.value.op, info.value.status) == (BlkifOp.WRITE, BlkifStatus.ERROR)
    with pytest.raises(BlkIOError):
        await front.write(0, b"x" * MiB, indirect=True)
    assert await front.read(0, 4096) == original[:4096]
    assert file_bytes(image) == original


async def test_connected_keys_and_4096_sectors(rig, tmp_path):
    image = make_image(tmp_path / "disk.img", 4 * MiB + 1000)  # ragged tail is not a sector
    dev, front = await rig.attach({"path": image, "sector-size": "4096"})
    keys = front.backend_keys
    assert keys["sectors"] == str(4 * MiB // 512)
    assert keys["sector-size"] == "4096" and keys["physical-sector-size"] == "4096"
    assert keys["info"] == "0"
    assert keys["max-ring-page-order"] == "4"
    assert keys["feature-max-indirect-segments"] == "256"
    assert int(keys["multi-queue-max-queues"]) >= 4
    await random_workload(front, image, 4 * MiB, workers=4, ops=8, align=4096)
    # A 512-byte request on a 4096-byte-sector disk is refused, the ring carries on.
    rid = front.new_id()
    gref = front.gnttab.grant_access(front.ram.alloc_page())
    raw = front.codecs.request.pack(BlkifOp.READ, 1, 0, rid, 8, gref, 0, 0, *[0] * 30)
    assert await front.send_raw(raw, rid) == (BlkifOp.READ, BlkifStatus.ERROR)
    assert await front.read(8, 4096) == file_bytes(image, 4096, 4096)
    assert dev.stats()["invalid"] == 1


async def test_bad_requests_answered_between_good_ones(rig, tmp_path):
    image = make_image(tmp_path / "disk.img", MiB)
    dev, front = await rig.attach({"path": image})
    codecs = front.codecs
    gfn = front.ram.alloc_page()
    good = front.gnttab.grant_access(gfn)
    revoked = front.gnttab.grant_access(front.ram.alloc_page())
    assert front.gnttab.end_access(revoked)
    ro = front.gnttab.grant_access(front.ram.alloc_page(), readonly=True)
    foreign = front.gnttab.grant_access(front.ram.alloc_page(), domid=7)

    def rw(op, segs, sector=0, nseg=None):
        rid = front.new_id()
        flat = [v for s in segs for v in s] + [0, 0, 0] * (11 - len(segs))
        return rid, codecs.request.pack(op, len(segs) if nseg is None else nseg, 0, rid,
                                        sector, *flat)

    cases = [
        (rw(BlkifOp.READ, [(good, 0, 7)]), BlkifOp.READ, BlkifStatus.OKAY),
        (rw(BlkifOp.READ, [(good, 0, 8)]), BlkifOp.READ, BlkifStatus.ERROR),
        (rw(BlkifOp.READ, [(good, 0, 7)], nseg=12), BlkifOp.READ, BlkifStatus.ERROR),
        (rw(BlkifOp.READ, [(good, 0, 7)], sector=2045), BlkifOp.READ, BlkifStatus.ERROR),
        (rw(BlkifOp.READ, [(revoked, 0, 7)]), BlkifOp.READ, BlkifStatus.ERROR),
        (rw(BlkifOp.READ, [(ro, 0, 7)]), BlkifOp.READ, BlkifStatus.ERROR),  # read into ro
        (rw(BlkifOp.WRITE, [(ro, 0, 7)]), BlkifOp.WRITE, BlkifStatus.OKAY),
        (rw(BlkifOp.WRITE, [(good, 0, 7), (foreign, 0, 7)]), BlkifOp.WRITE,
         BlkifStatus.ERROR),
        (rw(BlkifOp.WRITE, [(99999999, 0, 7)]), BlkifOp.WRITE, BlkifStatus.ERROR),
        (rw(BlkifOp.RESERVED_1, []), BlkifOp.RESERVED_1, BlkifStatus.EOPNOTSUPP),
        (rw(77, []), 77, BlkifStatus.EOPNOTSUPP),
        (rw(BlkifOp.WRITE, [(good, 3, 3)], sector=7), BlkifOp.WRITE, BlkifStatus.OKAY),
    ]
    results = await asyncio.gather(*(front.send_raw(raw, rid) for (rid, raw), _, _ in cases))
    assert results == [(op, status) for _, op, status in cases]
    # Bad indirect pages: a revoked indirect gref, and a segment page with a bad segment.
    rid = front.new_id()
    raw = codecs.indirect.pack(BlkifOp.INDIRECT, BlkifOp.READ, 4, rid, 0, 0, revoked,
                               *[0] * 7)
    assert await front.send_raw(raw, rid) == (BlkifOp.READ, BlkifStatus.ERROR)
    seg_page = front.ram.alloc_page()
    for i, seg in enumerate([(good, 0, 7), (good, 2, 1)]):
        codecs.segment.pack_into(front.ram.page(seg_page), i * 8, *seg)
    iref = front.gnttab.grant_access(seg_page, readonly=True)
    rid = front.new_id()
    raw = codecs.indirect.pack(BlkifOp.INDIRECT, BlkifOp.READ, 2, rid, 0, 0, iref,
                               *[0] * 7)
    assert await front.send_raw(raw, rid) == (BlkifOp.READ, BlkifStatus.ERROR)
    assert await front.read(0, 8192) == file_bytes(image, 0, 8192)
    for gref in (good, ro, foreign, iref):
        assert front.gnttab.end_access(gref)  # nothing left mapped by the failures
    stats = dev.stats()
    assert stats["unsupported"] == 2 and stats["invalid"] == 9


async def test_producer_overflow_halts_only_that_ring(rig, tmp_path):
    image = make_image(tmp_path / "disk.img", MiB)
    dev, front = await rig.attach({"path": image}, queues=2, devid=7)
    assert await front.read(0, 4096, queue=1) == file_bytes(image, 0, 4096)
    bad = front.queues[1]
    bad.shared.idx[REQ_PROD] = (bad.front.req_prod_pvt + bad.front.size + 5) & 0xFFFFFFFF
    bad.port.send()

    async def reported() -> None:
        while not rig.notices.misbehaved:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(reported(), 60)  # a hang guard, no speed requirement
    assert len(rig.notices.misbehaved) == 1
    devid, message = rig.notices.misbehaved[0]
    assert devid == 7 and "blk ring 1" in message
    assert dev.queues[1].halted and not dev.queues[0].halted
    assert dev.stats()["rings_halted"] == 1
    for _ in range(3):  # the other ring is untouched
        assert await front.read(8, 4096, queue=0) == file_bytes(image, 4096, 4096)
    bad.shared.idx[REQ_PROD] = bad.front.req_prod_pvt  # leave it sane for teardown


async def test_write_errors_enospc_and_device_keeps_serving(root, rig, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        image = make_image(mnt / "sparse.img", 8 * MiB, fill=False)  # holes only
        dev, front = await rig.attach({"path": image})
        data = random.Random(4).randbytes(256 * 1024)
        await front.write(0, data)  # fits in the 1 MiB filesystem
        failures = 0
        for i in range(1, 8):
            try:
                await front.write(i * 2048, random.Random(i).randbytes(MiB))
            except BlkIOError as e:
                assert e.status == BlkifStatus.ERROR
                failures += 1
        assert failures >= 5
        assert dev.stats()["errors"] == failures
        assert await front.read(0, len(data)) == data  # still serving
        await front.write(8, b"z" * 4096)  # rewriting allocated blocks needs no space
        assert await front.read(8, 4096) == b"z" * 4096
        await rig.close()  # release the image before unmounting
        rig.pairs.clear()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


async def test_reads_past_a_shrunken_file_fail(rig, tmp_path):
    image = make_image(tmp_path / "disk.img", MiB)
    dev, front = await rig.attach({"path": image})
    os.truncate(image, MiB // 2)  # the backing store shrinks under the device
    with pytest.raises(BlkIOError) as info:
        await front.read(1536, 8192)
    assert info.value.status == BlkifStatus.ERROR
    assert await front.read(0, 4096) == file_bytes(image, 0, 4096)
    assert dev.stats()["errors"] == 1


async def test_disconnect_answers_in_flight_requests(rig, tmp_path):
    image = make_image(tmp_path / "disk.img", 8 * MiB)
    dev, front = await rig.attach({"path": image})
    queue = dev.queues[0]
    reads = [asyncio.ensure_future(front.read(i * 2048, MiB)) for i in range(6)]
    while taken(queue) < 6:  # until the backend has taken them all
        await asyncio.sleep(0)
    await dev.disconnect()
    # Everything taken was completed and answered (else this would wait forever).
    results = await asyncio.gather(*reads)
    assert results == [file_bytes(image, i * MiB, MiB) for i in range(6)]
    await dev.disconnect()  # idempotent
    assert rig.grants_in_use() == []  # ring pages and data pages all let go


async def test_pending_pool_is_bounded(rig, tmp_path):
    image = make_image(tmp_path / "disk.img", 8 * MiB)
    rig.dataplane = "python"  # watches the Python queue's hand-off to the pool
    dev, front = await rig.attach({"path": image}, ring_order=3)  # 256-slot ring
    queue = dev.queues[0]
    assert queue.max_pending == 64
    peak = 0
    original = queue._run

    def watch(batch):
        nonlocal peak
        original(batch)
        peak = max(peak, queue.back.pending_responses())

    queue._run = watch
    reads = [front.read((i % 64) * 8, 4096) for i in range(200)]
    await asyncio.gather(*reads)
    assert 0 < peak <= 64


def test_config_keys(tmp_path):
    image = make_image(tmp_path / "disk.img", MiB)

    async def attempt(config, extras=None):
        rig = Rig(ram_size=MiB, extras=extras)
        try:
            dev = BlkDevice(1, config, rig.ctx)
            await dev.close()
        finally:
            await rig.close()

    def refused(config, extras=None) -> str:
        with pytest.raises(ConfigError) as info:
            asyncio.run(attempt(config, extras))
        return info.value.message

    assert DEVICE_TYPES["blk"] is BlkDevice
    assert "colour" in refused({"path": image, "colour": "red"})
    assert refused({}).startswith("path")
    assert refused({"path": image, "mode": "rw"}).startswith("mode")
    assert refused({"path": image, "sector-size": "1024"}).startswith("sector-size")
    assert refused({"path": image, "direct-io": "yes"}).startswith("direct-io")
    assert refused({"path": image, "device-type": "tape"}).startswith("device-type")
    assert refused({"path": str(tmp_path / "missing.img")}).startswith("path")
    assert refused({"path": str(tmp_path)}).startswith("path")
    assert refused({"path": make_image(tmp_path / "tiny.img", 100)}).startswith("path")
    jail = {"config": Config(block=BlockSection(allowed_dirs=[str(tmp_path / "images")]))}
    assert "allowed" in refused({"path": image}, jail)
    (tmp_path / "images").mkdir()
    inside = make_image(tmp_path / "images" / "ok.img", MiB)
    asyncio.run(attempt({"path": inside}, jail))
    asyncio.run(attempt({"path": image, "mode": "r", "direct-io": "1", "discard": "0",
                         "sector-size": "4096", "device-type": "disk"}))


def open_flags(fd: int) -> int:
    """The file status flags the kernel holds for one of our descriptors."""
    return int(fdinfo(fd, "flags"), 8)


@pytest.mark.parametrize(("direct", "mode"), [("1", "w"), ("1", "r"), ("0", "w")])
async def test_direct_io(rig, tmp_path, direct, mode):
    image = make_image(tmp_path / "disk.img", 8 * MiB)
    dev, front = await rig.attach({"path": image, "direct-io": direct, "mode": mode})
    flags = open_flags(dev.image.fd)
    assert bool(flags & os.O_DIRECT) is (direct == "1")
    assert flags & os.O_ACCMODE == (os.O_RDWR if mode == "w" else os.O_RDONLY)
    if mode == "w":
        await random_workload(front, image, 8 * MiB, workers=4, ops=10, seed=6)
    else:
        assert await front.read(8, 64 * 1024) == file_bytes(image, 4096, 64 * 1024)


async def test_bad_frontend_keys_refuse_connect(rig, tmp_path):
    from backendd.errors import GuestError

    image = make_image(tmp_path / "disk.img", MiB)
    dev = BlkDevice(1, {"path": image}, rig.ctx)
    front = BlkFront(rig.ram, rig.gt, 1, queues=2)
    try:
        keys = front.frontend_keys()
        port0 = keys["queue-0/event-channel"]
        for bad, message in (
                ({"protocol": "arm-abi"}, "protocol: 'arm-abi' is not supported"),
                ({"multi-queue-num-queues": "99"}, "multi-queue-num-queues: 99 is above 4"),
                ({"queue-1/ring-ref": "x1"}, "queue-1/ring-ref: 'x1' is not a decimal number"),
                ({"queue-0/event-channel": "+1"},
                 "queue-0/event-channel: '+1' is not a decimal number"),
                ({"queue-1/event-channel": port0},
                 f"event-channel: queues share a port ([{port0}, {port0}])"),
                ({"ring-page-order": "5"}, "ring-page-order: 5 is above 4"),
                ({"queue-0/ring-ref": "4294967296"},
                 "queue-0/ring-ref: 4294967296 is above 4294967295")):
            chans = {p: EventChannel(p, k, c) for p, k, c in
                     [(p, os.dup(k), os.dup(c)) for p, k, c in front.channels()]}
            with pytest.raises(GuestError) as info:
                await dev.connect(keys | bad, chans)
            assert str(info.value) == message
            await dev.disconnect()
            assert all(ch._closed for ch in chans.values())
        assert rig.grants_in_use() == []
    finally:
        for _port, kick, call in front.channels():
            os.close(kick)
            os.close(call)
        front.close()
        await dev.close()


async def test_block_device_backing(root, rig, tmp_path):
    backing = make_image(tmp_path / "backing.img", 4 * MiB)
    loop_dev = subprocess.run(["losetup", "--find", "--show", backing], check=True,
                              capture_output=True, text=True).stdout.strip()
    try:
        dev, front = await rig.attach({"path": loop_dev})
        assert front.backend_keys["sectors"] == str(4 * MiB // 512)
        assert dev.image.is_block
        data = random.Random(8).randbytes(MiB)
        await front.write(2048, data)
        await front.flush()
        assert await front.read(2048, MiB) == data
        # A loop device over a file on a hole-punching filesystem takes discards.
        assert front.backend_keys["feature-discard"] == "1"
        await front.discard(2048, 2048)
        assert await front.read(2048, 4096) == bytes(4096)
        assert file_bytes(backing, MiB, MiB) == bytes(MiB)
        await rig.close()
        rig.pairs.clear()
    finally:
        subprocess.run(["losetup", "-d", loop_dev], check=True)
