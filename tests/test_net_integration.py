"""The net backend through the real daemon: control socket, memory and grant table handed
over by a VMM client, xenbus states, then ping and TCP between the host namespace (the
daemon's tap) and the guest namespace (the simulated netfront's tap)."""

from __future__ import annotations

import pytest
from test_net_harness import addr, daemon_guest, namespaces, run, tcp_transfer, uniq

from backendd.guest import RequestFailed, VmmClient
from backendd.guest.netfront import NetFront
from rings.consts import XenbusState

# Taps, bridges and namespaces need root: without it these tests fail, never skip.
pytestmark = pytest.mark.usefixtures("root")


async def test_ping_and_tcp_through_the_daemon(daemon):
    host, gns = uniq("nih"), uniq("nig")
    tap, gtap = uniq("bv") + "i", uniq("bg") + "i"
    with namespaces(host, gns):
        async with daemon_guest(daemon.path) as (client, guest, fronts):
            state, keys = await client.add_device(0, "net", {"tap": tap, "netns": host,
                                                           "mac": "00:16:3e:00:00:33"})
            assert state == XenbusState.INIT_WAIT
            assert keys["feature-sg"] == "1" and keys["feature-rx-copy"] == "1"
            assert keys["mac"] == "00:16:3e:00:00:33"
            front = NetFront(guest.ram, guest.gnttab, 0, split=True)
            fronts.append(front)
            state, _ = await client.hand_over_channels(0, XenbusState.CONNECTED,
                                                       front.frontend_keys(), front.channels())
            assert state == XenbusState.CONNECTED
            front.start()
            await front.attach_tap(gtap, netns=gns, mac=keys["mac"])
            await addr(host, tap, "10.77.9.1/24")
            await addr(gns, gtap, "10.77.9.2/24")
            await run("ping", "-c", "3", "-i", "0.2", "-W", "2", "10.77.9.1", ns=gns)
            sent, received = await tcp_transfer(gns, host, "10.77.9.1", 4 << 20)
            assert sent == received
            sent, received = await tcp_transfer(host, gns, "10.77.9.2", 4 << 20, seed=2)
            assert sent == received
            stats = await client.stats(0)
            assert int(stats["0.tx_packets"]) > 0 and int(stats["0.rx_packets"]) > 0
            assert int(stats["0.tx_gso"]) > 0
            state, _ = await client.frontend_state(0, XenbusState.CLOSED, {})
            assert state == XenbusState.CLOSED
            await client.remove_device(0)
            assert not front.busy_after_response


async def test_bad_config_refused(daemon):
    client = await VmmClient.connect(daemon.path)
    try:
        for config, word in [({"colour": "red"}, "colour"),
                             ({"tap": "a/b"}, "interface name"),
                             ({"tap": "x" * 16}, "interface name"),
                             ({"tap": "has space"}, "interface name"),
                             ({"rate": "fast"}, "rate"),
                             ({"mac": "zz"}, "mac"),
                             ({"netns": "no-such-ns-here"}, "netns")]:
            with pytest.raises(RequestFailed) as info:
                await client.add_device(1, "net", config)
            assert word in info.value.message
    finally:
        await client.close()
