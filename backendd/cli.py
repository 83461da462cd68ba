"""`backendd` command line: serve, status, stats, ring-dump, demo.

The common options (--config, --socket, --timeout) are accepted before and after the
command. Errors are one line on stderr naming what failed (the socket path, the config
file), with exit status 1 (2 for a bad configuration), never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

from . import __version__
from .config import ConfigFileError, load_config
from .errors import ControlError, StartupError
from .metrics import device_counters, group_status, guest_label, render_status

DEFAULT_TIMEOUT = 10.0


class CliError(Exception):
    """An operator-facing failure: printed as `backendd: <message>`, exit status 1."""


def _socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    return load_config(args.config).daemon.socket


async def _with_client(args: argparse.Namespace, work: Callable[..., Awaitable[int]]) -> int:
    """Connect to the daemon at the socket, run `work(client)`, all within --timeout."""
    from .guest.vmm import ConnectionLost, VmmClient

    path = _socket_path(args)

    async def session() -> int:
        client = await VmmClient.connect(path)
        try:
            return await work(client)
        finally:
            await client.close()

    try:
        return await asyncio.wait_for(session(), args.timeout)
    except TimeoutError:
        raise CliError(f"{path}: the daemon did not answer within {args.timeout:g}s "
                       "(stopped or overloaded?)") from None
    except ControlError as exc:
        raise CliError(f"{path}: {exc}") from None
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise CliError(f"{path}: cannot reach the daemon: {exc.strerror} "
                       "(is it running?)") from None
    except ConnectionLost as exc:
        raise CliError(f"{path}: {exc}") from None
    except OSError as exc:
        raise CliError(f"{path}: cannot reach the daemon: {exc.strerror or exc}") from None


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon import run
    from .supervisor import prepare

    config = load_config(args.config)
    if args.ready_fd is not None:
        try:
            os.fstat(args.ready_fd)
        except OSError:
            raise CliError(f"--ready-fd {args.ready_fd}: not an open file descriptor") from None
    prepare(config)  # per-connection: fork the zygote before any loop or thread exists
    return uvloop.run(run(config, args.socket, ready_fd=args.ready_fd))


def _connections(status: dict[str, str]) -> list[dict[str, Any]]:
    """Connections other than the asking one, with their devices."""
    own = status.get("self")
    out = []
    for conn_id, info in group_status(status).items():
        if conn_id == own:
            continue
        devices = []
        for devid, (type_name, counters) in device_counters(info).items():
            d = f"dev.{devid}."
            rings = info.get(d + "rings", "")
            devices.append({"devid": int(devid), "type": type_name,
                            "state": info.get(d + "state", ""),
                            "rings": rings.split(",") if rings else [],
                            "counters": counters})
        out.append({"conn": int(conn_id), "guest": info.get("guest", ""),
                    "peer": info.get("peer", ""),
                    "memory_bytes": int(info.get("memory_bytes", "0") or 0),
                    "memory_regions": int(info.get("memory_regions", "0") or 0),
                    "unread_reply_bytes": int(info.get("unread_reply_bytes", "0") or 0),
                    "grant_frames": int(info.get("grant_frames", "0") or 0),
                    "requests": int(info.get("requests", "0") or 0),
                    "errors": int(info.get("errors", "0") or 0),
                    "devices": devices,
                    # per-connection: the worker's state (ok, unresponsive, gone...)
                    **({"worker": info["worker"]} if "worker" in info else {})})
    return out


def cmd_status(args: argparse.Namespace) -> int:
    async def work(client) -> int:
        status = await client.daemon_status()  # every page
        conns = _connections(status)
        if args.json:
            _print_json({"version": status.get("version", ""),
                         "uptime_seconds": float(status.get("uptime_seconds", "0") or 0),
                         "connections": conns})
            return 0
        print(f"daemon {status.get('version', '?')}, up "
              f"{float(status.get('uptime_seconds', '0') or 0):.0f}s; "
              f"connections: {len(conns)} (not counting this one)")
        for c in conns:
            print(f"conn {c['conn']}: guest={c['guest'] or '-'} {c['peer']} "
                  f"devices={len(c['devices'])} memory={c['memory_bytes'] >> 20}MiB "
                  f"grant_frames={c['grant_frames']} requests={c['requests']} "
                  f"errors={c['errors']}"
                  + (f" worker={c['worker']}" if c.get("worker", "ok") != "ok" else ""))
            for d in c["devices"]:
                print(f"  device {d['devid']}: type={d['type']} state={d['state']} "
                      f"rings={','.join(d['rings']) or '-'}")
        return 0

    return uvloop.run(_with_client(args, work))


def cmd_stats(args: argparse.Namespace) -> int:
    async def work(client) -> int:
        status = await client.daemon_status()  # every page
        if args.prometheus:
            sys.stdout.write(render_status(status))
            return 0
        devices = []
        for conn_id, info in group_status(status).items():
            for devid, (type_name, counters) in device_counters(info).items():
                devices.append({"conn": int(conn_id), "guest": guest_label(info, conn_id),
                                "devid": int(devid), "type": type_name,
                                "counters": counters})
        if args.json:
            _print_json({"devices": devices})
            return 0
        if not devices:
            print("no devices")
            return 0
        for d in devices:
            text = " ".join(f"{k}={v}" for k, v in sorted(d["counters"].items()))
            print(f"conn={d['conn']} guest={d['guest']} devid={d['devid']} type={d['type']} "
                  f"{text}")
        return 0

    return uvloop.run(_with_client(args, work))


def cmd_ring_dump(args: argparse.Namespace) -> int:
    from .protocol.messages import RingDump
    from .ringdump import describe, table

    async def work(client) -> int:
        reply = await client.request(RingDump(args.conn, args.devid, args.ring))
        info = reply.info
        try:
            desc = describe(info["layout"], reply.data, int(info["size"]), args.slots)
        except (KeyError, ValueError) as exc:
            raise CliError(f"ring-dump: cannot decode the reply: {exc}") from None
        desc = {"conn": args.conn, "devid": args.devid, "ring": info.get("name", ""),
                "truncated": info.get("truncated") == "1", **desc}
        if args.json:
            _print_json(desc)
            return 0
        print(f"ring {desc['ring']} of device {args.devid} (connection {args.conn})"
              + (" [dump truncated]" if desc["truncated"] else ""))
        for line in table(desc):
            print(line)
        return 0

    return uvloop.run(_with_client(args, work))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return uvloop.run(run_demo(args))


def _common(default: Any) -> argparse.ArgumentParser:
    """The options every command takes. The top-level parser holds the defaults; each
    command's copy has none (SUPPRESS), so it only sets what is given after the command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=default(None),
                        help="TOML configuration (default /etc/backendd/backendd.toml if "
                             "present, else built-in defaults)")
    common.add_argument("--socket", default=default(None),
                        help="control socket path (overrides [daemon] socket)")
    common.add_argument("--timeout", type=float, default=default(DEFAULT_TIMEOUT),
                        metavar="SECONDS",
                        help="how long status/stats/ring-dump wait for the daemon "
                             f"(default {DEFAULT_TIMEOUT:g})")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backendd", parents=[_common(lambda v: v)],
        description="Xen PV block and network backends for KVM guests, as a daemon. "
                    "Options may come before or after the command.")
    parser.add_argument("--version", action="version", version=f"backendd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_common(lambda v: argparse.SUPPRESS)]

    p = sub.add_parser("serve", parents=common, help="run the daemon")
    p.add_argument("--ready-fd", type=int, default=None, metavar="N",
                   help="write READY=1 and a newline to file descriptor N, then close it, "
                        "once the control socket listens (for supervisors without systemd)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("status", parents=common,
                       help="connections and devices of a running daemon")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("stats", parents=common, help="per-device counters of a running daemon")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--prometheus", action="store_true",
                     help="print in the Prometheus text exposition format")
    fmt.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("ring-dump", parents=common,
                       help="decode a live ring of a running daemon")
    p.add_argument("conn", type=int, help="connection id (see `backendd status`)")
    p.add_argument("devid", type=int)
    p.add_argument("ring", type=int, nargs="?", default=0,
                   help="ring index in the order `status` lists them (default 0)")
    p.add_argument("--slots", type=int, default=8,
                   help="answered slots to show before the pending ones (default 8)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_ring_dump)
    p = sub.add_parser("demo", parents=common,
                       help="a daemon and a simulated guest with a disk and a nic")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to run traffic")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeout <= 0:
        print("backendd: --timeout must be more than 0", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except ConfigFileError as exc:
        print(f"backendd: configuration: {exc}", file=sys.stderr)
        return 2
    except (CliError, StartupError) as exc:
        print(f"backendd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
