"""The C client library (clients/c) against a real `backendd serve` process: its example
sets up a guest with a disk and does verified block I/O through Xen's ring.h, and its
check program drives the error paths (error replies, a notice, a timeout, the daemon
going away); each once built plainly and once under AddressSanitizer and UBSan, where any
sanitizer report fails."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "clients" / "c"
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                   "SUMMARY: AddressSanitizer", "SUMMARY: UndefinedBehaviorSanitizer")


def build(out: Path, sanitize: bool) -> Path:
    assert shutil.which("gcc"), "gcc is missing: run `make test`, which installs it"
    assert Path("/usr/include/xen/io/ring.h").exists(), (
        "Xen public headers missing: run `make test`, which installs libxen-dev")
    cmd = ["make", "-s", "-C", str(CLIENT), f"O={out}", "CC=gcc"]
    if sanitize:
        cmd.append("SANITIZE=1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}{result.stderr}"
    return out


class Serve:
    """`backendd serve` as a process; ready once it says READY=1 on its NOTIFY_SOCKET."""

    def __init__(self, tmp: Path) -> None:
        self.path = str(tmp / "backendd.sock")
        config = tmp / "backendd.toml"
        config.write_text("")
        notify_path = str(tmp / "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify_path)
        self.notify.settimeout(30)
        env = {**os.environ, "NOTIFY_SOCKET": notify_path}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backendd", "--config", str(config), "--socket", self.path,
             "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self) -> None:
        while b"READY=1" not in self.notify.recv(4096):
            pass

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return self.proc.returncode, out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        self.notify.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    daemon = Serve(tmp_path)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.close()


SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=99",
                 "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=98"}


def run_clean(argv: list[str]) -> subprocess.CompletedProcess:
    """Run a C program; it must exit 0, say ok, and leave no sanitizer report."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                            env={**os.environ, **SANITIZER_ENV})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"{Path(argv[0]).name}: ok" in result.stdout, output
    for mark in SANITIZER_MARKS:
        assert mark not in output, output
    return result


@pytest.mark.parametrize("sanitize", [False, True], ids=["plain", "asan-ubsan"])
def test_c_example_drives_the_daemon(serve: Serve, tmp_path: Path, sanitize: bool) -> None:
    binary = build(tmp_path / "build", sanitize) / "guest-disk"
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20) * 16)  # 16 MiB of data the writes overwrite
    result = run_clean([str(binary), serve.path, str(image)])
    # Every step the example reports, so a silently skipped one shows.
    for step in ("Connected, 32768 sectors", "48 verified reads and writes",
                 "refused: a read past the end", "grown to 2 frames",
                 "KEYS_CHANGED sectors=34816", "stats: writes=25 reads=25",
                 "Closed and removed"):
        assert step in result.stdout, result.stdout
    rc, log = serve.stop()
    assert rc == 0, log
    assert "event=device_connected" in log and "event=device_removed" in log, log


@pytest.mark.parametrize("sanitize", [False, True], ids=["plain", "asan-ubsan"])
def test_c_client_error_paths(serve: Serve, tmp_path: Path, sanitize: bool) -> None:
    binary = build(tmp_path / "build", sanitize) / "client-check"
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    result = run_clean([str(binary), serve.path, str(image), str(serve.proc.pid)])
    for step in ("a named guest", "connection alive", "F_SEAL_SHRINK set", "FRONTEND_MISBEHAVED",
                 "a pipe refused with EBADF", "migration: SUSPEND, a",
                 "dirty log: a pipe EBADF", "bound: 128 memory regions, then ENOSPC",
                 "-ETIMEDOUT, then -EPIPE", "-ECONNRESET, then -EPIPE"):
        assert step in result.stdout, result.stdout
    # The check program ended the daemon with SIGTERM: a clean stop.
    assert serve.proc.wait(timeout=30) == 0
