"""The net backend end to end, in-process: the kernel's TCP/IP stack in a "host"
namespace on the daemon's tap, and in a "guest" namespace on the simulated netfront's
tap, the rings between them."""

from __future__ import annotations

import pytest
from test_net_harness import addr, make_guest, namespaces, plug, run, tcp_transfer, uniq

# Taps, bridges and namespaces need root: without it these tests fail, never skip.
pytestmark = pytest.mark.usefixtures("root")


async def test_ping_both_ways():
    host, gns = uniq("nbh"), uniq("nbg")
    with namespaces(host, gns):
        guest = make_guest()
        try:
            tap = uniq("bv") + "a"
            dev, front = await plug(guest, 0, {"tap": tap, "netns": host})
            gtap = uniq("bg") + "a"
            await front.attach_tap(gtap, netns=gns, mac="00:16:3e:00:00:10")
            await addr(host, tap, "10.77.0.1/24")
            await addr(gns, gtap, "10.77.0.2/24")
            await run("ping", "-c", "3", "-i", "0.2", "-W", "2", "10.77.0.1", ns=gns)
            await run("ping", "-c", "3", "-i", "0.2", "-W", "2", "10.77.0.2", ns=host)
            stats = dev.stats()
            assert stats["tx_packets"] >= 6 and stats["rx_packets"] >= 6
            assert not guest.notices.misbehaved
            assert not front.busy_after_response
        finally:
            await guest.close()


async def test_tcp_both_ways_jumbo_and_gso():
    host, gns = uniq("nbh"), uniq("nbg")
    with namespaces(host, gns):
        guest = make_guest()
        try:
            tap, gtap = uniq("bv") + "b", uniq("bg") + "b"
            dev, front = await plug(guest, 1, {"tap": tap, "netns": host, "mtu": "9000",
                                                "queues": "2"}, queues=2)
            await front.attach_tap(gtap, netns=gns)
            await addr(host, tap, "10.77.1.1/24", mtu=9000)
            await addr(gns, gtap, "10.77.1.2/24", mtu=9000)
            # A 9000-byte frame that must not be fragmented crosses in both directions.
            await run("ping", "-c", "2", "-i", "0.2", "-W", "2", "-M", "do", "-s", "8972",
                      "10.77.1.1", ns=gns)
            await run("ping", "-c", "2", "-i", "0.2", "-W", "2", "-M", "do", "-s", "8972",
                      "10.77.1.2", ns=host)
            n = 8 << 20
            sent, received = await tcp_transfer(gns, host, "10.77.1.1", n, seed=3)
            assert sent == received and sent.startswith(f"{n} ")
            sent, received = await tcp_transfer(host, gns, "10.77.1.2", n, seed=4)
            assert sent == received and sent.startswith(f"{n} ")
            stats = dev.stats()
            # TSO on both sides: super-frames crossed as GSO in both directions.
            assert stats["tx_gso"] > 0 and stats["rx_gso"] > 0
            assert front.counters["tx_gso"] > 0 and front.counters["rx_gso"] > 0
            assert stats["queues"] == 2
            assert not guest.notices.misbehaved
            assert not front.busy_after_response
            assert front.counters.get("tx_errors", 0) == 0
        finally:
            await guest.close()
