"""Network throughput through the daemon against a plain veth pair, in the same run.

The daemon runs as its own process (`python -m backendd serve`), so its CPU time is
measured alone; this process plays the VMM and the guest (netfront bridged to a tap in a
"guest" namespace). iperf3 runs in the namespaces: TCP for ~4 s each way, and UDP with
64-byte payloads for small-packet rates. The baseline is the same iperf3 runs over a veth
pair between two namespaces. The daemon's column includes the simulated guest: its
netfront is Python code in this process, so those figures are the daemon and a Python
guest together, not the daemon alone.

A second table sets a transmit rate limit on the vif and prints the rate the guest
actually reached beside the one set.

Namespaces are created under names unique to this run (and fail if taken), and only those
are deleted afterwards; iperf3's port is inside those private namespaces. Without root or
iperf3 the benchmark exits with an error instead of printing a partial table.

    python -m bench.net        (root; needs iperf3)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable

import uvloop

from .report import table

TCP_SECONDS = 4
UDP_SECONDS = 3
# Inside namespaces this run created: nothing else listens there.
IPERF_PORT = "5301"
RATE_CREDIT, RATE_USEC = 20_000, 10_000  # 2 MB/s in 10 ms windows
RATE_BYTES, RATE_FRAME = 4_000_000, 1000


async def _run(*argv: str, ns: str | None = None) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {out.decode(errors='replace')}")
    return out.decode()


def _ns(name: str) -> None:
    """A new namespace; one of that name already there is an error, never replaced."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)


async def _iperf(server_ns: str, client_ns: str, ip: str, *args: str) -> dict:
    server = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", IPERF_PORT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(50):
            with contextlib.suppress(RuntimeError):
                out = await _run("iperf3", "-c", ip, "-p", IPERF_PORT, "-J", *args, ns=client_ns)
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


@contextlib.asynccontextmanager
async def _guest_on_daemon(host: str, gns: str, config: dict[str, str]):
    """A daemon process and a simulated guest whose vif has `config`; the backend's tap
    is up in `host` (10.78.1.1), the guest's own tap in `gns` (10.78.1.2)."""
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
        await client.add_device(0, "net", {"tap": "bnvtap", "netns": host, "queues": "1"}
                                | config)
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
        yield proc, client, front
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


async def _daemon(host: str, gns: str) -> list[float]:
    async with _guest_on_daemon(host, gns, {}) as (proc, client, _front):
        async def packets() -> int:
            s = await client.stats(0)
            return int(s.get("0.tx_packets", 0)) + int(s.get("0.rx_packets", 0))

        return await _measure(host, gns, "10.78.1.1", proc.pid, packets)


async def _rate_limited(host: str, gns: str) -> list[float]:
    """[set MB/s, measured MB/s]: frames from the guest through a vif with a rate."""
    async with _guest_on_daemon(host, gns, {"rate": f"{RATE_CREDIT},{RATE_USEC}"}) as (
            _proc, client, front):
        frame = (b"\xff" * 6 + bytes.fromhex("020000000099") + b"\x88\xb5").ljust(
            RATE_FRAME, b"\0")
        loop = asyncio.get_running_loop()
        start = loop.time()
        for _ in range(RATE_BYTES // RATE_FRAME):
            await front.send_frame(frame)
        await front.wait_tx_done(timeout=RATE_BYTES / (RATE_CREDIT / RATE_USEC * 1e6) * 4)
        elapsed = loop.time() - start
        # The guest's kernel may add a few frames of its own (IPv6 neighbour discovery).
        sent = int((await client.stats(0))["0.tx_bytes"])
        if sent < RATE_BYTES:
            raise RuntimeError(f"rate run: {sent} of {RATE_BYTES} bytes sent")
        return [RATE_CREDIT / (RATE_USEC / 1e6) / 1e6, sent / elapsed / 1e6]


async def _main() -> tuple[list[list[object]], list[list[object]]]:
    run = f"bnv{os.getpid()}{secrets.token_hex(2)}"
    a, b, host, gns = (f"{run}-{role}" for role in ("a", "b", "host", "guest"))
    made: list[str] = []
    try:
        for n in (a, b, host, gns):
            _ns(n)
            made.append(n)
        veth = await _veth(a, b)
        daemon = await _daemon(host, gns)
        set_rate, measured = await _rate_limited(host, gns)
    finally:
        for n in made:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
    labels = ["TCP guest->host Gbit/s", "TCP host->guest Gbit/s",
              "UDP 64 B received kpps", "daemon CPU us/packet (UDP run)"]
    rows = [[label, d, v] for label, d, v in zip(labels, daemon, veth, strict=True)]
    rate = [[f"{RATE_BYTES // 1000} kB of {RATE_FRAME} B frames", set_rate, measured,
             measured / set_rate]]
    return rows, rate


def main() -> None:
    missing = [what for what, ok in (("root", os.geteuid() == 0),
                                     ("iperf3", shutil.which("iperf3") is not None)) if not ok]
    if missing:
        raise SystemExit(f"bench.net: needs {' and '.join(missing)} (`make bench` installs "
                         "iperf3; run as root); no figures without the veth baseline")
    rows, rate = uvloop.run(_main())
    print(table("netif through the daemon vs a veth pair (iperf3)",
                ["", "daemon + simulated guest (Python netfront)", "veth"], rows))
    print()
    print(table("tx rate limit: the rate set on the vif vs the rate reached "
                "(daemon + simulated guest)",
                ["", "set MB/s", "measured MB/s", "measured/set"], rate))


if __name__ == "__main__":
    main()
