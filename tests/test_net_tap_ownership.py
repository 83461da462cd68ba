"""A tap belongs to one device of one connection: through the real daemon, a second
connection naming another connection's tap is refused and changes nothing; an existing
tap is attached to only when the daemon's configuration allows it, and never when anyone
else holds a queue of it."""

from __future__ import annotations

import errno
import io
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_net_harness import uniq

from backendd.config import Config, DaemonSection, NetworkSection
from backendd.devices.net.tap import close_fds, open_tap, run_netlink_async, tap_queue_count
from backendd.guest import RequestFailed, VmmClient
from backendd.log import EventLog
from backendd.server import Server

# Taps, bridges and namespaces need root: without it these tests fail, never skip.
pytestmark = pytest.mark.usefixtures("root")


def mtu(name: str) -> int:
    return int(Path(f"/sys/class/net/{name}/mtu").read_text())


def _queues_open(name: str) -> int | None:
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        return tap_queue_count(ip, ip.link_lookup(ifname=name)[0])


async def queues_open(name: str) -> int | None:
    """The kernel's count of open queues of tap `name` (pyroute2 off the loop)."""
    return await run_netlink_async(_queues_open, name)


def exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def persistent_tap(name: str) -> None:
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap", "multi_queue",
                    "vnet_hdr"], check=True)


def delete_link(name: str) -> None:
    subprocess.run(["ip", "link", "del", name], capture_output=True)


@pytest.fixture
async def attach_daemon(tmp_path: Path) -> AsyncIterator[str]:
    """A daemon whose configuration allows attaching to existing taps."""
    path = str(tmp_path / "backendd.sock")
    config = Config(daemon=DaemonSection(socket=path, log_level="debug"),
                    network=NetworkSection(attach_existing_taps=True))
    server = Server(config, EventLog("debug", io.StringIO()))
    await server.start()
    try:
        yield path
    finally:
        await server.close()


async def test_a_connection_cannot_take_another_connections_tap(daemon):
    tap = uniq("own") + "a"
    a = await VmmClient.connect(daemon.path)
    b = await VmmClient.connect(daemon.path)
    try:
        await a.add_device(0, "net", {"tap": tap, "queues": "2"})
        assert await queues_open(tap) == 2 and mtu(tap) == 1500
        for client, devid in ((b, 0), (a, 1)):  # another connection, or another device
            with pytest.raises(RequestFailed) as info:
                await client.add_device(devid, "net", {"tap": tap, "queues": "2",
                                                       "mtu": "9000"})
            assert info.value.code == errno.EBUSY
            assert "exists" in info.value.message
        # Nothing of the owner's tap changed: no queue was added, the MTU is its own.
        assert await queues_open(tap) == 2 and mtu(tap) == 1500
        # The refused device did not come into being; the owner's still works.
        await b.add_device(0, "net", {"tap": uniq("own") + "b", "queues": "1"})
        await a.remove_device(0)
        assert not exists(tap)
    finally:
        await a.close()
        await b.close()


async def test_existing_taps_are_refused_without_the_opt_in(daemon):
    tap = uniq("own") + "p"
    persistent_tap(tap)
    client = await VmmClient.connect(daemon.path)
    try:
        with pytest.raises(RequestFailed) as info:
            await client.add_device(0, "net", {"tap": tap, "queues": "2"})
        assert info.value.code == errno.EBUSY
        assert "attach_existing_taps" in info.value.message
        assert await queues_open(tap) == 0
    finally:
        await client.close()
        delete_link(tap)


async def test_attaching_an_existing_tap_only_when_nobody_holds_it(attach_daemon):
    tap = uniq("own") + "q"
    persistent_tap(tap)
    a = await VmmClient.connect(attach_daemon)
    b = await VmmClient.connect(attach_daemon)
    held: list[int] = []
    try:
        await a.add_device(0, "net", {"tap": tap, "queues": "2"})
        assert await queues_open(tap) == 2
        with pytest.raises(RequestFailed) as info:
            await b.add_device(0, "net", {"tap": tap, "queues": "2", "mtu": "9000"})
        assert info.value.code == errno.EBUSY and "in use" in info.value.message
        assert await queues_open(tap) == 2 and mtu(tap) == 1500
        await a.remove_device(0)
        assert exists(tap) and await queues_open(tap) == 0  # the operator's tap stays

        # Another process holding a queue of it: refused as well.
        held.append(open_tap(tap, multi_queue=True))
        with pytest.raises(RequestFailed) as info:
            await b.add_device(0, "net", {"tap": tap, "queues": "2"})
        assert info.value.code == errno.EBUSY and "in use" in info.value.message
        assert await queues_open(tap) == 1

        # A tap the daemon created for one connection is never attachable by another.
        own = uniq("own") + "r"
        await a.add_device(1, "net", {"tap": own, "queues": "2"})
        with pytest.raises(RequestFailed) as info:
            await b.add_device(1, "net", {"tap": own, "queues": "2"})
        assert info.value.code == errno.EBUSY
        assert await queues_open(own) == 2
    finally:
        close_fds(held)
        await a.close()
        await b.close()
        delete_link(tap)
