"""Guest errors on a nic leave warning lines in the daemon's log (visible at the default
level, info), at most [daemon] guest_log_burst of them per guest, device and kind."""

from __future__ import annotations

import pytest
from test_net_harness import daemon_guest, namespaces, uniq, until

from backendd.guest.netfront import NetFront
from rings.consts import NetifRsp, XenbusState
from rings.netif import TX_REQUEST

# Taps, bridges and namespaces need root: without it these tests fail, never skip.
pytestmark = pytest.mark.usefixtures("root")


async def test_tx_errors_are_logged_within_the_limit(daemon):
    host = uniq("glh")
    with namespaces(host):
        async with daemon_guest(daemon.path) as (client, guest, fronts):
            await client.add_device(0, "net", {"tap": uniq("gl") + "t", "netns": host,
                                               "queues": "1"})
            front = NetFront(guest.ram, guest.gnttab, 0)
            fronts.append(front)
            await client.hand_over_channels(0, XenbusState.CONNECTED,
                                            front.frontend_keys(), front.channels())
            front.start()
            # 30 packets whose grant is past the table, then 30 whose first slot is
            # shorter than an Ethernet header: each answered ERROR.
            bad_gref = [TX_REQUEST.pack(1 << 30, 0, 0, i, 60) for i in range(30)]
            short = [TX_REQUEST.pack(front.tx_page(0)[1], 0, 0, 30 + i, 10)
                     for i in range(30)]
            front.put_tx_raw(bad_gref + short)
            await until(lambda: len(front.raw_tx_responses) == 60)
            assert {status for _, status in front.raw_tx_responses} == {NetifRsp.ERROR}
            stats = await client.stats(0)
            assert stats["0.tx_errors"] == "60" and stats["0.fatal"] == "0"
    lines = [line for line in daemon.log_lines() if "event=guest_error" in line]
    assert lines and all(line.startswith("<4>level=warning") for line in lines)
    assert all("kind=tx_error" in line and "devid=0" in line for line in lines)
    # One kind for both causes, limited to the burst of 10 per minute.
    assert len(lines) == 10
    assert "beyond the grant table" in lines[0]
