"""Multicast control and the transmit rate limit, through the real device and tap."""

from __future__ import annotations

import asyncio

import pytest
from test_net_harness import inject, make_guest, namespaces, plug, uniq

# Taps, bridges and namespaces need root: without it these tests fail, never skip.
pytestmark = pytest.mark.usefixtures("root")

ETHERTYPE = b"\x88\xb5"  # local experimental: no stack consumes or answers these
SRC = bytes.fromhex("020000000099")
GUEST_MAC = bytes.fromhex("00163e000042")
MCAST = bytes.fromhex("01005e010203")


def eth(dst: bytes, tag: bytes) -> bytes:
    return dst + SRC + ETHERTYPE + tag.ljust(46, b"\0")


async def receive_until(front, tag: bytes) -> list[bytes]:
    """Frames of our ethertype received up to and including the one tagged `tag`."""
    got: list[bytes] = []
    while True:
        ((_, data, _),) = await front.wait_rx(1)
        if data[12:14] != ETHERTYPE:
            continue
        got.append(data)
        if data[14:14 + len(tag)] == tag:
            return got


async def test_multicast_filter():
    host = uniq("nbh")
    with namespaces(host):
        guest = make_guest()
        try:
            tap = uniq("bv") + "f"
            dev, front = await plug(guest, 6, {"tap": tap, "netns": host, "queues": "1"},
                                    multicast_control=True)
            await inject(host, tap, [eth(MCAST, b"m-before"), eth(b"\xff" * 6, b"bcast"),
                                     eth(GUEST_MAC, b"mark1")])
            got = await receive_until(front, b"mark1")
            assert [g[14:19] for g in got] == [b"bcast", b"mark1"]
            assert dev.stats()["rx_mcast_filtered"] == 1

            front.mcast(MCAST, add=True)
            await front.wait_tx_done()
            await inject(host, tap, [eth(MCAST, b"m-after"), eth(GUEST_MAC, b"mark2")])
            got = await receive_until(front, b"mark2")
            assert [g[:6] for g in got] == [MCAST, GUEST_MAC]

            front.mcast(MCAST, add=False)
            await front.wait_tx_done()
            await inject(host, tap, [eth(MCAST, b"m-del"), eth(GUEST_MAC, b"mark3")])
            got = await receive_until(front, b"mark3")
            assert [g[:6] for g in got] == [GUEST_MAC]

            # Netback keeps at most 64 addresses: the 65th add is answered ERROR.
            for i in range(64):
                front.mcast(bytes([1, 0, 0x5E, 0, 1, i]), add=True)
                await front.wait_tx_done()
            assert front.counters.get("tx_errors", 0) == 0
            front.mcast(bytes([1, 0, 0x5E, 0, 2, 0]), add=True)
            await front.wait_tx_done()
            assert front.counters["tx_errors"] == 1
        finally:
            await guest.close()


async def test_without_multicast_control_everything_passes():
    host = uniq("nbh")
    with namespaces(host):
        guest = make_guest()
        try:
            tap = uniq("bv") + "g"
            dev, front = await plug(guest, 7, {"tap": tap, "netns": host, "queues": "1"})
            await inject(host, tap, [eth(MCAST, b"m"), eth(GUEST_MAC, b"mark")])
            got = await receive_until(front, b"mark")
            assert [g[:6] for g in got] == [MCAST, GUEST_MAC]
            assert not dev.stats().get("rx_mcast_filtered")
        finally:
            await guest.close()


async def test_rate_limit_holds_tx_to_the_credit():
    """Never more sent than the credit earned by then, on the device's own clock: one
    window's credit up front, one per window since. A bound that holds however slow the
    machine is; the rate actually reached is a figure for `python -m bench.net`."""
    host = uniq("nbh")
    credit, usec = 10_000, 10_000  # 1 MB/s in 10 ms windows
    window = usec / 1e6
    total, size = 300_000, 1000
    with namespaces(host):
        guest = make_guest()
        try:
            dev, front = await plug(guest, 8, {"tap": uniq("bv") + "h", "netns": host,
                                               "queues": "1", "rate": f"{credit},{usec}"})
            loop = asyncio.get_running_loop()
            start = loop.time()
            samples: list[tuple[float, int]] = []
            for _ in range(total // size):
                await front.send_frame(eth(b"\xff" * 6, b"r").ljust(size, b"\0"))
                samples.append((loop.time() - start, dev.stats().get("tx_bytes", 0)))
            await front.wait_tx_done(timeout=30)
            samples.append((loop.time() - start, dev.stats()["tx_bytes"]))
            assert dev.stats()["tx_bytes"] == total
            # 300 kB through 10 kB windows: the credit ran out and tx waited for it.
            assert dev.stats()["tx_rate_limited"] > 0
            for t, sent in samples:
                assert sent <= credit * 2 + credit * t / window, (t, sent)
        finally:
            await guest.close()


class _Policy:
    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed

    def bridge_allowed(self, name: str) -> bool:
        return name in self.allowed


async def test_bridge_attach_and_policy():
    import json
    import subprocess

    from backendd.devices.net import NetDevice
    from backendd.errors import ConfigError

    bridge, tap = uniq("bnbr"), uniq("bv") + "j"
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    guest = make_guest()
    try:
        guest.ctx.extras["config"] = _Policy({bridge})
        dev = NetDevice(9, {"tap": tap, "bridge": bridge}, guest.ctx)
        guest.devices.append(dev)
        link = json.loads(subprocess.run(["ip", "-j", "link", "show", tap], check=True,
                                         capture_output=True).stdout)[0]
        assert link["master"] == bridge
        with pytest.raises(ConfigError, match="not allowed"):
            NetDevice(10, {"tap": tap + "x", "bridge": "br-other"}, guest.ctx)
        with pytest.raises(ConfigError, match="no such bridge"):
            guest.ctx.extras["config"] = _Policy({"lo"})
            NetDevice(11, {"tap": tap + "y", "bridge": "lo"}, guest.ctx)
        # The refused devices left no tap behind.
        shown = subprocess.run(["ip", "link", "show", tap + "y"], capture_output=True)
        assert shown.returncode != 0
    finally:
        await guest.close()
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
