"""Bridge a daemon's nic to a "guest" network namespace with the C netfront
(bench/native/netfront_load.c), so the kernel's stack on both ends carries the traffic.

Python does the control plane, as a VMM and the guest's xenbus would: a connection to the
daemon, guest RAM and a grant table (memfds) handed over, ADD_DEVICE with the daemon's tap
moved into the host namespace, ring pages allocated and granted, eventfds made (split
event channels: a tx and an rx channel per queue), and the guest's tap opened with vnet
headers and checksum/TSO offloads, one queue fd per netif queue, and moved into the guest
namespace. The C program inherits all of it, initialises the rings, says "ready"; then
FRONTEND_STATE connects the device, the program is told to go and bridges frames between
the guest tap and the rings until it is told to stop, and prints one line of JSON.

With socket=True the program does that control plane itself, through the C client
library (clients/c/backendd-client.h) with --socket, as a C VMM would, and reports the
daemon's counters (GET_STATS) in its JSON; only the guest tap and its namespace come
from here.

    async with netfront(socket, host_ns=..., guest_ns=..., ...) as run:
        ... traffic between the namespaces ...
        result = await run.finish()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from backendd.devices.net.tap import (
    LinkConfig,
    close_fds,
    configure_link,
    open_tap,
    run_netlink_async,
    set_offload,
)
from backendd.guest.machine import SimGuest
from backendd.guest.vmm import VmmClient
from rings.consts import GTF_READING, GTF_WRITING, PAGE_SIZE, XenbusState

from .loadgen import event_channel_fds, guest_args, require_one_region, start_ready
from .native import build

DEVID = 0
PAGES_PER_QUEUE = 256 + 256  # a tx page per tx ring slot, an rx buffer per rx ring slot
FIRST_PORT = 1
# The first tx slot's size field is 16 bits: GSO frames from the guest's stack must fit,
# Ethernet header included (Linux's netfront caps them the same way).
GUEST_GSO_MAX = 65535 - 14 - 256


class NetLoadFailed(RuntimeError):
    """The netfront reported an error response, a malformed response, a grant still held
    after its response, or a ring index that made no sense."""


def sum_counters(counters: dict[str, str]) -> dict[str, int]:
    """The daemon's counters for a nic (GET_STATS), summed over its queues."""
    out: dict[str, int] = {}
    for key, value in counters.items():
        name = key.split(".", 1)[-1]
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0) + int(value)
    return out


@dataclass
class NetResult:
    raw: dict
    held_after_close: list[int] = field(default_factory=list)  # grefs still in use

    def __getitem__(self, key: str) -> int:
        return self.raw[key]

    @property
    def daemon_stats(self) -> dict[str, int]:
        """With socket=True: the counters the program read with GET_STATS after the run,
        summed over the queues."""
        return sum_counters(self.raw.get("daemon", {}))


@dataclass
class NetRun:
    client: VmmClient | None  # None with socket=True: the program has the connection
    proc: asyncio.subprocess.Process
    host_tap: str
    guest_tap: str
    queues: int
    split: bool
    grefs: range
    _guest: SimGuest | None
    result: NetResult | None = None

    async def stats(self) -> dict[str, int]:
        """The daemon's counters for the nic, summed over its queues (with socket=True
        the program asks for them, GET_STATS, when told "stats")."""
        if self.client is not None:
            return sum_counters(await self.client.stats(DEVID))
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"stats\n")
        await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        try:
            return sum_counters(json.loads(line)["daemon"])
        except (ValueError, KeyError):
            raise NetLoadFailed(f"netfront_load did not answer stats: {line!r}") from None

    async def finish(self) -> NetResult:
        """Stop the bridge, close the device; raise NetLoadFailed if the netfront saw
        anything wrong."""
        if self.result is not None:
            return self.result
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.proc.stdin.write(b"stop\n")
            await self.proc.stdin.drain()
        out, err = await asyncio.wait_for(self.proc.communicate(), 30)
        try:
            raw = json.loads(out.decode().splitlines()[-1])
        except (IndexError, ValueError):
            raise NetLoadFailed(f"netfront_load exited {self.proc.returncode} without "
                                f"results: {err.decode()}") from None
        if self.client is not None and self._guest is not None:
            await self.client.frontend_state(DEVID, XenbusState.CLOSED, {})
            gt = self._guest.gnttab
            held = [g for g in self.grefs if gt.entry(g)[0] & (GTF_READING | GTF_WRITING)]
        else:  # the program closed the nic itself and counted the grants still held
            held = [-1] * int(raw.get("held_after_close", 0))
        self.result = NetResult(raw, held)
        if self.proc.returncode != 0:
            raise NetLoadFailed(f"netfront_load: {raw.get('failure') or 'failed'} ({raw}); "
                                f"{err.decode()}")
        return self.result


