"""The simulated guest as a base to build on: byte-granular disk I/O, a bound on requests
in flight, failing instead of hanging when the daemon goes away, replaying a guest's
setup to a restarted daemon, and counters that start again with each daemon."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_blk_integration import connect_front
from test_c_client import Serve

from backendd.guest.blkfront import BlkFront
from backendd.guest.machine import SimGuest
from backendd.guest.vmm import ConnectionLost, VmmClient

MiB = 1 << 20
DEVID = 51712


def image(tmp_path: Path, size: int = 8 * MiB) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(size).randbytes(size))
    return path


@contextlib.asynccontextmanager
async def attached(socket_path: str, ram_size: int, gnttab_frames: int
                   ) -> AsyncIterator[tuple[VmmClient, SimGuest]]:
    """A VMM connection to the daemon and a simulated guest attached through it; both
    closed on the way out."""
    client = await VmmClient.connect(socket_path)
    guest = SimGuest(ram_size=ram_size, gnttab_frames=gnttab_frames)
    try:
        await guest.attach(client)
        yield client, guest
    finally:
        await client.close()
        guest.close()


@pytest.mark.parametrize("sector_size", [512, 4096])
async def test_read_at_write_at_split_and_read_modify_write(daemon, tmp_path, sector_size):
    path = image(tmp_path)
    model = bytearray(path.read_bytes())
    async with attached(daemon.path, 64 * MiB, 32) as (client, guest):
        front = await guest.add_disk(client, DEVID, {"path": str(path),
                                                     "sector-size": str(sector_size)},
                                     queues=2)
        assert front.started
        rng = random.Random(sector_size)
        # Unaligned heads and tails, ranges inside one sector, and ranges of several
        # requests (max_request_bytes is 1 MiB with indirect segments).
        cases = [(1, 1), (511, 2), (4095, 4098), (sector_size - 3, 3),
                 (12345, 3 * MiB + 777), (0, front.max_request_bytes + 1)]
        cases += [(rng.randrange(0, 7 * MiB), rng.randrange(1, 300000)) for _ in range(12)]
        for offset, n in cases:
            data = rng.randbytes(n)
            await front.write_at(offset, data)
            model[offset:offset + n] = data
            assert await front.read_at(offset, n) == data
        assert await front.read_at(0, len(model)) == bytes(model)
        await front.flush()
        assert path.read_bytes() == bytes(model)


@pytest.mark.parametrize("persistent", [False, True], ids=["grants", "persistent"])
async def test_a_full_grant_table_waits_instead_of_raising(daemon, tmp_path, persistent):
    path = image(tmp_path)
    # One frame: 504 grefs for the guest, while 64 writes of 1 MiB need 257 each.
    async with attached(daemon.path, 64 * MiB, 1) as (client, guest):
        _, keys = await client.add_device(DEVID, "blk", {"path": str(path)})
        front = BlkFront(guest.ram, guest.gnttab, DEVID, queues=2, backend_keys=keys,
                         persistent=persistent)
        _, keys = await connect_front(client, front)
        assert front.use_persistent == persistent
        blobs = [random.Random(i).randbytes(MiB) for i in range(8)]
        await asyncio.wait_for(asyncio.gather(
            *(front.write(i % 8 * 2048, blobs[i % 8], indirect=True) for i in range(64))),
            120)  # a guard against a hang, not a timing
        reads = await asyncio.gather(*(front.read(i * 2048, MiB) for i in range(8)))
        assert reads == blobs
        front.close()


async def test_guest_ram_exhaustion_waits_under_a_small_bound(daemon, tmp_path):
    path = image(tmp_path)
    # 2 MiB of RAM: 512 pages, fewer than 4 half-MiB requests in flight take.
    async with attached(daemon.path, 2 * MiB, 32) as (client, guest):
        _, keys = await client.add_device(DEVID, "blk", {"path": str(path)})
        front = BlkFront(guest.ram, guest.gnttab, DEVID, backend_keys=keys, max_inflight=4)
        await connect_front(client, front)
        await asyncio.gather(*(front.write(i * 1024, bytes([i]) * (MiB // 2))
                               for i in range(16)))
        assert await front.read(15 * 1024, 4096) == bytes([15]) * 4096
        front.close()


@pytest.fixture
def serve(tmp_path):
    daemon = Serve(tmp_path)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.close()


async def test_pending_requests_fail_when_the_daemon_is_lost(serve, tmp_path):
    path = image(tmp_path)
    async with attached(serve.path, 32 * MiB, 8) as (client, guest):
        front = await guest.add_disk(client, DEVID, {"path": str(path)}, inflight=False)
        await front.write_at(0, b"before")
        serve.proc.send_signal(signal.SIGSTOP)  # it will never answer what comes now
        pending = asyncio.gather(*(front.read(i * 8, 4096) for i in range(4)),
                                 return_exceptions=True)
        while sum(len(q.waiters) for q in front.queues) < 4:
            await asyncio.sleep(0)  # until every read is on the ring
        serve.proc.kill()
        results = await asyncio.wait_for(pending, 30)
        assert all(isinstance(r, ConnectionLost) for r in results), results
        with pytest.raises(ConnectionLost):  # and new ones fail at once
            await front.read(0, 512)


@pytest.mark.parametrize("stop", ["kill", "sigterm"])
async def test_reconnect_replays_the_setup_and_completes_pending_writes(tmp_path, stop):
    path = image(tmp_path)
    model = bytearray(path.read_bytes())
    first = Serve(tmp_path)
    guest = SimGuest(ram_size=32 * MiB, gnttab_frames=8)
    client = second = None
    try:
        first.wait_ready()
        client = await VmmClient.connect(first.path, name="vm1")
        await guest.attach(client)
        front = await guest.add_disk(client, DEVID, {"path": str(path)}, queues=2)
        for i in range(5):
            await front.write_at(i * 4096, b"old" * 100)
            model[i * 4096:i * 4096 + 300] = b"old" * 100
        stats = await client.stats(DEVID)
        assert stats[f"{DEVID}.writes"] == "5"
        first.proc.send_signal(signal.SIGSTOP)
        writes = [random.Random(i).randbytes(8192) for i in range(6)]
        pending = asyncio.ensure_future(asyncio.gather(
            *(front.write((1 + i) * 64, w) for i, w in enumerate(writes))))
        while sum(len(q.waiters) for q in front.queues) < len(writes):
            await asyncio.sleep(0)  # until every write is on a ring
        if stop == "kill":
            first.proc.kill()
            first.proc.wait()
        else:
            # Stopped with work queued: it answers what it took, leaves the rest in
            # the rings for the next daemon, and exits 0.
            first.proc.send_signal(signal.SIGTERM)
            first.proc.send_signal(signal.SIGCONT)
            assert first.proc.wait() == 0
        first.close()
        await client.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(first.path)
        if stop == "kill":
            assert not pending.done()  # kept for the next daemon, not failed

        (tmp_path / "second").mkdir()
        second = Serve(tmp_path / "second")
        second.wait_ready()
        client = await guest.reconnect(second.path, name="vm1")
        status = await client.daemon_status()
        assert "vm1" in {v for k, v in status.items() if k.endswith(".guest")}, status
        await asyncio.wait_for(pending, 30)
        for i, w in enumerate(writes):
            model[(1 + i) * 64 * 512:(1 + i) * 64 * 512 + 8192] = w
        assert await front.read_at(0, len(model)) == bytes(model)
        # Counters belong to the daemon process: the new one counts only its own.
        stats = await client.stats(DEVID)
        if stop == "kill":
            assert stats[f"{DEVID}.writes"] == "6", stats
        else:
            assert int(stats[f"{DEVID}.writes"]) <= 6, stats
        assert front.stray_responses == []
    finally:
        if client is not None:
            await client.close()
        guest.close()
        first.close()
        if second is not None:
            second.close()


async def test_counters_survive_a_frontend_reconnect_within_one_daemon(daemon, tmp_path):
    path = image(tmp_path)
    async with attached(daemon.path, 32 * MiB, 8) as (client, guest):
        _, keys = await client.add_device(DEVID, "blk", {"path": str(path)})
        front = BlkFront(guest.ram, guest.gnttab, DEVID, backend_keys=keys)
        assert not front.started
        await connect_front(client, front)
        assert front.started
        await front.write(0, b"a" * 4096)
        front.close()
        await client.frontend_state(DEVID, 6, {})  # Closed
        await client.frontend_state(DEVID, 1, {})  # Initialising: a driver reload
        front = BlkFront(guest.ram, guest.gnttab, DEVID, backend_keys=keys)
        await connect_front(client, front)
        await front.write(0, b"b" * 4096)
        stats = await client.stats(DEVID)
        assert stats[f"{DEVID}.writes"] == "2", stats
        front.close()
