"""A disk whose backing store is an NBD export, through libnbd's asynchronous API.

The export is named by the disk's `path`: nbd://HOST[:PORT]/EXPORT, nbds://... (TLS
required), nbd+unix:///EXPORT?socket=PATH and nbds+unix://... . The URI is parsed here,
checked against the daemon's `[block] allowed_nbd`, and the connection is made to exactly
what was checked (libnbd never sees the URI, so no second parser decides where to go).

Everything runs on the event loop: libnbd's socket is watched with add_reader/add_writer
as `aio_get_direction` asks, commands are issued with aio_pread/aio_pwrite/aio_flush/
aio_trim, and their completion callbacks only record the result; the records are acted on
after libnbd returns. There is no thread and no blocking call (a TLS export named by a
host name resolves that name inside libnbd; see docs/blk.md).

Requests come as ops (`op()`, `submit_ops()`) from either data plane: the compiled
kernel's NBD rings (backendd/dataplane/blknbd.py) or the Python one (`submit`, in place of
the I/O pool). The kernel's rings issue their plain reads and writes from C instead, on
the handle `fast_handle` names, while the connection is up with nothing waiting; this
module hears of those only through `FastSink` (answers to settle, and what to send
again after a loss). While only C has commands out, a readable socket is served whole
by one C call (`Waker`: every reply read, the rings answered, served again and
signalled), and this module steps in only when it reports a failure. Each op's sink
hears of it when it is done, and once more after every batch (`nbd_settle`), so the
answers of one wake-up go out together. Guest memory is handed to
libnbd as it is: a request whose pages are one run is read into or written from them. A
request of several segments, contiguous on the disk but not in memory, goes as one NBD
command through one bounce buffer: one command and one copy cost less than a command per
4 KiB segment. With `nbd_connections` above 1 and a server that can multi-conn, commands
go to several connections in turn.

When the connection is lost (the server went away, or had commands outstanding and said
nothing for `nbd_io_timeout_ms`) the disk is degraded: commands in flight go back to the
head of the queue, the other connections are closed too, and a new connection is tried
with a growing backoff. If it comes back
within `nbd_reconnect_timeout_ms` they are sent again and the guest sees nothing but the
delay; after that every waiting request, and each new one until the server is back, is
answered with an error. Reads, writes, flushes and trims are all safe to send twice.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import errno
import logging
import os
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from backendd.errors import ConfigError
from rings.consts import SECTOR_SIZE, BlkifOp, BlkifStatus

from .config import BlkConfig

if TYPE_CHECKING:
    from .engine import IoItem

log = logging.getLogger(__name__)

SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")
DEFAULT_PORT = 10809
TRIM_CHUNK = 1 << 30  # an NBD command's length is 32 bits: split larger discards
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0


def _nbd() -> Any:
    try:
        import nbd  # Debian's python3-libnbd (see the Makefile)
    except ImportError as e:
        raise ConfigError("path: NBD disks need libnbd's Python bindings "
                          "(Debian python3-libnbd)") from e
    return nbd


def is_nbd_uri(path: str) -> bool:
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme in SCHEMES


@dataclass(frozen=True)
class NbdTarget:
    """Where an NBD disk lives, as parsed from its URI."""

    uri: str
    export: str
    tls: bool
    host: str = ""  # TCP
    port: int = DEFAULT_PORT
    socket: str = ""  # unix socket path

    @property
    def server(self) -> str:
        """How the policy and the logs name the server."""
        if self.socket:
            return f"unix:{self.socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_nbd_uri(uri: str) -> NbdTarget:
    try:
        u = urllib.parse.urlsplit(uri)
        port = u.port
    except ValueError as e:
        raise ConfigError(f"path: {uri!r}: {e}") from None
    if u.scheme not in SCHEMES:
        raise ConfigError(f"path: {uri!r}: scheme is not one of {', '.join(SCHEMES)}")
    if u.username is not None or u.password is not None:
        raise ConfigError(f"path: {uri!r}: user names are not supported")
    if u.fragment:
        raise ConfigError(f"path: {uri!r}: a fragment is not allowed")
    path = urllib.parse.unquote(u.path)
    export = path[1:] if path.startswith("/") else path
    if "\0" in export or len(export.encode()) > 4096:
        raise ConfigError(f"path: {uri!r}: bad export name")
    try:
        query = urllib.parse.parse_qs(u.query, keep_blank_values=True, strict_parsing=False,
                                      max_num_fields=4)
    except ValueError as e:
        raise ConfigError(f"path: {uri!r}: {e}") from None
    # Only the socket: certificates, keys and user names come from the daemon's side.
    for key in query:
        if key != "socket":
            raise ConfigError(f"path: {uri!r}: query parameter {key!r} is not allowed")
    tls = u.scheme.startswith("nbds")
    if u.scheme.endswith("+unix"):
        sockets = query.get("socket", [])
        if len(sockets) != 1 or not os.path.isabs(sockets[0]) or "\0" in sockets[0]:
            raise ConfigError(f"path: {uri!r}: needs one absolute socket=PATH")
        if u.netloc:
            raise ConfigError(f"path: {uri!r}: a unix socket URI names no host")
        return NbdTarget(uri, export, tls, socket=os.path.normpath(sockets[0]))
    if "socket" in query:
        raise ConfigError(f"path: {uri!r}: socket= needs nbd+unix://")
    host = u.hostname or ""
    if not host:
        raise ConfigError(f"path: {uri!r}: no host")
    return NbdTarget(uri, export, tls, host=host, port=port or DEFAULT_PORT)


def nbd_allowed(target: NbdTarget, allowed: Sequence[str]) -> bool:
    """`allowed` holds "HOST:PORT" entries (any export of that server, plain or TLS) and
    absolute directories (unix sockets that resolve below one). Empty allows nothing."""
    if target.socket:
        real = os.path.realpath(target.socket)
        for entry in allowed:
            if os.path.isabs(entry):
                d = os.path.realpath(entry)
                if os.path.commonpath([real, d]) == d:
                    return True
        return False
    return target.server.lower() in (e.lower() for e in allowed if not os.path.isabs(e))


@dataclass(frozen=True)
class NbdPolicy:
    allowed: tuple[str, ...] = ()
    reconnect_timeout: float = 30.0
    io_timeout: float = 30.0
    tls_certificates: str = ""
    tls_psk_file: str = ""
    tls_username: str = ""
    connections: int = 1  # multi-conn: this many, when the server can

    @classmethod
    def from_config(cls, daemon_config: object) -> NbdPolicy:
        block = getattr(daemon_config, "block", None)
        if block is None:
            return cls()
        return cls(tuple(getattr(block, "allowed_nbd", ())),
                   getattr(block, "nbd_reconnect_timeout_ms", 30000) / 1000,
                   getattr(block, "nbd_io_timeout_ms", 30000) / 1000,
                   getattr(block, "nbd_tls_certificates", ""),
                   getattr(block, "nbd_tls_psk_file", ""),
                   getattr(block, "nbd_tls_username", ""),
                   getattr(block, "nbd_connections", 1))


class _Op:
    """One blkif request as a sequence of steps, each a set of NBD commands that may run
    together; a step is sent again whole after a reconnect. `sink` is told when it is
    done (`failed`: 0 or an errno); `key` orders what is sent again."""

    __slots__ = ("bounce", "failed", "key", "outstanding", "read", "sink", "steps", "tag")

    def __init__(self, sink: Sink, tag: Any, key: int, steps: list[list[tuple]],
                 read: bool = False, bounce: bytearray | None = None) -> None:
        self.sink = sink
        self.tag = tag
        self.key = key  # the order of submission
        self.steps = deque(steps)
        self.read = read
        self.bounce = bounce  # a read's data, to be copied into the guest's pages
        self.outstanding = 0
        self.failed = 0


class FastSink(Protocol):
    """A ring whose plain reads and writes are issued and completed in C
    (backendd/dataplane/nbd_kernel.c) on the connection `fast_handle` names; the disk
    knows of them only through these, on its slow paths."""

    def nbd_fast_pending(self) -> int: ...

    def nbd_fast_in_flight(self) -> int: ...

    def nbd_take_back(self) -> list[_Op]: ...

    def nbd_settle(self) -> None: ...

    def nbd_waker(self, sinks: list[Any]) -> Waker | None: ...


class Waker(Protocol):
    """The whole wake-up of the connection's socket in one C call, for `FastSink`s
    (backendd/dataplane/blknbd.py NbdWaker)."""

    def ready(self) -> bool: ...

    def run(self, image: NbdImage, handle: int, fd: int, watch: int) -> bool: ...

    def stats(self) -> tuple[int, int]: ...


class Sink(Protocol):
    """Who hears of finished requests: `nbd_done` for each, then `nbd_settle` once after
    every batch of them (one wake-up's worth), so answers go out together."""

    def nbd_done(self, op: _Op) -> None: ...

    def nbd_settle(self) -> None: ...


class _Batch:
    """The Python data plane's pool job: IoItems, resolved together."""

    __slots__ = ("future", "items", "left")

    def __init__(self, items: list[IoItem], future: asyncio.Future) -> None:
        self.items = items
        self.future = future
        self.left = len(items)

    def nbd_done(self, op: _Op) -> None:
        item = op.tag
        if op.failed:
            item.status = BlkifStatus.ERROR
            item.error = op.failed
        elif op.bounce is not None:
            buf, pos = memoryview(op.bounce), 0
            for view in item.views:  # the one copy into guest memory
                view[:] = buf[pos:pos + len(view)]
                pos += len(view)
        self.left -= 1
        if self.left == 0 and not self.future.done():
            self.future.set_result(self.items)

    def nbd_settle(self) -> None:
        pass


class _Conn:
    """One libnbd handle and how the event loop watches its socket."""

    __slots__ = ("fd", "h", "index", "o", "ptr", "ready", "settled", "watch")

    def __init__(self, h: Any, index: int) -> None:
        self.h = h
        self.o = h._o  # the extension's handle, for its calls on the data path
        self.ptr = _handle_pointer(self.o)  # libnbd's struct nbd_handle, for C
        self.index = index  # 0: the first, whose handshake tells about the export
        self.fd = -1
        self.watch = 0  # AIO_DIRECTION bits registered with the loop
        self.ready = False
        self.settled = False  # ready, and its socket known: no more asking libnbd


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _handle_pointer(o: Any) -> int:
    """The bindings keep libnbd's handle in a capsule named "nbd_handle"."""
    try:
        return _capsule_pointer(o, b"nbd_handle") or 0
    except (ValueError, TypeError):
        return 0


def _close_handle(h: Any) -> None:
    """Close a handle now (the bindings have no close() of their own)."""
    handle = h.__dict__.pop("_o", None)
    if handle is not None:
        _nbd().libnbdmod.close(handle)


class NbdImage:
    """The backing store of a disk on an NBD export; the same face as `Image` towards
    the device and the keys, plus `submit` in place of the I/O pool."""

    is_block = False
    discard_secure = False
    fd = -1  # the compiled data plane reaches the export through libnbd, not an fd

    def __init__(self, cfg: BlkConfig, policy: NbdPolicy,
                 loop: asyncio.AbstractEventLoop, name: str = "") -> None:
        self.cfg = cfg
        self.target = parse_nbd_uri(cfg.path)
        if not nbd_allowed(self.target, policy.allowed):
            raise ConfigError(f"path: NBD server {self.target.server} is not in "
                              "[block] allowed_nbd")
        self.policy = policy
        self.loop = loop
        self.name = name or self.target.uri
        self.nbd = _nbd()
        self.size = 0
        self.sectors = 0
        self.physical_sector_size = cfg.sector_size
        self.discard_granularity = max(4096, cfg.sector_size)
        self.discard = False
        self.flush = True
        self.fua = False
        self.export_readonly = False
        # The connections: the first, then (multi-conn) the others; empty while down.
        self._conns: list[_Conn] = []
        self._live: list[_Conn] = []  # those whose handshake is done
        self._rr = 0  # the next command's connection, round robin
        self._multi_refused = False  # an extra connection failed: one from now on
        self._mod = self.nbd.libnbdmod
        self._gen = 0
        self._ready = False  # the first connection is ready: the disk serves
        self._closed = False
        self._done: list[tuple[_Op, int, int]] = []  # (op, generation, errno)
        self._touched: dict[Sink, None] = {}  # sinks with finished ops, to settle
        self._pumping = False
        self._seq = 0  # ops in the order they came
        self._queue: deque[_Op] = deque()  # waiting for a connection
        self._active: set[_Op] = set()
        self._fast_sinks: list[FastSink] = []
        self._waker: Waker | None = None  # for _fast_sinks; None: to be made
        self._waker_calls = 0  # wake-ups and replies of wakers gone
        self._waker_replies = 0
        self._last_progress = 0.0
        self._down_since: float | None = None
        self._failing = False  # down for longer than the reconnect timeout
        self._draining = False  # the frontend is going away: nothing waits for the server
        self._backoff = BACKOFF_FIRST
        self._retry: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._connected_event: asyncio.Event | None = None
        self._connect_error = ""
        self.reconnects = 0
        self.connection_losses = 0
        self.timed_out = 0
        self.resent = 0  # requests in flight on a lost connection, sent again
        self.issued_in_c = 0  # reads and writes issued from C (nbd_kernel.c)

    # --- opening -------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, and learn the export's size and what it can do. A server that does
        not answer within the I/O timeout is a configuration error."""
        self._connected_event = asyncio.Event()
        self._start_connect()
        try:
            await asyncio.wait_for(self._connected_event.wait(), self.policy.io_timeout)
        except TimeoutError:
            self._drop_connection()
            raise ConfigError(f"path: NBD server {self.target.server} did not answer: "
                              f"{self._connect_error or 'timed out'}") from None
        if not self._ready:
            raise ConfigError(f"path: cannot connect to NBD server {self.target.server}: "
                              f"{self._connect_error}")
        self._connected_event = None
        self._learn()
        self._watchdog = self.loop.call_later(self._tick_interval(), self._tick)

    def _learn(self) -> None:
        h, nbd, cfg = self._conns[0].h, self.nbd, self.cfg
        size = h.get_size()
        self.size = size - size % cfg.sector_size
        if self.size == 0:
            raise ConfigError(f"path: NBD export {self.target.uri!r} is smaller than "
                              "one sector")
        self.sectors = self.size // SECTOR_SIZE
        self.export_readonly = bool(h.is_read_only())
        if self.export_readonly and not cfg.readonly:
            log.info("nbd %s: the export is read-only; so is the disk", self.name)
            self.cfg = dataclasses.replace(cfg, readonly=True)
        self.flush = bool(h.can_flush())
        self.fua = bool(h.can_fua())
        self.discard = (self.cfg.discard and not self.cfg.readonly and not cfg.cdrom
                        and bool(h.can_trim()))
        preferred = h.get_block_size(nbd.SIZE_PREFERRED)
        if preferred and preferred & (preferred - 1) == 0 and preferred <= 1 << 20:
            self.discard_granularity = max(preferred, cfg.sector_size)
        minimum = h.get_block_size(nbd.SIZE_MINIMUM)
        if minimum and minimum & (minimum - 1) == 0 and minimum <= 4096:
            self.physical_sector_size = max(minimum, cfg.sector_size)

    def _start_connect(self) -> None:
        self._retry = None
        if self._closed:
            return
        try:
            conn = self._new_conn()
        except self.nbd.Error as e:
            self._connect_error = str(e)
            self._lost(f"connect: {e}")
            self._pump()  # answers for what failed
            return
        self._gen += 1
        self._conns = [conn]
        self._last_progress = self.loop.time()
        self._pump()

    def _new_conn(self) -> _Conn:
        nbd = self.nbd
        t = self.target
        h = nbd.NBD()
        try:
            h.set_handle_name(f"backendd-{os.getpid()}")
            h.set_export_name(t.export)
            h.set_tls(nbd.TLS_REQUIRE if t.tls else nbd.TLS_DISABLE)
            if t.tls:
                p = self.policy
                if p.tls_psk_file:
                    h.set_tls_psk_file(p.tls_psk_file)
                elif p.tls_certificates:
                    h.set_tls_certificates(p.tls_certificates)
                if p.tls_username:
                    h.set_tls_username(p.tls_username)
            # On an error the guest is told so; zeroing every read buffer first buys
            # nothing.
            h.set_pread_initialize(False)
            if t.socket:
                h.aio_connect_unix(t.socket)
            else:
                h.aio_connect_tcp(t.host, str(t.port))
        except nbd.Error:
            _close_handle(h)
            raise
        return _Conn(h, len(self._conns))

    def _more_conns(self) -> None:
        """Multi-conn: once the first connection is ready, and the server says that
        its connections see one another's writes and flushes (can_multi_conn), open
        the others the policy asks for."""
        h = self._conns[0].h
        want = self.policy.connections
        if want <= 1 or self._multi_refused or not h.can_multi_conn():
            return
        try:
            for _ in range(want - 1):
                self._conns.append(self._new_conn())
        except self.nbd.Error as e:
            log.warning("nbd %s: a second connection to %s failed (%s): one from now on",
                        self.name, self.target.server, e)
            self._multi_refused = True

    # --- the socket ----------------------------------------------------------------

    def _rewatch(self) -> None:
        for conn in self._conns:
            self._rewatch_conn(conn)

    def _rewatch_conn(self, conn: _Conn) -> None:
        if not conn.settled:
            # While connecting, libnbd may try one address after another, each with a
            # socket of its own; the handshake may even end, on the last of them, within
            # one call. The socket is settled at the first look once it is ready.
            try:
                fd = conn.h.aio_get_fd()
            except self.nbd.Error:
                fd = -1
            if fd != conn.fd:
                self._unwatch(conn)
                conn.fd = fd
            if fd < 0:
                return
            conn.settled = conn.ready
        want = self._mod.aio_get_direction(conn.o) & 3  # AIO_DIRECTION_BOTH
        if want == conn.watch:
            return
        changed = want ^ conn.watch
        if changed & 1:  # AIO_DIRECTION_READ
            if want & 1:
                self.loop.add_reader(conn.fd, self._readable, conn)
            else:
                self.loop.remove_reader(conn.fd)
        if changed & 2:  # AIO_DIRECTION_WRITE
            if want & 2:
                self.loop.add_writer(conn.fd, self._notify, self._mod.aio_notify_write,
                                     conn)
            else:
                self.loop.remove_writer(conn.fd)
        conn.watch = want

    def _unwatch(self, conn: _Conn) -> None:
        if conn.watch & 1:
            self.loop.remove_reader(conn.fd)
        if conn.watch & 2:
            self.loop.remove_writer(conn.fd)
        conn.watch = 0

    def _readable(self, conn: _Conn) -> None:
        """The socket has something to read. While C has every command out on the one
        connection (no op of Python's active or waiting), the wake-up is one C call;
        otherwise, or when that call meets a failure, the Python way."""
        if conn.o is None:
            return
        if self._fast_sinks and not self._active and not self._queue and not self._done \
                and self._ready and not self._draining and conn.settled and conn.ptr \
                and len(self._live) == 1:
            waker = self._waker
            if waker is None:
                waker = self._waker = self._fast_sinks[0].nbd_waker(self._fast_sinks)
            if waker is not None and waker.ready():
                if waker.run(self, conn.ptr, conn.fd, conn.watch) or self._touched:
                    self._pump()  # a failure, or the socket to watch another way
                return
        self._notify(self._mod.aio_notify_read, conn)

    def _notify(self, call: Callable[[Any], object], conn: _Conn) -> None:
        if conn.o is None:
            return
        try:
            call(conn.o)
        except self.nbd.Error as e:
            self._connect_error = str(e)
        self._pump()

    def _pump(self) -> None:
        """After any call into libnbd: notice a dead connection or a finished
        handshake, act on completions, tell the sinks (whose answers may send more),
        watch the right directions. Calls from inside (a sink sending more) return at
        once: the outer pass goes on until nothing is left."""
        if self._pumping:
            return
        self._pumping = True
        try:
            mod = self._mod
            while True:
                for conn in self._conns:
                    o = conn.o
                    if mod.aio_is_dead(o) or mod.aio_is_closed(o):
                        if not conn.ready and conn.index:
                            log.warning("nbd %s: a second connection to %s failed: one "
                                        "from now on", self.name, self.target.server)
                            self._multi_refused = True
                        self._lost(self._connect_error or "connection closed")
                        break
                    if not conn.ready and mod.aio_is_ready(o):
                        conn.ready = True
                        self._live.append(conn)
                        if not conn.index:
                            self._became_ready()
                            break  # the list of connections may have grown
                self._complete()
                if not self._touched:
                    break
                touched, self._touched = self._touched, {}
                for sink in touched:
                    sink.nbd_settle()
            self._rewatch()
        finally:
            self._pumping = False

    def _became_ready(self) -> None:
        self._ready = True
        self._backoff = BACKOFF_FIRST
        self._last_progress = self.loop.time()
        if self._down_since is not None:
            log.warning("nbd %s: reconnected to %s after %.1f s", self.name,
                        self.target.server, self.loop.time() - self._down_since)
            self.reconnects += 1
            self._check_size_after_reconnect()
        self._down_since = None
        self._failing = False
        if self._connected_event is not None:
            self._connected_event.set()
        self._more_conns()
        while self._queue and self._ready:
            self._start(self._queue.popleft())

    def _check_size_after_reconnect(self) -> None:
        size = self._conns[0].h.get_size()
        if size - size % self.cfg.sector_size < self.size:
            # A smaller export now: requests beyond its end fail at the server.
            log.warning("nbd %s: the export shrank to %d bytes", self.name, size)

    def _drop_connection(self) -> None:
        conns, self._conns = self._conns, []
        self._live = []
        self._gen += 1  # completions of the old connections are ignored from now on
        self._ready = False
        for conn in conns:
            self._unwatch(conn)
            conn.o = None
            # Closing the handle drops what libnbd holds of guest memory for commands
            # that never completed.
            _close_handle(conn.h)

    def _lost(self, why: str) -> None:
        was_ready = self._ready
        self._drop_connection()
        self._done.clear()
        # What was in flight goes first when the server is back, in the order it came.
        active = sorted([*self._active, *self._take_back()], key=lambda op: op.key)
        self._active.clear()
        if not self._draining:
            self.resent += len(active)
        for op in reversed(active):
            op.outstanding = 0
            op.failed = 0
            self._queue.appendleft(op)
        if self._draining:
            self._fail_queue()
        now = self.loop.time()
        if self._down_since is None:
            self._down_since = now
            self.connection_losses += 1
            log.warning("nbd %s: lost the connection to %s (%s); %d requests wait for it",
                        self.name, self.target.server, why, len(self._queue))
        elif was_ready:
            log.warning("nbd %s: connection to %s lost again: %s", self.name,
                        self.target.server, why)
        if self._closed or self._connected_event is not None:
            if self._connected_event is not None:
                self._connected_event.set()  # open() reports the failure
            return
        self._check_deadline()
        self._retry = self.loop.call_later(self._backoff, self._start_connect)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    def _check_deadline(self) -> None:
        if self._down_since is None or self._failing:
            return
        if self.loop.time() - self._down_since >= self.policy.reconnect_timeout:
            self._failing = True
            log.error("nbd %s: %s gone for %.1f s: failing requests until it is back",
                      self.name, self.target.server, self.policy.reconnect_timeout)
            self._fail_queue()

    def _tick_interval(self) -> float:
        return max(0.05, min(self.policy.io_timeout, self.policy.reconnect_timeout) / 4)

    def _tick(self) -> None:
        """The watchdog: a silent server, a handshake that never ends, the deadline."""
        self._watchdog = None
        if self._closed:
            return
        now = self.loop.time()
        if self._conns and (self._active or self._fast_in_flight() or not self._ready) and \
                now - self._last_progress >= self.policy.io_timeout:
            self.timed_out += 1
            self._lost(f"no answer for {self.policy.io_timeout:.1f} s")
        self._check_deadline()
        self._pump()  # answers for what failed
        self._watchdog = self.loop.call_later(self._tick_interval(), self._tick)

    # --- requests ------------------------------------------------------------------

    def submit(self, _fn: object, _image: object, items: list[IoItem]) -> asyncio.Future:
        """In place of the I/O pool (the Python data plane): run `items` and resolve to
        them when all are done (status set on each, as engine.execute_batch does)."""
        future = self.loop.create_future()
        batch = _Batch(items, future)
        ops = []
        for item in items:
            req = item.req
            views = item.views
            buf: Any = None
            bounce = None
            read = req.op == BlkifOp.READ
            if len(views) == 1:
                buf = views[0]
            elif views and not read:
                buf = b"".join(views)  # the one copy out of guest memory
            elif views:
                buf = bounce = bytearray(req.nbytes)
            ops.append(self.op(batch, item, req.op, item.is_flush,
                               req.sector * SECTOR_SIZE, req.nr_sectors * SECTOR_SIZE,
                               buf, bounce))
        self.submit_ops(ops)
        return future

    def op(self, sink: Sink, tag: Any, blkif_op: int, flush: bool, offset: int,
           length: int, buf: Any, bounce: bytearray | None = None) -> _Op:
        """A request for submit_ops: `buf` holds the data of a read or a write (a view
        of guest memory, or a bounce buffer whose contents `sink` moves itself), None
        for a flush without data or a discard."""
        steps: list[list[tuple]] = []
        self._seq += 1
        key = self._seq
        if blkif_op == BlkifOp.DISCARD:
            cmds = []
            while length > 0:
                n = min(length, TRIM_CHUNK)
                cmds.append(("trim", offset, n))
                offset += n
                length -= n
            if cmds:
                steps.append(cmds)
            return _Op(sink, tag, key, steps)
        read = blkif_op == BlkifOp.READ
        if flush and self.flush:
            steps.append([("flush",)])
        if buf is not None:
            fua = flush and not read and self.flush
            flags = 0
            if fua and self.fua:
                flags, fua = self.nbd.CMD_FLAG_FUA, False
            steps.append([("pread" if read else "pwrite", offset, buf, flags)])
            if fua:
                # A flush with data: the data must be durable too, and this server
                # has no FUA flag.
                steps.append([("flush",)])
        return _Op(sink, tag, key, steps, read, bounce)

    def submit_ops(self, ops: list[_Op]) -> None:
        """Send `ops` (or queue them while the connection is down); each sink hears of
        its own as they finish."""
        for op in ops:
            if self._failing or self._closed or (self._draining and not self._ready):
                op.failed = errno.ENOTCONN
                self._finish(op)
            elif self._ready:
                self._start(op)
            else:
                self._queue.append(op)
        self._pump()

    def _start(self, op: _Op) -> None:
        if not op.steps:
            self._finish(op)
            return
        if not self._ready:
            self._queue.append(op)
            return
        live = self._live
        if len(live) == 1:
            o = live[0].o
        else:
            self._rr += 1
            o = live[self._rr % len(live)].o
        mod, gen, done_list = self._mod, self._gen, self._done
        step = op.steps[0]
        op.outstanding = len(step)
        op.failed = 0
        if not self._active:
            self._last_progress = self.loop.time()  # the silence counts from now
        self._active.add(op)
        for cmd in step:
            def done(err: Any, op: _Op = op, gen: int = gen) -> int:
                done_list.append((op, gen, err.value))
                return 1
            kind = cmd[0]
            try:
                if kind == "pread":
                    mod.aio_pread(o, cmd[2], cmd[1], done, cmd[3])
                elif kind == "pwrite":
                    mod.aio_pwrite(o, cmd[2], cmd[1], done, cmd[3])
                elif kind == "flush":
                    mod.aio_flush(o, done, 0)
                else:
                    mod.aio_trim(o, cmd[2], cmd[1], done, 0)
            except self.nbd.Error as e:
                if mod.aio_is_dead(o) or mod.aio_is_closed(o):
                    # The connection died under us: the op waits for the next one.
                    self._lost(str(e))
                    return
                # Refused before it was sent (e.g. beyond a shrunken export).
                op.outstanding -= 1
                op.failed = e.errnum or errno.EIO
        if op.outstanding == 0:
            self._step_done(op)

    def _complete(self) -> None:
        for sink in self._fast_sinks:
            if sink.nbd_fast_pending():
                self._touched[sink] = None
                self._last_progress = self.loop.time()
        done = self._done  # the callbacks hold this list: emptied in place
        if not done:
            return
        self._last_progress = self.loop.time()
        active = self._active
        while done:
            batch = done[:]
            done.clear()
            gen = self._gen
            for op, op_gen, err in batch:
                if op_gen != gen or op not in active:
                    continue
                if err:
                    op.failed = op.failed or err
                op.outstanding -= 1
                if op.outstanding == 0:
                    self._step_done(op)

    def _step_done(self, op: _Op) -> None:
        self._active.discard(op)
        op.steps.popleft()
        if op.steps and not op.failed:
            self._start(op)
        else:
            self._finish(op)

    def _finish(self, op: _Op) -> None:
        self._touched[op.sink] = None
        op.sink.nbd_done(op)

    # --- rings that issue plain reads and writes from C ------------------------------

    def add_fast_sink(self, sink: FastSink) -> None:
        self._fast_sinks.append(sink)
        self._drop_waker()

    def remove_fast_sink(self, sink: FastSink) -> None:
        if sink in self._fast_sinks:
            self._fast_sinks.remove(sink)
            self._drop_waker()

    def _drop_waker(self) -> None:
        if self._waker is not None:
            calls, replies = self._waker.stats()
            self._waker_calls += calls
            self._waker_replies += replies
            self._waker = None

    def fast_handle(self) -> int | None:
        """The libnbd handle to issue on from C, or None when commands must go the
        Python way: down, failing, draining, others waiting, or several connections."""
        if not self._ready or self._queue or self._closed or self._draining or \
                len(self._live) != 1:
            return None
        return self._live[0].ptr or None

    def take_seq(self, n: int) -> int:
        """Reserve `n` places in the order of submission; returns the one before."""
        seq = self._seq
        self._seq += n
        return seq

    def fast_issued(self, n: int) -> None:
        self.issued_in_c += n
        if n and not self._active and self._fast_in_flight() == n:
            self._last_progress = self.loop.time()  # the silence counts from now

    def _fast_in_flight(self) -> int:
        return sum(s.nbd_fast_in_flight() for s in self._fast_sinks)

    def _take_back(self) -> list[_Op]:
        ops: list[_Op] = []
        for sink in self._fast_sinks:
            taken = sink.nbd_take_back()
            if taken:
                ops.extend(taken)
                self._touched[sink] = None  # answers recorded before the loss
        return ops

    # --- the device's view ---------------------------------------------------------

    @property
    def degraded(self) -> bool:
        return self._down_since is not None

    def stats(self) -> dict[str, int]:
        return {"nbd_degraded": int(self.degraded), "nbd_failing": int(self._failing),
                "nbd_connection_losses": self.connection_losses,
                "nbd_reconnects": self.reconnects, "nbd_timeouts": self.timed_out,
                "nbd_resent": self.resent, "nbd_issued_in_c": self.issued_in_c,
                **self._wake_stats(),
                "nbd_waiting": len(self._queue),
                "nbd_in_flight": len(self._active) + self._fast_in_flight(),
                "nbd_connections": len(self._live)}

    def _wake_stats(self) -> dict[str, int]:
        calls, replies = self._waker.stats() if self._waker is not None else (0, 0)
        return {"nbd_wakes_in_c": self._waker_calls + calls,
                "nbd_replies_in_c": self._waker_replies + replies}

    def resized(self) -> bool:
        if not self._ready:
            return False
        size = self._conns[0].h.get_size()
        size -= size % self.cfg.sector_size
        if size == self.size or size == 0:
            return False
        self.size = size
        self.sectors = size // SECTOR_SIZE
        return True

    def set_draining(self, draining: bool) -> None:
        """While the frontend goes away, nothing waits for a lost server: what waits
        for it now, and what is in flight if the connection is lost meanwhile, is
        answered with an error at once instead of after the reconnect timeout."""
        self._draining = draining
        if draining:
            self._fail_queue()
            self._pump()

    def _fail_queue(self) -> None:
        while self._queue:
            op = self._queue.popleft()
            op.failed = errno.ENOTCONN
            self._finish(op)

    def close(self) -> None:
        """Fail whatever still waits, close the connection."""
        self._closed = True
        for timer in (self._retry, self._watchdog):
            if timer is not None:
                timer.cancel()
        self._retry = self._watchdog = None
        self._drop_connection()
        ops = list(self._queue) + list(self._active) + self._take_back()
        self._queue.clear()
        self._active.clear()
        for op in ops:
            op.failed = op.failed or errno.ENOTCONN
            self._finish(op)
        self._pump()

