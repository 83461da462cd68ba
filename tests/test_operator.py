"""`backendd serve` and the operator commands as an operator meets them, with real
processes: socket ownership (no takeover, no deleting another daemon's socket), readiness
(`--ready-fd`, a socket path that appears only once it listens), one-line startup errors,
CLI timeouts against a stopped daemon, options before and after the command, --json."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import backendd

BACKENDD = [sys.executable, "-m", "backendd"]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*BACKENDD, *args], capture_output=True, text=True,
                          timeout=timeout)


class Daemon:
    """`backendd serve ... --ready-fd N`, waited for on the pipe, never by polling."""

    def __init__(self, tmp: Path, *args: str, sock: str | None = None,
                 config: str = "") -> None:
        self.path = sock or str(tmp / "backendd.sock")
        cfg = tmp / f"backendd-{len(list(tmp.glob('backendd-*.toml')))}.toml"
        cfg.write_text(config)
        read, write = os.pipe()
        self.proc = subprocess.Popen(
            [*BACKENDD, "serve", "--socket", self.path, "--config", str(cfg),
             "--ready-fd", str(write), *args],
            pass_fds=(write,), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.close(write)
        self._ready = read

    def wait_ready(self, timeout: float = 30) -> bytes:
        """What the daemon wrote on its ready fd: b"READY=1\\n", or b"" if it exited."""
        try:
            got = b""
            while True:
                r, _, _ = select.select([self._ready], [], [], timeout)
                assert r, f"no readiness within {timeout}s"
                chunk = os.read(self._ready, 64)
                if not chunk:
                    return got
                got += chunk
        finally:
            os.close(self._ready)
            self._ready = -1

    def stop(self) -> tuple[str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
        out, err = self.proc.communicate(timeout=30)
        return out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)
        if self._ready >= 0:
            os.close(self._ready)
            self._ready = -1


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Every daemon a test starts is killed at the end, however the test ends."""
    started: list[Daemon] = []
    try:
        yield started
    finally:
        for d in started:
            d.kill()


def start(daemons: list[Daemon], tmp: Path, *args: str, **kw) -> Daemon:
    d = Daemon(tmp, *args, **kw)
    daemons.append(d)
    return d


