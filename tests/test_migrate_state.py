"""A device moved from one daemon to another with GET_DEVICE_STATE / SET_DEVICE_STATE,
while the simulated guest keeps doing verified I/O: suspend on A, copy the guest's RAM
and grant table into new memfds, move the guest onto them, set the devices up on B from
their state blobs, resume there, close A. The frontend never reconnects and its rings
are never reset; no request is lost, failed or answered twice. And every kind of bad
blob is refused with EINVAL, leaving the destination device unconnected."""

from __future__ import annotations

import asyncio
import errno
import random
import struct
import zlib

import pytest
from migrig import MiB, migrate_disks, migration_rig, set_state

from backendd.guest import RequestFailed
from backendd.guest.blkfront import BlkFront
from rings.consts import XenbusState
from rings.sring import REQ_PROD, RSP_PROD

DEVID = 51712
SECTORS = 16 * MiB // 512
HANG = 60  # seconds after which a wait that should end is a hang, not slowness


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
                                                  ("compiled", False), ("compiled", True)])
async def test_blk_moves_to_a_second_daemon_under_io(daemon, tmp_path, dataplane,
                                                     persistent):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(16 * MiB))
    config = {"path": str(image), "dataplane": dataplane}
    async with migration_rig(daemon.path, tmp_path, 64 * MiB, 32) as rig:
        front = await rig.guest.add_disk(rig.a, DEVID, config, inflight=False,
                                         persistent=persistent, queues=2)
        work = Workload(front, seed=3)
        stop = asyncio.Event()
        runner = asyncio.create_task(work.run_until(stop))
        await work.wait_done(200)
        ring = front.queues[0].shared
        b = await migrate_disks(rig, {DEVID: (front, config)})
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
    async with migration_rig(daemon.path, tmp_path) as rig:
        front = await rig.guest.add_disk(rig.a, DEVID, config, inflight=False)
        await front.write(0, b"a" * 4096)
        blob = await rig.suspend_and_get(DEVID)
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
        b = await rig.move()
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
        await rig.switch(DEVID, front)
        assert await front.read(0, 4096) == b"a" * 4096
        # Once connected, SET_DEVICE_STATE is refused.
        with pytest.raises(RequestFailed) as info:
            await set_state(b, DEVID, blob)
        assert info.value.code == errno.EBUSY
