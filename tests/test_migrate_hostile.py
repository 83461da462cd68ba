"""State blobs that pass the checksum but do not hold together, and migration steps in
awkward orders, through the real daemon: each blob is refused with EINVAL (the device
left unconnected, in InitWait) or clamped as docs/protocol.md says; the daemon never
crashes, never pins what the guest did not grant, and a suspended device does not spin."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import zlib
from collections.abc import Callable

import pytest
from migrig import MiB, get_state, migration_rig, move_guest, set_state
from test_net_harness import daemon_guest

from backendd import devstate
from backendd.devstate import BLK_PGRANTS, NET_MCAST, NET_QUEUE, NET_RATE, NET_RX_POSTED, NET_VIF
from backendd.devstate import Section as S
from backendd.guest import RequestFailed, VmmClient
from backendd.guest.blkfront import BlkFront
from backendd.guest.machine import SimGuest
from rings.consts import XenbusState
from rings.sring import REQ_PROD, RSP_PROD

DEVID = 51712
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
        return [*sections, next(s for s in sections if s.type == stype)]
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

@pytest.mark.parametrize("dataplane", ["python", "compiled"])
async def test_blk_duplicate_persistent_grants_refused(daemon, tmp_path, dataplane):
    """A BLK_PGRANTS section naming one gref twice is not a cache the source had: EINVAL
    at SET_DEVICE_STATE, InitWait; the true blob then works. Grefs beyond the table, not
    granted, or more than the destination's cache holds are not pinned (the cache stays
    within its bound) and the device serves."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * MiB))
    config = {"path": str(image), "dataplane": dataplane}
    async with migration_rig(daemon.path, tmp_path) as rig:
        front = await rig.guest.add_disk(rig.a, DEVID, config, inflight=False,
                                         persistent=True)
        for n in range(8):
            await front.write(n * 8, bytes([n + 1]) * 4096)
        blob = await rig.suspend_and_get(DEVID)
        grants = next(s for s in devstate.decode(blob, BLK) if s.type == BLK_PGRANTS)
        count = struct.unpack_from("<I", grants.body, 4)[0]
        assert count > 1
        first = struct.unpack_from("<I", grants.body, 8)[0]
        b = await rig.move()
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
        await rig.switch(DEVID, front)
        stats = await b.stats(DEVID)
        assert 1 <= int(stats[f"{DEVID}.pgrants"]) <= 1056
        for n in range(8):
            assert await front.read(n * 8, 4096) == bytes([n + 1]) * 4096


