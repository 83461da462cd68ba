"""The daemon's control socket end to end: a real unix socket, real memfds and eventfds,
the simulated guest's grant table, and a small device that echoes through a granted page.

The echo device stands in for blk/net here so these tests exercise only the core: it
maps the page named by `ring-ref`, and on each kick adds one to the u64 in it and
notifies, exactly through the interfaces real devices use."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import struct
from collections.abc import Mapping

import pytest
from procstat import mapping_count, open_fds

from backendd.devices.base import DEVICE_TYPES, Device
from backendd.evtchn import EventChannel
from backendd.grants import GrantMapping
from backendd.guest import RequestFailed, SimGuest, VmmClient, new_channel_pair, sealed_memfd
from backendd.protocol.messages import KeysChanged
from rings.consts import GTF_READING, GTF_WRITING, XenbusState

DEVID = 51712
PAGE = 4096


class EchoDevice(Device):
    type_name = "blk"
    instances: list[EchoDevice] = []

    def __init__(self, devid: int, config: Mapping[str, str], ctx) -> None:
        super().__init__(devid, config, ctx)
        self.mapping: GrantMapping | None = None
        self.channel: EventChannel | None = None
        self.echoes = 0
        self.closed = False
        EchoDevice.instances.append(self)

    def backend_keys(self) -> dict[str, str]:
        return {"feature-echo": "1"}

    async def connect(self, frontend_keys: Mapping[str, str],
                      channels: Mapping[int, EventChannel]) -> dict[str, str]:
        self.mapping = self.ctx.grants.map(int(frontend_keys["ring-ref"]), writable=True)
        self.channel = channels[int(frontend_keys["event-channel"])]
        self.channel.start(self.ctx.loop, self._kicked)
        return {"echo-ready": "1"}

    def _kicked(self) -> None:
        assert self.mapping is not None and self.channel is not None
        word = self.mapping.page_view(0, 8)
        (value,) = struct.unpack("<Q", word)
        word[:] = struct.pack("<Q", value + 1)
        self.echoes += 1
        if value == 999:
            self.ctx.notices.keys_changed(self.devid, {"echo-count": str(self.echoes)})
        self.channel.notify()

    async def disconnect(self) -> None:
        if self.mapping is not None:
            self.mapping.release()
            self.mapping = None
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    async def close(self) -> None:
        await self.disconnect()
        self.closed = True

    def stats(self) -> dict[str, int]:
        return {"echoes": self.echoes}


@pytest.fixture(autouse=True)
def echo_device(monkeypatch):
    monkeypatch.setitem(DEVICE_TYPES, "blk", EchoDevice)
    EchoDevice.instances.clear()
    yield


class Frontend:
    """The guest's side of one echo device: a granted page and an event channel."""

    def __init__(self, guest: SimGuest) -> None:
        self.guest = guest
        self.gfn = guest.ram.alloc_page()
        self.gref = guest.gnttab.grant_access(self.gfn)
        self.port, self.kick, self.call = new_channel_pair(port=7)

    def keys(self) -> dict[str, str]:
        return {"ring-ref": str(self.gref), "event-channel": str(self.port.port)}

    def channels(self) -> list[tuple[int, int, int]]:
        return [(self.port.port, self.kick, self.call)]

    def value(self) -> int:
        return struct.unpack("<Q", self.guest.ram.read(self.gfn * PAGE, 8))[0]

    async def echo(self) -> int:
        before = self.value()
        self.port.send()
        assert await self.port.notified(5.0)
        assert self.value() == before + 1
        return self.value()

    def close(self) -> None:
        self.port.close()
        for fd in (self.kick, self.call):
            with contextlib.suppress(OSError):
                os.close(fd)


async def connected(daemon) -> tuple[VmmClient, SimGuest]:
    client = await VmmClient.connect(daemon.path)
    guest = SimGuest(ram_size=1 << 20, gnttab_frames=1)
    await guest.attach(client)
    return client, guest


async def test_hello_negotiates_version_and_no_unknown_features(daemon):
    client = await VmmClient.connect(daemon.path, features=0xFF)
    assert client.version == 1
    assert client.features == 0
    await client.close()


async def test_requests_before_hello_and_a_second_hello_are_refused(daemon):
    from backendd.protocol.messages import GetStats, Hello

    client = await VmmClient.connect(daemon.path)
    with pytest.raises(RequestFailed) as exc:
        await client.request(Hello(1, 0))
    assert exc.value.code == errno.EPROTO
    await client.close()

    # A raw connection that skips HELLO.
    import socket

    from backendd.protocol.framing import encode_request
    from backendd.protocol.messages import decode_reply
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(s, daemon.path)
    await loop.sock_sendall(s, encode_request(9, GetStats(0xFFFFFFFF)))
    data = await asyncio.wait_for(loop.sock_recv(s, 4096), 5)
    reply = decode_reply(9, data[16:])
    assert reply.errno == errno.EPROTO and "before HELLO" in reply.message
    s.close()


