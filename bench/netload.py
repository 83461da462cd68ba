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


@dataclass
class NetResult:
    raw: dict
    held_after_close: list[int] = field(default_factory=list)  # grefs still in use

    def __getitem__(self, key: str) -> int:
        return self.raw[key]


@dataclass
class NetRun:
    client: VmmClient
    proc: asyncio.subprocess.Process
    host_tap: str
    guest_tap: str
    queues: int
    split: bool
    grefs: range
    _guest: SimGuest
    result: NetResult | None = None

    async def stats(self) -> dict[str, int]:
        """The daemon's counters for the nic, summed over its queues."""
        out: dict[str, int] = {}
        for key, value in (await self.client.stats(DEVID)).items():
            name = key.split(".", 1)[-1]
            with contextlib.suppress(ValueError):
                out[name] = out.get(name, 0) + int(value)
        return out

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
        await self.client.frontend_state(DEVID, XenbusState.CLOSED, {})
        gt = self._guest.gnttab
        held = [g for g in self.grefs if gt.entry(g)[0] & (GTF_READING | GTF_WRITING)]
        self.result = NetResult(raw, held)
        if self.proc.returncode != 0:
            raise NetLoadFailed(f"netfront_load: {raw.get('failure') or 'failed'} ({raw}); "
                                f"{err.decode()}")
        return self.result


@contextlib.asynccontextmanager
async def netfront(socket_path: str, *, host_ns: str, guest_ns: str, host_tap: str,
                   guest_tap: str, queues: int = 1, split: bool = True,
                   binary: Path | None = None, mtu: int = 1500,
                   config: dict[str, str] | None = None) -> AsyncIterator[NetRun]:
    """One connection, one guest, one nic bridged to `guest_tap` in `guest_ns`; the
    daemon's tap is `host_tap` in `host_ns`. Both taps are up, without addresses."""
    binary = binary or build("netfront_load")
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
        await run_netlink_async(configure_link, LinkConfig(guest_tap, mtu=mtu,
                                                           netns=guest_ns))
        subprocess.run(["ip", "-n", guest_ns, "link", "set", guest_tap, "gso_max_size",
                        str(GUEST_GSO_MAX)], check=True, capture_output=True)
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


__all__ = ["NetLoadFailed", "NetResult", "NetRun", "netfront"]
