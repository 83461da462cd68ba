"""The unit files say what we promise. `systemd-analyze verify` runs on the installed
units, in tests/test_install.py."""

import configparser
from pathlib import Path

UNITS = Path(__file__).resolve().parent.parent / "systemd"


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def test_service_is_notify_with_watchdog_and_restart() -> None:
    service = _unit("backendd.service")["Service"]
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert service["WatchdogSec"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == "CAP_NET_ADMIN"
    assert "/dev/net/tun rw" in (UNITS / "backendd.service").read_text()


def test_socket_is_private() -> None:
    socket = _unit("backendd.socket")["Socket"]
    assert socket["SocketMode"] == "0600"
    assert socket["ListenStream"].endswith(".sock")
