"""The C blkfront load generator (bench/native/blkfront_load.c) against the real daemon:
writes a pattern, reads it back and checks it in C, through ring.h's macros and real v1
grants; the image file is checked here too. Also built with -fsanitize=address,undefined
and run the same way, so the benchmark's frontend cannot rot."""

from __future__ import annotations

import asyncio
import math
import os
import random
from pathlib import Path

import pytest

from bench.blkload import (
    Load,
    LoadFailed,
    pattern_bytes,
    pingpong,
    run_load,
    run_load_socket,
    socket_result,
)
from bench.native import build

MiB = 1 << 20
IMAGE_SIZE = 32 * MiB


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(5).randbytes(IMAGE_SIZE))
    return path


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("blkfront_load", sanitize=True, out_dir=tmp_path_factory.mktemp("asan"))


def written_blocks(load: Load, size: int) -> list[int]:
    """The blocks a --verify run writes (blkfront_load.c pick_block)."""
    nblocks = size // load.bs
    stride = nblocks // 2 + 1
    while math.gcd(stride, nblocks) != 1:
        stride += 1
    return [n * stride % nblocks if load.pattern == "rand" else n % nblocks
            for n in range(load.count * load.queues)]


def assert_image_has_pattern(image: Path, load: Load) -> None:
    data = image.read_bytes()
    for block in written_blocks(load, len(data)):
        off = block * load.bs
        assert data[off:off + load.bs] == pattern_bytes(off, load.bs, load.seed), \
            f"block {block} of the image does not hold what was written"


async def check(daemon, image: Path, load: Load, **kw) -> None:
    result = await run_load(daemon.path, str(image), load, **kw)
    assert result.ios == 2 * load.count * load.queues  # every write and every read answered
    assert result.raw["mismatches"] == 0 and result.raw["errors"] == 0
    assert result.held_after_close == []  # the closed device holds none of our grants
    assert_image_has_pattern(image, load)


async def test_verified_4k_random_two_queues(daemon, image):
    await check(daemon, image, Load(bs=4096, qd=16, queues=2, count=150, verify=True,
                                    seed=0x1234))


async def test_verified_1mib_indirect_sequential(daemon, image):
    await check(daemon, image, Load(bs=MiB, qd=4, pattern="seq", count=6, verify=True,
                                    seed=7))


async def test_verified_direct_io_beside_a_cached_disk(daemon, image, tmp_path):
    """An O_DIRECT disk (every request with the kernel's I/O threads, its ring waited for
    asleep and woken by kicks and completions) served in the same calls as a cached
    disk's ring (watched spinning): both verified."""
    cached = tmp_path / "cached.img"
    cached.write_bytes(random.Random(6).randbytes(IMAGE_SIZE))
    direct = Load(bs=4096, qd=8, queues=2, count=200, verify=True, seed=21)
    plain = Load(bs=4096, qd=32, count=400, verify=True, seed=22)
    await asyncio.gather(check(daemon, image, direct, device_config={"direct-io": "1"}),
                         check(daemon, cached, plain))


async def test_verified_persistent_pool(daemon, image):
    """The copy-through-a-kept-pool path. Kept grants are valid for any backend, so it is
    exercised whether or not the daemon offers feature-persistent."""
    load = Load(bs=8192, qd=8, queues=2, count=100, verify=True, persistent=True, seed=3)
    result = await run_load(daemon.path, str(image), load, force_pool=True)
    assert result.raw["persistent"] == 1
    assert result.ios == 400 and result.held_after_close == []
    assert_image_has_pattern(image, load)


async def test_negotiates_persistent_only_when_offered(daemon, image):
    result = await run_load(daemon.path, str(image),
                            Load(count=32, qd=8, verify=True, persistent=True))
    assert result.persistent == result.offered_persistent
    assert result.raw["persistent"] == int(result.offered_persistent)


async def test_a_failed_request_fails_the_run(daemon, image):
    """A read-only disk answers writes with BLKIF_RSP_ERROR: the generator says so."""
    with pytest.raises(LoadFailed, match="answered status -1"):
        await run_load(daemon.path, str(image), Load(count=8, qd=4, verify=True),
                       device_config={"mode": "r"})


async def test_sanitizer_build(daemon, image, sanitized):
    """The same verified runs with -fsanitize=address,undefined: any report aborts it."""
    for load in (Load(bs=4096, qd=32, queues=2, count=100, verify=True, seed=11),
                 Load(bs=MiB, qd=2, count=4, verify=True, seed=12),
                 Load(bs=64 * 1024, qd=4, count=20, verify=True, persistent=True, seed=13)):
        await check(daemon, image, load, binary=sanitized, force_pool=load.persistent)


async def check_socket(daemon, image: Path, load: Load, **kw) -> dict:
    raw = await run_load_socket(daemon.path, str(image), load, **kw)
    assert raw["ios"] == 2 * load.count * load.queues
    assert raw["mismatches"] == 0 and raw["errors"] == 0 and raw["failure"] == ""
    assert raw["sectors"] == IMAGE_SIZE // 512  # from FRONTEND_STATE's reply
    assert raw["held_after_close"] == 0
    assert_image_has_pattern(image, load)
    return raw


