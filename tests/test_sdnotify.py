"""The notify protocol and socket activation helpers, against a real datagram socket."""

import os
import socket
from pathlib import Path

import pytest

from backendd.sdnotify import Notifier, listen_fds, watchdog_interval


def test_notifier_sends_datagrams(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(path)
    notifier = Notifier(path)
    notifier.ready("listening")
    notifier.watchdog()
    notifier.stopping()
    assert manager.recv(256) == b"READY=1\nSTATUS=listening"
    assert manager.recv(256) == b"WATCHDOG=1"
    assert manager.recv(256) == b"STOPPING=1"
    notifier.close()
    manager.close()


def test_abstract_notify_socket() -> None:
    name = f"backendd-test-{os.getpid()}"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind("\0" + name)
    Notifier("@" + name).ready()
    assert manager.recv(64) == b"READY=1"
    manager.close()


def test_notifier_without_manager_is_silent() -> None:
    notifier = Notifier("")
    assert not notifier.enabled
    notifier.ready()  # no socket: nothing happens, nothing raises


def test_listen_fds_only_for_this_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_fds() == []
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "a:b")
    assert listen_fds(unset_environment=True) == [3, 4]
    assert "LISTEN_FDS" not in os.environ and "LISTEN_FDNAMES" not in os.environ


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None


def test_notifier_never_blocks_on_a_manager_that_does_not_read(tmp_path: Path) -> None:
    """Past the kernel's datagram queue limit a blocking sendto would wait for the manager
    forever; the notifier drops the message instead."""
    import threading

    path = str(tmp_path / "notify")
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(path)
    notifier = Notifier(path)
    sent = threading.Event()

    def ping_a_lot() -> None:
        for _ in range(1000):  # the queue holds max_dgram_qlen (10 by default) datagrams
            notifier.watchdog()
        sent.set()

    worker = threading.Thread(target=ping_a_lot, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert sent.is_set(), "Notifier.watchdog() blocked on a full notify socket"
    # What did fit is intact and in order.
    assert manager.recv(64) == b"WATCHDOG=1"
    notifier.close()
    manager.close()
