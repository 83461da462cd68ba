"""The guest's end of event channels: it kicks the backend and collects its notifies."""

import asyncio
import os
import select


class GuestPort:
    def __init__(self, port: int, kick_fd: int, call_fd: int) -> None:
        self.port = port
        self._kick = kick_fd
        self._call = call_fd
        self.pending = 0  # notifications collected by poll()/wait(), not yet consumed
        self.sent = 0

    def send(self) -> None:
        os.eventfd_write(self._kick, 1)
        self.sent += 1

    def poll(self) -> int:
        """Collect notifications without blocking; returns how many arrived."""
        try:
            n = os.eventfd_read(self._call)
        except BlockingIOError:
            return 0
        self.pending += n
        return n

    def wait(self, timeout: float | None = None) -> int:
        """Block until notified (or timeout); returns how many arrived."""
        ready, _, _ = select.select([self._call], [], [], timeout)
        return self.poll() if ready else 0

    async def notified(self, timeout: float | None = None) -> int:
        """Wait on the event loop until notified; returns how many arrived (0 on timeout)."""
        n = self.poll()
        if n:
            return n
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(self._call, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            return 0
        finally:
            loop.remove_reader(self._call)
        return self.poll()

    def close(self) -> None:
        for fd in (self._kick, self._call):
            if fd >= 0:
                os.close(fd)
        self._kick = self._call = -1


def new_channel_pair(port: int = 1) -> tuple[GuestPort, int, int]:
    """Two eventfds; the guest port keeps its own duplicates, the returned kick and call
    fds are for the daemon's EventChannel (which takes ownership of them)."""
    flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
    kick = os.eventfd(0, flags)
    call = os.eventfd(0, flags)
    guest = GuestPort(port, os.dup(kick), os.dup(call))
    return guest, kick, call
