"""A nic moved between two real daemon processes on one host, with its tap handed over,
while TCP streams run both ways between the host namespace (the daemons' tap) and the
guest namespace (the simulated netfront's tap). Daemon A serves it; SUSPEND detaches
A's tap queues; daemon B (per-connection process model: its supervisor adopts the tap)
is given ADD_DEVICE with adopt-tap=1, the state blob and the frontend's keys with fresh
event channels, and RESUME. The streams finish with matching sha256 at both ends, and
the multicast list went along."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from migrig import get_state, move_guest, set_state
from test_net_harness import addr, namespaces, run, tcp_transfer, uniq, until

from backendd.devices.net.state import decode_state
from backendd.devstate import decode
from backendd.guest import RequestFailed, VmmClient
from backendd.guest.machine import SimGuest
from backendd.guest.netfront import NetFront
from rings.consts import XenbusState

pytestmark = pytest.mark.usefixtures("root")

MiB = 1 << 20
MAC = "00:16:3e:00:00:41"
MCAST = bytes.fromhex("01005e000042")


class Daemon:
    """`backendd serve` in network namespace `ns` (its taps live there)."""

    def __init__(self, tmp: Path, name: str, ns: str, model: str) -> None:
        self.ns = ns
        self.sock = str(tmp / f"{name}.sock")
        self.config = tmp / f"{name}.toml"
        self.config.write_text(f'[daemon]\nprocess_model = "{model}"\n')
        self.log_path = tmp / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        r, w = os.pipe()
        try:
            with open(self.log_path, "ab") as log:
                self.proc = await asyncio.create_subprocess_exec(
                    "ip", "netns", "exec", self.ns, sys.executable, "-m", "backendd", "serve",
                    "--config", str(self.config), "--socket", self.sock, "--ready-fd", str(w),
                    pass_fds=[w], stdout=log, stderr=log)
            os.close(w)
            w = -1
            ready = await asyncio.get_running_loop().run_in_executor(None, os.read, r, 64)
            assert ready.startswith(b"READY=1"), self.log_path.read_text()
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


class Pair:
    """Daemons `a` and `b`, and a guest whose nic `front` daemon A serves through `ca`;
    `move()` puts the suspended guest on daemon B, connected through `cb`."""

    def __init__(self, a: Daemon, b: Daemon, guest: SimGuest) -> None:
        self.a, self.b, self.guest = a, b, guest
        self.ca: VmmClient | None = None
        self.cb: VmmClient | None = None
        self.front: NetFront | None = None

    async def move(self) -> bytes:
        """SUSPEND on A, the nic's state blob, and the guest moved and attached to B."""
        assert self.ca is not None
        await self.ca.suspend()
        blob = await get_state(self.ca, 0)
        move_guest(self.guest)
        self.cb = await VmmClient.connect(self.b.sock)
        await self.guest.attach(self.cb)
        return blob


@contextlib.asynccontextmanager
async def nic_on_a(tmp_path: Path, a_ns: str, b_ns: str, b_model: str, gns: str, gtap: str,
                   config: dict[str, str], subnet: str, **front_options: bool | int
                   ) -> AsyncIterator[Pair]:
    """Daemon A (single process) in `a_ns` and B (`b_model`) in `b_ns`; the guest's nic
    on A, connected, its tap `gtap` in `gns` at `subnet`.2 and A's tap at `subnet`.1,
    pinged once. Everything is closed and stopped after."""
    pair = Pair(Daemon(tmp_path, "a", a_ns, "single"), Daemon(tmp_path, "b", b_ns, b_model),
                SimGuest(ram_size=64 * MiB, gnttab_frames=32))
    guest = pair.guest
    try:
        await pair.a.start()
        await pair.b.start()
        ca = pair.ca = await VmmClient.connect(pair.a.sock)
        await guest.attach(ca)
        await ca.add_device(0, "net", config)
        front = pair.front = NetFront(guest.ram, guest.gnttab, 0, **front_options)
        await ca.hand_over_channels(0, XenbusState.CONNECTED, front.frontend_keys(),
                                    front.channels())
        front.start()
        await front.attach_tap(gtap, netns=gns, mac=MAC)
        await addr(a_ns, config["tap"], f"{subnet}.1/24")
        await addr(gns, gtap, f"{subnet}.2/24")
        await run("ping", "-c", "2", "-i", "0.2", "-W", "2", f"{subnet}.1", ns=gns)
        yield pair
    finally:
        for c in (pair.ca, pair.cb):
            if c is not None:
                await c.close()
        if pair.front is not None:
            pair.front.close()
        guest.close()
        await pair.a.stop()
        await pair.b.stop()


