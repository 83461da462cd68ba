"""The control socket: accepts VMM connections and feeds each one's bytes and fds to its
Session. A thin adapter: framing lives in protocol/, request handling in session.py.

Each connection is isolated: its own Session (memory, grants, devices), its own request
queue and worker task. A connection that breaks framing is closed; one that is slow to
read its replies gets them buffered and written when the socket drains.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import functools
import os
import socket
import stat
import struct
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

from . import __version__
from .config import Config
from .dataplane import rounds
from .errors import ControlError, StartupError
from .iopool import FairPool
from .log import EventLog, GuestLogLimiter
from .protocol.framing import FatalFramingError, Frame, Framer, Role
from .protocol.messages import ALL_DEVICES, MAX_CHANNELS, MAX_PAYLOAD, RingDumpReply
from .session import DaemonView, Session, load_device_types

# The largest fd count any request carries (FRONTEND_STATE: a kick and a call per channel).
MAX_FDS_PER_RECV = 2 * MAX_CHANNELS
RECV_SIZE = 65536
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_RECV * array.array("i").itemsize)
# sun_path is 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107
# Stop reading a connection once this many requests wait: the VMM must read its replies.
MAX_QUEUED_REQUESTS = 64
# Stop reading and handling a connection's requests once this many reply bytes wait for
# the VMM to read them; carry on once they are down to half. A reply is at most 64 KiB,
# so a connection holds at most this plus one reply (and any notices) in memory.
MAX_REPLY_BACKLOG = 1 << 20


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end of a unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class Connection:
    def __init__(self, server: Server, sock: socket.socket, conn_id: int,
                 creds: tuple[int, int, int]) -> None:
        self.server = server
        self.sock = sock
        self.conn_id = conn_id
        self.pid, self.uid, _ = creds
        loop = server.loop
        self.framer = Framer(Role.DAEMON)
        self.session = Session(conn_id, server.config, loop, self.send, server.log,
                               server.guest_log, server.pool.submit,
                               peer=f"pid={self.pid},uid={self.uid}", daemon=server.view)
        self._queue: asyncio.Queue[Frame | None] = asyncio.Queue()
        self._out = bytearray()
        self._writing = False
        self._reading = False
        self._closing = False
        # Set while replies are under MAX_REPLY_BACKLOG; the worker waits on it.
        self._drained = asyncio.Event()
        self._drained.set()
        # Set while the connection is not read because its replies are not read.
        self.backlogged = asyncio.Event()
        self.done = loop.create_future()
        self._worker = loop.create_task(self._work())
        self._resume_reading()

    @property
    def closing(self) -> bool:
        return self._closing

    # --- input -------------------------------------------------------------------

    def _resume_reading(self) -> None:
        if (not self._reading and not self._closing and self._drained.is_set()
                and self._queue.qsize() < MAX_QUEUED_REQUESTS):
            self.server.loop.add_reader(self.sock.fileno(), self._readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading:
            self.server.loop.remove_reader(self.sock.fileno())
            self._reading = False

    def _readable(self) -> None:
        try:
            data, ancdata, msg_flags, _ = self.sock.recvmsg(
                RECV_SIZE, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._hang_up(f"recvmsg: {exc.strerror}")
            return
        fds = _fds_from_ancillary(ancdata)
        if msg_flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            self._hang_up(f"more than {MAX_FDS_PER_RECV} fds in one message")
            return
        if not data:
            for fd in fds:
                os.close(fd)
            self._hang_up("peer closed")
            return
        try:
            frames = self.framer.feed(data, fds)
        except FatalFramingError as exc:
            self.server.log.warning("connection_framing_error", conn=self.conn_id,
                                    errno=errno.errorcode.get(exc.code, exc.code),
                                    message=str(exc))
            self._hang_up("framing error")
            return
        for frame in frames:
            self._queue.put_nowait(frame)
        if self._queue.qsize() >= MAX_QUEUED_REQUESTS:
            self._pause_reading()

    async def _work(self) -> None:
        while True:
            frame = await self._queue.get()
            if frame is None:
                break
            await self._drained.wait()
            await self.session.handle(frame)
            if self._queue.qsize() < MAX_QUEUED_REQUESTS // 2:
                self._resume_reading()

    # --- output ------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self._closing:
            return
        self._out += data
        if not self._writing:
            self._flush()
        else:
            self._check_backlog()

    def _check_backlog(self) -> None:
        if len(self._out) > MAX_REPLY_BACKLOG:
            if self._drained.is_set():
                self._drained.clear()
                self.backlogged.set()
                self._pause_reading()
        elif not self._drained.is_set() and len(self._out) <= MAX_REPLY_BACKLOG // 2:
            self._drained.set()
            self.backlogged.clear()
            self._resume_reading()

    def _flush(self) -> None:
        while self._out:
            try:
                n = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._out.clear()
                self._hang_up(f"send: {exc.strerror}")
                return
            del self._out[:n]
        self._check_backlog()
        if self._out and not self._writing:
            self.server.loop.add_writer(self.sock.fileno(), self._flush)
            self._writing = True
        elif not self._out and self._writing:
            self.server.loop.remove_writer(self.sock.fileno())
            self._writing = False

    # --- teardown ----------------------------------------------------------------

    def _hang_up(self, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self._pause_reading()
        if self._writing:
            self.server.loop.remove_writer(self.sock.fileno())
            self._writing = False
        self.server.log.info("connection_closed", conn=self.conn_id, reason=reason)
        self._out = bytearray()  # unread replies go now, not when the object does
        self._drained.set()  # let the worker finish the request it holds
        # Requests already queued are dropped, their fds closed; the one being handled
        # finishes first so teardown never races a device connect.
        while not self._queue.empty():
            frame = self._queue.get_nowait()
            if frame is not None:
                for fd in frame.fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        self._queue.put_nowait(None)
        self.server.loop.create_task(self._teardown())

    async def _teardown(self) -> None:
        try:
            await self._worker
        except Exception:
            self.server.log.error("connection_worker_crashed", conn=self.conn_id,
                                  traceback=traceback.format_exc())
        try:
            await self.session.close()
        finally:
            self.framer.close()
            self.sock.close()
            self.server.connections.pop(self.conn_id, None)
            if not self.done.done():
                self.done.set_result(None)

    async def close(self) -> None:
        self._hang_up("daemon stopping")
        await self.done


# A DAEMON_STATUS page's key/value map stays within one reply (the reply's result word
# comes first), with room left for the next-page cursor.
STATUS_PAGE_BYTES = MAX_PAYLOAD - 4
# Room for next.conn/next.devid, and the asker's `self` that the session adds.
_STATUS_CURSOR_ROOM = 96


def _kv_size(kv: dict[str, str]) -> int:
    """Bytes of `kv` encoded as a key/value map (docs/protocol.md)."""
    return 4 + sum(4 + len(k.encode()) + len(v.encode()) for k, v in kv.items())


ConnView = tuple[Callable[[], dict[str, str]], Mapping[int, Callable[[], dict[str, str]]]]


def status_page(header: dict[str, str], conns: Mapping[int, ConnView], conn: int = 0,
                devid: int = ALL_DEVICES) -> dict[str, str]:
    """One DAEMON_STATUS page, from cursor (conn, devid) on: `header` (on every page),
    then whole connection summaries and whole devices only, as much as fits one reply;
    `next.conn` and `next.devid` say where the next page starts. `conns` maps a
    connection id to its summary and its devices' parts, each made only when it is put
    on the page."""
    out = dict(header)
    size = _kv_size(out) + _STATUS_CURSOR_ROOM
    daemon_keys = len(out)  # on every page; a page holds at least one part besides
    for cid in sorted(c for c in conns if c >= conn):
        summary, devices = conns[cid]
        within = cid == conn and devid != ALL_DEVICES
        parts: list[tuple[int, Callable[[], dict[str, str]]]] = []
        if not within:
            parts.append((ALL_DEVICES, summary))
        parts += [(d, devices[d]) for d in sorted(devices) if not within or d >= devid]
        for d, make in parts:
            part = {f"conn.{cid}.{k}": v for k, v in make().items()}
            n = _kv_size(part) - 4
            if size + n > STATUS_PAGE_BYTES and len(out) > daemon_keys:
                out["next.conn"], out["next.devid"] = str(cid), str(d)
                return out
            out.update(part)
            size += n
    return out


def merge_status_pages(page: Callable[[int, int], dict[str, str]]) -> dict[str, str]:
    """Every DAEMON_STATUS page, from `page(conn, devid)` (a status_page), merged into
    one map without the `next.*` keys, as VmmClient.daemon_status() does over the wire."""
    out: dict[str, str] = {}
    cursor = (0, ALL_DEVICES)
    while True:
        got = page(*cursor)
        nxt = got.pop("next.conn", None), got.pop("next.devid", None)
        out.update(got)
        if nxt[0] is None or nxt[1] is None:
            return out
        cursor = (int(nxt[0]), int(nxt[1]))


def _bound_blk_io_threads(n: int) -> None:
    """The compiled blk data plane runs its blocking I/O on threads of its own: at most
    as many as the I/O pool has."""
    from .dataplane import kernel as blk_kernel

    with contextlib.suppress(blk_kernel.KernelError):  # a stale build: ADD_DEVICE says so
        k = blk_kernel.load()
        if k is not None:
            k.io_threads(n)


class Server:
    def __init__(self, config: Config, log: EventLog | None = None) -> None:
        self.config = config
        self.log = log if log is not None else EventLog(config.daemon.log_level)
        self.guest_log = GuestLogLimiter(self.log, burst=config.daemon.guest_log_burst)
        self.connections: dict[int, Connection] = {}
        self._next_id = 1
        self.pool = FairPool(config.daemon.io_threads)
        _bound_blk_io_threads(config.daemon.io_threads)
        rounds.set_poll(config.daemon.poll_us)
        self._listener: socket.socket | None = None
        # (path, st_dev, st_ino) of the socket file this daemon created.
        self._owns_path: tuple[Path, int, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.start_time = time.time()
        self._started = time.monotonic()
        # What sessions ask for operator requests: this server, or (in a worker process)
        # the supervisor's view of every worker.
        self.view: DaemonView = self
        load_device_types()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("server not started")
        return self._loop

    @property
    def address(self) -> str:
        assert self._listener is not None
        if self._owns_path is not None:
            return str(self._owns_path[0])  # the socket was bound under a temporary name
        name = self._listener.getsockname()
        return name if isinstance(name, str) else name.decode()

    async def start(self, path: str | None = None, sock: socket.socket | None = None) -> None:
        """Listen on `sock` (socket activation) or on a new socket bound at `path`."""
        self._loop = asyncio.get_running_loop()
        if sock is None:
            sock = self._bind(Path(path or self.config.daemon.socket))
        sock.setblocking(False)
        self._listener = sock
        self.loop.add_reader(sock.fileno(), self._accept)
        self.log.info("listening", socket=self.address)
        with contextlib.suppress(ImportError):
            from .devices.net.tap import preload_netlink

            preload_netlink()

    def _bind(self, path: Path) -> socket.socket:
        """Listen at `path`, which appears only once the socket listens: bound and listening
        under a temporary name first, then hard-linked to `path` (which fails rather than
        replaces if the name was taken meanwhile). A live daemon's socket is never removed."""
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            # The link would succeed, but no client could connect by that name.
            raise StartupError(f"control socket {path}: the path is {len(os.fsencode(path))} "
                               f"bytes, a unix socket's is at most {MAX_SOCKET_PATH}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._clear_stale(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as exc:
            raise StartupError(f"control socket {path}: cannot listen: "
                               f"{exc.strerror or exc}") from None
        temp = path.parent / f".backendd-{os.getpid()}.sock"
        try:
            # Only a process with this pid could have left this name.
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            # Born 0600 (umask) so no other user ever gets a window to connect.
            old = os.umask(0o177)
            try:
                sock.bind(str(temp))
            finally:
                os.umask(old)
            try:
                sock.listen(64)
                try:
                    os.link(temp, path)
                except FileExistsError:
                    raise StartupError(f"control socket {path}: another daemon took it while "
                                       "this one started") from None
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                        raise
                    # A file system without hard links: rename, after the same check.
                    self._clear_stale(path)
                    os.rename(temp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    temp.unlink()
            st = path.lstat()
        except StartupError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise StartupError(f"control socket {path}: cannot listen: "
                               f"{exc.strerror or exc}") from None
        self._owns_path = (path, st.st_dev, st.st_ino)
        return sock

    @staticmethod
    def _clear_stale(path: Path) -> None:
        """Remove a socket file left by a daemon that is gone; refuse anything else."""
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"control socket {path}: exists and is not a socket; "
                               "not replacing it")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
            probe.setblocking(False)
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                pass  # nobody listens: stale
            except FileNotFoundError:
                return
            except BlockingIOError:
                # A full backlog: a live daemon (perhaps a stopped one).
                raise StartupError(f"control socket {path}: a daemon is already listening "
                                   "there (its backlog is full)") from None
            else:
                raise StartupError(f"control socket {path}: a daemon is already listening "
                                   "there; stop it first or choose another --socket") from None
        # Remove it only if it is still the file that refused the probe.
        with contextlib.suppress(FileNotFoundError):
            now = path.lstat()
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                path.unlink()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: keep the daemon alive, the VMM will retry.
                self.log.error("accept_failed", error=exc.strerror)
                return
            sock.setblocking(False)
            creds = peer_credentials(sock)
            if not self.config.peer_allowed(creds[1]):
                self.log.warning("peer_refused", pid=creds[0], uid=creds[1])
                sock.close()
                continue
            conn_id = self._next_id
            self._next_id += 1
            self.log.info("connection_accepted", conn=conn_id, pid=creds[0], uid=creds[1])
            self.adopt(sock, conn_id, creds)

    def adopt(self, sock: socket.socket, conn_id: int,
              creds: tuple[int, int, int]) -> Connection:
        """Serve an accepted, checked, non-blocking connection (a worker process is handed
        its one connection this way, without a listener of its own)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        conn = self.connections[conn_id] = Connection(self, sock, conn_id, creds)
        return conn

    # --- operator view (DaemonView) ----------------------------------------------

    def status(self, conn: int = 0, devid: int = ALL_DEVICES) -> dict[str, str]:
        """One DAEMON_STATUS page from cursor (conn, devid) on (see status_page)."""
        views = {cid: (functools.partial(self._conn_status, cid),
                       {d: functools.partial(c.session.device_status, d)
                        for d in sorted(c.session.devices)})
                 for cid, c in self.connections.items()}
        return status_page(self.status_header(len(self.connections)), views, conn, devid)

    def status_header(self, connections: int) -> dict[str, str]:
        """The daemon's own keys, on every DAEMON_STATUS page."""
        return {"connections": str(connections), "version": __version__,
                "start_time": f"{self.start_time:.3f}",
                "uptime_seconds": f"{time.monotonic() - self._started:.3f}",
                "io_threads": str(self.config.daemon.io_threads)}

    def _conn_status(self, conn_id: int) -> dict[str, str]:
        conn = self.connections[conn_id]
        return {**conn.session.status(), "unread_reply_bytes": str(len(conn._out))}

    def full_status(self) -> dict[str, str]:
        """Every page of status() merged into one map (merge_status_pages)."""
        return merge_status_pages(self.status)

    def guest_name_in_use(self, name: str) -> bool:
        # A connection already hung up (its VMM reconnecting) no longer holds its name.
        return any(c.session.guest_name == name and not c.closing
                   for c in self.connections.values())

    def ring_dump(self, conn: int, devid: int, ring: int) -> RingDumpReply:
        connection = self.connections.get(conn)
        if connection is None:
            raise ControlError(errno.ENOENT, f"connection {conn}: no such connection")
        return connection.session.ring_dump(devid, ring)

    def _remove_own_socket(self) -> None:
        """Unlink the socket file only if it is still the one this daemon bound: another
        daemon's socket at the same path is left alone."""
        if self._owns_path is None:
            return
        path, dev, ino = self._owns_path
        self._owns_path = None
        with contextlib.suppress(FileNotFoundError):
            st = path.lstat()
            if (st.st_dev, st.st_ino) == (dev, ino):
                path.unlink()

    async def close(self) -> None:
        if self._loop is None:
            self.pool.shutdown()
            return
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            self._remove_own_socket()
        for conn in list(self.connections.values()):
            await conn.close()
        self.pool.shutdown()