async def test_state_dropped_when_the_frontend_closes_before_connecting(daemon, tmp_path):
    """SET_DEVICE_STATE, then the frontend goes Closing/Closed/Initialising instead of
    connecting (the guest gave up on the old rings): the state is forgotten, and a fresh
    frontend with new rings connects (and serves after RESUME) instead of being refused
    forever for keys that differ from a state nobody uses."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * MiB))
    config = {"path": str(image)}
    async with migration_rig(daemon.path, tmp_path) as rig:
        guest = rig.guest
        front = await guest.add_disk(rig.a, DEVID, config, inflight=False)
        await front.write(0, b"z" * 4096)
        blob = await rig.suspend_and_get(DEVID)
        b = await rig.move()
        _, keys = await b.add_device(DEVID, "blk", config)
        await set_state(b, DEVID, blob)
        for st in (XenbusState.CLOSING, XenbusState.CLOSED, XenbusState.INITIALISING):
            await b.frontend_state(DEVID, st, {})
        assert (await b.backend_state(DEVID))[0] == XenbusState.INIT_WAIT
        await rig.a.close()
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


# --- net -------------------------------------------------------------------------------

def _frame(dst: bytes, n: int, size: int = 200) -> bytes:
    return dst + bytes.fromhex("00163e000061") + b"\x88\xb5" + bytes([n]) * size


@pytest.mark.usefixtures("root")
async def test_net_hostile_blobs_refused_or_clamped(daemon):
    """A suspended nic's blob, rewritten: queues beyond any bound, sections repeated,
    posted rx buffers that are not the requests in the rx ring, an rx req_cons beyond the
    ring's req_prod, a multicast list beyond its bound: EINVAL each, at SET_DEVICE_STATE
    or at the connect that would use it, InitWait after. Then the true blob connects and
    frames flow."""
    from test_net_harness import inject, namespaces, uniq

    host = uniq("mhh")
    tap, tap_b = uniq("mht"), uniq("mhu")
    mac = bytes.fromhex("00163e000062")
    config = {"netns": host, "mac": "00:16:3e:00:00:62", "queues": "1",
              "dataplane": "python"}
    with namespaces(host):
        async with daemon_guest(daemon.path) as dg:
            a, guest, _ = dg
            front = await dg.add_nic(config | {"tap": tap})
            # Frames in: the rx path takes posted buffers from the ring (more than it
            # uses), so the state has posted buffers.
            await inject(host, tap, [_frame(mac, n) for n in range(3)])
            await front.wait_rx(3)
            await a.suspend()
            blob = await get_state(a, 0)
            sections = devstate.decode(blob, NET)
            queue = next(s for s in sections if s.type == NET_QUEUE).body
            rx_cons, rx_pvt = struct.unpack_from("<II", queue, 32)
            posted = next(s for s in sections if s.type == NET_RX_POSTED).body
            nposted = struct.unpack_from("<I", posted, 4)[0]
            assert nposted == (rx_cons - rx_pvt) & 0xFFFFFFFF and nposted > 0
            move_guest(guest)
            b = await VmmClient.connect(daemon.path)
            try:
                await guest.attach(b)
                await b.add_device(0, "net", config | {"tap": tap_b})
                at_set = {
                    "queues": (patch(NET_VIF, 8, "I", 0xFFFFFFFF), "queues"),
                    "no queue": (patch(NET_VIF, 8, "I", 0), "queues"),
                    "mtu": (patch(NET_VIF, 4, "I", 0xFFFFFFF0), "mtu"),
                    "two vif": (repeat(NET_VIF), "two net vif"),
                    "usable": (patch(NET_RX_POSTED, 10, "H", 2), "usable flag"),
                    "empty queue": (replace(NET_QUEUE, b""), "truncated"),
                    "two mcast": (repeat(NET_MCAST), "two multicast"),
                    "mcast bound": (replace(NET_MCAST, struct.pack("<I", 65) + bytes(6 * 65)),
                                    "65 addresses"),
                    "rate twice": (lambda ss: ss + [S(NET_RATE, struct.pack(
                        "<IIQQQq", 0, 0, 1, 1, 1, 1))] * 2, "two rate"),
                }
                for name, (fn, words) in at_set.items():
                    await refused(set_state(b, 0, edit(blob, NET, fn)), words)
                    assert (await b.backend_state(0))[0] == XenbusState.INIT_WAIT, name
                # The last section's length one past the blob's end (checksum right).
                last = sections[-1]
                over = bytearray(blob)
                struct.pack_into("<I", over, len(blob) - len(last.body) - 4,
                                 len(last.body) + 1)
                over[24:28] = bytes(4)
                over[24:28] = struct.pack("<I", zlib.crc32(bytes(over)))
                await refused(set_state(b, 0, bytes(over)), "run past the blob")
                # Blobs that hold together alone but not with the copied rx ring.
                ring = front.queues[0].rx_shared
                first_id, first_gref = struct.unpack_from("<HxxI", posted, 8)
                at_connect = {"gref": patch(NET_RX_POSTED, 12, "I", first_gref + 1),
                              "id": patch(NET_RX_POSTED, 8, "H", first_id ^ 1)}
                for name, fn in at_connect.items():
                    await set_state(b, 0, edit(blob, NET, fn))
                    await refused(b.hand_over_channels(0, XenbusState.CONNECTED,
                                                       front.frontend_keys(),
                                                       front.new_channels()),
                                  "in the rx ring")
                    assert (await b.backend_state(0))[0] == XenbusState.INIT_WAIT, name
                # The copied ring's req_prod short of the state's rx req_cons (a state
                # from later than the memory): the last posted buffer is no request.
                req_prod = ring.idx[REQ_PROD]
                ring.idx[REQ_PROD] = (rx_cons - 1) & 0xFFFFFFFF
                await set_state(b, 0, blob)
                await refused(b.hand_over_channels(0, XenbusState.CONNECTED,
                                                   front.frontend_keys(),
                                                   front.new_channels()), "beyond req_prod")
                ring.idx[REQ_PROD] = req_prod
                await set_state(b, 0, blob)
                state, _ = await b.hand_over_channels(0, XenbusState.CONNECTED,
                                                      front.frontend_keys(),
                                                      front.new_channels())
                assert state == XenbusState.CONNECTED
                await b.resume()
                await a.close()
                await inject(host, tap_b, [_frame(mac, 9)])
                got = await front.wait_rx(1)
                assert got[-1][1][14] == 9
                assert ring.idx[RSP_PROD] != 0
            finally:
                await b.close()


@pytest.mark.usefixtures("root")
async def test_net_rate_credit_from_a_blob_is_clamped(daemon):
    """A NET_RATE section for the destination's own rate but with a credit no window
    gives (2**62 bytes left, the window ending in 2**62 usec): the credit is clamped to
    one burst, so the guest's frames beyond it wait for the next window (counted in
    tx_rate_limited), instead of the rate limit being gone or the nic stalled for ever."""
    from test_net_harness import namespaces, uniq

    from backendd.devices.net.ratelimit import MIN_BURST

    host = uniq("mrh")
    tap, tap_b = uniq("mrt"), uniq("mru")
    config = {"netns": host, "mac": "00:16:3e:00:00:63", "queues": "1",
              "dataplane": "python", "rate": "1000,3600000000"}  # 1000 bytes an hour
    with namespaces(host):
        async with daemon_guest(daemon.path) as dg:
            a, guest, _ = dg
            front = await dg.add_nic(config | {"tap": tap}, tx_pages=200)
            await a.suspend()
            blob = await get_state(a, 0)
            rate = next(s for s in devstate.decode(blob, NET) if s.type == NET_RATE).body
            assert struct.unpack_from("<QQ", rate, 8) == (1000, 3600000000)
            blob = edit(blob, NET, patch(NET_RATE, 24, "Qq", 1 << 62, 1 << 62))
            move_guest(guest)
            b = await VmmClient.connect(daemon.path)
            try:
                await guest.attach(b)
                await b.add_device(0, "net", config | {"tap": tap_b})
                await set_state(b, 0, blob)
                await b.hand_over_channels(0, XenbusState.CONNECTED, front.frontend_keys(),
                                           front.new_channels())
                await b.resume()
                await a.close()
                frames = MIN_BURST // 1000 + 10
                sends = [asyncio.create_task(front.send_frame(_frame(b"\xff" * 6, n, 986)))
                         for n in range(frames)]
                try:
                    stats: dict[str, str] = {}

                    async def limited() -> None:
                        nonlocal stats
                        while int(stats.get("0.tx_rate_limited", 0)) == 0:
                            await asyncio.sleep(0.01)
                            stats = await b.stats(0)
                    await asyncio.wait_for(limited(), 30)
                    sent = int(stats["0.tx_bytes"]) if "0.tx_bytes" in stats else None
                    assert int(stats["0.tx_packets"]) <= MIN_BURST // 1000
                    assert sent is None or sent <= MIN_BURST
                finally:
                    for t in sends:
                        t.cancel()
                    await asyncio.gather(*sends, return_exceptions=True)
            finally:
                await b.close()


@pytest.mark.parametrize("dataplane", ["python", "compiled"])
async def test_a_kick_storm_while_suspended_wakes_nothing(daemon, tmp_path, dataplane):
    """Thousands of kicks and a posted request while suspended: the daemon's loop is not
    woken by them (its event channel counts no wake-up, no request is taken), not
    even when SUSPEND comes again, GET_DEVICE_STATE is asked twice (the same blob) and
    RESUME of another, never suspended, device is asked; RESUME then serves the request
    once."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * MiB))
    async with daemon_guest(daemon.path) as (a, guest, _):
        front = await guest.add_disk(a, DEVID, {"path": str(image), "dataplane": dataplane},
                                     inflight=False)
        other = await guest.add_disk(a, DEVID + 16, {"path": str(image)}, inflight=False)
        await front.write(0, b"k" * 4096)
        (conn,) = [c for c in daemon.server.connections.values()
                   if DEVID in c.session.devices]
        device = conn.session.devices[DEVID].device
        await a.suspend(DEVID)
        channel = device.queues[0].channel
        wakeups = channel.kicks
        before = await a.stats(DEVID)
        task = asyncio.create_task(front.read(0, 4096))
        for _ in range(10):
            await asyncio.sleep(0)
        for _ in range(5000):
            front.queues[0].port.send()
        await a.suspend(DEVID)
        await a.resume(DEVID + 16)
        assert await get_state(a, DEVID) == await get_state(a, DEVID)
        for _ in range(3):
            assert await a.stats(DEVID) == before
        assert channel.kicks == wakeups and not task.done()
        await a.resume(DEVID)
        assert await asyncio.wait_for(task, 30) == b"k" * 4096
        assert await other.read(0, 4096) == b"k" * 4096
        after = await a.stats(DEVID)
        assert int(after[f"{DEVID}.requests"]) == int(before[f"{DEVID}.requests"]) + 1


