"""State blobs that pass the checksum but do not hold together, and migration steps in
awkward orders, through the real daemon: each blob is refused with EINVAL (the device
left unconnected, in InitWait) or clamped as docs/protocol.md says; the daemon never
crashes, never pins what the guest did not grant, and a suspended device does not spin."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from collections.abc import Callable

import pytest
from test_migrate_state import get_state, move_guest, second_daemon, set_state

from backendd import devstate
from backendd.devstate import BLK_PGRANTS, NET_MCAST, NET_QUEUE, NET_RATE, NET_RX_POSTED, NET_VIF
from backendd.devstate import Section as S
from backendd.guest import RequestFailed, VmmClient
from backendd.guest.blkfront import BlkFront
from backendd.guest.machine import SimGuest
from rings.consts import XenbusState
from rings.sring import REQ_PROD, RSP_PROD

DEVID = 51712
MiB = 1 << 20
BLK, NET = 1, 2


def edit(blob: bytes, dtype: int, fn: Callable[[list[S]], list[S]]) -> bytes:
    """The blob with its sections rewritten by fn, and a right checksum."""
    return devstate.encode(dtype, fn(list(devstate.decode(blob, dtype))))


def patch(stype: int, offset: int, fmt: str, *values: int, nth: int = 0):
    """An edit: section `stype` (the nth of its type) with `values` packed at `offset`."""
    def fn(sections: list[S]) -> list[S]:
        out, seen = [], 0
        for s in sections:
            if s.type == stype:
                if seen == nth:
                    body = bytearray(s.body)
                    struct.pack_into("<" + fmt, body, offset, *values)
                    s = S(stype, bytes(body))
                seen += 1
            out.append(s)
        return out
    return fn


def repeat(stype: int):
    def fn(sections: list[S]) -> list[S]:
        return sections + [next(s for s in sections if s.type == stype)]
    return fn


def replace(stype: int, body: bytes):
    def fn(sections: list[S]) -> list[S]:
        return [S(stype, body) if s.type == stype else s for s in sections]
    return fn


async def refused(call, words: str) -> None:
    with pytest.raises(RequestFailed) as info:
        await call
    assert info.value.code == errno.EINVAL, info.value.message
    assert words in info.value.message, info.value.message


# --- blk -------------------------------------------------------------------------------

async def test_blk_duplicate_persistent_grants_refused(daemon, tmp_path):
    """A BLK_PGRANTS section naming one gref twice is not a cache the source had: EINVAL
    at SET_DEVICE_STATE, InitWait; the true blob then works. Grefs beyond the table, not
    granted, or more than the destination's cache holds are not pinned (the cache stays
    within its bound) and the device serves."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * MiB))
    config = {"path": str(image), "dataplane": "python"}
    a = await VmmClient.connect(daemon.path)
    guest = SimGuest(ram_size=48 * MiB, gnttab_frames=16)
    b: VmmClient | None = None
    try:
        async with second_daemon(tmp_path) as daemon_b:
            await guest.attach(a)
            front = await guest.add_disk(a, DEVID, config, inflight=False, persistent=True)
            for n in range(8):
                await front.write(n * 8, bytes([n + 1]) * 4096)
            await a.suspend()
            blob = await get_state(a, DEVID)
            grants = next(s for s in devstate.decode(blob, BLK) if s.type == BLK_PGRANTS)
            count = struct.unpack_from("<I", grants.body, 4)[0]
            assert count > 1
            first = struct.unpack_from("<I", grants.body, 8)[0]
            move_guest(guest)
            b = await VmmClient.connect(daemon_b.path)
            await guest.attach(b)
            await b.add_device(DEVID, "blk", config)
            dup = patch(BLK_PGRANTS, 16, "I", first)  # the second grant = the first
            await refused(set_state(b, DEVID, edit(blob, BLK, dup)), "listed twice")
            assert (await b.backend_state(DEVID))[0] == XenbusState.INIT_WAIT
            # Out of the table (16 frames: 8192 entries), never granted, and 2000 of
            # them: more than the 1056 the cache keeps.
            hostile = [(first, 1), (1 << 30, 1), (8191, 1), (8192, 0), (0xFFFFFFFF, 1)]
            hostile += [(g, 1) for g in range(2000, 4000)]
            body = struct.pack("<II", 0, len(hostile)) + b"".join(
                struct.pack("<II", g, w) for g, w in hostile)
            await set_state(b, DEVID, edit(blob, BLK, replace(BLK_PGRANTS, body)))
            state, _ = await b.hand_over_channels(DEVID, XenbusState.CONNECTED,
                                                  front.frontend_keys(), front.new_channels())
            assert state == XenbusState.CONNECTED
            front.watch(b)
            await b.resume()
            await a.close()
            stats = await b.stats(DEVID)
            assert 1 <= int(stats[f"{DEVID}.pgrants"]) <= 1056
            for n in range(8):
                assert await front.read(n * 8, 4096) == bytes([n + 1]) * 4096
    finally:
        await a.close()
        if b is not None:
            await b.close()
        guest.close()


async def test_state_dropped_when_the_frontend_closes_before_connecting(daemon, tmp_path):
    """SET_DEVICE_STATE, then the frontend goes Closing/Closed/Initialising instead of
    connecting (the guest gave up on the old rings): the state is forgotten, and a fresh
    frontend with new rings connects (and serves after RESUME) instead of being refused
    forever for keys that differ from a state nobody uses."""
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
            await front.write(0, b"z" * 4096)
            await a.suspend()
            blob = await get_state(a, DEVID)
            move_guest(guest)
            b = await VmmClient.connect(daemon_b.path)
            await guest.attach(b)
            _, keys = await b.add_device(DEVID, "blk", config)
            await set_state(b, DEVID, blob)
            for st in (XenbusState.CLOSING, XenbusState.CLOSED, XenbusState.INITIALISING):
                await b.frontend_state(DEVID, st, {})
            assert (await b.backend_state(DEVID))[0] == XenbusState.INIT_WAIT
            await a.close()
            fresh = BlkFront(guest.ram, guest.gnttab, DEVID, backend_keys=keys)
            try:
                state, _ = await b.hand_over_channels(DEVID, XenbusState.CONNECTED,
                                                      fresh.frontend_keys(), fresh.channels())
                assert state == XenbusState.CONNECTED
                fresh.start()
                fresh.watch(b)
                await b.resume()
                assert await fresh.read(0, 4096) == b"z" * 4096
            finally:
                fresh.close()
    finally:
        await a.close()
        if b is not None:
            await b.close()
        guest.close()
