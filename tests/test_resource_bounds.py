"""Resources stay flat: 1,000 blk device add/connect/I-O/remove cycles on one connection
leave the daemon's fds, guest-memory mappings and live device objects where they started,
and RSS within a bound that only a leak could cross."""

from __future__ import annotations

import gc
import os

from procstat import mapping_count, open_fds

from backendd.devices.blk.device import BlkDevice
from backendd.devices.blk.image import Image
from backendd.devices.blk.queue import RingQueue
from backendd.evtchn import EventChannel
from backendd.grants import GrantMapping
from backendd.guest.blkfront import BlkFront
from backendd.guest.machine import SimGuest
from backendd.guest.vmm import VmmClient
from rings.consts import XenbusState

MiB = 1 << 20
CYCLES = 1000


TRACKED = (BlkDevice, Image, RingQueue, GrantMapping, EventChannel)


def live_objects() -> dict[str, int]:
    """How many objects of each per-device type are alive (in this process: the daemon
    runs in-process, the simulated guest uses none of these types)."""
    gc.collect()
    counts = dict.fromkeys((t.__name__ for t in TRACKED), 0)
    for obj in gc.get_objects():
        if isinstance(obj, TRACKED):
            counts[type(obj).__name__] += 1
    return counts


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_thousand_device_cycles_leave_fds_mappings_and_rss_flat(daemon, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    client = await VmmClient.connect(daemon.path)
    guest = SimGuest(ram_size=16 * MiB, gnttab_frames=4)
    await guest.attach(client)

    async def cycle(devid: int) -> None:
        _, keys = await client.add_device(devid, "blk", {"path": str(image)})
        front = BlkFront(guest.ram, guest.gnttab, devid, backend_keys=keys)
        _, keys = await client.hand_over_channels(devid, XenbusState.CONNECTED,
                                                  front.frontend_keys(), front.channels())
        front.start()
        data = os.urandom(4096)
        await front.write(devid % 256 * 8, data)
        assert await front.read(devid % 256 * 8, 4096) == data
        await client.frontend_state(devid, XenbusState.CLOSED, {})
        await client.remove_device(devid)
        front.close()

    for devid in range(20):  # warm-up: thread pool, allocator arenas, caches
        await cycle(devid)
    fds, maps, objects, rss = open_fds(), mapping_count(), live_objects(), rss_kib()
    assert objects == dict.fromkeys(objects, 0)
    for devid in range(CYCLES):
        await cycle(devid)
    assert open_fds() == fds
    assert mapping_count() == maps
    assert live_objects() == objects  # counted exactly: nothing per device survives it
    (conn,) = daemon.server.connections.values()
    assert conn.session.devices == {} and conn.session.grants.grefs_in_use() == []
    # RSS is only a coarse guard: allocator arenas and caches move it by a few MiB on
    # their own, while a leak of one ring page per cycle would show as 4 MiB, a leaked
    # device with its buffers as far more.
    grown = rss_kib() - rss
    assert grown < 16 * 1024, f"RSS grew by {grown} KiB over {CYCLES} cycles"
    assert guest.gnttab._granted == set()  # every grant came back to the guest
    await client.close()
    guest.close()
