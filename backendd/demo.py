"""`backendd demo`: the real daemon (a `backendd serve` process) and a simulated guest
with a disk and a nic, driven through the control socket the way a VMM would.

The disk part writes and reads random blocks through the blkif rings and checks every byte
against the image file read independently; the nic part sends real pings through the tap
the daemon serves, from a network namespace on the host side to a second namespace where
the simulated guest's network stack sits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from rings.consts import XenbusState

from .guest.blkfront import BlkFront
from .guest.machine import SimGuest
from .guest.netdemo import run_nic_demo
from .guest.vmm import VmmClient
from .protocol.messages import DaemonStatus

MiB = 1 << 20
DISK_DEVID = 51712  # xvda
NIC_DEVID = 0
IMAGE_SIZE = 64 * MiB


def say(text: str) -> None:
    print(text, flush=True)


class Progress:
    """One status line per second (rewritten in place on a terminal)."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.last = 0.0

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 1.0:
            return
        self.last = now
        if self.tty:
            sys.stdout.write("\r\033[K" + text)
            sys.stdout.flush()
        else:
            say(text)

    def done(self, text: str) -> None:
        if self.tty:
            sys.stdout.write("\r\033[K")
        say(text)


async def start_daemon(workdir: Path) -> tuple[asyncio.subprocess.Process, str, Path]:
    """`backendd serve --ready-fd`: ready when READY=1 arrives on the pipe; end-of-file
    instead means the daemon exited, and its log says why."""
    path = str(workdir / "backendd.sock")
    log_path = workdir / "backendd.log"
    log = open(log_path, "w")  # noqa: SIM115 - handed to the child, closed below
    read, write = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "backendd", "serve", "--socket", path,
            "--ready-fd", str(write), pass_fds=(write,),
            stdout=log, stderr=asyncio.subprocess.STDOUT)
        os.close(write)
        write = -1
        ready = await asyncio.get_running_loop().run_in_executor(None, os.read, read, 64)
    finally:
        log.close()
        os.close(read)
        if write >= 0:
            os.close(write)
    if ready != b"READY=1\n":
        await proc.wait()
        raise RuntimeError(f"daemon did not start: {log_path.read_text()}")
    return proc, path, log_path


async def demo_disk(client: VmmClient, guest: SimGuest, workdir: Path, seconds: float) -> bool:
    image = workdir / "disk.img"
    rng = random.Random(1)
    with open(image, "wb") as f:
        f.write(rng.randbytes(IMAGE_SIZE))
    _, keys = await client.add_device(DISK_DEVID, "blk", {"path": str(image)})
    say(f"disk: {image.name} ({IMAGE_SIZE // MiB} MiB) added as xvda; backend offers "
        f"indirect={keys.get('feature-max-indirect-segments')} "
        f"queues={keys.get('multi-queue-max-queues')} "
        f"discard={keys.get('feature-discard', '0')}")
    front = BlkFront(guest.ram, guest.gnttab, DISK_DEVID, queues=2, ring_order=1,
                     backend_keys=keys)
    state, keys = await client.hand_over_channels(DISK_DEVID, XenbusState.CONNECTED,
                                                  front.frontend_keys(), front.channels())
    front.update_backend_keys(keys)
    front.start()
    say(f"disk: connected ({XenbusState(state).name}), sectors={keys['sectors']}, "
        "2 queues, 2-page rings")

    model = bytearray(image.read_bytes())
    written = read = ios = 0
    progress = Progress()
    start = time.monotonic()
    deadline = start + seconds
    mismatches = 0

    async def worker(w: int) -> None:
        nonlocal written, read, ios, mismatches
        wrng = random.Random(100 + w)
        # Each worker owns a slice of the disk, so its reads check its own writes.
        span = IMAGE_SIZE // 8
        base = w * span
        while time.monotonic() < deadline:
            n = wrng.choice([4096, 16384, 65536, 262144, MiB])
            off = base + wrng.randrange(0, span - n + 1, 4096)
            data = wrng.randbytes(n)
            await front.write(off // 512, data)
            model[off:off + n] = data
            got = await front.read(off // 512, n)
            if got != data:
                mismatches += 1
            written += n
            read += n
            ios += 2
            elapsed = time.monotonic() - start
            progress.update(f"disk: {elapsed:4.1f}s  {ios} I/Os  "
                            f"{written / elapsed / MiB:6.1f} MiB/s written  "
                            f"{read / elapsed / MiB:6.1f} MiB/s read  "
                            f"verified {ios // 2} blocks")

    await asyncio.gather(*(worker(w) for w in range(8)))
    await front.flush()
    elapsed = time.monotonic() - start
    on_disk = image.read_bytes()
    same = on_disk == bytes(model)
    progress.done(f"disk: {ios} I/Os in {elapsed:.1f}s: {written / elapsed / MiB:.1f} MiB/s "
                  f"written, {read / elapsed / MiB:.1f} MiB/s read; read-back mismatches: "
                  f"{mismatches}; image file after flush matches: {'yes' if same else 'NO'}")
    await client.frontend_state(DISK_DEVID, XenbusState.CLOSED, {})
    front.close()
    return same and mismatches == 0


async def show_status(client: VmmClient) -> None:
    """What `backendd status` shows, from the same operator request."""
    status = (await client.request(DaemonStatus())).counters
    say(f"daemon: {status['connections']} connection(s)")
    for key, value in sorted(status.items()):
        if key.endswith((".peer", ".requests", ".errors")):
            say(f"  {key} = {value}")


async def run_demo(args: argparse.Namespace) -> int:
    seconds = max(2.0, float(getattr(args, "seconds", 10.0)))
    with tempfile.TemporaryDirectory(prefix="backendd-demo-") as tmp:
        workdir = Path(tmp)
        proc, path, log_path = await start_daemon(workdir)
        say(f"daemon: pid {proc.pid} listening on {path}")
        ok = False
        try:
            client = await VmmClient.connect(path, name="demo")
            guest = SimGuest(ram_size=256 * MiB, gnttab_frames=64)
            try:
                await guest.attach(client)
                say("guest: 256 MiB of RAM and a 64-frame grant table handed to the daemon")
                disk_ok = await demo_disk(client, guest, workdir, seconds / 2)
                nic_ok = await run_nic_demo(client, guest, seconds / 2, say)
                await show_status(client)
                ok = disk_ok and nic_ok
            finally:
                await client.close()
                guest.close()
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            await proc.wait()
            if not ok:
                say("daemon log:\n" + log_path.read_text())
        say(f"demo: disk and nic {'working' if ok else 'FAILED'}")
        return 0 if ok else 1
