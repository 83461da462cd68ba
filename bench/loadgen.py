"""What the C load generators' harnesses (bench/blkload.py, bench/netload.py) share: the
daemon's CPU time from /proc, the guest RAM frames and grant refs handed to a program, the
eventfds of its event channels, and starting a program that says "ready" once its rings
are initialised."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence

from backendd.guest.gnttab import GuestGrantTable
from backendd.guest.memory import GuestRAM


def _proc_cpu(pid: int) -> float:
    """CPU seconds of pid and its descendants: each live one's utime + stime + cutime +
    cstime (a reaped child's time moves into its parent's cutime/cstime, so the sum does
    not jump when one exits)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    pending = [pid]
    while pending:
        p = pending.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        # fields[0] is field 3 (state): utime 14, stime 15, cutime 16, cstime 17.
        total += sum(int(v) for v in fields[11:15])
        for task in os.listdir(f"/proc/{p}/task") if os.path.isdir(f"/proc/{p}/task") else ():
            with contextlib.suppress(FileNotFoundError), \
                    open(f"/proc/{p}/task/{task}/children") as f:
                pending.extend(int(c) for c in f.read().split())
    return total / tick


def daemon_cpu(pid: int | None) -> float | None:
    return None if pid is None else _proc_cpu(pid)


def contiguous(frames: list[int]) -> int:
    """The first of `frames`, which the program takes as one run of guest pages."""
    if frames != list(range(frames[0], frames[0] + len(frames))):
        raise RuntimeError("guest RAM allocator handed out non-contiguous frames")
    return frames[0]


def require_one_region(ram: GuestRAM) -> None:
    """The programs map guest RAM (the --ram memfd) as one region at guest address 0."""
    if len(ram.regions) != 1 or ram.regions[0][0] != 0 or ram.regions[0][3] != 0:
        raise RuntimeError("the load generator maps guest RAM as one region at 0")


def event_channel_fds(fds: list[int]) -> tuple[int, int]:
    """A new event channel's kick and call eventfds, added to `fds` (closed by the caller)."""
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fds.append(kick)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fds.append(call)
    return kick, call


def guest_args(ram: GuestRAM, gt: GuestGrantTable, ring_grefs: list[int],
               data_pages: int) -> tuple[int, list[str]]:
    """Sets `data_pages` guest pages and as many grant refs aside for the program, once
    the rings are granted. Returns the first of those grant refs and the program's
    --ram, --gnttab, --grefs and --frames arguments."""
    frame_first = contiguous([ram.alloc_page() for _ in range(data_pages)])
    # Python's grant allocator hands out the lowest free entries: everything above
    # the rings' grants is the program's.
    gref_first = max(ring_grefs) + 1
    if gref_first + data_pages > gt.entries:
        raise RuntimeError("grant table too small")
    return gref_first, ["--ram", f"{ram.fd}:{ram.size}",
                        "--gnttab", f"{gt.fd}:{gt.nr_frames}",
                        "--grefs", f"{gref_first}:{data_pages}",
                        "--frames", f"{frame_first}:{data_pages}"]


async def start_ready(args: Sequence[str], pass_fds: Sequence[int]
                      ) -> tuple[asyncio.subprocess.Process, str]:
    """Start a generator with pipes on stdio and wait for its "ready" line. Returns the
    process and, when it did not say ready, what it wrote on stderr (it has exited)."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, pass_fds=list(pass_fds))
    assert proc.stdout is not None and proc.stderr is not None
    ready = await proc.stdout.readline()
    if ready.strip() == b"ready":
        return proc, ""
    await proc.wait()
    return proc, (await proc.stderr.read()).decode()


__all__ = ["contiguous", "daemon_cpu", "event_channel_fds", "guest_args", "require_one_region",
           "start_ready"]
