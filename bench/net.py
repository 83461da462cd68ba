"""Network throughput through the daemon against a plain veth pair, in the same run.

The daemon runs as its own process (`python -m backendd serve`), so its CPU time is
measured alone. The guest is the C netfront (bench/native/netfront_load.c, wired by
bench/netload.py): it pairs with the daemon as a C VMM would, through the C client
library (clients/c, --socket), and bridges the netif rings to a tap in a "guest"
namespace, so the kernel's stack is on both ends: iperf3 in the guest namespace talks to
iperf3 in the "host" namespace, where the daemon's tap is. The baseline is the same iperf3
runs over a veth pair between two namespaces.

Measured: TCP for a few seconds each way: one flow, and FLOWS flows with one and with
two queues; UDP with 64-byte payloads each way (`-b 0`, received packets per
second); the daemon's CPU time (its process and descendants, from /proc) per frame it
moved in the UDP runs and per 64 KiB moved in the one-queue TCP runs, where the frames are
GSO super-frames. The one-queue TCP and UDP runs are made twice: with the nic's default
data plane (the compiled kernel when it is built) and with `dataplane = python`, the
pure-Python reference, so the two stand side by side from the same run. Last, a transmit
rate limit is set on the vif and the TCP rate reached is printed beside the rate set (the
suite tests only that the credit is never exceeded, which holds at any speed; how close
the rate comes is a figure).

    python -m bench.net        (root; needs iperf3)
    python -m bench.net --only tcp,flows [--repeat N] [--perf DIR]

`--only` runs some lines alone, through the compiled data plane, without the veth pair
or the Python path: `tcp` (one flow each way, 1 queue, with the daemon CPU per 64 KiB),
`udp` (64-byte UDP each way, with the CPU per frame), `flows` (FLOWS flows each way, 1
and 2 queues, and their ratio). `--repeat N` makes N runs of them, one after the other,
and prints each run's line and the medians. `--perf DIR` records the daemon with
`perf record -g` during each TCP run (DIR/<run>-<direction>.data).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import uvloop

from .loadgen import daemon_cpu
from .netload import netfront
from .report import table

TCP_SECONDS = 4
UDP_SECONDS = 3
# Flows for the multi-queue rows: the taps pin each flow to one queue by its hash, so a
# few flows make an even spread likely (each run prints how the frames fell).
FLOWS = 4
PORT = 5301  # inside namespaces this run made: nothing else listens there
# The rate-limit run: `rate = RATE_BYTES,RATE_USEC` on the vif (100 Mbit/s).
RATE_BYTES, RATE_USEC = 125_000, 10_000
HOST_IP, GUEST_IP = "10.78.1.1", "10.78.1.2"
VETH_A, VETH_B = "10.78.0.1", "10.78.0.2"


class BenchError(RuntimeError):
    pass


async def _run(*argv: str, ns: str | None = None, timeout: float = 60.0) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"{' '.join(cmd)}: timed out") from None
    if proc.returncode:
        raise BenchError(f"{' '.join(cmd)}: {out.decode(errors='replace')}")
    return out.decode()


class Namespaces:
    """Network namespaces with names unique to this run; only those it made are
    deleted."""

    def __init__(self) -> None:
        self.tag = f"bn{os.getpid() % 10000}{secrets.token_hex(2)}"
        self.made: list[str] = []

    def add(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        self.made.append(name)
        for cmd in (["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                    ["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"],
                    ["ip", "link", "set", "lo", "up"]):
            subprocess.run(["ip", "netns", "exec", name, *cmd], check=True)
        return name

    def close(self) -> None:
        for name in self.made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.made.clear()


async def _iperf(server_ns: str, client_ns: str, ip: str, *args: str) -> dict:
    """One iperf3 client run against a one-shot server; its JSON report."""
    server = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", str(PORT),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(50):  # until the server listens: at most ~5 s
            try:
                out = await _run("iperf3", "-c", ip, "-p", str(PORT), "-J", *args,
                                 ns=client_ns)
                result = json.loads(out)
                if "error" in result:
                    raise BenchError(f"iperf3 {' '.join(args)}: {result['error']}")
                return result
            except BenchError as e:
                if "Connection refused" not in str(e):
                    raise
            await asyncio.sleep(0.1)
        raise BenchError("iperf3 server did not come up")
    finally:
        if server.returncode is None:
            server.kill()
        await server.wait()


def _gbit(result: dict) -> float:
    return result["end"]["sum_received"]["bits_per_second"] / 1e9


def _kpps(result: dict) -> float:
    s = result["end"]["sum"]
    return (s["packets"] - s["lost_packets"]) / s["seconds"] / 1e3


@dataclass
class Sample:
    cpu: float
    frames: int
    bytes: int


Sampler = Callable[[], Awaitable[Sample]]


@dataclass
class Figures:
    tcp_out: float = float("nan")    # guest -> host (veth: a -> b), one flow
    tcp_in: float = float("nan")
    tcp_out_m: float = float("nan")  # FLOWS flows, one queue
    tcp_in_m: float = float("nan")
    tcp_out_2: float = float("nan")  # FLOWS flows, two queues
    tcp_in_2: float = float("nan")
    udp_out: float = float("nan")    # kpps received
    udp_in: float = float("nan")
    us_per_frame: float = float("nan")      # daemon CPU, UDP runs
    us_per_64k: float = float("nan")        # daemon CPU per 64 KiB, one-queue TCP runs
    tcp_frame_bytes: float = float("nan")   # mean frame size the daemon moved in TCP


async def _measured(sampler: Sampler | None, run: Awaitable[dict]
                    ) -> tuple[dict, tuple[float, int, int] | None]:
    before = await sampler() if sampler else None
    result = await run
    after = await sampler() if sampler else None
    if before is None or after is None:
        return result, None
    return result, (after.cpu - before.cpu, after.frames - before.frames,
                    after.bytes - before.bytes)


async def _tcp_udp(f: Figures, server_ns: str, client_ns: str, ip: str,
                   sampler: Sampler | None) -> None:
    """One flow each way, then 64-byte UDP each way; the client is the "guest"."""
    cpu = frames = nbytes = 0.0
    out, d1 = await _measured(sampler, _iperf(server_ns, client_ns, ip,
                                              "-t", str(TCP_SECONDS)))
    into, d2 = await _measured(sampler, _iperf(server_ns, client_ns, ip,
                                               "-t", str(TCP_SECONDS), "-R"))
    f.tcp_out, f.tcp_in = _gbit(out), _gbit(into)
    if d1 and d2:
        cpu, frames, nbytes = (a + b for a, b in zip(d1, d2, strict=True))
        if nbytes:
            f.us_per_64k = cpu / (nbytes / 65536) * 1e6
            f.tcp_frame_bytes = nbytes / frames
    udp = ("-u", "-b", "0", "-l", "64", "-t", str(UDP_SECONDS))
    out, d1 = await _measured(sampler, _iperf(server_ns, client_ns, ip, *udp))
    into, d2 = await _measured(sampler, _iperf(server_ns, client_ns, ip, *udp, "-R"))
    f.udp_out, f.udp_in = _kpps(out), _kpps(into)
    if d1 and d2 and d1[1] + d2[1]:
        f.us_per_frame = (d1[0] + d2[0]) / (d1[1] + d2[1]) * 1e6


async def _flows(server_ns: str, client_ns: str, ip: str) -> tuple[float, float]:
    """FLOWS TCP flows each way (Gbit/s out, in)."""
    many = ("-t", str(TCP_SECONDS), "-P", str(FLOWS))
    return (_gbit(await _iperf(server_ns, client_ns, ip, *many)),
            _gbit(await _iperf(server_ns, client_ns, ip, *many, "-R")))


async def _veth(nss: Namespaces) -> Figures:
    a, b = nss.add("va"), nss.add("vb")
    subprocess.run(["ip", "link", "add", "bnva", "netns", a, "type", "veth", "peer",
                    "name", "bnvb", "netns", b], check=True)
    for ns, dev, ip in ((a, "bnva", VETH_A), (b, "bnvb", VETH_B)):
        await _run("ip", "addr", "add", f"{ip}/24", "dev", dev, ns=ns)
        await _run("ip", "link", "set", dev, "up", ns=ns)
    f = Figures()
    await _tcp_udp(f, a, b, VETH_A, None)
    f.tcp_out_m, f.tcp_in_m = await _flows(a, b, VETH_A)
    f.tcp_out_2, f.tcp_in_2 = f.tcp_out_m, f.tcp_in_m  # a veth pair has no queues to set
    return f


@contextlib.asynccontextmanager
async def _daemon_process():
    tmp = tempfile.mkdtemp(prefix="bench-net-")
    sock = os.path.join(tmp, "backendd.sock")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "backendd", "--socket", sock, "serve",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        for _ in range(200):  # bounded: ~10 s
            if os.path.exists(sock) or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        if not os.path.exists(sock):
            raise BenchError("backendd serve did not start")
        yield sock, proc.pid
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


async def _daemon(nss: Namespaces, queues: int, f: Figures, dataplane: str | None = None,
                  flows: bool = True) -> dict:
    host, guest = nss.add(f"h{queues}{len(nss.made)}"), nss.add(f"g{queues}{len(nss.made)}")
    tap, gtap = f"{nss.tag}h", f"{nss.tag}g"
    async with _daemon_process() as (sock, pid), \
            netfront(sock, host_ns=host, guest_ns=guest, host_tap=tap, guest_tap=gtap,
                     queues=queues, socket=True,
                     config={"dataplane": dataplane} if dataplane else None) as bridge:
        await _run("ip", "addr", "add", f"{HOST_IP}/24", "dev", tap, ns=host)
        await _run("ip", "addr", "add", f"{GUEST_IP}/24", "dev", gtap, ns=guest)

        async def sample() -> Sample:
            s = await bridge.stats()
            return Sample(daemon_cpu(pid) or 0.0, s["tx_packets"] + s["rx_packets"],
                          s["tx_bytes"] + s["rx_bytes"])

        if queues == 1:
            await _tcp_udp(f, host, guest, HOST_IP, sample)
            if flows:
                f.tcp_out_m, f.tcp_in_m = await _flows(host, guest, HOST_IP)
        else:
            f.tcp_out_2, f.tcp_in_2 = await _flows(host, guest, HOST_IP)
        result = await bridge.finish()
    return result.raw


async def _rate_limited(nss: Namespaces) -> float:
    """TCP guest->host through a vif with a transmit rate set: Mbit/s received."""
    host, guest = nss.add("hr"), nss.add("gr")
    tap, gtap = f"{nss.tag}h", f"{nss.tag}g"
    async with _daemon_process() as (sock, _pid), \
            netfront(sock, host_ns=host, guest_ns=guest, host_tap=tap, guest_tap=gtap,
                     socket=True, config={"rate": f"{RATE_BYTES},{RATE_USEC}"}):
        await _run("ip", "addr", "add", f"{HOST_IP}/24", "dev", tap, ns=host)
        await _run("ip", "addr", "add", f"{GUEST_IP}/24", "dev", gtap, ns=guest)
        result = await _iperf(host, guest, HOST_IP, "-t", str(TCP_SECONDS))
    return _gbit(result) * 1e3


async def _main() -> tuple[Figures, Figures, Figures, list[dict], float]:
    nss = Namespaces()
    try:
        veth = await _veth(nss)
        daemon, python = Figures(), Figures()
        fronts = [await _daemon(nss, 1, daemon), await _daemon(nss, 2, daemon)]
        await _daemon(nss, 1, python, dataplane="python", flows=False)
        limited = await _rate_limited(nss)
    finally:
        nss.close()
    return daemon, python, veth, fronts, limited


def rows(daemon: Figures, python: Figures, veth: Figures) -> list[list[object]]:
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.0%}" if a == a and b == b and b else "-"

    def times(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if a == a and b == b and b else "-"

    out: list[list[object]] = []
    for label, name in (("TCP guest->host, 1 queue, Gbit/s", "tcp_out"),
                        ("TCP host->guest, 1 queue, Gbit/s", "tcp_in"),
                        (f"TCP guest->host, 1 queue, {FLOWS} flows, Gbit/s", "tcp_out_m"),
                        (f"TCP host->guest, 1 queue, {FLOWS} flows, Gbit/s", "tcp_in_m"),
                        (f"TCP guest->host, 2 queues, {FLOWS} flows, Gbit/s", "tcp_out_2"),
                        (f"TCP host->guest, 2 queues, {FLOWS} flows, Gbit/s", "tcp_in_2"),
                        ("UDP 64 B guest->host, kpps received", "udp_out"),
                        ("UDP 64 B host->guest, kpps received", "udp_in")):
        d, p, v = getattr(daemon, name), getattr(python, name), getattr(veth, name)
        out.append([label, d, p, v, ratio(d, v)])
    nan = float("nan")
    out += [[f"{FLOWS} flows: 2 queues / 1 queue, guest->host",
             times(daemon.tcp_out_2, daemon.tcp_out_m), "-", "-", "-"],
            [f"{FLOWS} flows: 2 queues / 1 queue, host->guest",
             times(daemon.tcp_in_2, daemon.tcp_in_m), "-", "-", "-"],
            ["daemon CPU per frame (UDP runs), us", daemon.us_per_frame, python.us_per_frame,
             nan, "-"],
            ["daemon CPU per 64 KiB (TCP, 1 queue), us", daemon.us_per_64k,
             python.us_per_64k, nan, "-"],
            ["mean frame the daemon moved (TCP), bytes", daemon.tcp_frame_bytes,
             python.tcp_frame_bytes, nan, "-"]]
    return out


LINES = ("tcp", "udp", "flows")


@contextlib.asynccontextmanager
async def _perf(pid: int, path: str | None):
    """`perf record -g` of the daemon process while the block runs (nothing without a
    path)."""
    if path is None:
        yield
        return
    proc = await asyncio.create_subprocess_exec(
        "perf", "record", "-g", "-q", "-p", str(pid), "-o", path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    await asyncio.sleep(0.3)  # attached
    try:
        yield
    finally:
        proc.send_signal(2)
        await proc.wait()


async def _only_run(nss: Namespaces, lines: set[str], perf: str | None,
                    run: int) -> dict[str, float]:
    """The lines asked for, once, on the compiled data plane: name -> figure."""
    out: dict[str, float] = {}
    for queues in (1, 2):
        if queues == 2 and "flows" not in lines:
            break
        host = nss.add(f"h{queues}{len(nss.made)}")
        guest = nss.add(f"g{queues}{len(nss.made)}")
        tap, gtap = f"{nss.tag}h", f"{nss.tag}g"
        async with _daemon_process() as (sock, pid), \
                netfront(sock, host_ns=host, guest_ns=guest, host_tap=tap, guest_tap=gtap,
                         queues=queues, socket=True) as bridge:
            await _run("ip", "addr", "add", f"{HOST_IP}/24", "dev", tap, ns=host)
            await _run("ip", "addr", "add", f"{GUEST_IP}/24", "dev", gtap, ns=guest)

            async def sample() -> Sample:
                s = await bridge.stats()
                return Sample(daemon_cpu(pid) or 0.0,
                              s["tx_packets"] + s["rx_packets"], s["tx_bytes"] + s["rx_bytes"])

            if queues == 1 and "tcp" in lines:
                for name, extra in (("tcp_out", ()), ("tcp_in", ("-R",))):
                    where = os.path.join(perf, f"{run}-{name}.data") if perf else None
                    async with _perf(pid, where):
                        r, d = await _measured(sample, _iperf(
                            host, guest, HOST_IP, "-t", str(TCP_SECONDS), *extra))
                    out[name] = _gbit(r)
                    if d and d[2]:
                        out[f"{name}_us_per_64k"] = d[0] / (d[2] / 65536) * 1e6
                        out[f"{name}_frame_bytes"] = d[2] / d[1]
            if queues == 1 and "udp" in lines:
                f = Figures()
                udp = ("-u", "-b", "0", "-l", "64", "-t", str(UDP_SECONDS))
                o, d1 = await _measured(sample, _iperf(host, guest, HOST_IP, *udp))
                i, d2 = await _measured(sample, _iperf(host, guest, HOST_IP, *udp, "-R"))
                out["udp_out"], out["udp_in"] = _kpps(o), _kpps(i)
                if d1 and d2 and d1[1] + d2[1]:
                    f.us_per_frame = (d1[0] + d2[0]) / (d1[1] + d2[1]) * 1e6
                    out["us_per_frame"] = f.us_per_frame
            if "flows" in lines:
                a, b = await _flows(host, guest, HOST_IP)
                out[f"flows_out_{queues}q"], out[f"flows_in_{queues}q"] = a, b
            await bridge.finish()
    if "tcp_out_us_per_64k" in out and "tcp_in_us_per_64k" in out:
        out["us_per_64k"] = (out["tcp_out_us_per_64k"] + out["tcp_in_us_per_64k"]) / 2
    if "flows_out_2q" in out:
        out["ratio_out"] = out["flows_out_2q"] / out["flows_out_1q"]
        out["ratio_in"] = out["flows_in_2q"] / out["flows_in_1q"]
    return out


async def _only(lines: set[str], repeat: int, perf: str | None) -> list[dict[str, float]]:
    runs = []
    nss = Namespaces()
    try:
        for k in range(repeat):
            r = await _only_run(nss, lines, perf, k)
            print(f"run {k + 1}/{repeat}, load {os.getloadavg()[0]:.1f}: "
                  + ", ".join(f"{n} {v:.2f}" for n, v in r.items()), flush=True)
            runs.append(r)
            nss.close()
    finally:
        nss.close()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.net")
    parser.add_argument("--only", help=f"comma-separated lines among {', '.join(LINES)}")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--perf", metavar="DIR", help="perf record the daemon in TCP runs")
    args = parser.parse_args()
    if shutil.which("iperf3") is None:
        raise SystemExit("bench.net: iperf3 is missing (`make bench` installs it)")
    if os.geteuid() != 0:
        raise SystemExit("bench.net: needs root (network namespaces and taps)")
    if args.only:
        lines = set(args.only.split(","))
        if not lines <= set(LINES):
            raise SystemExit(f"bench.net: --only takes {', '.join(LINES)}")
        if args.perf:
            os.makedirs(args.perf, exist_ok=True)
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        print(f"bench.net --only {args.only}, {when}, load average {os.getloadavg()[0]:.1f}")
        runs = uvloop.run(_only(lines, args.repeat, args.perf))
        print("medians: " + ", ".join(
            f"{n} {statistics.median(r[n] for r in runs if n in r):.2f}" for n in runs[0]))
        return
    load0 = os.getloadavg()[0]
    daemon, python, veth, fronts, limited = uvloop.run(_main())
    load1 = os.getloadavg()[0]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(table(f"netif through the daemon (C netfront) vs a veth pair, iperf3, {when}, "
                f"{os.cpu_count()} CPUs, load average {load0:.1f} -> {load1:.1f}",
                ["", "daemon", "python", "veth", "daemon/veth"],
                rows(daemon, python, veth)))
    set_mbit = RATE_BYTES * 8 / RATE_USEC
    print()
    print(table("tx rate limit on the vif: the rate set vs the rate reached (TCP guest->host, "
                "C netfront)", ["", "set Mbit/s", "measured Mbit/s", "measured/set"],
                [[f"rate = {RATE_BYTES},{RATE_USEC}", set_mbit, limited,
                  f"{limited / set_mbit:.0%}"]]))
    for raw in fronts:
        frames = raw["tx_frames"] + raw["rx_frames"]
        per = raw["cpu_seconds"] / frames * 1e6 if frames else float("nan")
        print(f"C netfront, {raw['queues']} queue(s): {frames} frames "
              f"({raw['tx_gso']} tx + {raw['rx_gso']} rx GSO), {per:.1f} us CPU per frame, "
              f"{raw['kicks']} kicks, {raw['wakeups']} wakeups, frames per queue "
              f"{raw['frames_per_queue']}")


if __name__ == "__main__":
    main()
