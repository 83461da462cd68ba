"""A device moved from one daemon to another with GET_DEVICE_STATE / SET_DEVICE_STATE,
while the simulated guest keeps doing verified I/O: suspend on A, copy the guest's RAM
and grant table into new memfds, move the guest onto them, set the devices up on B from
their state blobs, resume there, close A. The frontend never reconnects and its rings
are never reset; no request is lost, failed or answered twice. And every kind of bad
blob is refused with EINVAL, leaving the destination device unconnected."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import os
import random
import struct
import zlib
from collections.abc import AsyncIterator

import pytest
from conftest import DaemonHandle

from backendd.config import Config, DaemonSection
from backendd.guest import RequestFailed, VmmClient
from backendd.guest.blkfront import BlkFront
from backendd.guest.machine import SimGuest
from backendd.guest.memory import sealed_memfd
from backendd.guest.migrate import clone_memfd, move_gnttab, move_ram
from backendd.log import EventLog
from backendd.server import Server
from rings.consts import XenbusState
from rings.sring import REQ_PROD, RSP_PROD

DEVID = 51712
MiB = 1 << 20
SECTORS = 16 * MiB // 512
HANG = 60  # seconds after which a wait that should end is a hang, not slowness


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


async def migrate_disks(a: VmmClient, b_path: str, guest: SimGuest,
                        disks: dict[int, tuple[BlkFront, dict[str, str]]]) -> VmmClient:
    await a.suspend()
    blobs = {devid: await get_state(a, devid) for devid in disks}
    move_guest(guest)
    b = await VmmClient.connect(b_path)
    await guest.attach(b)
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


class Workload:
    """Random writes of whole 4 KiB blocks, each read back once written, `depth` at a
    time; `model` is what the disk must hold."""

    def __init__(self, front: BlkFront, seed: int, depth: int = 32) -> None:
        self.front = front
        self.rng = random.Random(seed)
        self.depth = depth
        self.model: dict[int, bytes] = {}
        self.done = 0
        self.stop = False
        self.busy: set[int] = set()
        self._goal = 0
        self._reached = asyncio.Event()

    async def _one(self) -> None:
        while not self.stop:
            block = self.rng.randrange(SECTORS // 8)
            if block in self.busy:
                continue
            self.busy.add(block)
            data = self.rng.randbytes(4096)
            await self.front.write(block * 8, data)
            self.model[block] = data
            assert await self.front.read(block * 8, 4096) == data
            self.busy.discard(block)
            self.done += 1
            if self.done >= self._goal:
                self._reached.set()

    async def wait_done(self, n: int) -> None:
        """Until `n` write-and-read-backs have completed (a hang fails the test)."""
        self._goal = n
        self._reached.clear()
        if self.done < n:
            await asyncio.wait_for(self._reached.wait(), HANG)

    async def run_until(self, event: asyncio.Event) -> None:
        async def stopper() -> None:
            await event.wait()
            self.stop = True
        await asyncio.gather(stopper(), *(self._one() for _ in range(self.depth)))

    async def verify(self) -> None:
        for block, data in self.model.items():
            assert await self.front.read(block * 8, 4096) == data, f"block {block}"


@pytest.mark.parametrize("dataplane,persistent", [("python", False), ("python", True),
                                                  ("compiled", False)])
async def test_blk_moves_to_a_second_daemon_under_io(daemon, tmp_path, dataplane,
                                                     persistent):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(16 * MiB))
    config = {"path": str(image), "dataplane": dataplane}
    a = await VmmClient.connect(daemon.path)
    guest = SimGuest(ram_size=64 * MiB, gnttab_frames=32)
    b: VmmClient | None = None
    try:
        async with second_daemon(tmp_path) as daemon_b:
            await guest.attach(a)
            front = await guest.add_disk(a, DEVID, config, inflight=False,
                                         persistent=persistent, queues=2)
            work = Workload(front, seed=3)
            stop = asyncio.Event()
            runner = asyncio.create_task(work.run_until(stop))
            await work.wait_done(200)
            ring = front.queues[0].shared
            b = await migrate_disks(a, daemon_b.path, guest, {DEVID: (front, config)})
            stats_b = await b.stats(DEVID)
            if persistent:  # the cache moved with the rings
                assert int(stats_b[f"{DEVID}.pgrants"]) > 0
            # The rings go on from where they were: no reset to 0.
            assert ring.idx[RSP_PROD] > 0
            moved = work.done
            await work.wait_done(moved + 200)
            stop.set()
            await asyncio.wait_for(runner, HANG)
            await work.verify()
            assert not front.stray_responses
            assert ring.idx[REQ_PROD] == ring.idx[RSP_PROD]
            stats_b = await b.stats(DEVID)
            assert int(stats_b[f"{DEVID}.errors"]) == 0 and int(stats_b[f"{DEVID}.invalid"]) == 0
            assert int(stats_b[f"{DEVID}.requests"]) > 0
            await b.close()
    finally:
        await a.close()
        if b is not None:
            await b.close()
        guest.close()


def tamper(blob: bytes, offset: int, value: bytes, fix_crc: bool = True) -> bytes:
    out = bytearray(blob)
    out[offset:offset + len(value)] = value
    if fix_crc:
        out[24:28] = b"\0\0\0\0"
        out[24:28] = struct.pack("<I", zlib.crc32(bytes(out)))
    return bytes(out)


async def test_bad_blobs_are_refused_and_leave_the_device_unconnected(daemon, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * MiB))
    config = {"path": str(image)}
    a = await VmmClient.connect(daemon.path)
    guest = SimGuest(ram_size=48 * MiB, gnttab_frames=16)
    b: VmmClient | None = None
    try:
        async with second_daemon(tmp_path) as daemon_b:
            await guest.attach(a)
            front = await guest.add_disk(a, DEVID, config, inflight=False)
            await front.write(0, b"a" * 4096)
            await a.suspend()
            blob = await get_state(a, DEVID)
            net_blob = tamper(blob, 12, struct.pack("<I", 2))
            bad = {
                "version": (tamper(blob, 8, struct.pack("<I", 99)), "version 99"),
                "type": (net_blob, "for a net device"),
                "truncated": (blob[:-5], "truncated"),
                "header only": (blob[:20], "truncated"),
                "corrupt": (tamper(blob, len(blob) - 3, b"\x7f", fix_crc=False),
                            "checksum"),
                "magic": (tamper(blob, 0, b"XXXXXXXX"), "magic"),
                "unknown section": (tamper(blob, 32, struct.pack("<I", 0x4242)),
                                    "unknown section"),
            }
            move_guest(guest)
            b = await VmmClient.connect(daemon_b.path)
            await guest.attach(b)
            await b.add_device(DEVID, "blk", config)
            for name, (data, words) in bad.items():
                with pytest.raises(RequestFailed) as info:
                    await set_state(b, DEVID, data)
                assert info.value.code == errno.EINVAL, name
                assert words in info.value.message, (name, info.value.message)
                assert (await b.backend_state(DEVID))[0] == XenbusState.INIT_WAIT
            # A blob of another device's rings: the keys do not match, connect refused.
            await set_state(b, DEVID, blob)
            keys = dict(front.frontend_keys())
            keys["ring-ref"] = str(int(keys["ring-ref"]) + 1)
            with pytest.raises(RequestFailed) as info:
                await b.hand_over_channels(DEVID, XenbusState.CONNECTED, keys,
                                           front.new_channels())
            assert info.value.code == errno.EINVAL and "differ" in info.value.message
            assert (await b.backend_state(DEVID))[0] == XenbusState.INIT_WAIT
            # The right keys: connected from the state, and I/O goes on.
            state, _ = await b.hand_over_channels(DEVID, XenbusState.CONNECTED,
                                                  front.frontend_keys(), front.new_channels())
            assert state == XenbusState.CONNECTED
            front.watch(b)
            await b.resume()
            await a.close()
            assert await front.read(0, 4096) == b"a" * 4096
            # Once connected, SET_DEVICE_STATE is refused.
            with pytest.raises(RequestFailed) as info:
                await set_state(b, DEVID, blob)
            assert info.value.code == errno.EBUSY
            await b.close()
    finally:
        await a.close()
        if b is not None:
            await b.close()
        guest.close()
