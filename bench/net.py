"""Network throughput through the daemon against a plain veth pair, in the same run.

The daemon runs as its own process (`python -m backendd serve`), so its CPU time is
measured alone; this process plays the VMM and the guest (netfront bridged to a tap in a
"guest" namespace). iperf3 runs in the namespaces: TCP for ~4 s each way, and UDP with
64-byte payloads for small-packet rates. The baseline is the same iperf3 runs over a veth
pair between two namespaces.

    python -m bench.net        (root; needs iperf3)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable

import uvloop

from .report import table

TCP_SECONDS = 4
UDP_SECONDS = 3


async def _run(*argv: str, ns: str | None = None) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {out.decode(errors='replace')}")
    return out.decode()


def _ns(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)


async def _iperf(server_ns: str, client_ns: str, ip: str, *args: str) -> dict:
    server = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", "5301",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(50):
            with contextlib.suppress(RuntimeError):
                out = await _run("iperf3", "-c", ip, "-p", "5301", "-J", *args, ns=client_ns)
                result = json.loads(out)
                if "error" in result:
                    raise RuntimeError(f"iperf3 {' '.join(args)}: {result['error']}")
                return result
            await asyncio.sleep(0.1)
        raise RuntimeError("iperf3 server did not come up")
    finally:
        if server.returncode is None:
            server.kill()
        await server.wait()


async def _measure(server_ns: str, client_ns: str, ip: str, pid: int | None = None,
                   packets: Callable[[], Awaitable[int]] | None = None) -> list[float]:
    """[tx Gbit/s, rx Gbit/s, UDP kpps, daemon us/packet (nan without a daemon)]"""
    tx = await _iperf(server_ns, client_ns, ip, "-t", str(TCP_SECONDS))
    rx = await _iperf(server_ns, client_ns, ip, "-t", str(TCP_SECONDS), "-R")
    before = await _sample(pid, packets)
    udp = await _iperf(server_ns, client_ns, ip, "-u", "-b", "0", "-l", "64",
                       "-t", str(UDP_SECONDS))
    after = await _sample(pid, packets)
    gbit = [r["end"]["sum_received"]["bits_per_second"] / 1e9 for r in (tx, rx)]
    summ = udp["end"]["sum"]
    kpps = (summ["packets"] - summ["lost_packets"]) / summ["seconds"] / 1e3
    per_packet = float("nan")
    if before and after and after[1] > before[1]:
        per_packet = (after[0] - before[0]) / (after[1] - before[1]) * 1e6
    return [*gbit, kpps, per_packet]


async def _sample(pid: int | None, packets: Callable[[], Awaitable[int]] | None
                  ) -> tuple[float, int] | None:
    """(CPU seconds the daemon used so far, packets it has moved)."""
    if pid is None or packets is None:
        return None
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK"), await packets()


async def _veth(a: str, b: str) -> list[float]:
    subprocess.run(["ip", "link", "add", "bnva", "netns", a, "type", "veth", "peer",
                    "name", "bnvb", "netns", b], check=True)
    await _run("ip", "addr", "add", "10.78.0.1/24", "dev", "bnva", ns=a)
    await _run("ip", "link", "set", "bnva", "up", ns=a)
    await _run("ip", "addr", "add", "10.78.0.2/24", "dev", "bnvb", ns=b)
    await _run("ip", "link", "set", "bnvb", "up", ns=b)
    return await _measure(a, b, "10.78.0.1")


async def _daemon(host: str, gns: str) -> list[float]:
    from backendd.guest import SimGuest, VmmClient
    from backendd.guest.netfront import NetFront

    tmp = tempfile.mkdtemp()
    sock = os.path.join(tmp, "backendd.sock")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "backendd", "--socket", sock, "serve",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    guest = SimGuest(ram_size=64 << 20, gnttab_frames=32)
    front = None
    client = None
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            await asyncio.sleep(0.05)
        client = await VmmClient.connect(sock)
        await guest.attach(client)
        await client.add_device(0, "net", {"tap": "bnvtap", "netns": host, "queues": "1"})
        front = NetFront(guest.ram, guest.gnttab, 0)
        channels = front.channels()
        await client.frontend_state(0, 4, front.frontend_keys(), channels)
        for _, kick, call in channels:
            os.close(kick)
            os.close(call)
        front.start()
        await front.attach_tap("bnvgtap", netns=gns)
        await _run("ip", "addr", "add", "10.78.1.1/24", "dev", "bnvtap", ns=host)
        await _run("ip", "link", "set", "bnvtap", "up", ns=host)
        await _run("ip", "addr", "add", "10.78.1.2/24", "dev", "bnvgtap", ns=gns)
        await _run("ip", "link", "set", "bnvgtap", "up", ns=gns)
        async def packets() -> int:
            assert client is not None
            s = await client.stats(0)
            return int(s.get("0.tx_packets", 0)) + int(s.get("0.rx_packets", 0))

        return await _measure(host, gns, "10.78.1.1", proc.pid, packets)
    finally:
        if front is not None:
            front.close()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        guest.close()
        proc.terminate()
        await proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


async def _main() -> list[list[object]]:
    names = ["bnv-a", "bnv-b", "bnv-host", "bnv-guest"]
    try:
        for n in names:
            _ns(n)
        veth = await _veth("bnv-a", "bnv-b")
        daemon = await _daemon("bnv-host", "bnv-guest")
    finally:
        for n in names:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
    labels = ["TCP guest->host Gbit/s", "TCP host->guest Gbit/s",
              "UDP 64 B received kpps", "daemon CPU us/packet (UDP run)"]
    return [[label, d, v] for label, d, v in zip(labels, daemon, veth, strict=True)]


def main() -> None:
    if os.geteuid() != 0 or shutil.which("iperf3") is None:
        print("bench.net: needs root and iperf3; skipped")
        return
    rows = uvloop.run(_main())
    print(table("netif through the daemon vs a veth pair (iperf3)",
                ["", "daemon + netfront", "veth"], rows))


if __name__ == "__main__":
    main()
