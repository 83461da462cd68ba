"""The blk device through the real daemon: control socket, fds passed with SCM_RIGHTS,
the session's xenbus state machine and its I/O pool."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import random
import subprocess
import termios

import pytest

from backendd.guest.blkfront import BlkFront, BlkIOError
from backendd.guest.vmm import RequestFailed, VmmClient
from backendd.protocol.framing import encode_request
from backendd.protocol.messages import (
    ALL_DEVICES,
    HEADER,
    Code,
    Flags,
    GetStats,
    RemoveDevice,
    StatsReply,
    decode_reply,
)
from backendd.server import MAX_QUEUED_REQUESTS
from rings.consts import BlkifStatus, XenbusState
from rings.sring import REQ_PROD

MiB = 1 << 20
DEVID = 51712


def make_image(path, size: int) -> str:
    with open(path, "wb") as f:
        f.write(random.Random(size).randbytes(size))
    return str(path)


def file_bytes(path: str, offset: int = 0, n: int = -1) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


async def connect_front(client: VmmClient, front: BlkFront, devid: int = DEVID
                        ) -> tuple[int, dict[str, str]]:
    state, keys = await client.hand_over_channels(devid, XenbusState.CONNECTED,
                                                  front.frontend_keys(), front.channels())
    front.update_backend_keys(keys)
    front.start()
    return state, keys


async def test_read_write_flush_discard_through_the_daemon(vm, tmp_path):
    client, guest = vm
    image = make_image(tmp_path / "disk.img", 8 * MiB)
    state, keys = await client.add_device(DEVID, "blk", {"path": image})
    assert state == XenbusState.INIT_WAIT
    assert keys["feature-max-indirect-segments"] == "256"
    # 4 queues of 32-entry rings: 320 requests wrap every ring's indices twice or more.
    front = BlkFront(guest.ram, guest.gnttab, DEVID, queues=4, ring_order=0,
                     backend_keys=keys)
    state, keys = await connect_front(client, front)
    assert state == XenbusState.CONNECTED and keys["sectors"] == str(8 * MiB // 512)

    model = bytearray(file_bytes(image))

    async def worker(w: int) -> None:
        rng = random.Random(w)
        base = w * MiB
        for _ in range(40):
            n = rng.choice([512, 4096, 12288, 65536, 262144, MiB])
            off = base + rng.randrange(0, MiB - n + 1, 512)
            if rng.random() < 0.5:
                data = rng.randbytes(n)
                await front.write(off // 512, data)
                model[off:off + n] = data
            else:
                assert await front.read(off // 512, n) == model[off:off + n]

    await asyncio.gather(*(worker(w) for w in range(8)))
    assert all(q.front.req_prod_pvt > 2 * q.shared.size for q in front.queues)
    await front.flush()
    assert file_bytes(image) == model
    await front.discard(0, 2048)
    assert await front.read(0, 4096) == bytes(4096)

    stats = await client.stats(DEVID)
    assert int(stats[f"{DEVID}.flushes"]) == 1
    assert int(stats[f"{DEVID}.discards"]) == 1
    assert int(stats[f"{DEVID}.errors"]) == 0
    assert int(stats[f"{DEVID}.reads"]) + int(stats[f"{DEVID}.writes"]) == 8 * 40 + 1

    state, _ = await client.frontend_state(DEVID, XenbusState.CLOSING, {})
    state, _ = await client.frontend_state(DEVID, XenbusState.CLOSED, {})
    assert state == XenbusState.CLOSED
    front.close()
    assert front.refused_revokes == [] and front.stray_responses == []
    await client.remove_device(DEVID)


async def test_corrupt_ring_reported_and_other_devices_serve(vm, tmp_path):
    client, guest = vm
    image = make_image(tmp_path / "disk.img", MiB)
    fronts = []
    for devid in (1, 2):
        _, keys = await client.add_device(devid, "blk", {"path": image, "mode": "r"})
        front = BlkFront(guest.ram, guest.gnttab, devid, backend_keys=keys,
                         first_port=devid * 10)
        await connect_front(client, front, devid)
        fronts.append(front)
    bad = fronts[0].queues[0]
    bad.shared.idx[REQ_PROD] = (bad.front.req_prod_pvt + 1000) & 0xFFFFFFFF
    bad.port.send()
    notice = await asyncio.wait_for(client.notices.get(), 30)
    assert notice.devid == 1 and "blk ring 0" in str(notice)
    with pytest.raises(BlkIOError) as info:
        await fronts[1].write(0, b"x" * 512)
    assert info.value.status == BlkifStatus.ERROR  # read-only, and still serving
    assert await fronts[1].read(0, 4096) == file_bytes(image, 0, 4096)
    stats = await client.stats()
    assert stats["1.rings_halted"] == "1" and stats["2.rings_halted"] == "0"
    for devid, front in zip((1, 2), fronts, strict=True):
        await client.remove_device(devid)
        front.close()


async def test_bad_config_refused_with_its_key(vm, tmp_path):
    client, _guest = vm
    image = make_image(tmp_path / "disk.img", MiB)
    with pytest.raises(RequestFailed) as info:
        await client.add_device(5, "blk", {"path": image, "cache": "none"})
    assert info.value.code == errno.EINVAL and "cache" in info.value.message
    with pytest.raises(RequestFailed) as info:
        await client.add_device(5, "blk", {"path": str(tmp_path / "nope.img")})
    assert "path" in info.value.message


async def test_discard_frees_blocks_and_a_full_disk_errors_through_the_daemon(root, vm,
                                                                           tmp_path):
    """Through the socket: discard zeroes and frees blocks (st_blocks drops); a disk that
    runs out of space answers ERROR, the daemon and its other disk keep serving."""
    import subprocess

    from backendd.guest.blkfront import BlkIOError

    client, guest = vm
    image = make_image(tmp_path / "disk.img", 4 * MiB)
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    fronts = []
    try:
        small = str(mnt / "sparse.img")
        with open(small, "wb") as f:
            f.truncate(8 * MiB)  # holes only: writes need space the filesystem lacks
        for devid, path in ((1, image), (2, small)):
            _, keys = await client.add_device(devid, "blk", {"path": path})
            front = BlkFront(guest.ram, guest.gnttab, devid, first_port=1 + devid * 4,
                             backend_keys=keys)
            await connect_front(client, front, devid)
            fronts.append(front)
        disk, full = fronts

        before = os.stat(image).st_blocks
        await disk.discard(0, 2 * MiB // 512)
        for off in range(0, 2 * MiB, MiB):
            assert await disk.read(off // 512, MiB) == bytes(MiB)
        assert os.stat(image).st_blocks < before - (MiB // 512)

        failures = 0
        for i in range(8):
            try:
                await full.write(i * 2048, random.Random(i).randbytes(MiB))
            except BlkIOError as e:
                assert e.status == BlkifStatus.ERROR
                failures += 1
        assert failures >= 5
        stats = await client.stats()
        assert int(stats["2.errors"]) == failures
        # The same daemon, the same guest: the healthy disk and the full one still serve.
        data = random.Random(9).randbytes(65536)
        await disk.write(4096, data)
        assert await disk.read(4096, 65536) == data
        assert len(await full.read(0, 4096)) == 4096
        for devid in (1, 2):
            await client.frontend_state(devid, XenbusState.CLOSED, {})
            await client.remove_device(devid)
    finally:
        for front in fronts:
            front.close()
        subprocess.run(["umount", "-l", str(mnt)], check=True)


async def test_a_resized_image_is_reported_and_served(vm, tmp_path):
    from backendd.guest.blkfront import BlkIOError
    from backendd.protocol.messages import KeysChanged

    client, guest = vm
    image = make_image(tmp_path / "disk.img", MiB)
    _, keys = await client.add_device(DEVID, "blk", {"path": image})
    front = BlkFront(guest.ram, guest.gnttab, DEVID, backend_keys=keys)
    _, keys = await connect_front(client, front)
    assert keys["sectors"] == str(MiB // 512)
    with pytest.raises(BlkIOError):  # beyond the disk
        await front.read(MiB // 512, 4096)

    os.truncate(image, 2 * MiB)  # the operator grows the image
    notice = await asyncio.wait_for(client.notices.get(), 30)
    assert isinstance(notice, KeysChanged) and notice.devid == DEVID
    assert notice.keys == {"sectors": str(2 * MiB // 512)}
    assert notice.state == XenbusState.CONNECTED
    _, published = await client.backend_state(DEVID)
    assert published["sectors"] == str(2 * MiB // 512)
    assert await front.read(MiB // 512, 4096) == bytes(4096)  # the new space is served

    os.truncate(image, MiB // 2)  # and shrinks it
    notice = await asyncio.wait_for(client.notices.get(), 30)
    assert notice.keys == {"sectors": str(MiB // 2 // 512)}
    with pytest.raises(BlkIOError):
        await front.read(MiB // 2 // 512, 512)
    await client.frontend_state(DEVID, XenbusState.CLOSED, {})
    front.close()


def unread_bytes(sock) -> int:
    """Bytes waiting in a socket's receive queue (SIOCINQ)."""
    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)), "little")


