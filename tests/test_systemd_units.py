"""The unit files pass `systemd-analyze verify` with no warning, and say what we promise."""

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def _installed_backendd() -> str:
    found = shutil.which("backendd") or str(Path(sys.executable).parent / "backendd")
    assert Path(found).exists(), "the backendd console script is not installed"
    return found


@pytest.mark.parametrize("unit", ["backendd.socket", "backendd.service"])
def test_systemd_analyze_verify_is_silent(tmp_path: Path, unit: str) -> None:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze missing (Debian package systemd)"
    for name in ("backendd.socket", "backendd.service"):
        text = (UNITS / name).read_text()
        # verify checks that ExecStart exists; point it at this checkout's installed script.
        text = text.replace("/usr/local/bin/backendd", _installed_backendd())
        (tmp_path / name).write_text(text)
    result = subprocess.run([tool, "verify", str(tmp_path / unit)], capture_output=True,
                            text=True, timeout=60)
    # systemd 252 exits 0 on unknown keys and bad values, warning only on stderr.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


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
