"""`backendd serve` as a real process, with the test playing systemd's part: it binds the
listening socket and hands it over with LISTEN_FDS/LISTEN_PID, and reads READY=1,
WATCHDOG=1 and STOPPING=1 from its NOTIFY_SOCKET. The operator commands (`status`,
`stats`, `ring-dump`) run against that daemon."""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Activated:
    proc: subprocess.Popen
    path: str
    notify: socket.socket
    notify_path: str
    received: queue.Queue[bytes] | None = None

    def drain_continuously(self) -> None:
        """Read the notify socket all the time, as systemd does, into `received`."""
        self.received = queue.Queue()

        def pump() -> None:
            while True:
                try:
                    msg = self.notify.recv(4096)
                except OSError:
                    return  # closed at teardown
                assert self.received is not None
                self.received.put(msg)

        threading.Thread(target=pump, daemon=True).start()

    def datagrams(self, until: bytes, timeout: float = 30.0) -> list[bytes]:
        assert self.received is not None, "datagrams() needs drain_continuously()"
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.received.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            got.append(msg)
            if until in msg:
                return got
        raise AssertionError(f"no {until!r} within {timeout}s; got {got}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        # shutdown wakes the pump thread's recv; close alone may not.
        with contextlib.suppress(OSError):
            self.notify.shutdown(socket.SHUT_RDWR)
        self.notify.close()


def cli(*args: str, path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backendd", "--socket", path, *args],
                          capture_output=True, text=True, timeout=30)


def start_activated(tmp_path: Path, config_text: str = "", drain: bool = True) -> Activated:
    path = str(tmp_path / "backendd.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    config = tmp_path / "backendd.toml"
    config.write_text(config_text)
    env = {**os.environ, "LISTEN_FDS": "1", "NOTIFY_SOCKET": notify_path,
           "WATCHDOG_USEC": "200000"}
    fd = listener.fileno()
    # What systemd does between fork and exec: the listener becomes fd 3 and LISTEN_PID
    # names the process that will exec the daemon.
    launcher = (
        "import os, sys\n"
        f"os.dup2({fd}, 3)\n"
        f"os.close({fd})\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'backendd', "
        f"'--config', {str(config)!r}, 'serve'])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher], env=env, pass_fds=(fd,),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    listener.close()
    daemon = Activated(proc, path, notify, notify_path)
    if drain:
        daemon.drain_continuously()
    return daemon


@pytest.fixture
def activated(tmp_path: Path) -> Iterator[Activated]:
    daemon = start_activated(tmp_path)
    try:
        yield daemon
    finally:
        daemon.close()


def test_socket_activation_ready_watchdog_and_stop(activated: Activated) -> None:
    first = activated.datagrams(until=b"READY=1")
    assert any(b"STATUS=listening on" in m and b"socket activation" in m for m in first)
    # The watchdog is pinged from the loop at half of WATCHDOG_USEC.
    activated.datagrams(until=b"WATCHDOG=1", timeout=30)
    activated.datagrams(until=b"WATCHDOG=1", timeout=30)

    status = cli("status", path=activated.path)
    assert status.returncode == 0, status.stderr
    # The status request's own connection is not listed.
    assert "connections: 0 (not counting this one)" in status.stdout

    activated.proc.send_signal(signal.SIGTERM)
    activated.datagrams(until=b"STOPPING=1")
    out, err = activated.proc.communicate(timeout=10)
    assert activated.proc.returncode == 0, err
    assert "event=stopped" in out
    # The activated socket belongs to systemd: the daemon must not remove it.
    assert os.path.exists(activated.path)


def test_operator_commands_against_a_running_daemon(activated: Activated) -> None:
    activated.datagrams(until=b"READY=1")
    stats = cli("stats", path=activated.path)
    assert stats.returncode == 0 and stats.stdout == "no devices\n"
    prom = cli("stats", "--prometheus", path=activated.path)
    assert prom.returncode == 0
    dump = cli("ring-dump", "99", "51712", path=activated.path)
    assert dump.returncode == 1
    assert "connection 99: no such connection" in dump.stderr


def test_daemon_not_running_is_a_clear_error(tmp_path: Path) -> None:
    result = cli("status", path=str(tmp_path / "absent.sock"))
    assert result.returncode == 1
    assert "cannot reach the daemon" in result.stderr


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[daemon]\nio_thread = 4\n")
    result = subprocess.run([sys.executable, "-m", "backendd", "--config", str(config),
                             "serve"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "io_thread: unknown key" in result.stderr


def test_metrics_endpoint_on_loopback(tmp_path: Path) -> None:
    # Port 0: the daemon binds a free port and says which in its ready status, so no
    # port is picked here and released for someone else to take first.
    daemon = start_activated(tmp_path, '[metrics]\nlisten = "127.0.0.1:0"\n')
    try:
        ready = next(m for m in daemon.datagrams(until=b"READY=1") if b"READY=1" in m)
        match = re.search(rb"metrics on 127\.0\.0\.1:(\d+)", ready)
        assert match, ready
        port = int(match[1])
        assert port != 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
        assert exc.value.code == 404
    finally:
        daemon.proc.terminate()
        daemon.proc.wait(timeout=10)
        daemon.close()


def serve_a_disk_and_ask_the_cli(daemon: Activated,
                                 tmp_path: Path) -> dict[str, subprocess.CompletedProcess]:
    """A guest writes five blocks to a disk; status, stats and ring-dump run meanwhile."""
    import asyncio

    from diskguest import guest_with_disk

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))

    async def scenario() -> dict[str, subprocess.CompletedProcess]:
        async with guest_with_disk(daemon.path, image) as front:
            for i in range(5):
                await front.write(i * 8, bytes([i]) * 4096)
            loop = asyncio.get_running_loop()
            results = {}
            for name, args in (("status", ["status"]), ("stats", ["stats"]),
                               ("prom", ["stats", "--prometheus"]),
                               ("dump", ["ring-dump", "1", "51712", "0", "--slots", "5"])):
                results[name] = await loop.run_in_executor(
                    None, lambda a=args: cli(*a, path=daemon.path))
        return results

    return asyncio.run(scenario())


def test_cli_shows_a_live_disk(activated: Activated, tmp_path: Path) -> None:
    """status, stats (plain and Prometheus) and ring-dump while a guest has a disk."""
    activated.datagrams(until=b"READY=1")
    results = serve_a_disk_and_ask_the_cli(activated, tmp_path)
    for r in results.values():
        assert r.returncode == 0, r.stderr
    assert "device 51712: type=blk state=CONNECTED rings=queue-0" in results["status"].stdout
    assert "conn=1 guest=conn-1 devid=51712 type=blk" in results["stats"].stdout
    assert "writes=5" in results["stats"].stdout
    assert ('backendd_blk_writes_total{guest="conn-1",devid="51712",type="blk"} 5'
            in results["prom"].stdout)
    dump = results["dump"].stdout
    assert "layout blkif-x86_64, 32 slots: req_prod=5 rsp_prod=5" in dump
    # The last five slots hold the five responses, decoded with the response layout.
    assert dump.count("answered  id=") == 5
    assert dump.count("operation=write(1) status=okay(0)") == 5


def notify_queue_is_full(notify_path: str) -> bool:
    """True once the manager's datagram queue holds as much as the kernel lets it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.sendto(b"PROBE=1", socket.MSG_DONTWAIT, notify_path)
        except BlockingIOError:
            return True
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return True
            raise
    return False


def test_unread_notify_socket_does_not_stop_the_daemon(tmp_path: Path) -> None:
    """A service manager that stops reading NOTIFY_SOCKET must not freeze the daemon: the
    watchdog pings (every 0.1 s here) fill the queue, and after that the daemon still serves
    a guest's disk and the operator's commands."""
    daemon = start_activated(tmp_path, drain=False)
    try:
        deadline = time.monotonic() + 60
        while not notify_queue_is_full(daemon.notify_path):
            assert daemon.proc.poll() is None, daemon.proc.communicate()
            assert time.monotonic() < deadline, "the notify queue never filled"
            time.sleep(0.1)
        # Full now: every further ping the daemon sends would block a blocking sendto.
        results = serve_a_disk_and_ask_the_cli(daemon, tmp_path)
        for r in results.values():
            assert r.returncode == 0, r.stderr
        assert "writes=5" in results["stats"].stdout
        assert daemon.proc.poll() is None
    finally:
        daemon.close()
