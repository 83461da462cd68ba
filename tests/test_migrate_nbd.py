"""SUSPEND of a disk on an NBD export: the requests on the NBD connection complete and
are answered before the reply; then nothing moves until RESUME."""

from __future__ import annotations

import asyncio
import random

from test_blk_nbd import (  # noqa: F401
    attach,
    detach,
    in_flight_reaches,
    nbdkit_memory,
    servers,
    uri,
    vm,
    vm_factory,
)
from test_migrate_suspend import memory_bytes, posted

from rings.sring import RSP_PROD

MiB = 1 << 20


async def test_nbd_disk_suspends_with_its_requests_answered(vm, tmp_path, servers):  # noqa: F811
    srv = nbdkit_memory(tmp_path, "8M")
    servers.append(srv.start())
    front, _ = await attach(vm, 1, uri(srv), queues=2)
    rng = random.Random(3)
    data = {i: rng.randbytes(8192) for i in range(40)}
    first = [asyncio.create_task(front.write(i * 16, d)) for i, d in data.items()]
    await posted(first, front)
    await vm.client.suspend(1)
    stats = await vm.client.stats(1)
    answered = sum(q.shared.idx[RSP_PROD] for q in front.queues)
    assert answered == int(stats["1.requests"]) > 0
    late = asyncio.create_task(front.write(1000, b"z" * 4096))
    await posted([late], front)
    quiet = memory_bytes(vm.guest)
    for _ in range(3):
        assert await vm.client.stats(1) == stats
    assert memory_bytes(vm.guest) == quiet and not late.done()
    await vm.client.resume(1)
    await asyncio.gather(*first, late)
    for i, d in data.items():
        assert await front.read(i * 16, len(d)) == d
    assert await front.read(1000, 4096) == b"z" * 4096
    assert not front.stray_responses
    await detach(vm, 1, front)


async def test_a_completion_while_suspending_takes_no_new_request(vm, tmp_path,  # noqa: F811
                                                                  servers):  # noqa: F811
    """The compiled kernel serves an NBD ring again after each completion. While SUSPEND
    waits for a write on the connection (the server holds every write two seconds), a
    read the guest posts meanwhile is not taken when the write completes: it waits for
    RESUME."""
    srv = nbdkit_memory(tmp_path, "8M", filters=["delay"], params=["delay-write=2"])
    servers.append(srv.start())
    front, _ = await attach(vm, 1, uri(srv))
    assert (await vm.client.stats(1))["1.compiled"] == "1"
    write = asyncio.create_task(front.write(0, b"w" * 4096))
    await in_flight_reaches(vm.client, 1, 1)
    suspending = asyncio.create_task(vm.client.suspend(1))
    (conn,) = vm.server.connections.values()  # the daemon runs on this loop
    device = conn.session.devices[1].device
    while not device.suspended:  # SUSPEND taken in: it now waits for the write
        await asyncio.sleep(0)
    late = asyncio.create_task(front.read(64, 4096))
    await posted([late], front)
    await suspending
    await write
    stats = await vm.client.stats(1)
    assert stats["1.requests"] == "1" and not late.done()
    await vm.client.resume(1)
    assert await late == bytes(4096)
    assert await front.read(0, 4096) == b"w" * 4096
    await detach(vm, 1, front)
