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
from test_net_harness import daemon_guest

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


@pytest.mark.parametrize("dataplane,persistent,queues", [
    ("python", False, 1), ("python", True, 1), ("compiled", False, 1),
    ("compiled", False, 3),  # three rings: the kernel serves them in parallel
    ("compiled", True, 3)])  # the same, each with its cache of persistent grants
async def test_blk_suspend_quiesces_then_resume_completes(daemon, tmp_path, dataplane,
                                                          persistent, queues):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(16 * MiB))
    async with daemon_guest(daemon.path) as (client, guest, _):
        front = await guest.add_disk(client, DEVID, {"path": str(image),
                                                     "dataplane": dataplane},
                                     inflight=False, persistent=persistent, queues=queues)
        rng = random.Random(7)
        data = {i: rng.randbytes(4096 * (1 + i % 4)) for i in range(48)}
        first = [asyncio.create_task(front.write(i * 64, d)) for i, d in data.items()]
        await posted(first, front)
        await client.suspend()
        # Everything taken is answered and published: rsp_prod counts every request.
        stats = await client.stats(DEVID)
        answered = sum(q.shared.idx[RSP_PROD] for q in front.queues)
        assert answered == int(stats[f"{DEVID}.requests"]) > 0
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


async def test_blk_suspend_with_a_flush_in_flight_and_resume_one_device(daemon, tmp_path):
    """Writes and a flush taken before SUSPEND are answered by it; RESUME of one devid
    leaves another device suspended; GET_DEVICE_STATE of a running device is EBUSY."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * MiB))
    other = tmp_path / "other.img"
    other.write_bytes(bytes(8 * MiB))
    fd = sealed_memfd("state", 4096)
    try:
        async with daemon_guest(daemon.path) as (client, guest, _):
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


def _frame(dst: bytes, n: int) -> bytes:
    return dst + bytes.fromhex("00163e000051") + b"\x88\xb5" + bytes([n]) * 200


@pytest.mark.usefixtures("root")
@pytest.mark.parametrize("dataplane", ["python", "compiled"])
async def test_net_suspend_takes_no_tx_reads_no_tap(daemon, dataplane):
    """While suspended the nic takes none of the guest's tx requests and reads nothing
    from its tap: guest memory stays as it is, no event; after RESUME the frames posted
    meanwhile go out once each, and frames flow again both ways."""
    from test_net_harness import inject, namespaces, uniq

    host = uniq("msh") + dataplane[0]
    tap = uniq("mst") + dataplane[0]
    mac = bytes.fromhex("00163e000052")
    with namespaces(host):
        async with daemon_guest(daemon.path) as dg:
            client, guest, _ = dg
            front = await dg.add_nic({"tap": tap, "netns": host, "mac": "00:16:3e:00:00:52",
                                      "dataplane": dataplane, "queues": "1"}, split=True)
            await inject(host, tap, [_frame(mac, 1)])
            await front.wait_rx(1)
            await front.send_frame(_frame(b"\xff" * 6, 2))
            await front.wait_tx_done()

            async def counters() -> dict[str, str]:
                stats: dict[str, str] = {}
                for _ in range(3):
                    stats = await client.stats(0)
                return stats

            await client.suspend()
            before = await counters()
            events = front.events
            for n in range(3):
                await front.send_frame(_frame(b"\xff" * 6, 10 + n))
            quiet = memory_bytes(guest)
            await inject(host, tap, [_frame(mac, 20), _frame(mac, 21)])
            assert await counters() == before
            assert memory_bytes(guest) == quiet
            assert front.events == events and not front.received
            assert any(q.tx_inflight for q in front.queues)
            await client.resume()
            await front.wait_tx_done()
            after = await client.stats(0)
            assert int(after["0.tx_packets"]) == int(before["0.tx_packets"]) + 3
            await inject(host, tap, [_frame(mac, 30)])
            got = await front.wait_rx(1)
            assert got[0][1][14] == 30
