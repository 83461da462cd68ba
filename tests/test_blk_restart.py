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
import sys
from pathlib import Path

from backendd.guest.blkfront import BlkFront
from backendd.guest.machine import SimGuest
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
        self.inflight = os.memfd_create("inflight")
        os.ftruncate(self.inflight, region_size(2))
        self.proc: asyncio.subprocess.Process | None = None
        self.client: VmmClient | None = None
        self.front: BlkFront | None = None

    async def start_daemon(self) -> None:
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "backendd", "--socket", self.sock, "serve",
            stdout=self.log, stderr=self.log)
        for _ in range(1000):
            # The socket file appears at bind(), before listen(): wait until it accepts.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                if probe.connect_ex(self.sock) == 0:
                    return
            await asyncio.sleep(0.01)
        raise AssertionError("daemon did not come up")

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
        if self.client is not None:
            await self.client.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        if self.front is not None:
            self.front.close()
        self.guest.close()
        os.close(self.inflight)
        self.log.close()


async def test_kill_9_twenty_times_during_random_writes(tmp_path):
    vmm = Vmm(tmp_path)
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
    try:
        await front.flush()
        # Exactly one response per request: none unknown or repeated, none outstanding.
        assert front.stray_responses == []
        assert all(not q.waiters for q in front.queues)
        assert vmm.image.read_bytes() == bytes(model)
        # Kills landed while requests were in flight, and those were replayed.
        assert replayed > 0
        assert acked[0] > KILLS
    finally:
        with contextlib.suppress(ConnectionLost, RequestFailed):
            await vmm.stop()
