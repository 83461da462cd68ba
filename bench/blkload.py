"""Drive a daemon's blk device with the C load generator (bench/native/blkfront_load.c).

Python does the control plane, as a VMM and the guest's xenbus would: a connection to the
daemon, guest RAM and a grant table (memfds) handed over, ADD_DEVICE, ring pages allocated
and granted, eventfds made. The C program inherits the memfds and eventfds, initialises
the rings (SHARED_RING_INIT), grants its data pages itself and says "ready"; then
FRONTEND_STATE connects the device with the ring refs and channels, the C program is told
to go, and it drives the rings at full speed and prints one line of JSON.

run_load_socket instead lets the program do the control plane itself, through the C
client library (clients/c/backendd-client.h) with --socket, as a C VMM would.

The daemon's CPU time is read from /proc (utime + stime of the daemon process and its
descendants) just before "go" and after the program exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from backendd.guest.machine import SimGuest
from backendd.guest.vmm import VmmClient
from rings.consts import GTF_READING, GTF_WRITING, PAGE_SIZE, XenbusState

from .loadgen import (
    contiguous,
    daemon_cpu,
    event_channel_fds,
    guest_args,
    require_one_region,
    start_ready,
)
from .native import build

DEVID = 51712  # xvda
RING_ENTRIES_PER_PAGE = 32  # blkif, x86_64: __CONST_RING_SIZE(blkif, 4096)
DIRECT_SEGMENTS = 11
SEGMENTS_PER_INDIRECT_PAGE = PAGE_SIZE // 8
FIRST_PORT = 1


class LoadFailed(RuntimeError):
    """The load generator reported a failed request, a bad response, a grant still held
    after its response, a verify mismatch, or a stall."""


@dataclass(frozen=True)
class Load:
    rw: str = "read"           # read | write
    pattern: str = "rand"      # rand | seq
    bs: int = 4096
    qd: int = 32               # per queue
    queues: int = 1
    seconds: float = 0.0       # run for this long, or
    count: int = 0             # this many requests per queue (with verify: writes, then reads)
    persistent: bool = False   # asked for; used only when the daemon offers it too
    verify: bool = False
    seed: int = 1


@dataclass
class LoadResult:
    load: Load
    persistent: bool            # negotiated: both ends said 1
    offered_persistent: bool    # the daemon's feature-persistent
    ios: int
    bytes: int
    seconds: float
    lat_ns: dict[str, float]
    daemon_cpu_s: float | None
    sectors: int
    grant_range: tuple[int, int]            # (first gref, count) the program used
    held_after_close: list[int] = field(default_factory=list)  # grefs still in use
    raw: dict = field(default_factory=dict)

    @property
    def iops(self) -> float:
        return self.ios / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0

    @property
    def frontend_cpu_us_per_io(self) -> float:
        return self.raw["cpu_seconds"] / self.ios * 1e6 if self.ios else float("nan")

    @property
    def cpu_us_per_io(self) -> float:
        if self.daemon_cpu_s is None or not self.ios:
            return float("nan")
        return self.daemon_cpu_s / self.ios * 1e6


def _pages_per_request(bs: int) -> tuple[int, int]:
    nsegs = bs // PAGE_SIZE
    nind = -(-nsegs // SEGMENTS_PER_INDIRECT_PAGE) if nsegs > DIRECT_SEGMENTS else 0
    return nsegs, nind


def _ring_order(qd: int) -> int:
    order = 0
    while RING_ENTRIES_PER_PAGE << order < qd:
        order += 1
    return order


def _load_output(returncode: int | None, out: bytes, err: bytes) -> dict:
    """blkfront_load's JSON line (its last line of output); LoadFailed if it has none or
    the program failed."""
    try:
        raw = json.loads(out.decode().splitlines()[-1])
    except (IndexError, ValueError):
        raise LoadFailed(f"blkfront_load exited {returncode} without results: "
                         f"{err.decode()}") from None
    if returncode != 0:
        raise LoadFailed(f"blkfront_load: {raw.get('failure') or 'failed'} ({raw}); "
                         f"{err.decode()}")
    return raw


async def run_load(socket_path: str, image: str, load: Load, *,
                   daemon_pid: int | None = None, binary: Path | None = None,
                   device_config: dict[str, str] | None = None,
                   force_pool: bool = False, sectors: int | None = None) -> LoadResult:
    """One connection, one guest, one disk, one run of the load generator.

    `force_pool` (tests): with load.persistent, copy through a pool of kept grants even
    when the daemon does not offer feature-persistent. Kept grants are valid for any
    backend; only the negotiated result tells whether the backend kept them mapped.
    `sectors`: the disk's size where `image` is not a file (an NBD URI)."""
    if load.bs % PAGE_SIZE or load.bs <= 0:
        raise ValueError("bs must be a multiple of 4096")
    binary = binary or build("blkfront_load")
    nsegs, nind = _pages_per_request(load.bs)
    order = _ring_order(load.qd)
    data_pages = load.queues * load.qd * (nsegs + nind)
    ring_pages = load.queues << order
    ram_pages = data_pages + ring_pages + 64
    gnttab_frames = -(-(data_pages + ring_pages + 64) * 8 // PAGE_SIZE) + 1
    guest = SimGuest(ram_size=ram_pages * PAGE_SIZE, gnttab_frames=gnttab_frames)
    client: VmmClient | None = None
    fds: list[int] = []
    proc: asyncio.subprocess.Process | None = None
    try:
        client = await VmmClient.connect(socket_path)
        await guest.attach(client)
        _, bkeys = await client.add_device(DEVID, "blk", {"path": image,
                                                          **(device_config or {})})
        offered = bkeys.get("feature-persistent") == "1"
        persistent = load.persistent and offered
        max_indirect = int(bkeys.get("feature-max-indirect-segments", "0"))

        ram, gt = guest.ram, guest.gnttab
        require_one_region(ram)
        fkeys: dict[str, str] = {"protocol": "x86_64-abi",
                                 "feature-persistent": "1" if load.persistent else "0"}
        if load.queues > 1:
            fkeys["multi-queue-num-queues"] = str(load.queues)
        if order:
            fkeys["ring-page-order"] = str(order)
        queue_args: list[str] = []
        channels: list[tuple[int, int, int]] = []
        ring_grefs: list[int] = []
        for q in range(load.queues):
            frames = [ram.alloc_page() for _ in range(1 << order)]
            first = contiguous(frames)
            grefs = [gt.grant_access(gfn) for gfn in frames]
            ring_grefs += grefs
            prefix = f"queue-{q}/" if load.queues > 1 else ""
            if order:
                fkeys |= {f"{prefix}ring-ref{i}": str(g) for i, g in enumerate(grefs)}
            else:
                fkeys[f"{prefix}ring-ref"] = str(grefs[0])
            port = FIRST_PORT + q
            fkeys[f"{prefix}event-channel"] = str(port)
            kick, call = event_channel_fds(fds)
            channels.append((port, kick, call))
            queue_args += ["--queue", f"{first}:{order}:{kick}:{call}"]
        gref_first, memory_args = guest_args(ram, gt, ring_grefs, data_pages)

        args = [str(binary), *memory_args, *queue_args,
                "--sectors", str(sectors or os.path.getsize(image) // 512),
                "--max-indirect", str(max_indirect), "--qd", str(load.qd),
                "--bs", str(load.bs), "--rw", load.rw, "--pattern", load.pattern,
                "--persistent", str(int(persistent or (load.persistent and force_pool))),
                "--seed", str(load.seed),
                "--handle", str(DEVID & 0xFFFF)]
        args += ["--count", str(load.count)] if load.count else ["--seconds", str(load.seconds)]
        if load.verify:
            args.append("--verify")
        proc, why = await start_ready(args, [ram.fd, gt.fd, *fds])
        if why or proc.returncode is not None:
            raise LoadFailed(f"blkfront_load did not start: {why}")
        assert proc.stdin is not None

        _, ckeys = await client.frontend_state(DEVID, XenbusState.CONNECTED, fkeys, channels)
        for fd in fds:  # the daemon and the program have their own now
            os.close(fd)
        fds.clear()
        cpu0 = daemon_cpu(daemon_pid)
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        out, err = await proc.communicate()
        cpu1 = daemon_cpu(daemon_pid)
        raw = _load_output(proc.returncode, out, err)

        await client.frontend_state(DEVID, XenbusState.CLOSED, {})
        # A closed device holds no grant: the entries the program left granted (its
        # persistent pool) must show no GTF_reading/GTF_writing now.
        held = [g for g in range(gref_first, gref_first + data_pages)
                if gt.entry(g)[0] & (GTF_READING | GTF_WRITING)]
        return LoadResult(load, persistent, offered, raw["ios"], raw["bytes"], raw["seconds"],
                          raw["lat_ns"], None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
                          int(ckeys["sectors"]), (gref_first, data_pages), held, raw)
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        for fd in fds:
            os.close(fd)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.remove_device(DEVID)
            await client.close()
        guest.close()


async def run_load_socket(socket_path: str, image: str, load: Load, *,
                          binary: Path | None = None,
                          device_config: dict[str, str] | None = None,
                          inflight: bool = False, daemon_pid: int | None = None,
                          log: bool = False) -> dict:
    """One run of the load generator doing its own control plane (--socket): it connects
    to the daemon through the C client library (clients/c), hands over its guest memory,
    grant table and eventfds, connects the disk, runs, and closes and removes it. Returns
    its JSON line; LoadFailed when it fails. With daemon_pid, the daemon's CPU seconds
    over the run alone (from its "ready" once connected to its "done" before the close,
    --markers) are added as "daemon_cpu_seconds". With log, the daemon logs its writes
    into a dirty log (--log) and "dirty_pages" counts the guest pages it marked."""
    binary = binary or build("blkfront_load")
    args = [str(binary), "--socket", socket_path, "--disk", f"path={image}",
            *(a for k, v in (device_config or {}).items() for a in ("--disk", f"{k}={v}")),
            "--queues", str(load.queues), "--devid", str(DEVID), "--qd", str(load.qd),
            "--bs", str(load.bs), "--rw", load.rw, "--pattern", load.pattern,
            "--persistent", str(int(load.persistent)), "--seed", str(load.seed),
            "--handle", str(DEVID & 0xFFFF)]
    args += ["--count", str(load.count)] if load.count else ["--seconds", str(load.seconds)]
    if load.verify:
        args.append("--verify")
    if inflight:
        args.append("--inflight")
    if log:
        args.append("--log")  # the dirty log on for the run (SET_LOG)
    cpu: float | None = None
    if daemon_pid is None:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
    else:
        proc, why = await start_ready([*args, "--markers"], [])
        if why or proc.returncode is not None:
            raise LoadFailed(f"blkfront_load did not connect: {why}")
        assert proc.stdin is not None and proc.stdout is not None
        try:
            cpu0 = daemon_cpu(daemon_pid)
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            done = await proc.stdout.readline()
            cpu1 = daemon_cpu(daemon_pid)
            if done.strip() == b"done" and cpu0 is not None and cpu1 is not None:
                cpu = cpu1 - cpu0
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(b"close\n")
            out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    raw = _load_output(proc.returncode, out, err)
    if cpu is not None:
        raw["daemon_cpu_seconds"] = cpu
    return raw


def socket_result(load: Load, raw: dict) -> LoadResult:
    """A LoadResult from run_load_socket's JSON line (with daemon_pid)."""
    return LoadResult(load, bool(raw["persistent"]), raw["offered_persistent"] == 1,
                      raw["ios"], raw["bytes"], raw["seconds"], raw["lat_ns"],
                      raw.get("daemon_cpu_seconds"), raw["sectors"], (0, 0),
                      [-1] * raw["held_after_close"], raw)


async def pingpong(rounds: int = 20000) -> dict[str, int]:
    """The eventfd round trip between two processes: the latency floor of a kick."""
    proc = await asyncio.create_subprocess_exec(
        str(build("eventfd_pingpong")), str(rounds), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise LoadFailed(f"eventfd_pingpong: {err.decode()}")
    return json.loads(out)


def pattern_bytes(offset: int, length: int, seed: int) -> bytes:
    """What blkfront_load --verify writes at disk byte `offset` (a multiple of 8)."""
    mask = (1 << 64) - 1
    return b"".join(((o * 0x9E3779B97F4A7C15 & mask) ^ seed).to_bytes(8, "little")
                    for o in range(offset, offset + length, 8))


__all__ = ["Load", "LoadFailed", "LoadResult", "daemon_cpu", "pattern_bytes", "pingpong",
           "run_load", "run_load_socket", "socket_result"]
