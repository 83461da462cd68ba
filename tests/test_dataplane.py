"""The compiled blk data plane (backendd/dataplane): its layouts are Xen's and the rings/
layouts; it matches the pure-Python path on random and hostile input, also under
AddressSanitizer and UBSan; page-cache misses, O_DIRECT, flush and discard go to the
I/O pool and are answered; queues are served with the GIL released."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backendd.dataplane import kernel as K
from backendd.dataplane.build import build
from bench import blkdiff
from rings.blkif import BLKIF, blkif_segment
from rings.consts import GTF_READING, GTF_WRITING, BlkifAbi, BlkifOp, BlkifStatus
from rings.grant import grant_entry_v1, grant_entry_v2_sub_page
from rings.sring import sring_header
from tests.native_build import field_offsets
from tests.test_blk_device import MiB, Rig, file_bytes, make_image, random_workload

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kernel() -> K.Kernel:
    k = K.load()
    assert k is not None, "the blk kernel is not built: `make test` builds it"
    return k


def test_kernel_layouts_are_the_rings_layouts(kernel):
    lay = kernel.layout()
    for abi, tag in ((BlkifAbi.X86_64, "x64"), (BlkifAbi.X86_32, "x32")):
        layouts = BLKIF[abi]
        req = field_offsets(layouts.request)
        ind = field_offsets(layouts.indirect)
        assert lay[f"{tag}.request.sizeof"] == layouts.request.sizeof()
        assert lay[f"{tag}.request.id"] == req["id"]
        assert lay[f"{tag}.request.sector_number"] == req["sector_number"]
        assert lay[f"{tag}.request.seg"] == req["seg[0].gref"]
        assert lay[f"{tag}.discard.nr_sectors"] == field_offsets(layouts.discard)["nr_sectors"]
        assert lay[f"{tag}.indirect.nr_segments"] == ind["nr_segments"]
        assert lay[f"{tag}.indirect.indirect_grefs"] == ind["indirect_grefs[0]"]
        assert lay[f"{tag}.indirect.sizeof"] == layouts.indirect.sizeof()
        assert lay[f"{tag}.response.sizeof"] == layouts.response.sizeof()
        assert lay[f"{tag}.response.status"] == field_offsets(layouts.response)["status"]
        assert lay[f"{tag}.entry"] == layouts.entry_size
    assert blkif_segment.sizeof() == 8
    v1, v2 = field_offsets(grant_entry_v1), field_offsets(grant_entry_v2_sub_page)
    assert (lay["grant_v1.sizeof"], lay["grant_v1.frame"]) == (grant_entry_v1.sizeof(),
                                                               v1["frame"])
    assert (lay["grant_v2.sizeof"], lay["grant_v2.page_off"], lay["grant_v2.length"],
            lay["grant_v2.frame"]) == (16, v2["page_off"], v2["length"], v2["frame"])
    ring = field_offsets(sring_header)
    assert (lay["sring.ring"], lay["sring.rsp_prod"], lay["sring.rsp_event"]) == (
        sring_header.sizeof(), ring["rsp_prod"], ring["rsp_event"])


def test_kernel_builds_warning_free_from_the_source(tmp_path):
    # -Wall -Wextra -Werror, plain and with the sanitizers.
    assert build("blk", tmp_path / "plain.so").exists()
    assert build("blk", tmp_path / "asan.so", sanitize=True).exists()


def test_differential_random_and_hostile_rings(kernel):
    """A quick subset of `python -m bench.fuzz --targets blk-diff`."""
    requests, cases, bad = blkdiff.run(3000, seed=11, kernel=kernel)
    assert cases > 50 and requests >= 3000
    assert bad == []


_ASAN_ENV = {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=97",
             "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}


def _run_sanitized(lib: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                             text=True, check=True).stdout.strip()
    env = os.environ | _ASAN_ENV | {"LD_PRELOAD": libasan, "BACKENDD_BLK_KERNEL": str(lib),
                                    "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_differential_under_address_and_ub_sanitizers(tmp_path):
    lib = build("blk", tmp_path / "asan.so", sanitize=True)
    code = (
        "import sys\n"
        "from backendd.dataplane import kernel as K\n"
        "from bench import blkdiff\n"
        "k = K.load()\n"
        f"assert k.path == {str(lib)!r}, k.path\n"
        "assert 'libasan' in open('/proc/self/maps').read()\n"
        "n, cases, bad = blkdiff.run(1500, seed=23, kernel=k)\n"
        "print(n, cases, bad)\n"
        "if bad: sys.exit(1)\n"
        # The device paths the harness does not take: the I/O threads (EAGAIN, writes,
        # flush, discard, O_DIRECT), rings served in parallel on the kernel's helper
        # threads (watched after each round), and a ring served beside a kicked one.
        "import asyncio, pathlib, tempfile\n"
        "from tests import test_dataplane as t\n"
        "for fn in (t.test_page_cache_misses_go_to_the_pool_and_hits_are_served_inline,\n"
        "           t.test_direct_io_images_are_served_by_the_pool,\n"
        "           t.test_blocking_io_runs_on_the_kernels_threads_not_the_python_pool,\n"
        "           t.test_a_ring_with_requests_is_served_beside_a_kicked_one,\n"
        "           t.test_queues_served_in_parallel_threads,\n"
        "           t.test_persistent_grants_on_parallel_rings_and_the_io_threads):\n"
        "    asyncio.run(fn(pathlib.Path(tempfile.mkdtemp(dir=sys.argv[1]))))\n"
        # O_DIRECT transfers through the queues' io_uring and, for the same tests, the
        # I/O threads; suspend and disconnect with transfers in flight; a queue whose
        # io_uring cannot be set up.
        "from tests import test_blk_uring as tu\n"
        "for mode in tu.MODES:\n"
        "    for fn in (tu.test_direct_io_reads_and_writes,\n"
        "               tu.test_a_short_transfer_is_finished_or_fails_as_on_the_io_threads):\n"
        "        asyncio.run(fn(pathlib.Path(tempfile.mkdtemp(dir=sys.argv[1])), mode))\n"
        "for fn in (tu.test_suspend_waits_for_transfers_in_the_io_uring,\n"
        "           tu.test_disconnect_with_transfers_in_the_io_uring,\n"
        "           tu.test_a_queue_that_cannot_get_an_io_uring_uses_the_io_threads):\n"
        "    asyncio.run(fn(pathlib.Path(tempfile.mkdtemp(dir=sys.argv[1]))))\n"
        # The ring watched after a batch (bk_serve_poll, bk_serve_round_poll), with a
        # guest on another thread.
        "from tests import test_dataplane_poll as tp\n"
        "for fn in (tp.test_requests_published_while_watched_are_served_in_the_same_call,\n"
        "           tp.test_an_idle_ring_ends_the_call_with_req_event_set):\n"
        "    r = tp.PollRig(k, tempfile.mkdtemp(dir=sys.argv[1]))\n"
        "    fn(r)\n"
        "    r.close()\n"
        "for fn in (tp.test_a_round_watches_every_ring_it_may_serve,\n"
        "           tp.test_a_round_leaves_alone_the_rings_it_may_not_serve):\n"
        "    fn(k, pathlib.Path(tempfile.mkdtemp(dir=sys.argv[1])))\n"
        "tp.test_each_thread_of_a_round_gets_the_ring_whose_guest_is_on_its_cpu(k)\n"
        "print('device paths ok')\n")
    result = _run_sanitized(lib, code, str(tmp_path))
    report = result.stderr
    assert "AddressSanitizer" not in report and "runtime error" not in report, report
    assert result.returncode == 0, result.stdout + report
    assert "device paths ok" in result.stdout

    # The control: the same set-up does catch a fault in the kernel (a double free).
    bad = _run_sanitized(lib, (
        "import ctypes\n"
        "from backendd.dataplane import kernel as K\n"
        "k = K.load()\n"
        "q = ctypes.c_void_p(ctypes.CDLL(k.path).malloc(64))\n"
        "k.queue_free(q); k.queue_free(q)\n"))
    assert bad.returncode != 0 and "AddressSanitizer" in bad.stderr


async def _rig(dataplane: str = "compiled") -> Rig:
    return Rig(dataplane=dataplane)


async def test_page_cache_misses_go_to_the_pool_and_hits_are_served_inline(tmp_path):
    rig = await _rig()
    try:
        image = make_image(tmp_path / "disk.img", 8 * MiB)
        dev, front = await rig.attach({"path": image})
        # Out of the page cache: RWF_NOWAIT meets EAGAIN, so the pool reads it.
        fd = os.open(image, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        assert await front.read(2048, 64 * 1024) == file_bytes(image, MiB, 64 * 1024)
        stats = dev.stats()
        assert stats["compiled"] == 1
        assert stats["pooled"] == 1 and stats["inline_io"] == 0
        # Now cached: served inline on the event loop, no pool hand-off.
        assert await front.read(2048, 64 * 1024) == file_bytes(image, MiB, 64 * 1024)
        assert dev.stats()["inline_io"] == 1 and dev.stats()["pooled"] == 1
        # Writes, flush and discard always go to the pool (a write can wait for a frozen
        # filesystem even with RWF_NOWAIT).
        await front.write(2048, b"\x5a" * 4096)
        await front.flush()
        await front.discard(0, 8)
        stats = dev.stats()
        assert stats["inline_io"] == 1 and stats["pooled"] == 4
        assert stats["writes"] == stats["flushes"] == stats["discards"] == 1
        assert file_bytes(image, MiB, 4096) == b"\x5a" * 4096
        assert file_bytes(image, 0, 4096) == bytes(4096)
    finally:
        await rig.close()


async def test_direct_io_images_are_served_by_the_pool(tmp_path):
    rig = await _rig()
    try:
        image = make_image(tmp_path / "disk.img", 4 * MiB)
        dev, front = await rig.attach({"path": image, "direct-io": "1"})
        for i in range(4):
            assert await front.read(i * 8, 4096) == file_bytes(image, i * 4096, 4096)
        stats = dev.stats()
        assert stats["inline_io"] == 0 and stats["pooled"] == 4 and stats["reads"] == 4
    finally:
        await rig.close()


async def test_python_plane_selectable_per_device(tmp_path):
    rig = await _rig()
    try:
        image = make_image(tmp_path / "disk.img", MiB)
        dev_c, front_c = await rig.attach({"path": image}, devid=1)
        dev_p, front_p = await rig.attach({"path": image, "dataplane": "python"}, devid=2)
        assert dev_c.stats()["compiled"] == 1 and dev_p.stats()["compiled"] == 0
        await front_c.write(0, b"c" * 4096)
        assert await front_p.read(0, 4096) == b"c" * 4096
    finally:
        await rig.close()


async def test_queues_served_in_parallel_threads(tmp_path):
    """Rings due in the same loop turn are served by one kernel call, on helper threads
    with the GIL released; the data stays right and every grant is let go."""
    rig = await _rig()
    try:
        image = make_image(tmp_path / "disk.img", 16 * MiB)
        dev, front = await rig.attach({"path": image}, queues=4, ring_order=1)
        await random_workload(front, image, 16 * MiB, workers=32, ops=16, seed=5)
        stats = dev.stats()
        assert stats["parallel"] > 0
        assert stats["errors"] == stats["invalid"] == 0
    finally:
        await rig.close()  # asserts no grant is left in use


async def test_persistent_grants_on_parallel_rings_and_the_io_threads(tmp_path):
    """The kernel's persistent-grant cache under its concurrency: four rings served in
    parallel on helper threads, writes and O_DIRECT transfers reaped from the I/O threads
    (bk_reap hands a cached pin back to the cache, never unpins it). The frontend's pool
    stays pinned while connected, and nothing is left pinned after close."""
    rig = await _rig()
    try:
        image = make_image(tmp_path / "disk.img", 16 * MiB)
        direct = make_image(tmp_path / "direct.img", 4 * MiB)
        dev, front = await rig.attach({"path": image}, queues=4, ring_order=1,
                                      persistent=True)
        ddev, dfront = await rig.attach({"path": direct, "direct-io": "1"}, devid=2,
                                        persistent=True)
        # One after the other: the simulated guest's 4096 grefs would not hold both
        # frontends' pools at once.
        await random_workload(front, image, 16 * MiB, workers=8, ops=24, seed=9)
        await random_workload(dfront, direct, 4 * MiB, workers=4, ops=16, seed=10,
                              align=4096)
        for d, f in ((dev, front), (ddev, dfront)):
            stats = d.stats()
            assert stats["compiled"] == stats["persistent"] == 1
            assert stats["errors"] == stats["invalid"] == 0
            # Each ring caches its pool, up to the bound.
            assert stats["pgrant_hits"] > 0
            assert stats["pgrants"] == sum(min(len(q.pool), 1056) for q in f.queues) > 0
            # Within the bound, nothing purged: the whole pool stays pinned between
            # requests, though the I/O threads' completions were reaped.
            assert stats["pgrant_purged"] == 0
            pool = {g for q in f.queues for g, _ in q.pool}
            assert pool <= set(rig.grants_in_use())
        assert dev.stats()["parallel"] > 0
        assert ddev.stats()["pooled"] > 0 and ddev.stats()["inline_io"] == 0
    finally:
        await rig.close()  # asserts no grant is left in use


async def test_a_ring_with_requests_is_served_beside_a_kicked_one(tmp_path):
    """Frontends kick their queues independently, so a loop turn seldom finds two kicks:
    a turn also serves the other rings whose requests are already published, beside the
    kicked one. Queue 1's kicks are lost here; its read is answered all the same."""
    rig = await _rig()
    try:
        image = make_image(tmp_path / "disk.img", 4 * MiB)
        dev, front = await rig.attach({"path": image}, queues=2)
        front.queues[1].port.send = lambda: None  # publishes, never kicks
        silent = asyncio.ensure_future(front.read(8, 4096, queue=1))
        await asyncio.sleep(0)  # published on queue 1
        assert front.queues[1].front.req_prod_pvt == 1
        assert await front.read(0, 4096, queue=0) == file_bytes(image, 0, 4096)
        assert await asyncio.wait_for(silent, timeout=30) == file_bytes(image, 4096, 4096)
        assert dev.queues[1].channel.kicks == 0
    finally:
        await rig.close()


