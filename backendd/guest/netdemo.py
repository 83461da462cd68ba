"""The nic half of `backendd demo`: two network namespaces, the daemon's tap in one and the
simulated guest's tap in the other, and real ping and TCP traffic between them through
the netif rings."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Callable

from rings.consts import XenbusState

from .machine import SimGuest
from .netfront import NetFront
from .vmm import VmmClient

NIC_DEVID = 0
HOST_IP, GUEST_IP = "10.123.0.1", "10.123.0.2"


async def _run(*argv: str, ns: str | None = None, timeout: float = 60.0) -> tuple[int, str]:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"{argv[0]}: timed out"
    return proc.returncode or 0, out.decode(errors="replace")


async def _netns(name: str) -> None:
    await _run("ip", "netns", "del", name)
    rc, out = await _run("ip", "netns", "add", name)
    if rc:
        raise RuntimeError(f"ip netns add {name}: {out.strip()}")
    await _run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", ns=name)
    await _run("ip", "link", "set", "lo", "up", ns=name)


async def _tcp(host_ns: str, guest_ns: str, nbytes: int) -> tuple[bool, float]:
    """Guest -> host TCP copy with a digest checked on both ends; returns (ok, MB/s)."""
    import sys

    server = (
        "import socket, hashlib\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('{HOST_IP}', 5201)); s.listen(1); print('ready', flush=True)\n"
        "c, _ = s.accept(); h = hashlib.sha256(); n = 0\n"
        "while (b := c.recv(1 << 20)):\n"
        "    h.update(b); n += len(b)\n"
        "print(n, h.hexdigest(), flush=True)\n")
    client = (
        "import socket, hashlib, random\n"
        f"data = random.Random(5).randbytes({nbytes})\n"
        f"c = socket.create_connection(('{HOST_IP}', 5201), timeout=30)\n"
        "c.sendall(data); c.close()\n"
        "print(len(data), hashlib.sha256(data).hexdigest(), flush=True)\n")
    srv = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", host_ns, sys.executable, "-c", server,
        stdout=asyncio.subprocess.PIPE)
    assert srv.stdout is not None
    try:
        await asyncio.wait_for(srv.stdout.readline(), 10)
        start = time.monotonic()
        rc, sent = await _run(sys.executable, "-c", client, ns=guest_ns, timeout=60)
        received = (await asyncio.wait_for(srv.stdout.readline(), 60)).decode()
        elapsed = time.monotonic() - start
    finally:
        with contextlib.suppress(ProcessLookupError):
            srv.kill()
        await srv.wait()
    ok = rc == 0 and sent.split() == received.split()
    return ok, nbytes / elapsed / 1e6


async def run_nic_demo(client: VmmClient, guest: SimGuest, seconds: float,
                       say: Callable[[str], None]) -> bool:
    tag = os.getpid() % 100000
    host_ns, guest_ns = f"bkd-host{tag}", f"bkd-guest{tag}"
    tap, gtap = f"bkdvif{tag}", f"bkdeth{tag}"
    front: NetFront | None = None
    try:
        await _netns(host_ns)
        await _netns(guest_ns)
        _, keys = await client.add_device(NIC_DEVID, "net", {
            "tap": tap, "netns": host_ns, "mac": "00:16:3e:12:34:56"})
        say(f"nic: vif {tap} added in netns {host_ns}; backend offers "
            + ", ".join(k for k in sorted(keys) if k.startswith("feature-") and keys[k] == "1"))
        front = NetFront(guest.ram, guest.gnttab, NIC_DEVID, first_port=20)
        state, keys = await client.hand_over_channels(NIC_DEVID, XenbusState.CONNECTED,
                                                      front.frontend_keys(), front.channels())
        front.start()
        await front.attach_tap(gtap, netns=guest_ns, mac="00:16:3e:12:34:56")
        await _run("ip", "addr", "add", f"{HOST_IP}/24", "dev", tap, ns=host_ns)
        await _run("ip", "addr", "add", f"{GUEST_IP}/24", "dev", gtap, ns=guest_ns)
        say(f"nic: connected ({XenbusState(state).name}); guest {GUEST_IP} on {gtap} in "
            f"netns {guest_ns}, host side {HOST_IP} on {tap}")
        count = max(3, int(seconds))
        rc, out = await _run("ping", "-c", str(count), "-i", "0.2", "-W", "2", HOST_IP,
                             ns=guest_ns, timeout=seconds + 30)
        for line in out.splitlines():
            if line.startswith(("64 bytes", f"{count} packets", "rtt")):
                say(f"nic: ping: {line}")
        loss = re.search(r"(\d+)% packet loss", out)
        ping_ok = rc == 0 and loss is not None and loss.group(1) == "0"
        tcp_ok, rate = await _tcp(host_ns, guest_ns, 32 << 20)
        say(f"nic: TCP guest -> host, 32 MiB with sha256 checked on both ends: "
            f"{'ok' if tcp_ok else 'FAILED'}, {rate:.1f} MB/s")
        counters = await client.stats(NIC_DEVID)
        say("nic: daemon counters: " + " ".join(
            f"{k.split('.', 1)[1]}={v}" for k, v in sorted(counters.items())
            if v != "0"))
        await client.frontend_state(NIC_DEVID, XenbusState.CLOSED, {})
        return ping_ok and tcp_ok
    finally:
        if front is not None:
            front.close()
        with contextlib.suppress(Exception):
            await client.remove_device(NIC_DEVID)
        await _run("ip", "netns", "del", guest_ns)
        await _run("ip", "netns", "del", host_ns)
