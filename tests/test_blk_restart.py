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
import sys
from pathlib import Path

from backendd.guest.blkfront import BlkFront
from backendd.guest.machine import SimGuest
from backendd.guest.memory import sealed_memfd
from backendd.guest.vmm import ConnectionLost, RequestFailed, VmmClient
from backendd.inflight import region_size
from rings.consts import XenbusState

MiB = 1 << 20
DEVID = 51712
IMAGE = 8 * MiB
WORKERS = 6
KILLS = 20


class Vmm:
    def __init__(self, tmp: Path) -> None:
        self.sock = str(tmp / "backendd.sock")
        self.image = tmp / "disk.img"
        self.image.write_bytes(bytes(IMAGE))
        self.log = open(tmp / "daemon.log", "ab")  # noqa: SIM115
        self.guest = SimGuest(ram_size=64 * MiB, gnttab_frames=8)
        self.inflight = sealed_memfd("inflight", region_size(2))
        self.proc: asyncio.subprocess.Process | None = None
        self.client: VmmClient | None = None
        self.front: BlkFront | None = None

    async def start_daemon(self) -> None:
        """Start the daemon and wait for it on --ready-fd: no polling for the socket file.
        The socket the killed daemon left behind is the daemon's to replace."""
        read, write = os.pipe()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "backendd", "serve", "--socket", self.sock,
                "--ready-fd", str(write), pass_fds=(write,), stdout=self.log, stderr=self.log)
            os.close(write)
            write = -1
            # READY=1, or end-of-file if the daemon exited first.
            ready = await asyncio.get_running_loop().run_in_executor(None, os.read, read, 64)
        finally:
            os.close(read)
            if write >= 0:
                os.close(write)
        assert ready == b"READY=1\n", "daemon did not come up (see daemon.log)"

    async def connect(self) -> None:
        """Everything a VMM sends, first time and after each restart."""
        client = await VmmClient.connect(self.sock)
        await self.guest.attach(client)
        _, keys = await client.add_device(DEVID, "blk", {"path": str(self.image)})
        await client.set_inflight(DEVID, self.inflight, region_size(2))
        if self.front is None:
            self.front = BlkFront(self.guest.ram, self.guest.gnttab, DEVID, queues=2,
                                  backend_keys=keys)
            channels = self.front.channels()
        else:
            channels = self.front.new_channels()
        try:
            _, keys = await client.frontend_state(DEVID, XenbusState.CONNECTED,
                                                  self.front.frontend_keys(), channels)
        finally:
            for _, kick, call in channels:
                os.close(kick)
                os.close(call)
        self.front.update_backend_keys(keys)
        if self.front._loop is None:
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
        await vmm.stop()


async def restarts_under_writes(vmm: Vmm) -> None:
    await vmm.start_daemon()
    await vmm.connect()
    front = vmm.front
    assert front is not None
    model = bytearray(IMAGE)
    acked = [0]
    stop = asyncio.Event()

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
            # The workload makes progress after every restart.
            for _ in range(500):
                if acked[0] > before:
                    break
                await asyncio.sleep(0.01)
            assert acked[0] > before, "no write completed after a restart"
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
