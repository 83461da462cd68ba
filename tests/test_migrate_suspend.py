"""SUSPEND and RESUME through the real daemon with a simulated guest: a suspended device
has answered and published everything it took, then writes nothing into guest memory
and sends no event while the guest keeps posting requests and kicking; control requests
are still answered; after RESUME the requests posted meanwhile complete, each once."""

from __future__ import annotations

import asyncio
import errno
import os
import random

import pytest

from backendd.guest import RequestFailed, VmmClient
from backendd.guest.machine import SimGuest
from backendd.guest.memory import sealed_memfd
from rings.sring import RSP_PROD

DEVID = 51712
MiB = 1 << 20


def memory_bytes(guest: SimGuest) -> tuple[bytes, bytes]:
    """Every byte of the guest's RAM and grant table."""
    return (os.pread(guest.ram.fd, guest.ram.size, 0),
            os.pread(guest.gnttab.fd, guest.gnttab.size, 0))


async def settle(client: VmmClient, turns: int = 3) -> dict[str, str]:
    """Control round trips: the daemon's loop has turned and handled whatever the guest's
    kicks woke (in-process daemon, same loop); the last counters."""
    stats: dict[str, str] = {}
    for _ in range(turns):
        stats = await client.stats(DEVID)
    return stats


async def posted(tasks: list[asyncio.Task], front) -> None:
    """Let the new request tasks run until each has put its request on the ring."""
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.mark.parametrize("dataplane,persistent", [("python", False), ("python", True),
                                                  ("compiled", False)])
async def test_blk_suspend_quiesces_then_resume_completes(daemon, tmp_path, dataplane,
                                                          persistent):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(16 * MiB))
    client = await VmmClient.connect(daemon.path)
    guest = SimGuest(ram_size=48 * MiB, gnttab_frames=16)
    try:
        await guest.attach(client)
        front = await guest.add_disk(client, DEVID, {"path": str(image),
                                                     "dataplane": dataplane},
                                     inflight=False, persistent=persistent)
        rng = random.Random(7)
        data = {i: rng.randbytes(4096 * (1 + i % 4)) for i in range(48)}
        first = [asyncio.create_task(front.write(i * 64, d)) for i, d in data.items()]
        await posted(first, front)
        await client.suspend()
        # Everything taken is answered and published: rsp_prod counts every request.
        stats = await client.stats(DEVID)
        ring = front.queues[0].shared
        assert ring.idx[RSP_PROD] == int(stats[f"{DEVID}.requests"]) > 0
        await client.suspend()  # again: nothing changes
        events = front.events
        quiet = memory_bytes(guest)
        stats = await settle(client)
        assert memory_bytes(guest) == quiet
        # The guest goes on: new requests, kicks; the daemon leaves them alone.
        more = {100 + i: rng.randbytes(8192) for i in range(16)}
        second = [asyncio.create_task(front.write(i * 64, d)) for i, d in more.items()]
        await posted(second, front)
        quiet = memory_bytes(guest)
        assert await settle(client) == stats  # answered, and no request taken
        assert memory_bytes(guest) == quiet
        assert front.events == events
        assert not any(t.done() for t in second)
        await client.resume()
        await asyncio.gather(*first, *second)
        for i, d in (data | more).items():
            assert await front.read(i * 64, len(d)) == d
        assert not front.stray_responses
        stats = await client.stats(DEVID)
        assert int(stats[f"{DEVID}.requests"]) == 2 * (len(data) + len(more))
        assert int(stats[f"{DEVID}.writes"]) == len(data) + len(more)
        if persistent:
            assert int(stats[f"{DEVID}.pgrants"]) > 0
    finally:
        await client.close()
        guest.close()


async def test_blk_suspend_with_a_flush_in_flight_and_resume_one_device(daemon, tmp_path):
    """Writes and a flush taken before SUSPEND are answered by it; RESUME of one devid
    leaves another device suspended; GET_DEVICE_STATE of a running device is EBUSY."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * MiB))
    other = tmp_path / "other.img"
    other.write_bytes(bytes(8 * MiB))
    client = await VmmClient.connect(daemon.path)
    guest = SimGuest(ram_size=48 * MiB, gnttab_frames=16)
    fd = sealed_memfd("state", 4096)
    try:
        await guest.attach(client)
        front = await guest.add_disk(client, DEVID, {"path": str(image)}, inflight=False)
        front2 = await guest.add_disk(client, DEVID + 16, {"path": str(other)},
                                      inflight=False, first_port=9)
        with pytest.raises(RequestFailed) as info:
            await client.get_device_state(DEVID, fd)
        assert info.value.code == errno.EBUSY and "not suspended" in info.value.message
        tasks = [asyncio.create_task(front.write(i * 8, bytes([i]) * 4096)) for i in range(8)]
        tasks.append(asyncio.create_task(front.flush()))
        await posted(tasks, front)
        await client.suspend()
        ring = front.queues[0].shared
        stats = await client.stats(DEVID)
        assert ring.idx[RSP_PROD] == int(stats[f"{DEVID}.requests"])
        await client.resume(DEVID + 16)
        # The resumed one serves; the other does not.
        await front2.write(0, b"x" * 4096)
        late = asyncio.create_task(front.write(1000, b"y" * 4096))
        await posted([late], front)
        assert await settle(client) == stats
        assert not late.done()
        with pytest.raises(RequestFailed) as info:
            await client.resume(4242)
        assert info.value.code == errno.ENOENT
        await client.resume(DEVID)
        await asyncio.gather(*tasks, late)
        assert await front.read(1000, 4096) == b"y" * 4096
    finally:
        os.close(fd)
        await client.close()
        guest.close()