def one_line_error(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_ready_fd_and_the_socket_listens_when_it_appears(daemons, tmp_path) -> None:
    d = start(daemons, tmp_path)
    assert d.wait_ready() == b"READY=1\n"
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(d.path)
    # No temporary name is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_socket()) == ["backendd.sock"]
    out, _ = d.stop()
    assert f"event=listening socket={d.path}" in out
    assert not os.path.exists(d.path)


def test_a_second_daemon_refuses_a_live_socket(daemons, tmp_path) -> None:
    first = start(daemons, tmp_path)
    assert first.wait_ready() == b"READY=1\n"
    inode = os.stat(first.path).st_ino
    second = start(daemons, tmp_path)
    assert second.wait_ready() == b""  # it exited without ever being ready
    _, err = second.stop()
    assert second.proc.returncode == 1
    line = one_line_error(err)
    assert line == (f"backendd: control socket {first.path}: a daemon is already listening "
                    "there; stop it first or choose another --socket")
    # The live daemon's socket is the same file, and it still answers.
    assert os.stat(first.path).st_ino == inode
    status = cli("status", "--socket", first.path)
    assert status.returncode == 0, status.stderr


def test_stopping_a_daemon_leaves_another_daemons_socket(daemons, tmp_path) -> None:
    """The first daemon's socket file is removed by hand and a second daemon binds the
    path: stopping the first must not delete the second's socket."""
    first = start(daemons, tmp_path)
    assert first.wait_ready() == b"READY=1\n"
    os.unlink(first.path)
    second = start(daemons, tmp_path)
    assert second.wait_ready() == b"READY=1\n"
    first.stop()
    assert first.proc.returncode == 0
    assert os.path.exists(second.path)
    assert cli("status", "--socket", second.path).returncode == 0
    second.stop()
    assert not os.path.exists(second.path)


def test_a_stale_socket_is_replaced(daemons, tmp_path) -> None:
    path = tmp_path / "backendd.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # bound, never listening, closed: what a killed daemon leaves
    d = start(daemons, tmp_path)
    assert d.wait_ready() == b"READY=1\n"
    assert cli("status", "--socket", str(path)).returncode == 0


def test_metrics_address_in_use_is_one_line_and_leaves_no_socket(daemons, tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        d = start(daemons, tmp_path, config=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        assert d.wait_ready() == b""
        _, err = d.stop()
    assert d.proc.returncode == 1
    line = one_line_error(err)
    assert line.startswith(f"backendd: metrics: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in line
    assert not os.path.exists(d.path)
    assert not [p for p in tmp_path.iterdir() if p.is_socket()]


@pytest.mark.parametrize("where", ["proc", "not-a-dir", "not-a-socket", "too-long"])
def test_startup_errors_name_the_path(daemons, tmp_path, where) -> None:
    if where == "proc":
        path = "/proc/backendd-test.sock"
    elif where == "too-long":
        # Connectable by no client (sockaddr_un holds 108 bytes with the NUL), though a
        # short temporary name in the same directory could still be bound and linked.
        path = str(tmp_path / ("x" * (110 - len(str(tmp_path)))))
    elif where == "not-a-dir":
        (tmp_path / "file").write_text("")
        path = str(tmp_path / "file" / "backendd.sock")
    else:
        path = str(tmp_path / "backendd.sock")
        Path(path).write_text("keep me")
    d = start(daemons, tmp_path, sock=path)
    assert d.wait_ready() == b""
    _, err = d.stop()
    assert d.proc.returncode == 1
    assert one_line_error(err).startswith(f"backendd: control socket {path}: ")
    if where == "not-a-socket":
        assert Path(path).read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.is_socket()]


def test_cli_times_out_on_a_stopped_daemon(daemons, tmp_path) -> None:
    d = start(daemons, tmp_path)
    assert d.wait_ready() == b"READY=1\n"
    d.proc.send_signal(signal.SIGSTOP)
    try:
        result = cli("status", "--socket", d.path, "--timeout", "1")
    finally:
        d.proc.send_signal(signal.SIGCONT)
    assert result.returncode == 1
    assert one_line_error(result.stderr) == (
        f"backendd: {d.path}: the daemon did not answer within 1s (stopped or overloaded?)")


def test_options_before_and_after_the_command(daemons, tmp_path) -> None:
    # `serve --socket X` (after the command) is what Daemon runs.
    d = start(daemons, tmp_path)
    assert d.wait_ready() == b"READY=1\n"
    before = cli("--socket", d.path, "--timeout", "5", "stats")
    after = cli("stats", "--socket", d.path, "--timeout", "5")
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert before.stdout == after.stdout == "no devices\n"
    version = cli("--version")
    assert version.returncode == 0 and version.stdout == f"backendd {backendd.__version__}\n"
    absent = cli("status", "--socket", str(tmp_path / "absent.sock"))
    assert absent.returncode == 1
    assert one_line_error(absent.stderr).startswith(
        f"backendd: {tmp_path / 'absent.sock'}: cannot reach the daemon")


def test_json_and_own_connection(daemons, tmp_path) -> None:
    """status/stats/ring-dump --json while a named guest has a disk; status leaves out the
    connection it asks on."""
    from diskguest import guest_with_disk

    d = start(daemons, tmp_path)
    assert d.wait_ready() == b"READY=1\n"
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))

    async def scenario() -> dict[str, subprocess.CompletedProcess]:
        async with guest_with_disk(d.path, image, name="web1") as front:
            for i in range(3):
                await front.write(i * 8, bytes([i]) * 4096)
            loop = asyncio.get_running_loop()
            results = {}
            for name, args in (("status", ["status", "--json"]),
                               ("plain", ["status"]),
                               ("stats", ["stats", "--json"]),
                               ("dump", ["ring-dump", "1", "51712", "--json"]),
                               ("table", ["ring-dump", "1", "51712", "--slots", "2"])):
                results[name] = await loop.run_in_executor(
                    None, lambda a=args: cli(*a, "--socket", d.path))
            return results

    results = asyncio.run(scenario())
    for r in results.values():
        assert r.returncode == 0, r.stderr
    status = json.loads(results["status"].stdout)
    assert [c["guest"] for c in status["connections"]] == ["web1"]
    disk = status["connections"][0]["devices"][0]
    assert (disk["devid"], disk["type"], disk["state"]) == (51712, "blk", "CONNECTED")
    assert disk["counters"]["writes"] == 3
    assert "connections: 1 (not counting this one)" in results["plain"].stdout
    assert "conn 1: guest=web1" in results["plain"].stdout
    stats = json.loads(results["stats"].stdout)
    assert [(s["guest"], s["devid"], s["counters"]["writes"]) for s in stats["devices"]] == [
        ("web1", 51712, 3)]
    dump = json.loads(results["dump"].stdout)
    assert (dump["req_prod"], dump["rsp_prod"], dump["pending"]) == (3, 3, 0)
    assert [s["state"] for s in dump["slots"]] == ["answered"] * 3
    table = results["table"].stdout.splitlines()
    assert table[0] == "ring queue-0 of device 51712 (connection 1)"
    assert table[2] == "pending (rsp_prod..req_prod): 0"
    assert [line.split()[:3] for line in table[4:]] == [["1", "1", "answered"],
                                                         ["2", "2", "answered"]]


# Waits for the socket file with inotify at real-time priority, on the daemon's CPU: the
# moment the file is created the daemon is preempted, before it can take another step,
# and this connects. A path that appeared at bind() but before listen() is refused here
# every time; one that appears only once the socket listens is never refused.
WATCHER = r"""
import ctypes, os, socket, struct, sys
path = sys.argv[1]
directory, name = os.path.split(path)
os.sched_setaffinity(0, {int(sys.argv[2])})
os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(os.O_CLOEXEC)
IN_CREATE, IN_MOVED_TO = 0x100, 0x80
assert libc.inotify_add_watch(fd, directory.encode(), IN_CREATE | IN_MOVED_TO) >= 0
print("armed", flush=True)
while True:
    buf = os.read(fd, 4096)
    off = 0
    while off < len(buf):
        _, mask, _, size = struct.unpack_from("iIII", buf, off)
        got = buf[off + 16: off + 16 + size].rstrip(b"\0").decode()
        off += 16 + size
        if got == name:
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                    print("connected", flush=True)
                except ConnectionRefusedError:
                    print("refused", flush=True)
            sys.exit(0)
"""


def test_the_socket_file_appears_only_once_it_listens(daemons, tmp_path) -> None:
    cpu = min(os.sched_getaffinity(0))
    for i in range(3):
        path = str(tmp_path / f"s{i}.sock")
        watcher = subprocess.Popen([sys.executable, "-c", WATCHER, path, str(cpu)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert watcher.stdout is not None
            line = watcher.stdout.readline()
            if line != "armed\n":
                err = watcher.communicate(timeout=10)[1]
                if "PermissionError" in err:
                    pytest.skip("no real-time scheduling here")
                raise AssertionError(err)
            d = start(daemons, tmp_path, sock=path)
            os.sched_setaffinity(d.proc.pid, {cpu})
            out, err = watcher.communicate(timeout=60)
            assert out == "connected\n", out + err
            assert d.wait_ready() == b"READY=1\n"
            d.stop()
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait()
