"""The per-connection process model (`[daemon] process_model = "per-connection"`).

Three kinds of process:
- the supervisor: binds (or is handed) the control socket, accepts, checks the peer
  (SO_PEERCRED), numbers the connection, and hands it to a new worker; it gathers the
  workers' status for DAEMON_STATUS and RING_DUMP, logs a worker that dies with its
  guest's identity, and stops every worker on SIGTERM. It never reads a VMM's bytes.
- the zygote: forked by `start_zygote()` before any event loop or thread exists, with
  every module a worker needs already imported. It forks one worker per connection on the
  supervisor's request (the connection and the worker's channel arrive as SCM_RIGHTS),
  and reports each worker's exit status, since only a parent can reap.
- a worker (worker.py): one connection, its own event loop and I/O threads, no
  capabilities, no new privileges.

Forking the zygote early, not the supervisor later, is what makes fork safe: the
supervisor runs an event loop and threads, and a fork copies none of their locks' owners.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import json
import os
import selectors
import signal
import socket
import stat
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

import uvloop

from .config import Config
from .errors import ControlError
from .log import EventLog
from .metrics import render_status
from .protocol.messages import ALL_DEVICES, RingDumpReply
from .server import Server, _fds_from_ancillary, merge_status_pages, status_page
from .worker import (
    BROKER_FLAGS,
    BROKER_MAX_FDS,
    BROKER_MSG,
    Channel,
    ChannelClosed,
    drop_privileges,
    install_seccomp,
    raise_for_error,
    ring_dump_from_json,
    ring_dump_to_json,
    serve_connection,
    set_worker_limits,
)

# How long the supervisor waits for one worker's status before marking it unresponsive.
WORKER_STATUS_TIMEOUT = 2.0
# How long SIGTERM waits for the workers to drain their guests before SIGKILL.
WORKER_STOP_TIMEOUT = 30.0
_ZYGOTE_MSG = 4096


def _send_json(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(msg).encode()
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


# --- the zygote ------------------------------------------------------------------------


@dataclass
class Zygote:
    pid: int
    sock: socket.socket


def start_zygote(config: Config) -> Zygote:
    """Fork the zygote. Call before any event loop or thread exists in this process."""
    from .session import load_device_types

    load_device_types()  # imported once here, shared copy-on-write by every worker
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Socket activation's fds belong to the supervisor only.
    activated: list[int] = []
    with contextlib.suppress(ValueError):
        if int(os.environ.get("LISTEN_PID", "")) == os.getpid():
            activated = list(range(3, 3 + int(os.environ.get("LISTEN_FDS", "0"))))
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ours.close()
            for fd in activated:
                with contextlib.suppress(OSError):
                    os.close(fd)
            for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
                        "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(var, None)
            _zygote_main(config, theirs)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    theirs.close()
    return Zygote(pid, ours)


def _zygote_main(config: Config, sock: socket.socket) -> None:
    # Termination is the supervisor's to decide (by closing the socket); a signal to the
    # whole group (Ctrl-C, systemd's stop) must not take the zygote before its workers.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                msg, anc, _, _ = sock.recvmsg(_ZYGOTE_MSG, socket.CMSG_SPACE(12))
                fds = _fds_from_ancillary(anc)
                if not msg:
                    return  # the supervisor is gone; workers see their channels close
                req = json.loads(msg)
                if len(fds) != 3:
                    for fd in fds:
                        os.close(fd)
                    continue
                try:
                    pid = _fork_worker(config, sock, sel, req, fds)
                except OSError as exc:  # EAGAIN, ENOMEM: this connection fails, not all
                    _send_json(sock, {"failed": req["conn"], "errno": exc.errno})
                    continue
                finally:
                    for fd in fds:
                        os.close(fd)
                _send_json(sock, {"spawned": req["conn"], "pid": pid})
                try:
                    pidfd = os.pidfd_open(pid)
                except OSError:
                    # Cannot watch it: wait for it here, as the exit is reported.
                    _, status = os.waitpid(pid, 0)
                    _send_json(sock, {"exited": req["conn"], "pid": pid, "status": status})
                    continue
                sel.register(pidfd, selectors.EVENT_READ, (pid, req["conn"]))
            else:
                pid, conn = key.data
                sel.unregister(key.fd)
                os.close(key.fd)
                _, status = os.waitpid(pid, 0)
                _send_json(sock, {"exited": conn, "pid": pid, "status": status})


def _fork_worker(config: Config, zsock: socket.socket, sel: selectors.BaseSelector,
                 req: dict[str, Any], fds: list[int]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for key in list(sel.get_map().values()):
            if key.data is not None:
                os.close(key.fd)
        sel.close()
        zsock.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        set_worker_limits(config.daemon.worker_max_open_files,
                          config.daemon.worker_max_memory_mib)
        drop_privileges(config.daemon.worker_user)
        install_seccomp()
        vmm, chan, broker = (socket.socket(fileno=fd) for fd in fds)
        creds = (int(req["pid"]), int(req["uid"]), int(req["gid"]))
        code = uvloop.run(serve_connection(config, vmm, chan, int(req["conn"]), creds,
                                           broker))
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(code)


# --- the supervisor --------------------------------------------------------------------


def _future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


@dataclass
class Worker:
    conn_id: int
    creds: tuple[int, int, int]
    pid: int = 0
    guest_name: str = ""
    broker: socket.socket | None = None
    channel: asyncio.Future[Channel] = field(default_factory=_future)
    exited: asyncio.Future[int] = field(default_factory=_future)


class Supervisor(Server):
    """The listener of a per-connection daemon: accepts as Server does, serves nothing."""

    def __init__(self, config: Config, log: EventLog | None = None,
                 zygote: Zygote | None = None) -> None:
        self.zygote = zygote if zygote is not None else start_zygote(config)
        super().__init__(config, log)
        self.pool.shutdown()  # the supervisor does no guest I/O
        self.workers: dict[int, Worker] = {}
        self._zygote_reader = False

    async def start(self, path: str | None = None, sock: socket.socket | None = None) -> None:
        await super().start(path, sock)
        self.zygote.sock.setblocking(False)
        self.loop.add_reader(self.zygote.sock.fileno(), self._from_zygote)
        self._zygote_reader = True

    def adopt(self, sock: socket.socket, conn_id: int, creds: tuple[int, int, int]) -> Any:
        """Hand an accepted, checked connection to a new worker."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        broker, broker_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            _send_json(self.zygote.sock, {"conn": conn_id, "pid": creds[0], "uid": creds[1],
                                          "gid": creds[2]},
                       [sock.fileno(), theirs.fileno(), broker_theirs.fileno()])
        except OSError as exc:
            self.log.error("worker_spawn_failed", conn=conn_id, error=exc.strerror)
            ours.close()
            broker.close()
            return None
        finally:
            # The worker holds the connection now: when it dies, the VMM sees the hang-up.
            sock.close()
            theirs.close()
            broker_theirs.close()
        worker = self.workers[conn_id] = Worker(conn_id, creds, broker=broker)
        broker.setblocking(False)
        self.loop.add_reader(broker.fileno(), self._broker_readable, worker)
        self.loop.create_task(self._open_channel(worker, ours))
        return None

    def _broker_readable(self, worker: Worker) -> None:
        assert worker.broker is not None
        try:
            data = worker.broker.recv(BROKER_MSG)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_broker(worker)
            return
        # One request at a time per worker (it waits for each answer anyway).
        self.loop.remove_reader(worker.broker.fileno())
        self.loop.create_task(self._broker_request(worker, data))

    async def _broker_request(self, worker: Worker, data: bytes) -> None:
        """A worker asks for an image or a tap: checked here against the configuration,
        opened or created with the supervisor's privilege (in a thread: netlink and
        opens may block), and the fds passed back with SCM_RIGHTS."""
        fds: list[int] = []
        try:
            msg = json.loads(data)
            op = msg.get("op") if isinstance(msg, dict) else None
            if op == "open_image":
                fds = [await asyncio.to_thread(self._open_image, worker, msg)]
            elif op == "open_tap":
                fds = await asyncio.to_thread(self._open_tap, worker, msg)
            else:
                raise ControlError(errno.EINVAL, f"unknown request {op!r}")
            reply: dict[str, Any] = {"ok": 1}
        except Exception as exc:  # every request is answered, or the worker would wait
            if isinstance(exc, ControlError):
                code, message = exc.code, exc.message
            elif isinstance(exc, OSError) and exc.errno:
                code, message = exc.errno, exc.strerror or str(exc)
            elif isinstance(exc, ValueError | KeyError | TypeError):
                code, message = errno.EINVAL, f"bad request: {exc!r}"
            else:
                code, message = errno.EIO, f"internal error: {exc!r}"
            self.log.warning("broker_refused", conn=worker.conn_id,
                             errno=errno.errorcode.get(code, code), message=message)
            reply = {"errno": code, "message": message}
        try:
            if worker.broker is not None:
                with contextlib.suppress(OSError):
                    _send_json(worker.broker, reply, fds)
                self.loop.add_reader(worker.broker.fileno(), self._broker_readable, worker)
        finally:
            for fd in fds:
                os.close(fd)

    def _open_image(self, worker: Worker, msg: dict[str, Any]) -> int:
        path, flags = msg["path"], msg["flags"]
        if not isinstance(path, str) or not isinstance(flags, int) or "\0" in path:
            raise ControlError(errno.EINVAL, "open_image: bad request")
        if flags & ~BROKER_FLAGS:
            raise ControlError(errno.EINVAL, f"open_image: flags {flags:#o} not allowed")
        if not self.config.image_allowed(path):
            raise ControlError(errno.EACCES, f"path: {path!r} is outside allowed_dirs")
        # The checked path, resolved, is what is opened, and its last component must not
        # have become a symlink since.
        real = os.path.realpath(path)
        # O_NONBLOCK: opening a FIFO must not hang this thread; it is refused below.
        fd = os.open(real, flags | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW | os.O_NONBLOCK)
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            os.close(fd)
            raise ControlError(errno.EINVAL, f"path: {path!r} is neither a file nor a "
                               "block device")
        if not flags & os.O_NONBLOCK:
            os.set_blocking(fd, True)
        self.log.info("image_opened", conn=worker.conn_id, path=real)
        return fd

    def _open_tap(self, worker: Worker, msg: dict[str, Any]) -> list[int]:
        from .devices.net.tap import check_ifname, make_tap, netns_exists

        name, queues, mtu = msg["name"], msg["queues"], msg["mtu"]
        bridge, netns = msg["bridge"], msg["netns"]
        adopt = msg.get("adopt", False)  # a same-host migration's destination
        if not (isinstance(name, str) and isinstance(queues, int) and isinstance(adopt, bool)
                and 1 <= queues <= BROKER_MAX_FDS and (mtu is None or isinstance(mtu, int))
                and (bridge is None or isinstance(bridge, str))
                and (netns is None or isinstance(netns, str))):
            raise ControlError(errno.EINVAL, "open_tap: bad request")
        check_ifname(name)
        if bridge is not None and not self.config.bridge_allowed(bridge):
            raise ControlError(errno.EACCES, f"net: bridge {bridge!r} is not allowed")
        if netns is not None and ("/" in netns or netns in (".", "..")
                                  or not netns_exists(netns)):
            raise ControlError(errno.EINVAL, f"net: netns {netns!r}: no such network "
                               "namespace")
        fds = make_tap(name, queues, mtu, bridge, netns,
                       self.config.network.attach_existing_taps, adopt)
        self.log.info("tap_adopted" if adopt else "tap_created", conn=worker.conn_id,
                      tap=name, queues=queues)
        return fds

    def _close_broker(self, worker: Worker) -> None:
        if worker.broker is not None:
            self.loop.remove_reader(worker.broker.fileno())
            worker.broker.close()
            worker.broker = None

    async def _open_channel(self, worker: Worker, sock: socket.socket) -> None:
        channel = await Channel.open(sock,
                                     lambda msg: self._from_worker(worker.conn_id, msg))
        worker.channel.set_result(channel)

    def _from_zygote(self) -> None:
        while True:
            try:
                data = self.zygote.sock.recv(_ZYGOTE_MSG)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                self.log.error("zygote_lost", pid=self.zygote.pid)
                self.loop.remove_reader(self.zygote.sock.fileno())
                self._zygote_reader = False
                return
            msg = json.loads(data)
            if "spawned" in msg:
                self.loop.create_task(self._spawned(int(msg["spawned"]), int(msg["pid"])))
            elif "failed" in msg:
                self.loop.create_task(self._spawn_failed(int(msg["failed"]),
                                                         int(msg["errno"] or 0)))
            elif "exited" in msg:
                self.loop.create_task(self._exited(int(msg["exited"]), int(msg["pid"]),
                                                   int(msg["status"])))

    async def _spawned(self, conn_id: int, pid: int) -> None:
        worker = self.workers.get(conn_id)
        if worker is None:
            return
        worker.pid = pid
        self.log.info("worker_started", conn=conn_id, worker_pid=pid,
                      pid=worker.creds[0], uid=worker.creds[1])

    async def _spawn_failed(self, conn_id: int, code: int) -> None:
        worker = self.workers.pop(conn_id, None)
        self.log.error("worker_spawn_failed", conn=conn_id,
                       error=os.strerror(code) if code else "fork failed")
        if worker is not None:
            self._close_broker(worker)
            await (await worker.channel).close()
            if not worker.exited.done():
                worker.exited.set_result(-1)

    async def _exited(self, conn_id: int, pid: int, status: int) -> None:
        worker = self.workers.pop(conn_id, None)
        creds = worker.creds if worker is not None else (0, 0, 0)
        fields: dict[str, Any] = {"conn": conn_id, "worker_pid": pid,
                                  "pid": creds[0], "uid": creds[1]}
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            self.log.error("worker_crashed", **fields, signal=signal.Signals(sig).name)
        elif os.WEXITSTATUS(status) != 0:
            self.log.error("worker_failed", **fields, exit_code=os.WEXITSTATUS(status))
        else:
            self.log.info("worker_exited", **fields)
        if worker is not None:
            self._close_broker(worker)
            await (await worker.channel).close()
            if not worker.exited.done():
                worker.exited.set_result(status)

    # --- requests from workers (operator requests of their sessions) ------------------

    async def _from_worker(self, conn_id: int, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "daemon_status":
            return {"status": await self.gather_status(int(msg["conn"]), int(msg["devid"]))}
        if op == "guest_name":
            return {"in_use": await self.claim_guest_name(conn_id, str(msg["name"]))}
        if op == "ring_dump":
            return ring_dump_to_json(await self.forward_ring_dump(
                int(msg["conn"]), int(msg["devid"]), int(msg["ring"])))
        raise ControlError(errno.EOPNOTSUPP, f"supervisor: unknown request {op!r}")

    async def _worker_status(self, worker: Worker) -> tuple[dict[str, str],
                                                             dict[int, dict[str, str]]]:
        ident = {"peer": f"pid={worker.creds[0]},uid={worker.creds[1]}",
                 "worker_pid": str(worker.pid)}
        try:
            reply = raise_for_error(await (await worker.channel).request(
                {"op": "status"}, WORKER_STATUS_TIMEOUT))
        except (TimeoutError, ChannelClosed, ControlError) as exc:
            why = "unresponsive" if isinstance(exc, TimeoutError) else "gone"
            return {**ident, "worker": why}, {}
        try:
            summary = reply.get("summary") or {}
            devices = {int(d): {str(k): str(v) for k, v in part.items()}
                       for d, part in reply.get("devices", {}).items()}
            return {**{str(k): str(v) for k, v in summary.items()}, **ident,
                    "worker": "ok"}, devices
        except (AttributeError, TypeError, ValueError):
            # A worker serves an untrusted guest: its answer is checked, and a bad one
            # marks that worker only.
            return {**ident, "worker": "bad_reply"}, {}

    async def _gather(self, conn: int = 0) -> dict[int, Any]:
        """Every worker's part at or after connection `conn`, asked all at once."""
        chosen = [w for cid, w in sorted(self.workers.items()) if cid >= conn]
        answers = await asyncio.gather(*(self._worker_status(w) for w in chosen))
        return {w.conn_id: (lambda s=summary: s,
                            {d: (lambda p=part: p) for d, part in devices.items()})
                for w, (summary, devices) in zip(chosen, answers, strict=True)}

    async def gather_status(self, conn: int = 0, devid: int = ALL_DEVICES) -> dict[str, str]:
        """One DAEMON_STATUS page, gathered from every worker at or after the cursor. A
        worker that does not answer in time is listed with `worker=unresponsive`."""
        views = await self._gather(conn)
        return status_page(self.status_header(len(self.workers)), views, conn, devid)

    async def gather_full_status(self) -> dict[str, str]:
        """Every page merged, from one gathering (the metrics endpoint)."""
        views = await self._gather()
        return merge_status_pages(
            lambda conn, devid: status_page(self.status_header(len(self.workers)), views,
                                            conn, devid))

    async def prometheus_text(self) -> str:
        """The metrics endpoint's text: every worker's guests, gathered."""
        return render_status(await self.gather_full_status())

    async def claim_guest_name(self, conn_id: int, name: str) -> bool:
        """HELLO's guest name for `conn_id`, unless another live worker holds it; True if
        it is in use. Claimed here, in the supervisor's one loop, so that two workers
        cannot both take a name."""
        for other in list(self.workers.values()):
            if other.conn_id == conn_id or other.guest_name != name:
                continue
            # A worker that died (its VMM reconnecting) may not be reaped yet: a closed
            # channel means it holds nothing.
            try:
                await (await other.channel).request({"op": "status"}, WORKER_STATUS_TIMEOUT)
            except ChannelClosed:
                other.guest_name = ""
                continue
            except TimeoutError:
                pass
            if other.guest_name == name:
                return True
        worker = self.workers.get(conn_id)
        if worker is not None:
            worker.guest_name = name
        return False

    async def forward_ring_dump(self, conn: int, devid: int, ring: int) -> RingDumpReply:
        worker = self.workers.get(conn)
        if worker is None:
            raise ControlError(errno.ENOENT, f"connection {conn}: no such connection")
        try:
            reply = await (await worker.channel).request(
                {"op": "ring_dump", "devid": devid, "ring": ring}, WORKER_STATUS_TIMEOUT)
        except TimeoutError:
            raise ControlError(errno.ETIMEDOUT,
                               f"connection {conn}: worker does not answer") from None
        except ChannelClosed:
            raise ControlError(errno.ENOENT, f"connection {conn}: worker gone") from None
        return ring_dump_from_json(raise_for_error(reply))

    # --- shutdown ---------------------------------------------------------------------

    async def close(self) -> None:
        """Stop accepting, then SIGTERM every worker (each drains its guest as the single
        process does) and wait for them; a worker still there after WORKER_STOP_TIMEOUT
        is killed. Then the zygote goes."""
        await super().close()
        workers = list(self.workers.values())
        for w in workers:
            if w.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGTERM)
        if workers:
            _, late = await asyncio.wait([w.exited for w in workers],
                                         timeout=WORKER_STOP_TIMEOUT)
            for w in workers:
                if w.exited in late and w.pid:
                    self.log.error("worker_stop_timeout", conn=w.conn_id, worker_pid=w.pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.pid, signal.SIGKILL)
                        os.kill(w.pid, signal.SIGCONT)
            if late:
                await asyncio.wait(late, timeout=5)
        if self._zygote_reader:
            self.loop.remove_reader(self.zygote.sock.fileno())
        self.zygote.sock.close()
        await asyncio.to_thread(os.waitpid, self.zygote.pid, 0)


def daemon_server(config: Config, log: EventLog) -> Server:
    """The Server `backendd serve` runs: this one, or the supervisor of workers."""
    if config.daemon.process_model == "per-connection":
        return Supervisor(config, log, _early_zygote)
    return Server(config, log)


_early_zygote: Zygote | None = None


def prepare(config: Config) -> None:
    """Called by `backendd serve` before its event loop starts: fork the zygote then."""
    global _early_zygote
    if config.daemon.process_model == "per-connection" and _early_zygote is None:
        _early_zygote = start_zygote(config)