# --- control requests while suspended ----------------------------------------------------

def _memory(guest: SimGuest) -> tuple[bytes, bytes]:
    return (os.pread(guest.ram.fd, guest.ram.size, 0),
            os.pread(guest.gnttab.fd, guest.gnttab.size, 0))


@pytest.mark.parametrize("dataplane,persistent", [("python", True), ("compiled", False),
                                                  ("compiled", True)])
async def test_control_requests_while_suspended_write_nothing(daemon, tmp_path, dataplane,
                                                              persistent):
    """While a disk is suspended with a request posted: the grant table grows, the
    memory region under its rings cannot go (EBUSY), the dirty log is cleared and set
    again, GET_DEVICE_STATE twice gives one blob, SET_DEVICE_STATE on the live device is
    refused: guest memory and the log stay untouched. RESUME serves the request once (its
    page in the new log). Suspended again, the frontend closes and the device is
    removed; the daemon goes on serving."""
    from backendd.guest.dirtylog import DirtyLog

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * MiB))
    guest = SimGuest(ram_size=48 * MiB, gnttab_frames=32)
    ram_pages = max(gpa + size for gpa, size, _, _ in guest.ram.regions) // 4096
    logs: list[DirtyLog] = []
    a = await VmmClient.connect(daemon.path)
    try:
        for gpa, size, fd, offset in guest.ram.regions:
            await a.add_mem_region(gpa, size, fd, offset)
        await a.set_grant_table(guest.gnttab.fd, 16)  # grows to 32 below
        front = await guest.add_disk(a, DEVID, {"path": str(image), "dataplane": dataplane},
                                     inflight=False, persistent=persistent)
        await front.write(0, b"s" * 4096)
        logs.append(DirtyLog(ram_pages, 32))
        await a.set_log(logs[0].fd, logs[0].size, ram_pages)
        await a.suspend()
        logs[0].take_ram()
        logs[0].take_gnttab()
        task = asyncio.create_task(front.read(0, 4096))
        for _ in range(10):
            await asyncio.sleep(0)
        quiet = _memory(guest)  # the request is on the ring, the guest has kicked
        await a.set_grant_table(guest.gnttab.fd, 32)
        gpa, size, _, _ = guest.ram.regions[0]
        with pytest.raises(RequestFailed) as info:
            await a.remove_mem_region(gpa, size)
        assert info.value.code == errno.EBUSY
        assert not logs[0].take_ram() and not logs[0].take_gnttab()
        await a.clear_log()
        logs.append(DirtyLog(ram_pages, 32))
        await a.set_log(logs[1].fd, logs[1].size, ram_pages)
        blob = await get_state(a, DEVID)
        assert await get_state(a, DEVID) == blob
        with pytest.raises(RequestFailed) as info:
            await set_state(a, DEVID, blob)
        assert info.value.code == errno.EBUSY
        await a.suspend()
        quiet_now = _memory(guest)
        assert quiet_now[0] == quiet[0] and quiet_now[1] == quiet[1]
        assert not task.done() and not logs[1].take_ram() and not logs[1].take_gnttab()
        await a.resume()
        assert await asyncio.wait_for(task, 30) == b"s" * 4096
        assert logs[1].take_ram()  # the response landed, logged
        await a.suspend()
        await a.frontend_state(DEVID, XenbusState.CLOSING, {})
        await a.resume()
        await a.remove_device(DEVID)
        assert await a.stats() == {}
    finally:
        await a.close()
        for log in logs:
            log.close()
        guest.close()


