"""Block reads from an NBD export: the daemon's blk device on an nbd+unix:// disk against
fio's own NBD engine (or nbdcopy, where this fio has no such engine) on the same export,
in the same run. qemu-nbd serves a raw image from a warm page cache.

The device runs in a forked child with its own event loop, over the guest's RAM and grant
table memfds and eventfds, as the daemon would; the parent is the guest (blkfront). The
child's CPU time per I/O is the daemon's cost.

    python -m bench.nbd        (also run by python -m bench.blk)
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import select
import shutil
import subprocess
import tempfile
import time

from backendd.config import BlockSection, Config
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
# (label, request bytes, queue depth, sequential, fio's rw and bs)
CASES = [("4 KiB randread QD32", 4096, 32, False, "randread", "4k"),
         ("1 MiB seq read QD4", MiB, 4, True, "read", "1m")]


class _Quiet(NoticeSink):
    def device_failed(self, devid, code, message): ...
    def frontend_misbehaved(self, devid, message): ...
    def keys_changed(self, devid, keys): ...


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _serve(ram: GuestRAM, gt: GuestGrantTable, front: BlkFront, uri: str, allowed: str,
           ctl_r: int, rep_w: int) -> None:
    """The child, the daemon's side: serves the disk, answers each byte on ctl_r with
    its CPU seconds, stops at EOF."""
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
    config = Config(block=BlockSection(allowed_nbd=[allowed]))
    ctx = DeviceContext(mem, grants, loop, _Quiet(), None, extras={"config": config})
    done = loop.create_future()

    def on_ctl() -> None:
        if not os.read(ctl_r, 1):
            loop.remove_reader(ctl_r)
            done.set_result(None)
            return
        os.write(rep_w, f"{_cpu()}\n".encode())

    async def main() -> None:
        dev = BlkDevice(1, {"path": uri}, ctx)
        await dev.prepare()
        chans = {p: EventChannel(p, k, c) for p, k, c in front.channels()}
        keys = await dev.connect(front.frontend_keys(), chans)
        os.write(rep_w, (json.dumps(keys) + "\n").encode())
        loop.add_reader(ctl_r, on_ctl)
        await done
        await dev.close()

    loop.run_until_complete(main())
    os._exit(0)


class _Child:
    def __init__(self, ram, gt, front, uri: str, allowed: str) -> None:
        ctl_r, self.ctl_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self.ctl_w)
            os.close(self.rep_r)
            _serve(ram, gt, front, uri, allowed, ctl_r, rep_w)
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
               ) -> tuple[float, float, float]:
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


def device_run(uri: str, allowed: str, nbytes: int, depth: int, sequential: bool
               ) -> tuple[float, float, float]:
    ram = GuestRAM(64 * MiB)
    gt = GuestGrantTable(nr_frames=4)
    front = BlkFront(ram, gt, 1, ring_order=1, random_layout=False)
    child = _Child(ram, gt, front, uri, allowed)
    front.update_backend_keys(child.keys)
    try:
        return asyncio.run(_run(front, child, nbytes, depth, sequential))
    finally:
        child.stop()
        front.close()
        gt.close()
        ram.close()


def fio_has_nbd() -> bool:
    if not shutil.which("fio"):
        return False
    out = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True).stdout
    return any(line.strip() == "nbd" for line in out.splitlines())


def fio_run(uri: str, rw: str, bs: str, depth: int) -> tuple[float, float]:
    """(IOPS, MB/s) from fio's JSON output (the engine prints a line before it)."""
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--size={IMAGE_SIZE}",
           f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", "--time_based",
           f"--runtime={SECONDS:g}", "--output-format=json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    read = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return read["iops"], read["bw_bytes"] / 1e6


def nbdcopy_run(uri: str, bs: int, depth: int) -> tuple[float, float]:
    """(I/Os per second, MB/s) of one sequential copy of the export to null:."""
    t0 = time.perf_counter()
    subprocess.run(["nbdcopy", f"--request-size={bs}", f"--requests={depth}",
                    "--connections=1", uri, "null:"], check=True, capture_output=True)
    elapsed = time.perf_counter() - t0
    return IMAGE_SIZE / bs / elapsed, IMAGE_SIZE / elapsed / 1e6


def main() -> None:
    if not shutil.which("qemu-nbd"):
        print("nbd: qemu-nbd not installed (Debian qemu-utils); skipped")
        return
    workdir = tempfile.mkdtemp(prefix="bench-nbd-", dir="/var/tmp")
    image = os.path.join(workdir, "disk.img")
    sock = os.path.join(workdir, "nbd.sock")
    pidfile = os.path.join(workdir, "nbd.pid")
    uri = f"nbd+unix:///disk?socket={sock}"
    pid = 0
    try:
        with open(image, "wb") as f:
            chunk = random.Random(0).randbytes(MiB)
            for _ in range(IMAGE_SIZE // MiB):
                f.write(chunk)
        with open(image, "rb") as f:  # warm the page cache
            while f.read(8 * MiB):
                pass
        # Returns once the socket listens.
        subprocess.run(["qemu-nbd", "--fork", "--persistent", "--shared=64",
                        f"--pid-file={pidfile}", f"--socket={sock}", "--export-name=disk",
                        "--format=raw", "--read-only", image], check=True)
        with open(pidfile) as f:
            pid = int(f.read())
        with_fio = fio_has_nbd()
        rows = []
        for label, nbytes, depth, sequential, rw, bs in CASES:
            iops, mbs, cpu = device_run(uri, workdir, nbytes, depth, sequential)
            if with_fio:
                base_iops, base_mbs = fio_run(uri, rw, bs, depth)
                base = f"fio nbd engine, {label}"
            elif shutil.which("nbdcopy") and sequential:
                base_iops, base_mbs = nbdcopy_run(uri, nbytes, depth)
                base = f"nbdcopy, {label}"
            else:
                base_iops = base_mbs = float("nan")
                base = f"(no baseline), {label}"
            rows.append((f"backendd blk on NBD, {label}", iops, mbs, cpu,
                         f"{100 * iops / base_iops:.0f}%" if base_iops == base_iops else "-"))
            rows.append((base, base_iops, base_mbs, "-", "100%"))
        print(table(f"blk reads through NBD (qemu-nbd, raw, unix socket, warm "
                    f"{IMAGE_SIZE // MiB} MiB image; {SECONDS:g} s each)",
                    ["what", "IOPS", "MB/s", "daemon CPU us/IO", "of baseline"], rows))
    finally:
        if pid:
            os.kill(pid, 15)
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                pass
            else:
                select.select([fd], [], [], 30)
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
