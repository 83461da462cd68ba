"""What each additional guest costs in unique memory (USS), and what a second guest adds
to the aggregate IOPS, per process model: a real `backendd serve` process with
`process_model = "single"` and one with "per-connection", measured in the same run with
the same guests.

    python -m bench.workers [--guests N] [--seconds S]

USS is Private_Clean + Private_Dirty + Private_Hugetlb of /proc/PID/smaps_rollup, summed
over the daemon's processes (per-connection: the supervisor, its zygote and the workers).
Guest RAM and grant tables are the VMM's memfds, shared, so they count in no process's
USS. Each guest has one disk, connected, with some I/O done; the cost per guest is the
growth from an idle daemon (before any guest) to N guests, divided by N.

Stall: guest b's write latencies, undisturbed and while guest a's worker is killed.

Scaling: 4 KiB random reads at QD 32 by the C load generator (bench/blkload.py), one
guest alone, then two guests at once, each on its own warm image; the figure is the two
guests' aggregate IOPS over the one guest's. The load generators need CPU too, so on a
2-CPU machine four busy processes share two CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from backendd.guest.blkfront import BlkFront
from backendd.guest.machine import SimGuest
from backendd.guest.vmm import VmmClient
from rings.consts import XenbusState

from .blkload import Load, run_load_socket, socket_result
from .report import table

MiB = 1 << 20
GUESTS = 4
IMAGE = 16 * MiB
DEVID = 51712
TARGET_MIB = 25.0
TARGET_SCALING = 1.6
TARGET_STALL_MS = 100.0
NAN = float("nan")
SECONDS = 3.0
SCALE_IMAGE = 64 * MiB


def uss(pid: int) -> int:
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Private_Clean", "Private_Dirty", "Private_Hugetlb"):
            total += int(value.split()[0]) * 1024
    return total


def family(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(FileNotFoundError):
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                todo.extend(int(c) for c in children)
    return out


class Guest:
    def __init__(self, workdir: Path, n: int) -> None:
        self.image = workdir / f"disk{n}.img"
        self.image.write_bytes(bytes(IMAGE))
        self.sim = SimGuest(ram_size=32 * MiB, gnttab_frames=8)
        self.client: VmmClient | None = None
        self.front: BlkFront | None = None

    async def start(self, sock: str, name: str | None = None) -> None:
        self.client = await VmmClient.connect(sock, name=name)
        await self.sim.attach(self.client)
        _, keys = await self.client.add_device(DEVID, "blk", {"path": str(self.image)})
        self.front = BlkFront(self.sim.ram, self.sim.gnttab, DEVID, queues=1,
                              backend_keys=keys)
        channels = self.front.channels()
        _, keys = await self.client.hand_over_channels(
            DEVID, XenbusState.CONNECTED, self.front.frontend_keys(), channels)
        self.front.update_backend_keys(keys)
        self.front.start()
        for i in range(64):  # warm the data path: writes and reads of a few sizes
            await self.front.write(i * 256, os.urandom(4096 << (i % 4)))
            await self.front.read(i * 256, 4096 << (i % 4))

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.front is not None:
            self.front.close()
        self.sim.close()


async def measure(model: str, workdir: Path, guests: int) -> tuple[int, int, int]:
    """(idle USS, USS with `guests` guests, process count) of a daemon in `model`."""
    proc, sock = await start(model, workdir)
    made: list[Guest] = []
    try:
        # The probe's own worker (per-connection) goes when it hangs up: wait for that.
        while len(family(proc.pid)) > (2 if model == "per-connection" else 1):
            await asyncio.sleep(0.01)
        idle = sum(uss(p) for p in family(proc.pid))
        for n in range(guests):
            guest = Guest(workdir, n)
            made.append(guest)
            await guest.start(sock)
        pids = family(proc.pid)
        return idle, sum(uss(p) for p in pids), len(pids)
    finally:
        for guest in made:
            await guest.close()
        proc.send_signal(signal.SIGTERM)
        await proc.wait()


async def start(model: str, workdir: Path) -> tuple[asyncio.subprocess.Process, str]:
    sock = str(workdir / f"{model}.sock")
    config = workdir / f"{model}.toml"
    config.write_text(f'[daemon]\nprocess_model = "{model}"\nlog_level = "warning"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "backendd", "--config", str(config), "--socket", sock, "serve",
        stdout=asyncio.subprocess.DEVNULL)
    for _ in range(3000):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(sock) == 0:
                return proc, sock
        await asyncio.sleep(0.01)
    proc.kill()
    raise SystemExit(f"bench.workers: the {model} daemon did not come up")


async def scaling(model: str, images: list[str], workdir: Path,
                  seconds: float) -> tuple[float, float]:
    """(IOPS of one guest alone, aggregate IOPS of two guests at once)."""
    proc, sock = await start(model, workdir)
    try:
        load = Load(rw="read", bs=4096, qd=32, seconds=seconds)
        one = socket_result(load, await run_load_socket(sock, images[0], load))
        two = [socket_result(load, raw) for raw in await asyncio.gather(
            *(run_load_socket(sock, image, load) for image in images))]
        return one.iops, sum(r.iops for r in two)
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()


async def stall(workdir: Path, seconds: float) -> tuple[list[float], list[float]]:
    """Guest b's write latencies (ms) over `seconds`, once undisturbed and once while
    guest a's worker is killed with SIGKILL halfway through (per-connection)."""
    proc, sock = await start("per-connection", workdir)
    a, b = Guest(workdir, 100), Guest(workdir, 101)
    try:
        await a.start(sock, name="bench-a")
        await b.start(sock, name="bench-b")
        assert b.front is not None
        loop = asyncio.get_running_loop()
        data = os.urandom(4096)

        async def window(kill_at: float | None) -> list[float]:
            lat: list[float] = []
            t0 = loop.time()
            killed = kill_at is None
            while loop.time() - t0 < seconds:
                if not killed and loop.time() - t0 >= kill_at:
                    killed = True
                    client = await VmmClient.connect(sock)
                    try:
                        status = await client.daemon_status()
                    finally:
                        await client.close()
                    conn = next(k.split(".")[1] for k, v in status.items()
                                if k.endswith(".guest") and v == "bench-a")
                    os.kill(int(status[f"conn.{conn}.worker_pid"]), signal.SIGKILL)
                start_io = loop.time()
                await b.front.write(len(lat) % 1024 * 8, data)
                lat.append((loop.time() - start_io) * 1000)
            return lat

        quiet = await window(None)
        killed = await window(seconds / 2)
        return quiet, killed
    finally:
        for guest in (a, b):
            with contextlib.suppress(Exception):
                await guest.close()
        proc.send_signal(signal.SIGTERM)
        await proc.wait()


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else NAN


