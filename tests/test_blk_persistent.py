"""Persistent grants: the per-ring cache against a real shared grant table, and both ends
negotiating and using them through the real daemon, on either data plane (the Python
path's cache, persistent.py, and the compiled kernel's)."""

from __future__ import annotations

import asyncio
import os
import random

import pytest
from grantrig import backend_grant_table, guest_ram_and_table

from backendd.devices.blk.persistent import PersistentGrants
from backendd.grants import GrantError
from backendd.guest import GuestGrantTable
from backendd.guest.blkfront import BlkFront
from backendd.guest.machine import SimGuest
from backendd.guest.vmm import VmmClient
from rings.consts import GTF_READING, GTF_WRITING, XenbusState

PAGE = 4096
MiB = 1 << 20
DEVID = 51712
IN_USE = GTF_READING | GTF_WRITING


# --- the cache ------------------------------------------------------------------------

@pytest.fixture
def guest():
    with guest_ram_and_table(64) as pair:
        yield pair


@pytest.fixture
def table(guest):
    with backend_grant_table(*guest) as t:
        yield t


def flags(gt: GuestGrantTable, gref: int) -> int:
    return gt.entry(gref)[0] & IN_USE


def test_a_cached_grant_stays_pinned_between_uses_until_close(guest, table):
    ram, gt = guest
    gfn = ram.alloc_page()
    gref = gt.grant_access(gfn)
    cache = PersistentGrants(table, limit=4)
    use = cache.acquire(gref, True)
    use.page_view(0, 5)[:] = b"hello"
    use.release()
    use.release()  # idempotent
    assert ram.read(gfn * PAGE, 5) == b"hello"
    # Released by the request, still pinned by the cache: the frontend cannot revoke it.
    assert flags(gt, gref) == IN_USE
    assert not gt.end_access(gref)
    with cache.acquire(gref, False) as again:  # a read-only use of a writable pin: a hit
        assert bytes(again.page_view(0, 5)) == b"hello"
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)
    cache.close()
    assert flags(gt, gref) == 0
    assert gt.end_access(gref)


def test_read_only_pin_is_upgraded_when_idle_and_bypassed_when_busy(guest, table):
    ram, gt = guest
    gref = gt.grant_access(ram.alloc_page())
    cache = PersistentGrants(table, limit=4)
    ro = cache.acquire(gref, False)
    assert flags(gt, gref) == GTF_READING
    rw = cache.acquire(gref, True)  # in use read-only: an uncached writable pin
    assert cache.overflow == 1 and flags(gt, gref) == IN_USE
    rw.release()
    assert flags(gt, gref) == GTF_READING
    ro.release()
    up = cache.acquire(gref, True)  # idle: upgraded in place
    assert cache.upgrades == 1 and flags(gt, gref) == IN_USE and up.writable
    up.release()
    cache.close()
    assert flags(gt, gref) == 0


def test_a_read_only_grant_is_refused_for_writing_and_stays_cached(guest, table):
    ram, gt = guest
    gref = gt.grant_access(ram.alloc_page(), readonly=True)
    cache = PersistentGrants(table, limit=4)
    cache.acquire(gref, False).release()
    with pytest.raises(GrantError, match="readonly"):
        cache.acquire(gref, True)
    assert cache.cached(gref) and flags(gt, gref) == GTF_READING
    cache.close()
    assert flags(gt, gref) == 0


def test_full_cache_purges_the_least_recently_released_and_overflows_when_all_busy(
        guest, table):
    ram, gt = guest
    grefs = [gt.grant_access(ram.alloc_page()) for _ in range(6)]
    cache = PersistentGrants(table, limit=3)
    for g in grefs[:3]:
        cache.acquire(g, True).release()
    cache.acquire(grefs[0], True).release()  # 0 is now the most recently released
    cache.acquire(grefs[3], True).release()  # full: 1, the least recent, is purged
    assert not cache.cached(grefs[1]) and flags(gt, grefs[1]) == 0
    assert cache.cached(grefs[0]) and cache.purged == 1
    busy = [cache.acquire(g, True) for g in (grefs[0], grefs[2], grefs[3])]
    extra = cache.acquire(grefs[4], True)  # all three in use: not cached
    assert cache.overflow == 1 and not cache.cached(grefs[4])
    assert flags(gt, grefs[4]) == IN_USE
    extra.release()
    assert flags(gt, grefs[4]) == 0
    # Closed while in use: each pin goes when its use ends.
    cache.close()
    assert all(flags(gt, grefs[i]) == IN_USE for i in (0, 2, 3))
    for u in busy:
        u.release()
    assert all(flags(gt, g) == 0 for g in grefs)
    assert len(cache) == 0


# --- both ends through the daemon -------------------------------------------------------

@pytest.fixture(params=["python", "compiled"])
def dataplane(request) -> str:
    return request.param


def grants_in_use(guest: SimGuest) -> list[int]:
    gt = guest.gnttab
    return [g for g in range(gt.entries) if gt.entry(g)[0] & IN_USE]


async def close_and_check_released(client: VmmClient, guest: SimGuest, front: BlkFront
                                   ) -> None:
    """Close the device (xenbus Closed): the daemon holds no grant of the guest's after
    it, and the frontend takes back every grant it made."""
    await client.frontend_state(DEVID, XenbusState.CLOSED, {})
    assert grants_in_use(guest) == []
    front.close()
    assert front.refused_revokes == []