async def test_full_lifecycle_kick_call_disconnect_reconnect(daemon):
    client, guest = await connected(daemon)
    front = Frontend(guest)
    try:
        state, keys = await client.add_device(DEVID, "blk", {})
        assert state == XenbusState.INIT_WAIT and keys == {"feature-echo": "1"}

        state, keys = await client.frontend_state(DEVID, XenbusState.INITIALISED, front.keys(),
                                                  front.channels())
        assert state == XenbusState.CONNECTED
        assert keys["echo-ready"] == "1"
        # The daemon pinned the page as Xen would: the guest cannot revoke it now.
        flags = guest.gnttab.entry(front.gref)[0]
        assert flags & GTF_READING and flags & GTF_WRITING
        assert not guest.gnttab.end_access(front.gref)

        for expected in range(1, 51):
            assert await front.echo() == expected
        counters = await client.stats()
        assert counters[f"{DEVID}.echoes"] == "50"

        state, _ = await client.frontend_state(DEVID, XenbusState.CLOSING, {})
        assert state == XenbusState.CLOSING
        state, _ = await client.frontend_state(DEVID, XenbusState.CLOSED, {})
        assert state == XenbusState.CLOSED
        flags = guest.gnttab.entry(front.gref)[0]
        assert not flags & (GTF_READING | GTF_WRITING)

        # Reconnect, as after a guest reboot: Initialising, then connect again.
        state, _ = await client.frontend_state(DEVID, XenbusState.INITIALISING, {})
        assert state == XenbusState.INIT_WAIT
        front2 = Frontend(guest)
        state, _ = await client.frontend_state(DEVID, XenbusState.CONNECTED, front2.keys(),
                                               front2.channels())
        assert state == XenbusState.CONNECTED
        assert await front2.echo() == 1
        state, keys = await client.backend_state(DEVID)
        assert state == XenbusState.CONNECTED and keys["feature-echo"] == "1"
        front2.close()
    finally:
        front.close()
        await client.close()
        guest.close()


async def test_keys_changed_notice_reaches_the_vmm(daemon):
    client, guest = await connected(daemon)
    front = Frontend(guest)
    await client.add_device(DEVID, "blk", {})
    await client.frontend_state(DEVID, XenbusState.CONNECTED, front.keys(), front.channels())
    guest.ram.write(front.gfn * PAGE, struct.pack("<Q", 999))
    await front.echo()
    notice = await asyncio.wait_for(client.notices.get(), 5)
    assert isinstance(notice, KeysChanged)
    assert notice.devid == DEVID and notice.state == XenbusState.CONNECTED
    assert notice.keys == {"echo-count": "1"}
    front.close()
    await client.close()
    guest.close()


async def test_errors_name_the_problem_and_change_nothing(daemon):
    client, guest = await connected(daemon)
    front = Frontend(guest)
    try:
        with pytest.raises(RequestFailed) as exc:
            await client.remove_device(1)
        assert exc.value.code == errno.ENOENT
        await client.add_device(DEVID, "blk", {})
        with pytest.raises(RequestFailed) as exc:
            await client.add_device(DEVID, "blk", {})
        assert exc.value.code == errno.EEXIST

        # A connect that names a grant the guest never made fails with the gref named, the
        # backend stays in InitWait and a correct connect afterwards works.
        bad = {**front.keys(), "ring-ref": "4000"}
        with pytest.raises(RequestFailed) as exc:
            await client.frontend_state(DEVID, XenbusState.CONNECTED, bad, front.channels())
        assert "gref 4000" in exc.value.message
        state, _ = await client.backend_state(DEVID)
        assert state == XenbusState.INIT_WAIT
        state, _ = await client.frontend_state(DEVID, XenbusState.CONNECTED, front.keys(),
                                               front.channels())
        assert state == XenbusState.CONNECTED

        # Overlapping memory and a region still mapped by a device.
        fd = sealed_memfd("x", PAGE)
        with pytest.raises(RequestFailed) as exc:
            await client.add_mem_region(0, PAGE, fd)
        assert exc.value.code == errno.EEXIST
        os.close(fd)
        with pytest.raises(RequestFailed) as exc:
            await client.remove_mem_region(0, 1 << 20)
        assert exc.value.code == errno.EBUSY
    finally:
        front.close()
        await client.close()
        guest.close()


