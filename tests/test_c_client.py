"""The C client library (clients/c) against a real `backendd serve` process: its example
sets up a guest with a disk and does verified block I/O through Xen's ring.h, once built
plainly and once under AddressSanitizer and UBSan, where any sanitizer report fails."""

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
    return out / "guest-disk"


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


@pytest.mark.parametrize("sanitize", [False, True], ids=["plain", "asan-ubsan"])
def test_c_example_drives_the_daemon(serve: Serve, tmp_path: Path, sanitize: bool) -> None:
    binary = build(tmp_path / "build", sanitize)
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20) * 16)  # 16 MiB of data the writes overwrite
    env = {**os.environ,
           "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=99",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=98"}
    result = subprocess.run([str(binary), serve.path, str(image)], capture_output=True,
                            text=True, timeout=120, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "guest-disk: ok" in result.stdout, output
    for mark in SANITIZER_MARKS:
        assert mark not in output, output
    # Every step the example reports, so a silently skipped one shows.
    for step in ("Connected, 32768 sectors", "48 verified reads and writes",
                 "refused: a read past the end", "grown to 2 frames",
                 "KEYS_CHANGED sectors=34816", "stats: writes=25 reads=25",
                 "Closed and removed"):
        assert step in result.stdout, output
    rc, log = serve.stop()
    assert rc == 0, log
    assert "event=device_connected" in log and "event=device_removed" in log, log