async def connect(client: VmmClient, guest: SimGuest, image: str, *, backend: str | None,
                  frontend: bool, dataplane: str, queues: int = 1) -> BlkFront:
    config = {"path": image, "dataplane": dataplane}
    if backend is not None:
        config["persistent"] = backend
    _, keys = await client.add_device(DEVID, "blk", config)
    front = BlkFront(guest.ram, guest.gnttab, DEVID, queues=queues, backend_keys=keys,
                     persistent=frontend)
    await hand_over(client, front)
    return front


async def hand_over(client: VmmClient, front: BlkFront) -> None:
    _, keys = await client.hand_over_channels(DEVID, XenbusState.CONNECTED,
                                              front.frontend_keys(), front.channels())
    front.update_backend_keys(keys)
    front.start()


async def verified_io(front: BlkFront, image_size: int, seed: int, rounds: int = 30,
                      sizes=(4096, 12288, 65536, 262144)) -> None:
    rng = random.Random(seed)
    model: dict[int, bytes] = {}
    for _ in range(rounds):
        n = rng.choice(sizes)
        sector = rng.randrange(0, (image_size - n) // 512)
        data = rng.randbytes(n)
        await front.write(sector, data)
        model[sector] = data
        assert await front.read(sector, n) == data


@pytest.mark.parametrize(("backend", "frontend"), [(None, True), ("1", True), ("0", True),
                                                   ("1", False), ("0", False)])
async def test_negotiation_matrix(vm, tmp_path, backend, frontend, dataplane):
    client, guest = vm
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * MiB))
    front = await connect(client, guest, str(image), backend=backend, frontend=frontend,
                          dataplane=dataplane)
    advertised = backend != "0"  # on unless the device says 0
    assert front.backend_keys["feature-persistent"] == str(int(advertised))
    both = advertised and frontend
    assert front.use_persistent == both
    await verified_io(front, 4 * MiB, seed=1)
    stats = {k.split(".", 1)[1]: int(v) for k, v in (await client.stats(DEVID)).items()}
    assert stats["persistent"] == int(both)
    assert stats["compiled"] == int(dataplane == "compiled")
    if both:
        # The frontend's pool comes back request after request: hits, nothing revoked.
        assert stats["pgrant_hits"] > 0 and stats["pgrants"] == front.pool_size > 0
        assert stats["pgrant_overflow"] == 0
    else:
        assert stats["pgrant_hits"] == stats["pgrants"] == front.pool_size == 0
    # Connected: only the ring pages and, with persistent grants, the pool are pinned.
    ring_refs = {g for q in front.queues for g in q.grefs}
    pool_refs = {g for q in front.queues for g, _ in q.pool}
    assert set(grants_in_use(guest)) == ring_refs | pool_refs
    # Disconnect releases every pin: every flag clear, every revoke accepted.
    await close_and_check_released(client, guest, front)


async def test_a_frontend_beyond_the_bound_still_works(vm, tmp_path, dataplane):
    client, guest = vm
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * MiB))
    front = await connect(client, guest, str(image), backend="1", frontend=True,
                          dataplane=dataplane)
    rng = random.Random(5)

    async def worker(w: int) -> None:
        for _ in range(6):
            data = rng.randbytes(MiB)
            sector = w * (MiB // 512)
            await front.write(sector, data)
            assert await front.read(sector, MiB) == data

    # 8 MiB in flight: 8 x (256 data + 1 indirect page) pool grants on one ring.
    await asyncio.gather(*(worker(w) for w in range(8)))
    stats = {k.split(".", 1)[1]: int(v) for k, v in (await client.stats(DEVID)).items()}
    assert stats["compiled"] == int(dataplane == "compiled")
    assert front.pool_size > 1056
    assert stats["pgrants"] <= 1056
    assert stats["pgrant_purged"] + stats["pgrant_overflow"] > 0
    assert stats["pgrant_hits"] > 0
    through_guest = [await front.read(w * (MiB // 512), MiB) for w in range(8)]
    assert image.read_bytes() == b"".join(through_guest)
    await close_and_check_released(client, guest, front)


async def test_reconnect_and_remove_release_the_cache(vm, tmp_path, dataplane):
    client, guest = vm
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * MiB))
    front = await connect(client, guest, str(image), backend="1", frontend=True,
                          dataplane=dataplane, queues=2)
    await verified_io(front, 4 * MiB, seed=2)
    # A cached grant is still in use: the frontend cannot take it back while connected.
    gref, _ = front.queues[0].pool[0]
    assert not guest.gnttab.end_access(gref)
    keys = dict(front.backend_keys)
    await close_and_check_released(client, guest, front)
    # The driver comes back, this time without persistent grants, then with them again.
    for persistent in (False, True):
        state, _ = await client.frontend_state(DEVID, XenbusState.INITIALISING, {})
        assert state == XenbusState.INIT_WAIT
        front = BlkFront(guest.ram, guest.gnttab, DEVID, queues=2, backend_keys=keys,
                         persistent=persistent)
        await hand_over(client, front)
        await verified_io(front, 4 * MiB, seed=3)
        stats = await client.stats(DEVID)
        assert stats[f"{DEVID}.persistent"] == str(int(persistent))
        if persistent:
            break
        await client.frontend_state(DEVID, XenbusState.CLOSED, {})
        front.close()
    # Removing the device (and closing the connection) releases them too.
    await client.remove_device(DEVID)
    assert grants_in_use(guest) == []
    front.close()
    assert front.refused_revokes == []
    assert os.path.exists(image)
