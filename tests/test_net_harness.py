"""Shared wiring for the network tests (no tests here): one simulated guest's memory and
grant table handed to the daemon's own GuestMemory/GrantTable in-process, or attached to
the real daemon over its socket; network namespaces made and removed by the test, and
processes run inside them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from backendd.devices.base import DeviceContext, NoticeSink
from backendd.devices.net import NetDevice
from backendd.evtchn import EventChannel
from backendd.grants import GrantTable
from backendd.guest import GuestGrantTable, GuestRAM, SimGuest, VmmClient
from backendd.guest.netfront import NetFront
from backendd.memory import GuestMemory
from rings.consts import XenbusState


class RecordingNotices(NoticeSink):
    def __init__(self) -> None:
        self.misbehaved: list[tuple[int, str]] = []
        self.failed: list[tuple[int, int, str]] = []
        self.keys: list[tuple[int, dict[str, str]]] = []
        self.event = asyncio.Event()

    def device_failed(self, devid: int, code: int, message: str) -> None:
        self.failed.append((devid, code, message))

    def frontend_misbehaved(self, devid: int, message: str) -> None:
        self.misbehaved.append((devid, message))
        self.event.set()

    def keys_changed(self, devid: int, keys: Mapping[str, str]) -> None:
        self.keys.append((devid, dict(keys)))


@dataclass
class Guest:
    ram: GuestRAM
    gnttab: GuestGrantTable
    memory: GuestMemory
    grants: GrantTable
    ctx: DeviceContext
    notices: RecordingNotices
    devices: list[NetDevice] = field(default_factory=list)
    fronts: list[NetFront] = field(default_factory=list)

    async def close(self) -> None:
        for front in self.fronts:
            front.close()
        for dev in self.devices:
            await dev.close()
        self.grants.close()
        self.memory.close()
        self.gnttab.close()
        self.ram.close()


def make_guest(ram_size: int = 48 << 20, gnttab_frames: int = 16) -> Guest:
    ram = GuestRAM(ram_size)
    gnttab = GuestGrantTable(gnttab_frames)
    memory = GuestMemory()
    for gpa, size, fd, offset in ram.regions:
        memory.add_region(gpa, size, fd, offset)
    grants = GrantTable(memory)
    grants.set_table(gnttab.fd, 0, gnttab.nr_frames)
    notices = RecordingNotices()
    ctx = DeviceContext(memory, grants, asyncio.get_running_loop(), notices,
                        extras={"conn": 0})
    return Guest(ram, gnttab, memory, grants, ctx, notices)


class DaemonGuest(NamedTuple):
    client: VmmClient
    guest: SimGuest
    fronts: list[NetFront]  # closed with the guest

    async def add_nic(self, config: dict[str, str], **front_kwargs: object) -> NetFront:
        """ADD_DEVICE net device 0 with `config`, and a netfront (closed with the guest)
        connected to it and started."""
        await self.client.add_device(0, "net", config)
        front = NetFront(self.guest.ram, self.guest.gnttab, 0,
                         **front_kwargs)  # type: ignore[arg-type]
        self.fronts.append(front)
        state, _ = await self.client.hand_over_channels(0, XenbusState.CONNECTED,
                                                        front.frontend_keys(),
                                                        front.channels())
        assert state == XenbusState.CONNECTED
        front.start()
        return front


@contextlib.asynccontextmanager
async def daemon_guest(socket_path: str, gnttab_version: int = 1
                       ) -> AsyncIterator[DaemonGuest]:
    """A VMM connection to the daemon at `socket_path` and a 48 MiB guest (16 grant-table
    frames) attached to it; the netfronts the test puts in `fronts` are closed first."""
    client = await VmmClient.connect(socket_path)
    guest = SimGuest(ram_size=48 << 20, gnttab_frames=16, gnttab_version=gnttab_version)
    fronts: list[NetFront] = []
    try:
        await guest.attach(client)
        yield DaemonGuest(client, guest, fronts)
    finally:
        for front in fronts:
            front.close()
        await client.close()
        guest.close()


def uniq(tag: str) -> str:
    return f"{tag}{os.getpid() % 100000}"


def ns_add(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    subprocess.run(["ip", "netns", "add", name], check=True)
    # No IPv6 chatter (router/neighbour solicitations, MLD) on the links under test.
    for key in ("all", "default"):
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                        f"net.ipv6.conf.{key}.disable_ipv6=1"], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)


def ns_del(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextlib.contextmanager
def namespaces(*names: str):
    try:
        for n in names:
            ns_add(n)
        yield names
    finally:
        for n in names:
            ns_del(n)


async def run(*argv: str, ns: str | None = None, check: bool = True,
              timeout: float = 60.0, stdin: bytes | None = None) -> tuple[int, str]:
    """Run a process (inside `ns` via ip netns exec) without blocking the loop."""
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.PIPE if stdin is not None else None,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {proc.returncode}\n{text}")
    return proc.returncode or 0, text


async def plug(guest: Guest, devid: int, config: dict[str, str], **front_kwargs: object
               ) -> tuple[NetDevice, NetFront]:
    """Add a net device, connect a netfront to it (in-process, as the session would)."""
    dev = NetDevice(devid, config, guest.ctx)
    guest.devices.append(dev)
    front = NetFront(guest.ram, guest.gnttab, devid, first_port=1 + devid * 8,
                     **front_kwargs)  # type: ignore[arg-type]
    guest.fronts.append(front)
    chans = {port: EventChannel(port, kick, call) for port, kick, call in front.channels()}
    await dev.connect(front.frontend_keys(), chans)
    front.start()
    return dev, front


async def addr(ns: str, dev: str, cidr: str, mtu: int | None = None) -> None:
    await run("ip", "addr", "add", cidr, "dev", dev, ns=ns)
    if mtu:
        await run("ip", "link", "set", dev, "mtu", str(mtu), ns=ns)
    await run("ip", "link", "set", dev, "up", ns=ns)



async def connect_and_ping(client: VmmClient, front: NetFront, mac: str, host: str,
                           tap: str, gns: str, gtap: str, subnet: str) -> None:
    """Connect `front` (net device 0 on the daemon, tap `tap` in namespace `host`) and
    start it, put its tap `gtap` in namespace `gns`; check the daemon's tap is UP and
    that the guest pings it across `subnet` (the /24's first three octets)."""
    state, _ = await client.hand_over_channels(0, XenbusState.CONNECTED,
                                               front.frontend_keys(), front.channels())
    assert state == XenbusState.CONNECTED
    front.start()
    await front.attach_tap(gtap, netns=gns, mac=mac)
    _, shown = await run("ip", "link", "show", tap, ns=host)
    assert "UP" in shown
    await addr(host, tap, f"{subnet}.1/24")
    await addr(gns, gtap, f"{subnet}.2/24")
    await run("ping", "-c", "3", "-i", "0.2", "-W", "2", f"{subnet}.1", ns=gns)

SINK = """
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    h.update(b)
    n += len(b)
print(n, h.hexdigest(), flush=True)
"""

SOURCE = """
import hashlib, random, socket, sys
data = random.Random(int(sys.argv[3])).randbytes(int(sys.argv[4]))
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
c.recv(1)
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


async def tcp_transfer(src_ns: str, dst_ns: str, dst_ip: str, nbytes: int,
                       port: int = 5201, seed: int = 1) -> tuple[str, str]:
    """Send nbytes over TCP from src_ns to dst_ns; returns (sent, received) as
    "<bytes> <sha256>" lines."""
    sink = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", dst_ns, "python3", "-c", SINK, str(port),
        stdout=asyncio.subprocess.PIPE)
    try:
        assert sink.stdout is not None
        line = await asyncio.wait_for(sink.stdout.readline(), 30)
        assert line.strip() == b"ready"
        _, sent = await run("python3", "-c", SOURCE, dst_ip, str(port), str(seed),
                            str(nbytes), ns=src_ns)
        received = await asyncio.wait_for(sink.stdout.readline(), 30)
        return sent.strip(), received.decode().strip()
    finally:
        if sink.returncode is None:
            sink.kill()
        await sink.wait()


INJECT = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for frame in sys.argv[2:]:
    s.send(bytes.fromhex(frame))
"""


async def inject(ns: str, ifname: str, frames: list[bytes]) -> None:
    """Transmit raw Ethernet frames on the host side of a tap (they reach the daemon)."""
    await run("python3", "-c", INJECT, ifname, *(f.hex() for f in frames), ns=ns)


async def until(predicate, timeout: float = 30.0) -> None:
    """Wait (on the loop) until predicate() holds."""
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(poll(), timeout)