async def test_blocking_io_runs_on_the_kernels_threads_not_the_python_pool(tmp_path):
    """Writes, flushes, discards and O_DIRECT reads are done by the kernel's own I/O
    threads and reaped by the loop: the daemon's Python I/O pool never sees them."""
    rig = await _rig()
    try:
        submitted: list[object] = []
        real = rig.pool.submit
        rig.pool.submit = lambda *a: submitted.append(a) or real(*a)  # type: ignore[method-assign]
        image = make_image(tmp_path / "disk.img", 4 * MiB)
        dev, front = await rig.attach({"path": image})
        ddev, dfront = await rig.attach({"path": image, "direct-io": "1"}, devid=2)
        data = [bytes([i]) * 4096 for i in range(1, 33)]
        await asyncio.gather(*(front.write(i * 8, d) for i, d in enumerate(data)))
        await front.flush()
        await front.discard(64 * 8, 8)
        got = await asyncio.gather(*(dfront.read(i * 8, 4096) for i in range(32)))
        assert got == data
        assert dev.stats()["pooled"] == 34 and ddev.stats()["pooled"] == 32
        assert submitted == []
    finally:
        await rig.close()


async def test_a_ring_full_of_requests_answered_inline_keeps_being_served(tmp_path):
    """A one-page ring holds 32 requests, so the kernel takes a ring's worth and finds no
    room for more; it answers them all inline in the same call, and must then carry on
    by itself (no pool completion will come to wake it)."""
    rig = await _rig()
    try:
        image = make_image(tmp_path / "disk.img", 4 * MiB)
        dev, front = await rig.attach({"path": image})
        assert dev.queues[0].back.size == 32
        want = file_bytes(image, 0, 64 * 4096)
        reads = [front.read(i * 8, 4096) for i in range(64)] * 4
        got = await asyncio.wait_for(asyncio.gather(*reads), timeout=60)
        assert got == [want[i * 4096:(i + 1) * 4096] for i in range(64)] * 4
        assert dev.stats()["inline_io"] > 0
    finally:
        await rig.close()