async def test_socket_mode_does_its_own_control_plane(daemon, image):
    """--socket: the generator connects through the C client library (clients/c), hands
    over its memfds and eventfds, connects the disk, runs verified I/O, closes the disk
    (which must then hold none of its grants) and removes it. A two-page ring (qd 40),
    SET_INFLIGHT and feature-persistent are part of the last run."""
    for load in (Load(bs=4096, qd=16, queues=2, count=150, verify=True, seed=21),
                 Load(bs=MiB, qd=4, pattern="seq", count=6, verify=True, seed=22)):
        await check_socket(daemon, image, load)
    raw = await check_socket(daemon, image, Load(bs=8192, qd=40, count=50, verify=True,
                                                 persistent=True, seed=23), inflight=True)
    assert raw["persistent"] == raw["offered_persistent"] == 1


async def test_socket_mode_markers_bracket_the_run(daemon, image):
    """With daemon_pid (--markers) the program says "ready" once connected and "done"
    before it closes the disk; the daemon's CPU time between the two comes back. The
    daemon here runs in this process, so its CPU time is this process's."""
    load = Load(bs=4096, qd=32, count=2000, verify=True, seed=24)
    raw = await check_socket(daemon, image, load, daemon_pid=os.getpid())
    # It served the 4000 I/Os in between: far more than /proc's 10 ms tick of CPU time.
    assert raw["daemon_cpu_seconds"] > 0
    result = socket_result(load, raw)
    assert result.ios == 4000 and result.held_after_close == []
    assert result.cpu_us_per_io > 0


@pytest.mark.parametrize("dataplane", ["python", "compiled"])
async def test_socket_mode_dirty_log(daemon, image, dataplane):
    """--log: SET_LOG through the C client before the run; after it exactly the pages the
    daemon wrote are set: each of the 32 slots' data page (4 KiB reads, every slot used)
    and the one ring page, none of the pages it only read (writes); the grant table's
    page too. Without --log there is no log (-1)."""
    cfg = {"dataplane": dataplane, "persistent": "0"}
    raw = await run_load_socket(daemon.path, str(image), Load(rw="read", qd=32, count=400),
                                device_config=cfg, log=True)
    assert raw["errors"] == 0 and raw["failure"] == ""
    assert (raw["dirty_pages"], raw["dirty_gnttab_pages"]) == (32 + 1, 1)
    raw = await run_load_socket(daemon.path, str(image), Load(rw="write", qd=32, count=400),
                                device_config=cfg, log=True)
    assert (raw["dirty_pages"], raw["dirty_gnttab_pages"]) == (1, 1)
    raw = await run_load_socket(daemon.path, str(image), Load(rw="read", qd=4, count=10),
                                device_config=cfg)
    assert (raw["dirty_pages"], raw["dirty_gnttab_pages"]) == (-1, -1)


async def test_socket_mode_reports_a_failed_request(daemon, image):
    with pytest.raises(LoadFailed, match="answered status -1"):
        await run_load_socket(daemon.path, str(image), Load(count=8, qd=4, verify=True),
                              device_config={"mode": "r"})


async def test_socket_mode_reports_a_refused_device(daemon, tmp_path):
    with pytest.raises(LoadFailed, match="ADD_DEVICE"):
        await run_load_socket(daemon.path, str(tmp_path / "missing.img"),
                              Load(count=8, verify=True))


async def test_socket_mode_sanitizer_build(daemon, image, sanitized):
    for load in (Load(bs=4096, qd=32, queues=2, count=100, verify=True, seed=31),
                 Load(bs=MiB, qd=2, count=4, verify=True, seed=32),
                 Load(bs=64 * 1024, qd=4, count=20, verify=True, persistent=True, seed=33)):
        raw = await check_socket(daemon, image, load, binary=sanitized,
                                 inflight=load.persistent, log=load.bs == MiB)
        assert (raw["dirty_pages"] > 0) == (load.bs == MiB)  # the dirty log, taken


async def test_eventfd_pingpong_builds_and_runs():
    """The latency baseline bench.blk prints beside the daemon's QD1 figure."""
    result = await pingpong(200)
    assert result["rounds"] == 200 and 0 < result["p50_ns"] <= result["p99_ns"]


async def test_bench_queue_lines_alternate_the_kernels_they_are_given(image: Path,
                                                                       tmp_path: Path):
    """bench.blk --queues-rounds: the 1- and 2-queue QD32 lines and QD1, one daemon per
    kernel build given, each round running every line on each daemon in turn."""
    from backendd.dataplane import kernel as K
    from bench import blk

    kernel = K.load()
    assert kernel is not None
    work = tmp_path / "work"
    work.mkdir()
    rows = await blk.measure_queues(str(image), work, 0.2, 2, [kernel.path, kernel.path])
    name = Path(kernel.path).name
    assert [r[0] for r in rows] == [f"{name} backendd 4 KiB randread QD{qd} x{q}q"
                                    for _ in range(2) for qd, q in ((32, 1), (32, 2), (1, 1))]
    assert all(r[1] > 0 for r in rows)
    two_queue = [r for r in rows if r[0].endswith("x2q")]
    assert all(len(r[-1].split(", ")) == 2 for r in two_queue)  # one ratio per round
    assert all(r[-1] == "" for r in rows if not r[0].endswith("x2q"))
