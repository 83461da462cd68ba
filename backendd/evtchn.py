"""An event channel carried by two eventfds, as a VMM wires them (like vhost-user's
kick and call): the guest's notifications arrive on `kick_fd`, ours go out on `call_fd`.

The eventfds are the VMM's: it shares each open file description with us, so we never
change their flags (O_NONBLOCK set here would silently change the VMM's copy too), and
yet never block on them, whatever flags the VMM chose. Even watching an fd can change
them: uvloop's add_reader (libuv's uv_poll_init) sets O_NONBLOCK on it. So kick fds are
watched through one epoll set of our own per event loop, and only that set's fd is given
to the loop.
- kick: read with RWF_NOWAIT (preadv2), which the kernel honours for eventfds whatever
  O_NONBLOCK says; on kernels without it (before 5.12), poll with a zero timeout first.
- call: poll for POLLOUT with a zero timeout, then write. An eventfd is not writable only
  when its counter is saturated, which means the guest has been signalled already and has
  not looked yet: one more signal would add nothing, so it counts as delivered.
"""

import asyncio
import contextlib
import errno
import logging
import os
import select
from collections.abc import Callable

_ONE = (1).to_bytes(8, "little")
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)

log = logging.getLogger(__name__)


class _KickWatcher:
    """An epoll set of kick fds, watched by the loop as one fd of the daemon's own.
    Level-triggered: a kick fd stays ready until its channel reads the counter."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.epoll = select.epoll(flags=select.EPOLL_CLOEXEC)
        self.callbacks: dict[int, Callable[[], None]] = {}
        loop.add_reader(self.epoll.fileno(), self._ready)

    def _ready(self) -> None:
        for fd, _ in self.epoll.poll(0):
            cb = self.callbacks.get(fd)
            if cb is not None:
                cb()

    def close(self) -> None:
        self.loop.remove_reader(self.epoll.fileno())
        self.epoll.close()


_watchers: dict[asyncio.AbstractEventLoop, _KickWatcher] = {}


def _watch(loop: asyncio.AbstractEventLoop, fd: int, cb: Callable[[], None]) -> None:
    w = _watchers.get(loop)
    if w is None:
        w = _watchers[loop] = _KickWatcher(loop)
    w.epoll.register(fd, select.EPOLLIN)
    w.callbacks[fd] = cb


def _unwatch(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    w = _watchers.get(loop)
    if w is None or w.callbacks.pop(fd, None) is None:
        return
    # Before the fd is closed: the VMM's copy would keep a stale registration alive.
    with contextlib.suppress(OSError):
        w.epoll.unregister(fd)
    if not w.callbacks:  # the last channel on this loop: give the epoll fd back
        del _watchers[loop]
        w.close()


class EventChannel:
    """Owns both eventfds from construction on; `close()` releases them."""

    def __init__(self, port: int, kick_fd: int, call_fd: int) -> None:
        self.port = port
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.kicks = 0
        self.notifies = 0
        # notify() found the call eventfd saturated (or failing): the guest was already
        # signalled, nothing was written.
        self.notifies_saturated = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_kick: Callable[[], None] | None = None
        self._closed = False
        self._buf = bytearray(8)
        self._nowait = bool(_RWF_NOWAIT)
        self._call_poll = select.poll()
        self._call_poll.register(call_fd, select.POLLOUT)
        self._kick_poll: select.poll | None = None

    def start(self, loop: asyncio.AbstractEventLoop, on_kick: Callable[[], None]) -> None:
        if self._closed:
            raise RuntimeError(f"event channel {self.port}: closed")
        self.stop()
        self._loop = loop
        self._on_kick = on_kick
        _watch(loop, self.kick_fd, self._readable)

    def _read_kick(self) -> bool:
        """Reset the kick counter without blocking; whether it had been kicked."""
        if self._nowait:
            try:
                os.preadv(self.kick_fd, [self._buf], -1, _RWF_NOWAIT)
                return True
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                self._nowait = False  # an older kernel: fall back to poll-then-read
        if self._kick_poll is None:
            self._kick_poll = select.poll()
            self._kick_poll.register(self.kick_fd, select.POLLIN)
        if not self._kick_poll.poll(0):
            return False
        try:
            os.eventfd_read(self.kick_fd)
        except BlockingIOError:
            return False
        return True

    def _readable(self) -> None:
        # One read returns and resets the whole counter: any number of guest kicks
        # since the last wakeup become a single on_kick, which bounds work per
        # wakeup however fast the guest kicks.
        try:
            kicked = self._read_kick()
        except OSError as e:
            # Not a working eventfd after all (checked at the request, so a local bug):
            # stop listening rather than spin on a readable fd.
            self.stop()
            log.error("event channel %d: kick fd failed, no longer listening: %s",
                      self.port, e)
            return
        if not kicked:
            return
        self.kicks += 1
        if self._on_kick is not None:
            self._on_kick()

    def notify(self) -> None:
        """Signal the guest. Never blocks and never raises."""
        try:
            if self._call_poll.poll(0):
                os.write(self.call_fd, _ONE)
                self.notifies += 1
                return
        except (BlockingIOError, InterruptedError):
            pass  # filled by someone else since the poll: signalled all the same
        except OSError:
            pass  # e.g. closed: nothing can be signalled any more
        self.notifies_saturated += 1

    def count_notifies(self, written: int, saturated: int) -> None:
        """Events the compiled data plane signalled itself (bk_serve_poll)."""
        self.notifies += written
        self.notifies_saturated += saturated

    def count_kicks(self, read: int) -> None:
        """Kicks the compiled data plane read itself (nk_serve_poll)."""
        self.kicks += read

    def mute(self) -> bool:
        """Keep the kick fd out of the loop's watch for a while (the compiled data plane
        watches it itself meanwhile); whether it was watched. `unmute` undoes it: the
        watch is level-triggered, so a kick that came meanwhile is seen then."""
        w = _watchers.get(self._loop) if self._loop is not None else None
        if w is None or self.kick_fd not in w.callbacks:
            return False
        w.epoll.modify(self.kick_fd, 0)
        return True

    def unmute(self) -> None:
        w = _watchers.get(self._loop) if self._loop is not None else None
        if w is not None and self.kick_fd in w.callbacks:
            w.epoll.modify(self.kick_fd, select.EPOLLIN)

    def stop(self) -> None:
        if self._loop is not None:
            _unwatch(self._loop, self.kick_fd)
            self._loop = None
            self._on_kick = None

    def close(self) -> None:
        if self._closed:
            return
        self.stop()
        self._closed = True
        self._call_poll.unregister(self.call_fd)
        for fd in (self.kick_fd, self.call_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
