"""The rules docs/protocol.md states for VMM authors ("Rules for VMM authors"), each
checked against the real daemon: flat frontend keys with `state` ignored, ports paired
with fds by number not by order, Connected after Initialised without channels, and a
second set of fds closed unused."""

from __future__ import annotations

import os

from test_blk_integration import make_image

from backendd.guest.blkfront import BlkFront
from backendd.guest.evtchn import new_channel_pair
from backendd.guest.machine import SimGuest
from backendd.guest.vmm import VmmClient
from rings.consts import XenbusState

MiB = 1 << 20
DEVID = 51712


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_keys_ports_and_a_second_set_of_fds(daemon, tmp_path):
    image = make_image(tmp_path / "disk.img", 4 * MiB)
    client = await VmmClient.connect(daemon.path)
    guest = SimGuest(ram_size=32 * MiB, gnttab_frames=8)
    front = None
    try:
        await guest.attach(client)
        _, keys = await client.add_device(DEVID, "blk", {"path": image})
        front = BlkFront(guest.ram, guest.gnttab, DEVID, queues=2, backend_keys=keys)
        flat = front.frontend_keys()
        assert flat["multi-queue-num-queues"] == "2" and "queue-1/ring-ref" in flat
        # `state` in the map is ignored; ports listed in the reverse of queue order.
        state, keys = await client.hand_over_channels(
            DEVID, XenbusState.INITIALISED, {**flat, "state": "3"},
            list(reversed(front.channels())))
        assert state == XenbusState.CONNECTED
        front.update_backend_keys(keys)
        front.start()
        # Connected need not carry the channels again.
        state, _ = await client.frontend_state(DEVID, XenbusState.CONNECTED, flat)
        assert state == XenbusState.CONNECTED
        # A second set is accepted and closed unused: the daemon (in this process) holds
        # no more fds after the reply than before the request.
        port, kick, call = new_channel_pair(99)
        before = open_fds()
        state, _ = await client.frontend_state(DEVID, XenbusState.CONNECTED, flat,
                                               [(99, kick, call)])
        assert state == XenbusState.CONNECTED
        assert open_fds() == before
        os.close(kick)
        os.close(call)
        port.close()
        # Both queues still answer on the channels of the connect.
        for q in range(2):
            await front.write(q * 8, bytes([q + 1]) * 4096, queue=q)
            assert await front.read(q * 8, 4096, queue=q) == bytes([q + 1]) * 4096
    finally:
        if front is not None:
            front.close()
        await client.close()
        guest.close()
