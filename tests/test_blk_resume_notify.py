"""A daemon that takes over a ring from a killed one signals the frontend once.

kill -9 can land between an old daemon publishing responses (rsp_prod) and signalling
them on the call eventfd. The guest then holds answered requests it was never told about,
and the new daemon has nothing new to answer: without an event on connect the guest would
wait for ever. Here the test plays that old daemon: it answers a request on the shared ring
and publishes the response, but signals nothing; then a real daemon connects the ring."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from backendd.guest.blkfront import BlkFront
from backendd.guest.machine import SimGuest
from backendd.guest.vmm import VmmClient
from rings.consts import BlkifOp, XenbusState
from rings.ring import BackRing

DEVID = 51712


@pytest.mark.parametrize("dataplane", ["python", "compiled"])
async def test_responses_published_but_not_signalled_reach_the_guest(
        daemon, tmp_path: Path, dataplane: str) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    client = await VmmClient.connect(daemon.path)
    guest = SimGuest(ram_size=8 << 20, gnttab_frames=2)
    try:
        await guest.attach(client)
        _, keys = await client.add_device(
            DEVID, "blk", {"path": str(image), "persistent": "0", "dataplane": dataplane})
        front = BlkFront(guest.ram, guest.gnttab, DEVID, backend_keys=keys)
        channels = front.channels()
        front.start()
        q = front.queues[0]
        write = asyncio.create_task(front.write(0, b"\x5a" * 4096))
        while not q.waiters:  # the request is on the ring, its kick went nowhere
            await asyncio.sleep(0)
        (rid,) = q.waiters

        # The old daemon: takes the request, answers and publishes it, then dies before
        # it writes to the call eventfd.
        old = BackRing.attach(q.shared)
        assert len(old.take_requests(32)) == 1
        old.put_response(front.codecs.response.pack(rid, BlkifOp.WRITE, 0))
        old.push_responses()
        await asyncio.sleep(0)
        assert not write.done()

        # The new daemon resumes the ring at the published rsp_prod.
        await client.hand_over_channels(DEVID, XenbusState.CONNECTED, front.frontend_keys(),
                                        channels)
        try:
            await asyncio.wait_for(write, 30)  # a hang guard, not a speed check
        except TimeoutError:
            pytest.fail("the guest was never told of a response already on the ring")
        # The ring goes on working for new requests.
        await front.write(8, b"\xa5" * 4096)
        assert image.read_bytes()[4096:8192] == b"\xa5" * 4096
        front.close()
    finally:
        await client.close()
        guest.close()