@pytest.mark.parametrize("dataplane", ["compiled", "python"])
async def test_grant_uses_are_counted_across_planes(tmp_path, dataplane):
    """The ring page is pinned by the control plane (Python) for the whole connection; a
    request that names the ring's gref as a data page is pinned and released by the data
    plane. The use counts are shared, so the ring's GTF_reading/GTF_writing survive."""
    rig = await _rig(dataplane)
    try:
        image = make_image(tmp_path / "disk.img", MiB)
        _dev, front = await rig.attach({"path": image})
        ring_gref = front.queues[0].grefs[0]
        codecs = front.codecs
        rid = front.new_id()
        segs = [ring_gref, 0, 0] + [0, 0, 0] * 10
        raw = codecs.request.struct.pack(BlkifOp.WRITE, 1, 0, rid, 0, *segs)
        assert await front.send_raw(raw, rid) == (BlkifOp.WRITE, BlkifStatus.OKAY)
        flags = rig.gt.entry(ring_gref)[0]
        assert flags & GTF_READING and flags & GTF_WRITING  # the ring is still in use
        assert rig.grants.in_use(ring_gref) == 1
    finally:
        await rig.close()  # and after disconnect, nothing is left in use


async def test_requests_start_in_ring_order_behind_pool_work(tmp_path):
    """A discard goes to the pool; a read of the same blocks right behind it in the same
    batch must not overtake it inline: requests start in ring order, as on the Python
    path (the read sees the hole, not the old data)."""
    rig = await _rig()
    try:
        image = make_image(tmp_path / "disk.img", MiB)
        _dev, front = await rig.attach({"path": image})
        for i in range(8):
            await front.write(0, bytes([i + 1]) * 4096)
            _, got = await asyncio.gather(front.discard(0, 8), front.read(0, 4096))
            assert got == bytes(4096)
    finally:
        await rig.close()
