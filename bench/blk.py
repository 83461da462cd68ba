"""Block device throughput: the daemon's blk device against fio on the same file, in the
same run, warm page cache on both sides (fio --invalidate=0).

The device runs in a forked child process with its own event loop and I/O pool, over the
guest's RAM and grant table memfds and eventfds, exactly as the daemon would; the parent
is the guest (blkfront). The child's CPU time per I/O is the daemon's cost.

    python -m bench.blk
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from backendd.devices.base import DeviceContext, NoticeSink
from backendd.devices.blk.device import BlkDevice
from backendd.evtchn import EventChannel
from backendd.grants import GrantTable
from backendd.guest import GuestGrantTable, GuestRAM
from backendd.guest.blkfront import BlkFront
from backendd.memory import GuestMemory

from .report import table

MiB = 1 << 20
IMAGE_SIZE = 256 * MiB
SECONDS = 3.0


class _Quiet(NoticeSink):
    def device_failed(self, devid, code, message): ...
    def frontend_misbehaved(self, devid, message): ...
    def keys_changed(self, devid, keys): ...


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _serve(ram: GuestRAM, gt: GuestGrantTable, front: BlkFront, config: dict[str, str],
           batch: int, ctl_r: int, rep_w: int) -> None:
    """The child: the daemon side. Answers each byte on ctl_r with its CPU seconds."""
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    mem = GuestMemory()
    for gpa, size, fd, offset in ram.regions:
        mem.add_region(gpa, size, fd, offset)
    grants = GrantTable(mem)
    grants.set_table(gt.fd, 0, gt.nr_frames)
    pool = ThreadPoolExecutor(4)
    ctx = DeviceContext(mem, grants, loop, _Quiet(),
                        lambda fn, *a: asyncio.wrap_future(pool.submit(fn, *a), loop=loop))
    done = loop.create_future()

    def on_ctl() -> None:
        if not os.read(ctl_r, 1):
            loop.remove_reader(ctl_r)
            done.set_result(None)
            return
        os.write(rep_w, f"{_cpu()}\n".encode())

    async def main() -> None:
        dev = BlkDevice(1, config, ctx)
        dev.batch = batch
        chans = {p: EventChannel(p, k, c) for p, k, c in front.channels()}
        keys = await dev.connect(front.frontend_keys(), chans)
        os.write(rep_w, (json.dumps(keys) + "\n").encode())
        loop.add_reader(ctl_r, on_ctl)
        await done
        await dev.close()

    loop.run_until_complete(main())
    os._exit(0)


class _Child:
    def __init__(self, ram, gt, front, config, batch) -> None:
        ctl_r, self.ctl_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self.ctl_w)
            os.close(self.rep_r)
            _serve(ram, gt, front, config, batch, ctl_r, rep_w)
        os.close(ctl_r)
        os.close(rep_w)
        for _port, kick, call in front.channels():  # the child has them now
            os.close(kick)
            os.close(call)
        self.reply = os.fdopen(self.rep_r)
        self.keys = json.loads(self.reply.readline())

    def cpu(self) -> float:
        os.write(self.ctl_w, b"c")
        return float(self.reply.readline())

    def stop(self) -> None:
        os.close(self.ctl_w)
        os.waitpid(self.pid, 0)
        self.reply.close()


async def _run(front: BlkFront, child: _Child, nbytes: int, depth: int, sequential: bool
               ) -> tuple[float, float, int]:
    """(I/Os per second, MB/s, daemon CPU us per I/O)."""
    front.start()
    blocks = IMAGE_SIZE // nbytes
    count = 0
    stop_at = time.perf_counter() + SECONDS
    cursor = 0

    async def worker(w: int) -> None:
        nonlocal count, cursor
        rng = random.Random(w)
        while time.perf_counter() < stop_at:
            if sequential:
                block, cursor = cursor, (cursor + 1) % blocks
            else:
                block = rng.randrange(blocks)
            await front.read(block * nbytes // 512, nbytes)
            count += 1

    cpu0, t0 = child.cpu(), time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(depth)))
    elapsed, cpu = time.perf_counter() - t0, child.cpu() - cpu0
    return count / elapsed, count * nbytes / elapsed / 1e6, cpu / count * 1e6


def device_run(image: str, nbytes: int, depth: int, sequential: bool, batch: int,
               config: dict[str, str] | None = None) -> tuple[float, float, float]:
    ram = GuestRAM(64 * MiB)
    gt = GuestGrantTable(nr_frames=4)
    front = BlkFront(ram, gt, 1, ring_order=1, random_layout=False)
    child = _Child(ram, gt, front, {"path": image, **(config or {})}, batch)
    front.update_backend_keys(child.keys)
    try:
        return asyncio.run(_run(front, child, nbytes, depth, sequential))
    finally:
        child.stop()
        front.close()
        gt.close()
        ram.close()


def fio_run(image: str, engine: str, bs: str, rw: str, depth: int) -> tuple[float, float]:
    """(IOPS, MB/s) from fio's JSON output."""
    cmd = ["fio", "--name=bench", f"--filename={image}", f"--ioengine={engine}",
           f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", "--invalidate=0",
           "--time_based", f"--runtime={SECONDS:g}", "--output-format=json"]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    read = out["jobs"][0]["read"]
    return read["iops"], read["bw_bytes"] / 1e6


def main() -> None:
    workdir = tempfile.mkdtemp(prefix="bench-blk-", dir="/var/tmp")
    image = os.path.join(workdir, "disk.img")
    try:
        with open(image, "wb") as f:
            chunk = random.Random(0).randbytes(MiB)
            for _ in range(IMAGE_SIZE // MiB):
                f.write(chunk)
        with open(image, "rb") as f:  # warm the page cache for both sides
            while f.read(8 * MiB):
                pass
        rows = []
        for batch in (1, 4, 8):
            iops, mbs, cpu = device_run(image, 4096, 32, False, batch)
            rows.append((f"backendd blk, 4 KiB randread QD32, batch {batch}", iops, mbs, cpu))
        iops, mbs, cpu = device_run(image, MiB, 4, True, 4)
        rows.append(("backendd blk, 1 MiB seq read QD4", iops, mbs, cpu))
        if shutil.which("fio"):
            for engine, depth in (("psync", 1), ("io_uring", 32)):
                iops, mbs = fio_run(image, engine, "4k", "randread", depth)
                rows.append((f"fio {engine}, 4 KiB randread QD{depth}", iops, mbs, "-"))
            for engine, depth in (("psync", 1), ("io_uring", 4)):
                iops, mbs = fio_run(image, engine, "1m", "read", depth)
                rows.append((f"fio {engine}, 1 MiB seq read QD{depth}", iops, mbs, "-"))
        print(table(f"blk reads from a warm {IMAGE_SIZE // MiB} MiB image file "
                    f"({SECONDS:g} s each)",
                    ["what", "IOPS", "MB/s", "daemon CPU us/IO"], rows))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    from . import nbd  # the same reads through an NBD export, beside fio's nbd engine
    nbd.main()


if __name__ == "__main__":
    main()