async def test_vmm_disconnect_tears_everything_down(daemon):
    fds_before = open_fds()
    maps_before = mapping_count()
    client, guest = await connected(daemon)
    front = Frontend(guest)
    await client.add_device(DEVID, "blk", {})
    await client.frontend_state(DEVID, XenbusState.CONNECTED, front.keys(), front.channels())
    await front.echo()
    dev = EchoDevice.instances[-1]
    await client.close()
    for _ in range(100):
        if not daemon.server.connections:
            break
        await asyncio.sleep(0.01)
    assert not daemon.server.connections
    assert dev.closed
    # The guest got its page back: the daemon's in-use flags are gone.
    assert guest.gnttab.end_access(front.gref)
    front.close()
    guest.close()
    assert open_fds() <= fds_before
    assert mapping_count() <= maps_before


async def test_a_thousand_connect_disconnect_cycles_leave_no_fds_or_mappings(daemon):
    guest = SimGuest(ram_size=1 << 20, gnttab_frames=1)
    front = Frontend(guest)
    front.close()

    async def cycle() -> None:
        client = await VmmClient.connect(daemon.path)
        await guest.attach(client)
        await client.add_device(DEVID, "blk", {})
        port, kick, call = new_channel_pair(port=7)
        await client.frontend_state(DEVID, XenbusState.CONNECTED, front.keys(),
                                    [(7, kick, call)])
        os.close(kick)
        os.close(call)
        port.send()
        assert await port.notified(5.0)
        port.close()
        await client.close()

    async def settle() -> None:
        for _ in range(200):
            if not daemon.server.connections:
                return
            await asyncio.sleep(0.005)

    await cycle()  # first use warms lazily created resources (thread pool, caches)
    await settle()
    fds_before = open_fds()
    maps_before = mapping_count()
    for _ in range(1000):
        await cycle()
    await settle()
    assert not daemon.server.connections
    assert open_fds() == fds_before
    assert mapping_count() == maps_before
    # Every cycle echoed once through the guest's page.
    assert struct.unpack("<Q", guest.ram.read(front.gfn * PAGE, 8))[0] == 1001
    guest.close()


async def test_connections_are_isolated(daemon):
    a, guest_a = await connected(daemon)
    b, guest_b = await connected(daemon)
    fa, fb = Frontend(guest_a), Frontend(guest_b)
    await a.add_device(DEVID, "blk", {})
    await b.add_device(DEVID, "blk", {})  # same devid in another guest: no clash
    await a.frontend_state(DEVID, XenbusState.CONNECTED, fa.keys(), fa.channels())
    await b.frontend_state(DEVID, XenbusState.CONNECTED, fb.keys(), fb.channels())
    await a.close()
    assert await fb.echo() == 1
    assert await fb.echo() == 2
    assert (await b.stats())[f"{DEVID}.echoes"] == "2"
    fa.close()
    fb.close()
    await b.close()
    guest_a.close()
    guest_b.close()


async def test_grant_table_v2_through_the_socket(daemon):
    client = await VmmClient.connect(daemon.path)
    guest = SimGuest(ram_size=1 << 20, gnttab_frames=1, gnttab_version=2)
    await guest.attach(client)
    front = Frontend(guest)
    await client.add_device(DEVID, "blk", {})
    await client.frontend_state(DEVID, XenbusState.CONNECTED, front.keys(), front.channels())
    assert await front.echo() == 1
    # v2 keeps the daemon's in-use bits in the status frame.
    assert guest.gnttab.status(front.gref) == GTF_READING | GTF_WRITING
    assert guest.gnttab.entry(front.gref)[0] & (GTF_READING | GTF_WRITING) == 0
    await client.frontend_state(DEVID, XenbusState.CLOSED, {})
    assert guest.gnttab.status(front.gref) == 0
    assert guest.gnttab.end_access(front.gref)
    front.close()
    await client.close()
    guest.close()


async def test_set_inflight_is_refused_by_devices_that_cannot_replay(daemon):
    from backendd.inflight import region_size

    client, guest = await connected(daemon)
    fd = sealed_memfd("inflight", region_size(1))
    with pytest.raises(RequestFailed) as exc:
        await client.set_inflight(DEVID, fd, region_size(1))
    assert exc.value.code == errno.ENOENT
    await client.add_device(DEVID, "blk", {})
    with pytest.raises(RequestFailed) as exc:
        await client.set_inflight(DEVID, fd, region_size(1))
    assert exc.value.code == errno.EOPNOTSUPP  # the echo device keeps no table
    os.close(fd)
    await client.close()
    guest.close()