@contextlib.asynccontextmanager
async def netfront(socket_path: str, *, host_ns: str, guest_ns: str, host_tap: str,
                   guest_tap: str, queues: int = 1, split: bool = True,
                   binary: Path | None = None, mtu: int = 1500,
                   config: dict[str, str] | None = None,
                   socket: bool = False) -> AsyncIterator[NetRun]:
    """One connection, one guest, one nic bridged to `guest_tap` in `guest_ns`; the
    daemon's tap is `host_tap` in `host_ns`. Both taps are up, without addresses.
    socket=True: the program does the control plane itself, through the C client library
    (--socket); only the guest tap and its namespace are set up here."""
    binary = binary or build("netfront_load")
    if socket:
        async with _netfront_socket(socket_path, guest_ns=guest_ns, guest_tap=guest_tap,
                                    queues=queues, split=split, binary=binary, mtu=mtu,
                                    config={"tap": host_tap, "netns": host_ns,
                                            "queues": str(queues), "mtu": str(mtu),
                                            **(config or {})}) as run:
            yield run
        return
    data_pages = queues * PAGES_PER_QUEUE
    ram_pages = data_pages + 2 * queues + 64
    gnttab_frames = -(-(ram_pages + 16) * 8 // PAGE_SIZE) + 1
    guest = SimGuest(ram_size=ram_pages * PAGE_SIZE, gnttab_frames=gnttab_frames)
    client: VmmClient | None = None
    fds: list[int] = []
    tap_fds: list[int] = []
    proc: asyncio.subprocess.Process | None = None
    try:
        client = await VmmClient.connect(socket_path)
        await guest.attach(client)
        _, bkeys = await client.add_device(DEVID, "net", {
            "tap": host_tap, "netns": host_ns, "queues": str(queues), "mtu": str(mtu),
            **(config or {})})
        if split and bkeys.get("feature-split-event-channels") != "1":
            raise NetLoadFailed("the daemon does not offer split event channels")
        if int(bkeys.get("multi-queue-max-queues", "1")) < queues:
            raise NetLoadFailed(f"the daemon offers fewer than {queues} queues")

        ram, gt = guest.ram, guest.gnttab
        require_one_region(ram)
        fkeys: dict[str, str] = {
            "request-rx-copy": "1", "feature-rx-notify": "1", "feature-sg": "1",
            "feature-gso-tcpv4": "1", "feature-gso-tcpv6": "1",
            "feature-ipv6-csum-offload": "1"}
        if queues > 1:
            fkeys["multi-queue-num-queues"] = str(queues)
        channels: list[tuple[int, int, int]] = []
        ring_grefs: list[int] = []
        queue_args: list[str] = []
        port = FIRST_PORT
        for q in range(queues):
            prefix = f"queue-{q}/" if queues > 1 else ""
            tx_ring, rx_ring = ram.alloc_page(), ram.alloc_page()
            tx_gref, rx_gref = gt.grant_access(tx_ring), gt.grant_access(rx_ring)
            ring_grefs += [tx_gref, rx_gref]
            fkeys[prefix + "tx-ring-ref"] = str(tx_gref)
            fkeys[prefix + "rx-ring-ref"] = str(rx_gref)
            ends: list[tuple[int, int]] = []
            for _ in range(2 if split else 1):
                kick, call = event_channel_fds(fds)
                channels.append((port, kick, call))
                ends.append((kick, call))
                port += 1
            if split:
                fkeys[prefix + "event-channel-tx"] = str(channels[-2][0])
                fkeys[prefix + "event-channel-rx"] = str(channels[-1][0])
            else:
                fkeys[prefix + "event-channel"] = str(channels[-1][0])
            tap_fds.append(open_tap(guest_tap, multi_queue=queues > 1))
            (txk, txc), (rxk, rxc) = ends[0], ends[-1]
            queue_args += ["--queue", f"{tx_ring}:{rx_ring}:{txk}:{txc}:{rxk}:{rxc}:"
                                      f"{tap_fds[-1]}"]
        for fd in tap_fds:
            set_offload(fd, True, True, True)
        await guest_tap_up(guest_ns, guest_tap, mtu)
        gref_first, memory_args = guest_args(ram, gt, ring_grefs, data_pages)
        args = [str(binary), *memory_args, *queue_args]
        proc, why = await start_ready(args, [ram.fd, gt.fd, *fds, *tap_fds])
        if why or proc.returncode is not None:
            raise NetLoadFailed(f"netfront_load did not start: {why}")
        close_fds(tap_fds)  # the program's copies keep the guest tap
        tap_fds.clear()
        await client.frontend_state(DEVID, XenbusState.CONNECTED, fkeys, channels)
        close_fds(fds)  # the daemon and the program have their own now
        fds.clear()
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        yield NetRun(client, proc, host_tap, guest_tap, queues, split,
                     range(gref_first, gref_first + data_pages), guest)
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        close_fds(fds + tap_fds)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.remove_device(DEVID)
            await client.close()
        guest.close()


async def guest_tap_up(guest_ns: str, guest_tap: str, mtu: int) -> None:
    await run_netlink_async(configure_link, LinkConfig(guest_tap, mtu=mtu, netns=guest_ns))
    subprocess.run(["ip", "-n", guest_ns, "link", "set", guest_tap, "gso_max_size",
                    str(GUEST_GSO_MAX)], check=True, capture_output=True)


@contextlib.asynccontextmanager
async def _netfront_socket(socket_path: str, *, guest_ns: str, guest_tap: str, queues: int,
                           split: bool, binary: Path, mtu: int, config: dict[str, str]
                           ) -> AsyncIterator[NetRun]:
    tap_fds: list[int] = []
    proc: asyncio.subprocess.Process | None = None
    try:
        for _ in range(queues):
            tap_fds.append(open_tap(guest_tap, multi_queue=queues > 1))
        for fd in tap_fds:
            set_offload(fd, True, True, True)
        await guest_tap_up(guest_ns, guest_tap, mtu)
        args = [str(binary), "--socket", socket_path, "--devid", str(DEVID),
                "--split", str(int(split)),
                *(a for k, v in config.items() for a in ("--nic", f"{k}={v}")),
                *(a for fd in tap_fds for a in ("--tap", str(fd)))]
        # "ready" comes once the program has connected the nic.
        proc, why = await start_ready(args, tap_fds)
        if why or proc.returncode is not None:
            raise NetLoadFailed(f"netfront_load did not start: {why}")
        close_fds(tap_fds)  # the program's copies keep the guest tap
        tap_fds.clear()
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        yield NetRun(None, proc, config["tap"], guest_tap, queues, split, range(0), None)
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        close_fds(tap_fds)


__all__ = ["NetLoadFailed", "NetResult", "NetRun", "netfront", "sum_counters"]
