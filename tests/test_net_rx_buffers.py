"""Unusable rx buffers through the real daemon: a posted request whose grant cannot be
used fails alone, in its turn, and every other buffer is used as usual; rx buffers
granted as v2 sub-pages are guest errors answered on the ring and logged within the
per-guest limit, never an exception escaping the tap's reader; and the documented
recovery of a vif halted by a fatal error."""

from __future__ import annotations

import asyncio
import logging

import pytest
from test_net_harness import daemon_guest, inject, namespaces, uniq, until

from backendd.guest import SimGuest, VmmClient
from backendd.guest.netfront import NetFront
from backendd.protocol.messages import FrontendMisbehaved
from rings.consts import NetTxFlags, XenbusState
from rings.netif import TX_REQUEST

# Taps, bridges and namespaces need root: without it these tests fail, never skip.
pytestmark = pytest.mark.usefixtures("root")

BEYOND_TABLE = 1 << 30  # a gref far past any grant table here


def frame(n: int, tag: int) -> bytes:
    """A broadcast frame of n bytes (an experimental ethertype, so no stack answers)."""
    return b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + \
        bytes([tag & 0xFF]) * (n - 14)


async def plug(client: VmmClient, guest: SimGuest, devid: int, config: dict[str, str],
               **front_kwargs: object) -> NetFront:
    await client.add_device(devid, "net", config)
    front = NetFront(guest.ram, guest.gnttab, devid, first_port=1 + 8 * devid,
                     **front_kwargs)  # type: ignore[arg-type]
    return front


async def connect(client: VmmClient, front: NetFront) -> None:
    state, _ = await client.hand_over_channels(front.devid, XenbusState.CONNECTED,
                                               front.frontend_keys(), front.channels())
    assert state == XenbusState.CONNECTED
    front.start()


async def test_one_bad_rx_buffer_fails_alone(daemon):
    host = uniq("rbh")
    tap = uniq("rb") + "a"
    with namespaces(host):
        async with daemon_guest(daemon.path) as (client, guest, fronts):
            # A GSO frontend: the daemon waits for 18 posted buffers (a 64 KiB frame and
            # its extra-info slot) before it reads; the 18th has a gref past the table.
            front = await plug(client, guest, 0, {"tap": tap, "netns": host,
                                                  "queues": "1"})
            fronts.append(front)
            front.rx_bad_grefs[17] = BEYOND_TABLE
            await connect(client, front)
            frames = [frame(60 + i, i) for i in range(20)]
            await inject(host, tap, frames)
            got = await front.wait_rx(20)
            assert [data for _, data, _ in got] == frames
            await until(lambda: front.counters.get("rx_errors"))
            # Only that request failed, in its turn; its 17 neighbours carried frames.
            assert front.rx_error_ids == [17]
            assert front.counters["rx_errors"] == 1
            stats = await client.stats(0)
            assert stats["0.rx_bad_grant"] == "1"
            assert stats["0.rx_packets"] == "20"
            assert stats["0.rx_dropped"] == "0"
            assert not front.busy_after_response
            assert any("event=guest_error" in line and "kind=rx_bad_grant" in line
                       and "beyond the grant table" in line for line in daemon.log_lines())


async def test_a_frame_reaching_a_bad_buffer_is_the_only_loss(daemon):
    host = uniq("rbh")
    tap = uniq("rb") + "b"
    with namespaces(host):
        async with daemon_guest(daemon.path) as (client, guest, fronts):
            front = await plug(client, guest, 1, {"tap": tap, "netns": host,
                                                  "queues": "1", "mtu": "9000"})
            fronts.append(front)
            front.rx_bad_grefs[1] = BEYOND_TABLE
            await connect(client, front)
            # A 9000-byte frame takes slots 0-2, slot 1 among them: that frame is lost
            # (slot 1 answered ERROR, slots 0 and 2 as usual); the next one arrives.
            await inject(host, tap, [frame(9000, 1), frame(9000, 2)])
            got = await front.wait_rx(1)
            assert got[0][1] == frame(9000, 2)
            assert front.rx_error_ids == [1]
            assert front.counters["rx_errors"] == 1
            stats = await client.stats(1)
            assert stats["1.rx_bad_grant"] == "1"
            assert stats["1.rx_dropped"] == "1"
            assert stats["1.rx_packets"] == "1"
            assert not front.busy_after_response


async def test_sub_page_rx_buffers_are_guest_errors(daemon, caplog):
    host = uniq("rbh")
    tap = uniq("rb") + "c"
    caplog.set_level(logging.ERROR)
    with namespaces(host):
        async with daemon_guest(daemon.path, gnttab_version=2) as (client, guest, fronts):
            front = await plug(client, guest, 2, {"tap": tap, "netns": host,
                                                  "queues": "1"}, rx_sub_page=(0, 2048))
            fronts.append(front)
            await connect(client, front)
            await inject(host, tap, [frame(60, i) for i in range(5)])
            # Every buffer is answered ERROR by itself; the frontend posts again and
            # gets the same answer (its own doing), the daemon carries on.
            await until(lambda: front.counters.get("rx_errors", 0) >= 600)
            stats = await client.stats(2)
            assert int(stats["2.rx_bad_grant"]) >= 600
            assert stats["2.rx_packets"] == "0" and stats["2.fatal"] == "0"
            assert not front.received
    # No exception escaped a callback, and the log holds at most a burst of lines.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    lines = [line for line in daemon.log_lines() if "kind=rx_bad_grant" in line]
    assert 1 <= len(lines) <= 10
    assert "whole page" in lines[0] and "sub-page 0..2048" in lines[0]


async def test_recovery_after_a_fatal_error(daemon):
    """The documented sequence: FRONTEND_MISBEHAVED, then Closing, Closed, Initialising
    and Connected with fresh rings; the nic serves again and its counters carry on."""
    host = uniq("rbh")
    tap = uniq("rb") + "d"
    with namespaces(host):
        async with daemon_guest(daemon.path) as (client, guest, fronts):
            front = await plug(client, guest, 3, {"tap": tap, "netns": host,
                                                  "queues": "1"})
            fronts.append(front)
            await connect(client, front)
            gref = front.tx_page(0)[1]
            # A data slot crossing its page: fatal.
            front.put_tx_raw([TX_REQUEST.pack(gref, 0, NetTxFlags.MORE_DATA, 1, 2000),
                              TX_REQUEST.pack(gref, 3500, 0, 2, 1000)])
            notice = await asyncio.wait_for(client.notices.get(), 5)
            assert isinstance(notice, FrontendMisbehaved) and notice.devid == 3
            for state in (XenbusState.CLOSING, XenbusState.CLOSED):
                got, _ = await client.frontend_state(3, state, {})
                assert got == state
            got, _ = await client.frontend_state(3, XenbusState.INITIALISING, {})
            assert got == XenbusState.INIT_WAIT
            front.close()
            front = NetFront(guest.ram, guest.gnttab, 3, first_port=100)
            fronts.append(front)
            await connect(client, front)
            await inject(host, tap, [frame(60, 7)])
            got_frames = await front.wait_rx(1)
            assert got_frames[0][1] == frame(60, 7)
            stats = await client.stats(3)
            assert stats["3.fatal"] == "1" and stats["3.tx_fatal"] == "1"
            assert stats["3.rx_packets"] == "1"
