"""An event channel carried by two eventfds, as a VMM wires them (like vhost-user's
kick and call): the guest's notifications arrive on `kick_fd`, ours go out on `call_fd`."""

import asyncio
import contextlib
import os
from collections.abc import Callable


class EventChannel:
    """Owns both eventfds from construction on; `close()` releases them."""

    def __init__(self, port: int, kick_fd: int, call_fd: int) -> None:
        self.port = port
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.kicks = 0
        self.notifies = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_kick: Callable[[], None] | None = None
        self._closed = False
        # The reader drains until EAGAIN; a blocking fd would hang the loop on a
        # spurious wakeup.
        os.set_blocking(kick_fd, False)

    def start(self, loop: asyncio.AbstractEventLoop, on_kick: Callable[[], None]) -> None:
        if self._closed:
            raise RuntimeError(f"event channel {self.port}: closed")
        self.stop()
        self._loop = loop
        self._on_kick = on_kick
        loop.add_reader(self.kick_fd, self._readable)

    def _readable(self) -> None:
        try:
            # One read returns and resets the whole counter: any number of guest kicks
            # since the last wakeup become a single on_kick, which bounds work per
            # wakeup however fast the guest kicks.
            os.eventfd_read(self.kick_fd)
        except BlockingIOError:
            return
        self.kicks += 1
        if self._on_kick is not None:
            self._on_kick()

    def notify(self) -> None:
        os.eventfd_write(self.call_fd, 1)
        self.notifies += 1

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.kick_fd)
            self._loop = None
            self._on_kick = None

    def close(self) -> None:
        if self._closed:
            return
        self.stop()
        self._closed = True
        for fd in (self.kick_fd, self.call_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
