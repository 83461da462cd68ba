"""One busy guest cannot starve another: while guest A keeps 64 large writes in flight,
guest B's small reads are served alongside, not after A's backlog."""

from __future__ import annotations

import asyncio
import os

from backendd.guest.blkfront import BlkFront
from backendd.guest.machine import SimGuest
from backendd.guest.vmm import VmmClient
from rings.consts import XenbusState

MiB = 1 << 20


async def plug(daemon, image: str, devid: int) -> tuple[VmmClient, SimGuest, BlkFront]:
    client = await VmmClient.connect(daemon.path)
    guest = SimGuest(ram_size=64 * MiB, gnttab_frames=16)
    await guest.attach(client)
    _, keys = await client.add_device(devid, "blk", {"path": image})
    front = BlkFront(guest.ram, guest.gnttab, devid, ring_order=1, backend_keys=keys)
    await client.hand_over_channels(devid, XenbusState.CONNECTED, front.frontend_keys(),
                                    front.channels())
    front.start()
    return client, guest, front


async def test_a_busy_guest_does_not_starve_a_quiet_one(daemon, tmp_path):
    img_a, img_b = tmp_path / "a.img", tmp_path / "b.img"
    img_a.write_bytes(bytes(32 * MiB))
    img_b.write_bytes(os.urandom(MiB))
    a = await plug(daemon, str(img_a), 1)
    b = await plug(daemon, str(img_b), 2)
    front_a, front_b = a[2], b[2]
    stop = asyncio.Event()
    done_a = 0
    chunk = bytes(128 * 1024)

    async def busy(w: int) -> None:
        nonlocal done_a
        while not stop.is_set():
            await front_a.write(w * 256, chunk)
            done_a += 1

    # A keeps 64 writes in flight for as long as B works, and beyond.
    flood = [asyncio.create_task(busy(w)) for w in range(64)]
    while done_a < 64:
        await asyncio.sleep(0.001)
    expected = img_b.read_bytes()

    async def quiet() -> None:
        for i in range(50):
            off = (i * 4096) % MiB
            assert await front_b.read(off // 512, 4096) == expected[off:off + 4096]

    try:
        # Starvation would leave B waiting as long as A is busy, which is forever here.
        await asyncio.wait_for(quiet(), 60)
        assert not stop.is_set() and done_a > 64  # A was busy the whole time
    finally:
        stop.set()
        await asyncio.gather(*flood)
    for client, guest, front in (a, b):
        front.close()
        await client.close()
        guest.close()
