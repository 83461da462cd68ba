"""`backendd` command line: serve, status, stats, ring-dump, demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

from .config import ConfigFileError, load_config
from .errors import ControlError


def _socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    return load_config(args.config).daemon.socket


async def _with_client(path: str, work: Callable[..., Awaitable[int]]) -> int:
    from .guest.vmm import VmmClient

    client = await VmmClient.connect(path)
    try:
        return await work(client)
    finally:
        await client.close()


def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon import run

    config = load_config(args.config)
    return uvloop.run(run(config, args.socket))


def _group_status(status: dict[str, str]) -> dict[str, dict[str, str]]:
    conns: dict[str, dict[str, str]] = {}
    for key, value in status.items():
        parts = key.split(".", 2)
        if parts[0] == "conn" and len(parts) == 3:
            conns.setdefault(parts[1], {})[parts[2]] = value
    return conns


def cmd_status(args: argparse.Namespace) -> int:
    async def work(client) -> int:
        status = await client.daemon_status()  # every page
        conns = _group_status(status)
        print(f"connections: {status.get('connections', '0')}")
        for conn_id, info in sorted(conns.items(), key=lambda kv: int(kv[0])):
            print(f"conn {conn_id}: {info.get('peer', '')} devices={info.get('devices')} "
                  f"memory={int(info.get('memory_bytes', '0')) >> 20}MiB "
                  f"grant_frames={info.get('grant_frames')} requests={info.get('requests')} "
                  f"errors={info.get('errors')}")
            devids = sorted({k.split(".")[1] for k in info if k.startswith("dev.")}, key=int)
            for devid in devids:
                d = f"dev.{devid}."
                print(f"  device {devid}: type={info.get(d + 'type')} "
                      f"state={info.get(d + 'state')} rings={info.get(d + 'rings') or '-'}")
        return 0

    return uvloop.run(_with_client(_socket_path(args), work))


def cmd_stats(args: argparse.Namespace) -> int:
    from .metrics import render

    async def work(client) -> int:
        status = await client.daemon_status()  # every page
        devices = []
        for conn_id, info in sorted(_group_status(status).items(), key=lambda kv: int(kv[0])):
            per_dev: dict[str, dict[str, int]] = {}
            for key, value in info.items():
                parts = key.split(".", 3)
                if len(parts) == 4 and parts[0] == "dev" and parts[2] == "stat":
                    per_dev.setdefault(parts[1], {})[parts[3]] = int(value)
            for devid, counters in sorted(per_dev.items(), key=lambda kv: int(kv[0])):
                labels = {"conn": conn_id, "devid": devid,
                          "type": info.get(f"dev.{devid}.type", "")}
                devices.append((labels, counters))
        if args.prometheus:
            sys.stdout.write(render(devices))
            return 0
        for labels, counters in devices:
            text = " ".join(f"{k}={v}" for k, v in sorted(counters.items()))
            print(f"conn={labels['conn']} devid={labels['devid']} type={labels['type']} {text}")
        return 0

    return uvloop.run(_with_client(_socket_path(args), work))


def cmd_ring_dump(args: argparse.Namespace) -> int:
    from .protocol.messages import RingDump
    from .ringdump import decode

    async def work(client) -> int:
        reply = await client.request(RingDump(args.conn, args.devid, args.ring))
        info = reply.info
        print(f"ring {info['name']} of device {args.devid} (connection {args.conn})"
              + (" [dump truncated]" if info.get("truncated") == "1" else ""))
        for line in decode(info["layout"], reply.data, int(info["size"]), args.slots):
            print(line)
        return 0

    return uvloop.run(_with_client(_socket_path(args), work))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return uvloop.run(run_demo(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backendd",
        description="Xen PV block and network backends for KVM guests, as a daemon.")
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML configuration (default /etc/backendd/backendd.toml if "
                             "present, else built-in defaults)")
    parser.add_argument("--socket", default=None,
                        help="control socket path (overrides [daemon] socket)")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="run the daemon").set_defaults(func=cmd_serve)
    sub.add_parser("status", help="connections and devices of a running daemon"
                   ).set_defaults(func=cmd_status)
    p = sub.add_parser("stats", help="per-device counters of a running daemon")
    p.add_argument("--prometheus", action="store_true",
                   help="print in the Prometheus text exposition format")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("ring-dump", help="decode a live ring of a running daemon")
    p.add_argument("conn", type=int, help="connection id (see `backendd status`)")
    p.add_argument("devid", type=int)
    p.add_argument("ring", type=int, nargs="?", default=0,
                   help="ring index in the order `status` lists them (default 0)")
    p.add_argument("--slots", type=int, default=8, help="slots to show (default 8)")
    p.set_defaults(func=cmd_ring_dump)
    p = sub.add_parser("demo", help="a daemon and a simulated guest with a disk and a nic")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to run traffic")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigFileError as exc:
        print(f"backendd: configuration: {exc}", file=sys.stderr)
        return 2
    except ControlError as exc:
        print(f"backendd: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        print(f"backendd: cannot reach the daemon: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
