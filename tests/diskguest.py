"""A guest with one disk on a running daemon, for tests that look at the daemon from the
outside (the CLI, status, metrics) while a guest uses it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from backendd.guest.blkfront import BlkFront
from backendd.guest.machine import SimGuest
from backendd.guest.vmm import VmmClient
from rings.consts import XenbusState

DEVID = 51712


@contextlib.asynccontextmanager
async def guest_with_disk(socket_path: str, image: Path, name: str | None = None
                          ) -> AsyncIterator[BlkFront]:
    """Connect to the daemon as a VMM (naming the guest `name`), attach an 8 MiB guest,
    add `image` as blk device 51712 and yield its connected, started BlkFront."""
    client = await VmmClient.connect(socket_path, name=name)
    guest = SimGuest(ram_size=8 << 20, gnttab_frames=2)
    front = None
    try:
        await guest.attach(client)
        _, keys = await client.add_device(DEVID, "blk", {"path": str(image)})
        front = BlkFront(guest.ram, guest.gnttab, DEVID, backend_keys=keys)
        await client.hand_over_channels(DEVID, XenbusState.CONNECTED, front.frontend_keys(),
                                        front.channels())
        front.start()
        yield front
    finally:
        if front is not None:
            front.close()
        await client.close()
        guest.close()