async def test_flooded_connection_stops_being_read_while_others_are_served(
        freezable_dir, vm, daemon):
    """A VMM whose requests pile up (here behind a REMOVE_DEVICE that waits for a write
    stuck on a frozen filesystem) is no longer read once 64 requests wait: its bytes stay
    in its socket, while another connection is served. Thawed, every request is answered
    in order."""
    client, guest = vm
    mnt = freezable_dir
    image = make_image(mnt / "disk.img", MiB)
    _, keys = await client.add_device(DEVID, "blk", {"path": image, "discard": "0"})
    front = BlkFront(guest.ram, guest.gnttab, DEVID, queues=1, backend_keys=keys)
    await connect_front(client, front)
    (conn,) = daemon.server.connections.values()
    subprocess.run(["fsfreeze", "-f", str(mnt)], check=True)
    try:
        write = asyncio.ensure_future(front.write(0, b"w" * 4096))
        while int((await client.stats(DEVID))[f"{DEVID}.requests"]) < 1:
            await asyncio.sleep(0.01)
        # From here on the test speaks raw frames on the VMM's socket and reads no reply.
        client._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await client._reader
        flood = 2 * MAX_QUEUED_REQUESTS
        burst1 = encode_request(1000, RemoveDevice(DEVID)) + b"".join(
            encode_request(1001 + i, GetStats(ALL_DEVICES)) for i in range(flood))
        assert client.sock.send(burst1) == len(burst1)
        # Another VMM connects and is served: the daemon's loop ran, with burst1 readable.
        other = await VmmClient.connect(daemon.path)
        assert await other.stats() == {}
        assert conn._queue.qsize() == flood  # behind the stuck REMOVE_DEVICE
        assert not conn._reading
        burst2 = b"".join(encode_request(1001 + flood + i, GetStats(ALL_DEVICES))
                          for i in range(flood))
        assert client.sock.send(burst2) == len(burst2)
        assert await other.stats() == {}
        assert unread_bytes(conn.sock) == len(burst2)  # not read: paused
        assert conn._queue.qsize() == flood
        await other.close()
    finally:
        subprocess.run(["fsfreeze", "-u", str(mnt)], check=True)
    await write  # answered when the device stopped
    loop = asyncio.get_running_loop()
    data = b""
    expected = 1 + 2 * flood
    seqs = []
    while len(seqs) < expected:
        chunk = await asyncio.wait_for(loop.sock_recv(client.sock, 65536), 30)
        assert chunk, "connection closed"
        data += chunk
        while len(data) >= HEADER.size:
            code, flags, size, seq = HEADER.unpack_from(data)
            if len(data) < HEADER.size + size:
                break
            assert flags & Flags.REPLY
            reply = decode_reply(code, data[HEADER.size:HEADER.size + size])
            data = data[HEADER.size + size:]
            if seq == 1000:
                assert code == Code.REMOVE_DEVICE
            else:
                assert isinstance(reply, StatsReply) and reply.counters == {}
            seqs.append(seq)
    assert seqs == list(range(1000, 1000 + expected))
    assert conn._reading
