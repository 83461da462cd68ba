"""One busy guest cannot starve another: the daemon's I/O threads serve devices in turn,
so a quiet guest's request runs after at most a job or two of a busy guest's backlog,
not after all of it.

The order is observed through the data, not through time: both disks are the same image
file, the quiet guest reads the block the busy guest's last queued write goes to, and the
daemon has one I/O thread. Served in turn, the read runs before that write and returns
the old contents; first come, first served, it would run after it and see the new ones.
The backlog is built deterministically: the busy guest's first write is held on a frozen
filesystem while the rest of its writes, then the read, queue up behind it."""

from __future__ import annotations

import asyncio
import io
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backendd.config import Config, DaemonSection
from backendd.guest.blkfront import BlkFront
from backendd.guest.machine import SimGuest
from backendd.guest.vmm import VmmClient
from backendd.log import EventLog
from backendd.server import Server
from rings.consts import XenbusState

MiB = 1 << 20
CHUNK = 128 * 1024
WRITES = 64  # the busy ring's whole pending pool (a 64-slot ring)


@pytest.fixture
async def one_thread_daemon(tmp_path: Path) -> AsyncIterator[Server]:
    path = str(tmp_path / "backendd.sock")
    server = Server(Config(daemon=DaemonSection(socket=path, io_threads=1)),
                    EventLog("info", io.StringIO()))
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def plug(path: str, image: str, devid: int) -> tuple[VmmClient, SimGuest, BlkFront]:
    client = await VmmClient.connect(path)
    guest = SimGuest(ram_size=64 * MiB, gnttab_frames=16)
    await guest.attach(client)
    # No discard: probing for it punches a hole, which would block on the frozen fs.
    _, keys = await client.add_device(devid, "blk", {"path": image, "discard": "0"})
    front = BlkFront(guest.ram, guest.gnttab, devid, ring_order=1, backend_keys=keys)
    await client.hand_over_channels(devid, XenbusState.CONNECTED, front.frontend_keys(),
                                    front.channels())
    front.start()
    return client, guest, front


async def test_a_quiet_guest_is_served_before_a_busy_guests_backlog(freezable_dir,
                                                                     one_thread_daemon):
    mnt = freezable_dir
    image = mnt / "disk.img"
    image.write_bytes(bytes(WRITES * CHUNK))
    path = one_thread_daemon.address
    busy = await plug(path, str(image), 1)
    quiet = await plug(path, str(image), 2)
    busy_client, busy_front = busy[0], busy[2]
    subprocess.run(["fsfreeze", "-f", str(mnt)], check=True)
    try:
        writes = [asyncio.ensure_future(busy_front.write(i * CHUNK // 512, b"w" * CHUNK))
                  for i in range(WRITES)]
        # All taken: the first is stuck in the only I/O thread, the others queued.
        while int((await busy_client.stats(1))["1.requests"]) < WRITES:
            await asyncio.sleep(0.01)
        last = (WRITES - 1) * CHUNK
        read = asyncio.ensure_future(quiet[2].read(last // 512, 4096))
        while int((await quiet[0].stats(2))["2.requests"]) < 1:
            await asyncio.sleep(0.01)
    finally:
        subprocess.run(["fsfreeze", "-u", str(mnt)], check=True)
    # Served in turn: before the busy guest's last write, so the old contents.
    assert await read == bytes(4096)
    await asyncio.gather(*writes)
    assert image.read_bytes() == b"w" * (WRITES * CHUNK)
    for client, guest, front in (busy, quiet):
        front.close()
        await client.close()
        guest.close()
