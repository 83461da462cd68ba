"""kill -9 of a real daemon process in the middle of a random-write workload, 20 times.

The test plays both systemd (it restarts the daemon) and the VMM (it reconnects and
re-sends its state, with the same in-flight memfd). The simulated guest keeps its rings
and its requests in flight across the restarts. At the end every write was acknowledged
exactly once (no stray or duplicate response, no request left unanswered), and the image
holds exactly the acknowledged data after a flush."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

from backendd.guest.blkfront import BlkFront
from backendd.guest.machine import SimGuest
from backendd.guest.memory import sealed_memfd
from backendd.guest.vmm import ConnectionLost, RequestFailed, VmmClient
from backendd.inflight import region_size
from bench.migrate import wait_ready
from rings.consts import XenbusState

MiB = 1 << 20
DEVID = 51712
IMAGE = 8 * MiB
WORKERS = 6
KILLS = 20
HANG = 120  # seconds after which a wait that should end is a hang, not slowness


class Vmm:
    def __init__(self, tmp: Path, image: Path | None = None,
                 config: dict[str, str] | None = None) -> None:
        self.sock = str(tmp / "backendd.sock")
        self.image = image or tmp / "disk.img"
        self.image.write_bytes(bytes(IMAGE))
        self.config = {"path": str(self.image)} | (config or {})
        self.log = open(tmp / "daemon.log", "ab")  # noqa: SIM115
        self.guest = SimGuest(ram_size=64 * MiB, gnttab_frames=8)
        self.inflight = sealed_memfd("inflight", region_size(2))
        self.proc: asyncio.subprocess.Process | None = None
        self.client: VmmClient | None = None
        self.front: BlkFront | None = None

    async def start_daemon(self) -> None:
        """Start the daemon and wait for its READY=1 (sd_notify), or its exit: however
        long a loaded machine takes, there is no start-up budget to miss."""
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        notify_path = self.sock + ".notify"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify_path)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        notify.bind(notify_path)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "backendd", "--socket", self.sock, "serve",
                stdout=self.log, stderr=self.log,
                env={**os.environ, "NOTIFY_SOCKET": notify_path})
            assert await wait_ready(notify, self.proc), (
                f"daemon exited with {self.proc.returncode} before READY=1")
        finally:
            notify.close()
            os.unlink(notify_path)

    async def connect(self) -> None:
        """Everything a VMM sends, first time and after each restart."""
        client = await VmmClient.connect(self.sock)
        await self.guest.attach(client)
        _, keys = await client.add_device(DEVID, "blk", self.config)
        await client.set_inflight(DEVID, self.inflight, region_size(2))
        if self.front is None:
            self.front = BlkFront(self.guest.ram, self.guest.gnttab, DEVID, queues=2,
                                  backend_keys=keys)
            channels = self.front.channels()
        else:
            channels = self.front.new_channels()
        _, keys = await client.hand_over_channels(DEVID, XenbusState.CONNECTED,
                                                  self.front.frontend_keys(), channels)
        self.front.update_backend_keys(keys)
        if not self.front.started:
            self.front.start()
        self.client = client

    async def kill(self) -> None:
        assert self.proc is not None and self.client is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        await self.client.close()

    async def stop(self) -> None:
        """Tear everything down, whatever state the test left: the daemon goes first, so
        no process outlives the test even if closing the client fails."""
        try:
            if self.proc is not None and self.proc.returncode is None:
                self.proc.terminate()
                try:
                    await asyncio.wait_for(self.proc.wait(), 30)
                except TimeoutError:
                    self.proc.kill()
                    await self.proc.wait()
        finally:
            if self.client is not None:
                with contextlib.suppress(ConnectionLost, RequestFailed, OSError):
                    await self.client.close()
            if self.front is not None:
                self.front.close()
            self.guest.close()
            os.close(self.inflight)
            self.log.close()


async def test_kill_9_twenty_times_during_random_writes(tmp_path):
    vmm = Vmm(tmp_path)
    try:
        await restarts_under_writes(vmm)
    finally:
        # Whatever failed (a restart, a reconnect, the writers), no daemon outlives it.
        await vmm.stop()


async def restarts_under_writes(vmm: Vmm) -> None:
    await vmm.start_daemon()
    await vmm.connect()
    front = vmm.front
    assert front is not None
    model = bytearray(IMAGE)
    acked = [0]
    stop = asyncio.Event()
    progress = asyncio.Event()

    async def writer(w: int) -> None:
        rng = random.Random(w)
        span = IMAGE // WORKERS // 4096 * 4096
        base = w * span
        # One write at a time per worker, each to its own slice: the order of writes to
        # any byte is the order they were issued, so the model is exact.
        while not stop.is_set():
            n = rng.choice([4096, 8192, 65536, 131072])
            off = base + rng.randrange(0, span - n + 1, 4096)
            data = rng.randbytes(n)
            await front.write(off // 512, data)
            model[off:off + n] = data
            acked[0] += 1
            progress.set()

    tasks = [asyncio.create_task(writer(w)) for w in range(WORKERS)]
    rng = random.Random(99)
    replayed = 0
    try:
        for _ in range(KILLS):
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            before = acked[0]
            await vmm.kill()
            await vmm.start_daemon()
            await vmm.connect()
            counters = await vmm.client.stats(DEVID)
            replayed += int(counters[f"{DEVID}.replayed"])
            # The workload makes progress after every restart. The wait is an event; the
            # timeout only turns a hang into a failure, it is no speed requirement.
            async def progressed(before: int = before) -> None:
                while acked[0] <= before:
                    await progress.wait()
                    progress.clear()

            await asyncio.wait_for(progressed(), HANG)
    finally:
        stop.set()
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    errors = [d for d in done if isinstance(d, BaseException)]
    assert not errors, errors
    await front.flush()
    # Exactly one response per request: none unknown or repeated, none outstanding.
    assert front.stray_responses == []
    assert all(not q.waiters for q in front.queues)
    assert vmm.image.read_bytes() == bytes(model)
    # Kills landed while requests were in flight, and those were replayed.
    assert replayed > 0
    assert acked[0] > KILLS


async def wait_for_counter(vmm: Vmm, name: str, value: int) -> None:
    assert vmm.client is not None
    for _ in range(1000):
        if int((await vmm.client.stats(DEVID))[f"{DEVID}.{name}"]) >= value:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} never reached {value}")


async def kill_while_frozen(vmm: Vmm, mnt: Path) -> None:
    """SIGKILL takes the event loop at once, so nothing more is answered; the process
    finishes dying only when its I/O thread leaves the frozen write, after the thaw."""
    assert vmm.proc is not None and vmm.client is not None
    vmm.proc.send_signal(signal.SIGKILL)
    subprocess.run(["fsfreeze", "-u", str(mnt)], check=True)
    await vmm.proc.wait()
    await vmm.client.close()


async def test_second_crash_before_the_replay_is_answered(tmp_path, freezable_dir):
    """Crash with writes taken, restart (they are replayed), crash again before the
    replayed writes are answered, restart: every write is answered exactly once. The
    replayed requests must be in the table again, or the second crash loses them."""
    mnt = freezable_dir
    # No discard: probing for it punches a hole, which would block on the frozen fs.
    vmm = Vmm(tmp_path, image=mnt / "disk.img", config={"discard": "0"})
    writes = 8
    tasks: list[asyncio.Task] = []
    try:
        await vmm.start_daemon()
        await vmm.connect()
        front = vmm.front
        assert front is not None
        subprocess.run(["fsfreeze", "-f", str(mnt)], check=True)
        data = [bytes([i + 1]) * 4096 for i in range(writes)]
        tasks = [asyncio.create_task(front.write(i * 64, data[i])) for i in range(writes)]
        await wait_for_counter(vmm, "requests", writes)  # all taken, their I/O stuck
        await kill_while_frozen(vmm, mnt)

        subprocess.run(["fsfreeze", "-f", str(mnt)], check=True)
        await vmm.start_daemon()
        await vmm.connect()
        assert int((await vmm.client.stats(DEVID))[f"{DEVID}.replayed"]) == writes
        assert not any(t.done() for t in tasks)  # the replayed writes are stuck too
        await kill_while_frozen(vmm, mnt)

        await vmm.start_daemon()
        await vmm.connect()
        assert int((await vmm.client.stats(DEVID))[f"{DEVID}.replayed"]) == writes
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await front.flush()
        assert front.stray_responses == []
        assert all(not q.waiters for q in front.queues)
        image = vmm.image.read_bytes()
        for i in range(writes):
            assert image[i * 64 * 512:i * 64 * 512 + 4096] == data[i]
    finally:
        subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True)
        for t in tasks:
            t.cancel()
        with contextlib.suppress(ConnectionLost, RequestFailed):
            await vmm.stop()
