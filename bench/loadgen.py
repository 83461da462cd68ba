"""What the C load generators' harnesses (bench/blkload.py, bench/netload.py) share: the
daemon's CPU time from /proc, the guest RAM frames handed to a program, and starting a
program that says "ready" once its rings are initialised."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence


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


__all__ = ["contiguous", "daemon_cpu", "start_ready"]
