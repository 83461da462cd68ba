"""Moving a simulated guest from one daemon to another, for the migration tests: state
blobs in and out through memfds, the switch of the guest's memory to copies, and a rig
that holds the source connection, the guest and a second daemon to move to."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import AsyncIterator

from conftest import DaemonHandle

from backendd.config import Config, DaemonSection
from backendd.guest import VmmClient
from backendd.guest.blkfront import BlkFront
from backendd.guest.machine import SimGuest
from backendd.guest.memory import sealed_memfd
from backendd.guest.migrate import clone_memfd, move_gnttab, move_ram
from backendd.log import EventLog
from backendd.server import Server
from rings.consts import XenbusState

MiB = 1 << 20


@contextlib.asynccontextmanager
async def second_daemon(tmp_path) -> AsyncIterator[DaemonHandle]:
    path = str(tmp_path / "b.sock")
    log = io.StringIO()
    server = Server(Config(daemon=DaemonSection(socket=path, log_level="debug")),
                    EventLog("debug", log))
    await server.start()
    try:
        yield DaemonHandle(server, path, log)
    finally:
        await server.close()


async def get_state(client: VmmClient, devid: int) -> bytes:
    fd = sealed_memfd("state", 0)
    try:
        size = await client.get_device_state(devid, fd)
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


async def set_state(client: VmmClient, devid: int, blob: bytes) -> None:
    fd = sealed_memfd("state", len(blob))
    try:
        os.pwrite(fd, blob, 0)
        await client.set_device_state(devid, fd, len(blob))
    finally:
        os.close(fd)


def move_guest(guest: SimGuest) -> None:
    """The switch point: the guest's memory becomes a copy (the destination's)."""
    ram, table = clone_memfd(guest.ram.fd, "ram-b"), clone_memfd(guest.gnttab.fd, "gnttab-b")
    move_ram(guest.ram, ram)
    move_gnttab(guest.gnttab, table)


class Rig:
    """`guest`, attached to the first daemon through `a`; `move()` switches it to the
    second daemon (`daemon_b`), connected through `b`."""

    def __init__(self, a: VmmClient, guest: SimGuest, daemon_b: DaemonHandle) -> None:
        self.a = a
        self.guest = guest
        self.daemon_b = daemon_b
        self.b: VmmClient | None = None

    async def suspend_and_get(self, devid: int) -> bytes:
        """SUSPEND on the source, and the device's state blob."""
        await self.a.suspend()
        return await get_state(self.a, devid)

    async def move(self) -> VmmClient:
        """The guest's memory to copies, attached to the second daemon: its client."""
        move_guest(self.guest)
        self.b = await VmmClient.connect(self.daemon_b.path)
        await self.guest.attach(self.b)
        return self.b

    async def switch(self, devid: int, front: BlkFront) -> None:
        """After move() and the device's state set on B: connect `front` there on the
        rings it has (fresh event channels), RESUME on B and close the source."""
        assert self.b is not None
        state, _ = await self.b.hand_over_channels(devid, XenbusState.CONNECTED,
                                                   front.frontend_keys(),
                                                   front.new_channels())
        assert state == XenbusState.CONNECTED
        front.watch(self.b)
        await self.b.resume()
        await self.a.close()


@contextlib.asynccontextmanager
async def migration_rig(daemon_path: str, tmp_path, ram_size: int = 48 * MiB,
                        gnttab_frames: int = 16) -> AsyncIterator[Rig]:
    """A guest attached to the daemon at `daemon_path`, and a second daemon to move it
    to; both connections and the guest are closed after."""
    a = await VmmClient.connect(daemon_path)
    guest = SimGuest(ram_size=ram_size, gnttab_frames=gnttab_frames)
    rig: Rig | None = None
    try:
        async with second_daemon(tmp_path) as daemon_b:
            await guest.attach(a)
            rig = Rig(a, guest, daemon_b)
            yield rig
    finally:
        await a.close()
        if rig is not None and rig.b is not None:
            await rig.b.close()
        guest.close()


async def migrate_disks(rig: Rig, disks: dict[int, tuple[BlkFront, dict[str, str]]]
                        ) -> VmmClient:
    """Suspend on the source, move the guest, set each disk up on the second daemon from
    its blob, connect it on the rings it had, resume there and close the source."""
    a = rig.a
    await a.suspend()
    blobs = {devid: await get_state(a, devid) for devid in disks}
    b = await rig.move()
    for devid, (front, config) in disks.items():
        await b.add_device(devid, "blk", config)
        await set_state(b, devid, blobs[devid])
        state, keys = await b.hand_over_channels(devid, XenbusState.CONNECTED,
                                                 front.frontend_keys(), front.new_channels())
        assert state == XenbusState.CONNECTED
        front.update_backend_keys(keys)
        front.watch(b)
    await b.resume()
    await a.close()
    return b
