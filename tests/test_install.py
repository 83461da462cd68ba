"""`make install` and `make uninstall` into a scratch root (DESTDIR): the installed layout
is what the units name, the installed package runs, `systemd-analyze verify` passes on the
installed units with that root, and uninstall removes what install put there."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from backendd.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
PREFIX = "/usr/local"


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(REPO), f"PYTHON={sys.executable}", *args],
                          capture_output=True, text=True, timeout=600)


def test_sample_configuration_is_the_defaults_and_names_every_key() -> None:
    sample = REPO / "conf" / "backendd.toml"
    assert load_config(sample) == Config()
    text = sample.read_text()
    for section, fields in (("daemon", Config().daemon), ("block", Config().block),
                            ("network", Config().network), ("metrics", Config().metrics)):
        assert f"[{section}]" in text
        for name in vars(fields):
            assert f"# {name} = " in text, f"[{section}] {name} missing from the sample"


def test_prefix_reaches_the_unit() -> None:
    dry = make("-n", "install", "PREFIX=/opt/bd", "DESTDIR=/nonexistent")
    assert dry.returncode == 0, dry.stderr
    assert "ExecStart=/opt/bd/bin/backendd" in dry.stdout
    assert "/nonexistent/opt/bd/lib/backendd" in dry.stdout
    assert "/nonexistent/opt/bd/lib/systemd/system/backendd.service" in dry.stdout


def test_install_verify_and_uninstall_in_a_scratch_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = make("install", f"DESTDIR={root}")
    assert result.returncode == 0, result.stdout + result.stderr
    lib = root / PREFIX.lstrip("/") / "lib" / "backendd"
    units = root / PREFIX.lstrip("/") / "lib" / "systemd" / "system"
    binary = root / PREFIX.lstrip("/") / "bin" / "backendd"

    # The layout names final paths, never the staging root.
    assert os.readlink(binary) == f"{PREFIX}/lib/backendd/bin/backendd"
    assert (lib / "bin" / "backendd").read_text().splitlines()[0] == \
        f"#!{PREFIX}/lib/backendd/bin/python"
    for script in (lib / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            assert str(root) not in script.read_text(errors="replace"), script
    service = (units / "backendd.service").read_text()
    assert f"ExecStart={PREFIX}/bin/backendd serve" in service
    assert (units / "backendd.socket").read_text() == \
        (REPO / "systemd" / "backendd.socket").read_text()
    assert (root / "etc/backendd/backendd.toml").read_text() == \
        (REPO / "conf/backendd.toml").read_text()
    assert (root / f"{PREFIX.lstrip('/')}/share/doc/backendd/LICENSE").exists()
    images = root / "var/lib/backendd/images"
    assert stat.S_IMODE(images.stat().st_mode) == 0o700
    # The compiled blk and net data planes were built into the installed package.
    for name in ("_blk_kernel.so", "_net_kernel.so"):
        assert list(lib.glob(f"lib/python3*/site-packages/backendd/dataplane/{name}")), name

    # The installed package runs on its own, with its dependencies: serve, ready, status.
    python = lib / "bin" / "python"
    version = subprocess.run([python, "-m", "backendd", "--version"], capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("backendd "), version.stderr
    sock = str(tmp_path / "s.sock")
    read, write = os.pipe()
    daemon = subprocess.Popen([python, "-m", "backendd", "serve", "--socket", sock,
                               "--config", str(root / "etc/backendd/backendd.toml"),
                               "--ready-fd", str(write)], pass_fds=(write,),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as ready:
            assert ready.read() == b"READY=1\n"
        status = subprocess.run([python, "-m", "backendd", "status", "--socket", sock],
                                capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert status.returncode == 0, status.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=30)
    assert daemon.returncode == 0

    # systemd-analyze verify on the installed units, resolving ExecStart in the scratch
    # root; the root gets the host's own units for the dependencies (sysinit.target...).
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze missing (Debian package systemd)"
    host_units = Path("/usr/lib/systemd/system")
    if not host_units.is_dir():
        pytest.skip("no systemd units on this host to verify against")
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    verify = subprocess.run([tool, "verify", f"--root={root}", "backendd.socket",
                             "backendd.service"], capture_output=True, text=True, timeout=120)
    # systemd 252 exits 0 on unknown keys and bad values, warning only on stderr.
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr

    # Uninstall: everything install added goes, a changed configuration stays.
    config = root / "etc/backendd/backendd.toml"
    config.write_text(config.read_text() + "# changed here\n")
    result = make("uninstall", f"DESTDIR={root}")
    assert result.returncode == 0, result.stdout + result.stderr
    shutil.rmtree(root / "usr/lib/systemd/system")
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())
    assert left == ["etc/backendd/backendd.toml"]
