"""A nic with `netns` works in a daemon process holding exactly the capabilities the
systemd unit grants (CapabilityBoundingSet / AmbientCapabilities, NoNewPrivileges), as
setpriv sets them up the way systemd does for a root service: the tap is moved into the
namespace with netlink, never by entering the namespace."""

from __future__ import annotations

import asyncio
import configparser
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_net_harness import connect_and_ping, namespaces, uniq

from backendd.guest import SimGuest, VmmClient
from backendd.guest.netfront import NetFront

# Taps, bridges and namespaces need root: without it these tests fail, never skip.
pytestmark = pytest.mark.usefixtures("root")

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "backendd.service"


def unit_caps(key: str) -> list[str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser["Service"][key].split()


def cap_mask(names: list[str]) -> int:
    """The kernel's bit mask for capability names (setpriv lists them in bit order)."""
    order = subprocess.run(["setpriv", "--list-caps"], capture_output=True, text=True,
                           check=True).stdout.split()
    return sum(1 << order.index(n.removeprefix("CAP_").lower()) for n in names)


def proc_caps(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Cap"):
            out[key] = int(value.strip(), 16)
    return out


async def wait_ready(notify: socket.socket, proc: subprocess.Popen) -> None:
    loop = asyncio.get_running_loop()
    while True:
        msg = await asyncio.wait_for(loop.sock_recv(notify, 4096), 30)
        if b"READY=1" in msg:
            return
        assert proc.poll() is None, proc.communicate()


async def test_nic_with_netns_under_the_units_capabilities(tmp_path: Path) -> None:
    bounding = unit_caps("CapabilityBoundingSet")
    ambient = unit_caps("AmbientCapabilities")
    assert set(ambient) <= set(bounding)

    def setpriv_list(names: list[str]) -> str:
        return ",".join(["-all", *("+" + n.removeprefix("CAP_").lower() for n in names)])

    path = str(tmp_path / "backendd.sock")
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.setblocking(False)
    config = tmp_path / "backendd.toml"
    config.write_text("")
    host, gns = uniq("cph"), uniq("cpg")
    tap, gtap = uniq("cp") + "t", uniq("cp") + "g"
    with namespaces(host, gns):
        proc = subprocess.Popen(
            ["setpriv", "--bounding-set", setpriv_list(bounding),
             "--inh-caps", setpriv_list(ambient), "--ambient-caps", setpriv_list(ambient),
             "--no-new-privs", "--",
             sys.executable, "-m", "backendd", "--config", str(config), "--socket", path,
             "serve"],
            env={**os.environ, "NOTIFY_SOCKET": notify_path},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        client = guest = front = None
        try:
            await wait_ready(notify, proc)
            caps = proc_caps(proc.pid)
            assert caps["CapBnd"] == cap_mask(bounding)
            assert caps["CapEff"] == caps["CapPrm"] == cap_mask(bounding)
            assert caps["CapEff"] & cap_mask(["CAP_SYS_ADMIN"]) == 0

            client = await VmmClient.connect(path)
            guest = SimGuest(ram_size=48 << 20, gnttab_frames=16)
            await guest.attach(client)
            _, keys = await client.add_device(0, "net", {"tap": tap, "netns": host,
                                                         "queues": "1"})
            front = NetFront(guest.ram, guest.gnttab, 0)
            # The daemon's tap is up in its namespace, and traffic flows both ways.
            await connect_and_ping(client, front, keys["mac"], host, tap, gns, gtap,
                                   "10.77.21")
            await client.remove_device(0)
        finally:
            if front is not None:
                front.close()
            if client is not None:
                await client.close()
            if guest is not None:
                guest.close()
            proc.terminate()
            out, _ = proc.communicate(timeout=30)
            notify.close()
        assert "request_crashed" not in out, out


def test_the_unit_needs_no_namespace_switching() -> None:
    """The daemon never enters a namespace, so the unit allows none and no setns."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    service = parser["Service"]
    assert service["RestrictNamespaces"] == "yes"
    assert "setns" not in UNIT.read_text()