def _make_image(path: Path) -> None:
    with open(path, "wb") as f:
        for _ in range(SCALE_IMAGE // MiB):
            f.write(os.urandom(MiB))
    with open(path, "rb") as f:  # warm the page cache
        while f.read(8 * MiB):
            pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.workers")
    parser.add_argument("--guests", type=int, default=GUESTS)
    parser.add_argument("--seconds", type=float, default=SECONDS, help="per scaling line")
    args = parser.parse_args(argv or [])
    workdir = Path(tempfile.mkdtemp(prefix="bench-workers-", dir="/var/tmp"))
    rows = []
    per_guest = {}
    scale_rows = []
    ratio = {}
    try:
        for model in ("single", "per-connection"):
            idle, loaded, procs = asyncio.run(measure(model, workdir, args.guests))
            per_guest[model] = (loaded - idle) / args.guests / MiB
            rows.append([model, procs, idle / MiB, loaded / MiB, per_guest[model]])
        images = [workdir / f"scale{i}.img" for i in range(2)]
        for image in images:
            _make_image(image)
        for model in ("single", "per-connection"):
            one, two = asyncio.run(scaling(model, [str(i) for i in images], workdir,
                                           args.seconds))
            ratio[model] = two / one if one else 0.0
            scale_rows.append([model, one, two, f"{ratio[model]:.2f}x"])
        quiet, killed = asyncio.run(stall(workdir, args.seconds))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(table(f"daemon USS, idle and with {args.guests} guests (one disk each), {when}",
                ["process model", "processes", "idle MiB", "loaded MiB", "MiB per guest"],
                rows))
    print()
    print(table(f"4 KiB random reads, QD 32, {args.seconds:g} s a line, "
                f"{os.cpu_count()} CPUs (load generators included)",
                ["process model", "1 guest IOPS", "2 guests IOPS", "2 / 1"], scale_rows))
    print()
    print(table(f"guest b's 4 KiB writes (QD 1, Python guest), {args.seconds:g} s each, "
                "per-connection",
                ["window", "writes", "p50 ms", "p99 ms", "max ms"],
                [[name, len(lat), _pct(lat, 0.5), _pct(lat, 0.99), max(lat)]
                 for name, lat in (("undisturbed", quiet),
                                   ("guest a's worker killed halfway", killed))]))
    print()
    got = per_guest["per-connection"]
    scale = ratio["per-connection"]
    print(table("targets", ["what", "measured", "goal", "met"],
                [["USS per additional guest, per-connection", f"{got:.1f} MiB",
                  f"<= {TARGET_MIB:g} MiB", "yes" if got <= TARGET_MIB else "NO"],
                 ["2 guests / 1 guest IOPS, per-connection", f"{scale:.2f}x",
                  f">= {TARGET_SCALING:g}x", "yes" if scale >= TARGET_SCALING else "NO"],
                 ["guest b's longest write while a's worker is killed",
                  f"{max(killed):.1f} ms", f"<= {TARGET_STALL_MS:g} ms",
                  "yes" if max(killed) <= TARGET_STALL_MS else "NO"]]))


__all__ = ["main", "measure", "uss"]

if __name__ == "__main__":
    main(sys.argv[1:])
