"""A shared ring is a whole page: a ring page granted as a v2 sub-page is the guest's
error, answered EINVAL with a message at connect, for blk and for net, through the real
daemon; it is never an internal error, and the grant is left as it was."""

from __future__ import annotations

import errno
import os

import pytest
from test_net_harness import uniq

from backendd.guest import RequestFailed, SimGuest, VmmClient
from backendd.guest.blkfront import BlkFront
from backendd.guest.netfront import NetFront
from rings.consts import GTF_READING, GTF_SUB_PAGE, GTF_WRITING, GrantType, XenbusState

SUB_PAGES = [(0, 32), (0, 0), (64, 4032)]


def make_sub_page(guest: SimGuest, gref: int, window: tuple[int, int]) -> None:
    _, domid, frame = guest.gnttab.entry(gref)
    guest.gnttab.set_entry(gref, GrantType.PERMIT_ACCESS | GTF_SUB_PAGE, domid, frame,
                           window)


def make_whole(guest: SimGuest, gref: int) -> None:
    _, domid, frame = guest.gnttab.entry(gref)
    guest.gnttab.set_entry(gref, GrantType.PERMIT_ACCESS, domid, frame)


def close_front(front: BlkFront | NetFront) -> None:
    """Close the front and the daemon's ends of its event channels (frontend_state with
    them was refused, or the daemon holds its own copies)."""
    for _, kick, call in front.channels():
        os.close(kick)
        os.close(call)
    front.close()


async def refused(client: VmmClient, devid: int, keys: dict[str, str],
                  channels: list[tuple[int, int, int]]) -> RequestFailed:
    with pytest.raises(RequestFailed) as info:
        await client.frontend_state(devid, XenbusState.CONNECTED, keys, channels)
    return info.value


async def test_blk_ring_as_sub_page_is_einval(daemon, v2_vm, tmp_path):
    client, guest = v2_vm
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    await client.add_device(51712, "blk", {"path": str(image)})
    front = BlkFront(guest.ram, guest.gnttab, 51712, ring_order=1)
    try:
        channels = front.channels()
        for n in range(2):  # either page of a two-page ring
            for window in SUB_PAGES:
                make_sub_page(guest, front.queues[0].grefs[n], window)
                err = await refused(client, 51712, front.frontend_keys(), channels)
                assert err.code == errno.EINVAL, err
                assert "whole page" in err.message and f"ring page {n}" in err.message
                assert guest.gnttab.status(front.queues[0].grefs[n]) & \
                    (GTF_READING | GTF_WRITING) == 0
            make_whole(guest, front.queues[0].grefs[n])
        state, _ = await client.frontend_state(51712, XenbusState.CONNECTED,
                                               front.frontend_keys(), channels)
        assert state == XenbusState.CONNECTED
        front.start()
        await front.write(0, b"x" * 4096)
        assert await front.read(0, 4096) == b"x" * 4096
    finally:
        close_front(front)
    assert not any("request_crashed" in line for line in daemon.log_lines())


async def test_net_ring_as_sub_page_is_einval(root, daemon, v2_vm):
    client, guest = v2_vm
    await client.add_device(0, "net", {"tap": uniq("rp") + "n", "queues": "1"})
    front = NetFront(guest.ram, guest.gnttab, 0)
    try:
        channels = front.channels()
        q = front.queues[0]
        for gref, ring in ((q.tx_gref, "tx ring"), (q.rx_gref, "rx ring")):
            for window in SUB_PAGES:
                make_sub_page(guest, gref, window)
                err = await refused(client, 0, front.frontend_keys(), channels)
                assert err.code == errno.EINVAL, err
                assert "whole page" in err.message and ring in err.message
                for g in (q.tx_gref, q.rx_gref):
                    assert guest.gnttab.status(g) & (GTF_READING | GTF_WRITING) == 0
            make_whole(guest, gref)
        state, _ = await client.frontend_state(0, XenbusState.CONNECTED,
                                               front.frontend_keys(), channels)
        assert state == XenbusState.CONNECTED
    finally:
        close_front(front)
    assert not any("request_crashed" in line for line in daemon.log_lines())