@pytest.mark.parametrize("dataplane", ["python", "compiled"])
async def test_net_moves_with_its_tap_and_tcp_survives(tmp_path, dataplane):
    host, gns = uniq("mh") + dataplane[0], uniq("mg") + dataplane[0]
    tap, gtap = uniq("mta") + dataplane[0], uniq("mtg") + dataplane[0]
    config = {"tap": tap, "mac": MAC, "dataplane": dataplane, "queues": "2"}
    with namespaces(host, gns):
        async with nic_on_a(tmp_path, host, host, "per-connection", gns, gtap, config,
                            "10.77.41", queues=2, split=True,
                            multicast_control=True) as pair:
            front = pair.front
            assert front is not None
            front.mcast(MCAST)
            # A running device's tap cannot be adopted.
            probe = await VmmClient.connect(pair.b.sock)
            try:
                with pytest.raises(RequestFailed) as info:
                    await probe.add_device(9, "net", config | {"adopt-tap": "1"})
                assert info.value.code == errno.EBUSY and "SUSPEND" in info.value.message
            finally:
                await probe.close()
            up = asyncio.create_task(tcp_transfer(gns, host, "10.77.41.1", 128 * MiB,
                                                  port=5301, seed=3))
            down = asyncio.create_task(tcp_transfer(host, gns, "10.77.41.2", 128 * MiB,
                                                    port=5302, seed=4))
            await until(lambda: front.counters.get("rx_packets", 0) > 100
                        and front.counters.get("tx_packets", 0) > 100, timeout=60)
            # The switch point.
            blob = await pair.move()
            assert not up.done() and not down.done()
            cb = pair.cb
            assert cb is not None
            await cb.add_device(0, "net", config | {"adopt-tap": "1"})
            await set_state(cb, 0, blob)
            state, _ = await cb.hand_over_channels(0, XenbusState.CONNECTED,
                                                   front.frontend_keys(), front.new_channels())
            assert state == XenbusState.CONNECTED
            await cb.resume()
            await pair.ca.close()
            for task in (up, down):
                sent, received = await asyncio.wait_for(task, 180)
                assert sent == received
            await run("ping", "-c", "2", "-i", "0.2", "-W", "2", "10.77.41.1", ns=gns)
            stats = await cb.stats(0)
            assert int(stats["0.tx_packets"]) > 0 and int(stats["0.rx_packets"]) > 0
            assert int(stats["0.fatal"]) == 0 and int(stats["0.tx_errors"]) == 0
            # The multicast list moved with the state, and moves on again.
            await cb.suspend()
            st = decode_state(decode(await get_state(cb, 0), 2))
            assert st.mcast == [MCAST] and st.tap == tap and len(st.queues) == 2
            await cb.resume()
            assert not front.busy_after_response


async def test_net_across_hosts_creates_its_own_tap(tmp_path):
    """Two "hosts" (namespaces), a daemon in each: without adopt-tap the destination
    creates a tap of the same name in its own namespace, and the guest, moved without
    reconnecting, reaches the destination host's network through it."""
    host_a, host_b, gns = uniq("mxa"), uniq("mxb"), uniq("mxg")
    tap, gtap = uniq("mxt"), uniq("mxu")
    config = {"tap": tap, "mac": MAC, "queues": "1"}
    with namespaces(host_a, host_b, gns):
        async with nic_on_a(tmp_path, host_a, host_b, "single", gns, gtap, config,
                            "10.77.42") as pair:
            front = pair.front
            assert front is not None
            blob = await pair.move()
            cb = pair.cb
            assert cb is not None
            await cb.add_device(0, "net", config)  # a tap of its own, on its host
            await addr(host_b, tap, "10.77.42.1/24")
            await set_state(cb, 0, blob)
            await cb.hand_over_channels(0, XenbusState.CONNECTED, front.frontend_keys(),
                                        front.new_channels())
            await cb.resume()
            await pair.ca.close()
            await run("ip", "neigh", "flush", "all", ns=gns)  # another host, another MAC
            await run("ping", "-c", "3", "-i", "0.2", "-W", "2", "10.77.42.1", ns=gns)
            stats = await cb.stats(0)
            assert int(stats["0.rx_packets"]) >= 3 and int(stats["0.tx_packets"]) >= 3