@pytest.mark.parametrize("dataplane", ["python", "compiled"])
async def test_suspend_before_the_frontend_connects(daemon, tmp_path, dataplane):
    """SUSPEND between ADD_DEVICE and the connect (requests on one connection are
    handled one at a time, so this is "during connect" as a VMM can send it): the device
    connects suspended, takes nothing the guest posts and writes nothing, until RESUME."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"q" * 4096 + bytes(8 * MiB - 4096))
    a = await VmmClient.connect(daemon.path)
    guest = SimGuest(ram_size=48 * MiB, gnttab_frames=16)
    front: BlkFront | None = None
    try:
        await guest.attach(a)
        _, keys = await a.add_device(DEVID, "blk", {"path": str(image),
                                                    "dataplane": dataplane})
        await a.suspend(DEVID)
        front = BlkFront(guest.ram, guest.gnttab, DEVID, backend_keys=keys)
        state, _ = await a.hand_over_channels(DEVID, XenbusState.CONNECTED,
                                              front.frontend_keys(), front.channels())
        assert state == XenbusState.CONNECTED
        front.start()
        front.watch(a)
        task = asyncio.create_task(front.read(0, 4096))
        for _ in range(10):
            await asyncio.sleep(0)
        quiet = _memory(guest)
        before = await a.stats(DEVID)
        for _ in range(3):
            assert await a.stats(DEVID) == before
        assert _memory(guest) == quiet and not task.done()
        await a.resume(DEVID)
        assert await asyncio.wait_for(task, 30) == b"q" * 4096
    finally:
        if front is not None:
            front.close()
        await a.close()
        guest.close()
