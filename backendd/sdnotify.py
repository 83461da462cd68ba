"""systemd integration without libsystemd: socket activation (LISTEN_FDS) and the notify
protocol (READY=1, WATCHDOG=1, STATUS=, STOPPING=1) over NOTIFY_SOCKET datagrams."""

from __future__ import annotations

import contextlib
import os
import socket

SD_LISTEN_FDS_START = 3


def listen_fds(unset_environment: bool = True) -> list[int]:
    """The fds systemd passed for socket activation, if they are meant for this process."""
    try:
        if int(os.environ.get("LISTEN_PID", "")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    finally:
        if unset_environment:
            for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(var, None)
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(count, 0)))
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


class Notifier:
    """Sends state to the service manager; a no-op when not started by systemd."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        if address:
            # A leading '@' names an abstract-namespace socket.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            # Non-blocking: a service manager that reads slowly (or not at all) must never
            # stall the event loop that serves the guests. A dropped WATCHDOG=1 only risks
            # a restart by the manager; a blocked sendto stops every guest at once.
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        if self._sock is None or self._address is None:
            return
        # OSError covers both a manager that went away and a full datagram queue
        # (BlockingIOError): either way the message is dropped, never waited for.
        with contextlib.suppress(OSError):
            self._sock.sendto("\n".join(fields).encode(), socket.MSG_DONTWAIT, self._address)

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
        pid = os.environ.get("WATCHDOG_PID")
    except ValueError:
        return None
    if usec <= 0 or (pid is not None and pid.isdigit() and int(pid) != os.getpid()):
        return None
    return usec / 2_000_000
