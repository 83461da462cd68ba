"""A worker process: serves one VMM connection (its guest's memory, grants, devices and data
plane) and nothing else, on its own event loop. Forked by the zygote (supervisor.py) with the
accepted connection and one end of a control channel to the supervisor.

The channel carries length-prefixed JSON messages both ways, each with an id; a message
with "reply" answers the request of that id. The supervisor asks a worker for its status
and its rings; a worker asks the supervisor for the whole daemon's view when its own VMM
(or an operator) sends DAEMON_STATUS or RING_DUMP. JSON, not pickle: a worker serves an
untrusted guest, and what it sends must never be able to run code in the supervisor.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import errno
import json
import os
import pwd
import resource
import signal
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .config import Config
from .errors import ControlError
from .log import EventLog
from .protocol.messages import ALL_DEVICES, RingDumpReply

_LEN = struct.Struct("<I")
# A worker's whole status (32 devices of ~25 counters) or one ring dump is far below this.
MAX_CHANNEL_MESSAGE = 4 << 20

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ChannelClosed(ConnectionError):
    pass


class Channel:
    """Requests and replies, both ways, over one stream socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handler: Handler) -> None:
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._next_id = 1
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.closed = asyncio.get_running_loop().create_future()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reading = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, sock: socket.socket, handler: Handler) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock,
                                                            limit=MAX_CHANNEL_MESSAGE)
        return cls(reader, writer, handler)

    def _write(self, msg: dict[str, Any]) -> None:
        if self._writer.is_closing():
            raise ChannelClosed("channel closed")
        data = json.dumps(msg, separators=(",", ":")).encode()
        self._writer.write(_LEN.pack(len(data)) + data)

    async def request(self, msg: dict[str, Any], timeout: float | None = None
                      ) -> dict[str, Any]:
        rid = self._next_id
        self._next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            self._write({**msg, "id": rid})
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(rid, None)

    async def _read(self) -> None:
        try:
            while True:
                head = await self._reader.readexactly(_LEN.size)
                (n,) = _LEN.unpack(head)
                if n > MAX_CHANNEL_MESSAGE:
                    raise ValueError(f"channel message of {n} bytes")
                msg = json.loads(await self._reader.readexactly(n))
                if not isinstance(msg, dict) or not isinstance(msg.get("id"), int):
                    raise ValueError("channel message without an id")
                if msg.get("reply"):
                    fut = self._waiting.get(msg["id"])
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                else:
                    task = asyncio.get_running_loop().create_task(self._answer(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            reason = exc
        else:  # pragma: no cover - the loop only ends by an exception
            reason = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(f"channel closed: {reason!r}"))
        self._writer.close()
        if not self.closed.done():
            self.closed.set_result(None)

    async def _answer(self, msg: dict[str, Any]) -> None:
        try:
            reply = await self._handler(msg)
        except ControlError as exc:
            reply = {"errno": exc.code, "message": exc.message}
        except Exception as exc:  # a bug here answers the request, it does not hang it
            reply = {"errno": errno.EIO, "message": f"internal error: {exc!r}"}
        with contextlib.suppress(ChannelClosed):
            self._write({**reply, "id": msg["id"], "reply": True})

    async def close(self) -> None:
        self._writer.close()
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reading


def raise_for_error(reply: dict[str, Any]) -> dict[str, Any]:
    if "errno" in reply:
        raise ControlError(int(reply["errno"]), str(reply.get("message", "")))
    return reply


def ring_dump_to_json(reply: RingDumpReply) -> dict[str, Any]:
    return {"info": reply.info, "data": base64.b64encode(reply.data).decode()}


def ring_dump_from_json(msg: dict[str, Any]) -> RingDumpReply:
    return RingDumpReply({str(k): str(v) for k, v in msg["info"].items()},
                         base64.b64decode(msg["data"]))


# --- what the supervisor opens for a worker (images, taps) ------------------------------

# The open flags a worker may ask for an image with; the supervisor always opens with
# O_CLOEXEC, O_NOCTTY and O_NONBLOCK (and clears O_NONBLOCK again unless asked for).
BROKER_FLAGS = os.O_ACCMODE | os.O_DIRECT | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
BROKER_MSG = 8192
# The most fds one broker reply carries (a nic's queues).
BROKER_MAX_FDS = 64


class Broker:
    """Requests to the supervisor over a SEQPACKET socket, answered with fds (SCM_RIGHTS):
    `open_image` (the supervisor checks `[block] allowed_dirs` and opens) and `open_tap`
    (it creates and configures the tap). Blocking: used while a device is added, one
    request at a time per connection; the supervisor is trusted to answer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def _request(self, msg: dict[str, Any]) -> list[int]:
        self.sock.send(json.dumps(msg).encode())
        data, anc, flags, _ = self.sock.recvmsg(
            BROKER_MSG, socket.CMSG_SPACE(4 * BROKER_MAX_FDS), socket.MSG_CMSG_CLOEXEC)
        fds = [fd for level, kind, raw in anc
               if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
               for fd in struct.unpack(f"{len(raw) // 4}i", raw[: len(raw) - len(raw) % 4])]
        if flags & socket.MSG_CTRUNC:
            # The kernel installs no fd past RLIMIT_NOFILE: the worker is at its limit.
            for fd in fds:
                os.close(fd)
            raise ControlError(errno.EMFILE, f"{msg['op']}: the worker's open-file limit "
                               "is reached ([daemon] worker_max_open_files)")
        if not data:
            raise ControlError(errno.EPIPE, f"{msg['op']}: supervisor gone")
        reply = json.loads(data)
        if "errno" in reply:
            for fd in fds:
                os.close(fd)
            raise ControlError(int(reply["errno"]), str(reply.get("message", "")))
        return fds

    def open_image(self, path: str, flags: int) -> int:
        try:
            fds = self._request({"op": "open_image", "path": path, "flags": flags})
        except ControlError as exc:
            raise OSError(exc.code, exc.message) from None
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise OSError(errno.EPROTO, "supervisor sent no fd")
        return fds[0]

    def open_tap(self, name: str, queues: int, mtu: int | None, bridge: str | None,
                 netns: str | None, adopt: bool = False) -> list[int]:
        fds = self._request({"op": "open_tap", "name": name, "queues": queues, "mtu": mtu,
                             "bridge": bridge, "netns": netns, "adopt": adopt})
        if len(fds) != queues:
            for fd in fds:
                os.close(fd)
            raise ControlError(errno.EPROTO, f"net: tap {name}: supervisor sent "
                               f"{len(fds)} fds for {queues} queues")
        return fds


# --- least privilege ------------------------------------------------------------------

PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(libc: ctypes.CDLL, *args: int) -> None:
    if libc.prctl(*(ctypes.c_ulong(a) for a in args), *([ctypes.c_ulong(0)] * (5 - len(args)))):
        err = ctypes.get_errno()
        raise OSError(err, f"prctl{args}: {os.strerror(err)}")


def drop_privileges(user: str = "", keep: tuple[int, ...] = ()) -> None:
    """No new privileges, then every capability dropped from the bounding, ambient,
    inheritable, permitted and effective sets except `keep`, and with `user`, that user's
    uid and gid; then not dumpable, and no core dumps. Irreversible for this process and
    everything it starts."""
    libc = _libc()
    _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        if cap in keep or libc.prctl(PR_CAPBSET_READ, ctypes.c_ulong(cap), 0, 0, 0) != 1:
            continue
        # Without CAP_SETPCAP (a unit's CapabilityBoundingSet may leave it out) the
        # bounding set stays; with no_new_privs and the empty permitted and effective sets
        # below, nothing this process runs can gain a capability back.
        with contextlib.suppress(PermissionError):
            _prctl(libc, PR_CAPBSET_DROP, cap)
    _prctl(libc, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    if user:
        entry = pwd.getpwnam(user)
        if keep:
            _prctl(libc, PR_SET_KEEPCAPS, 1)
        os.setgroups([])
        os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
        os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for cap in keep:
        data[cap // 32].effective |= 1 << (cap % 32)
        data[cap // 32].permitted |= 1 << (cap % 32)
    if libc.capset(ctypes.byref(header), data):
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    # A worker maps its guest's memory: no core dump may hold it, and no other process of
    # the same user may attach to it or read its /proc files.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _prctl(libc, PR_SET_DUMPABLE, 0)


def set_worker_limits(max_open_files: int, max_memory_mib: int) -> dict[str, int]:
    """Soft and hard limits for a worker, set before it drops its capabilities: open files
    (RLIMIT_NOFILE) and, unless 0, private memory (RLIMIT_DATA). Not RLIMIT_AS: guest RAM is
    mapped into the worker and counts there, so an address-space cap would have to exceed
    the largest guest. Not RLIMIT_NPROC: it counts every process of the user, not of this
    worker. A value above the inherited hard limit is lowered to it (only CAP_SYS_RESOURCE
    could raise it). Returns what was set."""
    applied = {}
    wanted = [(resource.RLIMIT_NOFILE, "max_open_files", max_open_files)]
    if max_memory_mib:
        wanted.append((resource.RLIMIT_DATA, "max_memory_bytes", max_memory_mib << 20))
    for res, name, value in wanted:
        _, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(res, (value, value))
        applied[name] = value
    return applied


# A worker's system-call filter: a deny-list, since Python itself needs a broad and
# version-dependent set of calls. What a worker never does (run programs, debug or read
# other processes, mount, switch namespaces, load kernel code, manage keys, change the
# clock) fails with EPERM. x86_64 numbers; on other machines no filter is installed.
SECCOMP_DENIED_X86_64 = {
    "execve": 59, "execveat": 322, "ptrace": 101, "process_vm_readv": 310,
    "process_vm_writev": 311, "mount": 165, "umount2": 166, "pivot_root": 155,
    "chroot": 161, "setns": 308, "unshare": 272, "bpf": 321, "kexec_load": 246,
    "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
    "delete_module": 176, "keyctl": 250, "add_key": 248, "request_key": 249,
    "perf_event_open": 298, "open_by_handle_at": 304, "name_to_handle_at": 303,
    "userfaultfd": 323, "swapon": 167, "swapoff": 168, "reboot": 169,
    "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159,
    "iopl": 172, "ioperm": 173, "acct": 163, "quotactl": 179, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442, "personality": 135, "vhangup": 153, "syslog": 103,
    "lookup_dcookie": 212, "mbind": 237, "migrate_pages": 256, "move_pages": 279,
}
AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x06


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program(denied: list[int]) -> list[tuple[int, int, int, int]]:
    """Classic BPF over struct seccomp_data: another architecture, an x32 call or a
    denied number gets EPERM; everything else is allowed."""
    # 0-3 arch check and load, 4 x32 check, then one test per number, ALLOW, EPERM.
    deny_at = 5 + len(denied) + 1
    prog = [(_BPF_LD_W_ABS, 0, 0, 4),                      # arch
            (_BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
            (_BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM),
            (_BPF_LD_W_ABS, 0, 0, 0)]                      # nr
    prog.append((_BPF_JGE_K, deny_at - len(prog) - 1, 0, _X32_SYSCALL_BIT))
    for nr in denied:
        prog.append((_BPF_JEQ_K, deny_at - len(prog) - 1, 0, nr))
    prog.append((_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    prog.append((_BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM))
    assert len(prog) == deny_at + 1
    return prog


def install_seccomp() -> bool:
    """Install the worker's filter (needs no_new_privs first); False on a machine the
    list is not for."""
    if os.uname().machine != "x86_64":
        return False
    prog = seccomp_program(sorted(SECCOMP_DENIED_X86_64.values()))
    filters = (_SockFilter * len(prog))(*(_SockFilter(*ins) for ins in prog))
    fprog = _SockFprog(len(prog), filters)
    libc = _libc()
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0):
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp: {os.strerror(err)}")
    return True


# --- the worker -----------------------------------------------------------------------


class SupervisorView:
    """The DaemonView of a worker's session: operator requests answered by the supervisor,
    which gathers every worker's part."""

    def __init__(self) -> None:
        self.channel: Channel | None = None

    async def status(self, conn: int = 0, devid: int = ALL_DEVICES) -> dict[str, str]:
        assert self.channel is not None
        reply = raise_for_error(await self.channel.request(
            {"op": "daemon_status", "conn": conn, "devid": devid}))
        return {str(k): str(v) for k, v in reply["status"].items()}

    async def guest_name_in_use(self, name: str) -> bool:
        assert self.channel is not None
        reply = raise_for_error(await self.channel.request({"op": "guest_name",
                                                            "name": name}))
        return bool(reply["in_use"])

    async def ring_dump(self, conn: int, devid: int, ring: int) -> RingDumpReply:
        assert self.channel is not None
        reply = raise_for_error(await self.channel.request(
            {"op": "ring_dump", "conn": conn, "devid": devid, "ring": ring}))
        return ring_dump_from_json(reply)


async def serve_connection(config: Config, vmm: socket.socket, chan: socket.socket,
                           conn_id: int, creds: tuple[int, int, int],
                           broker: socket.socket | None = None) -> int:
    from .server import Server

    log = EventLog(config.daemon.log_level)
    server = Server(config, log)
    view = SupervisorView()
    server.view = view
    loop = asyncio.get_running_loop()

    async def handle(msg: dict[str, Any]) -> dict[str, Any]:
        conn = server.connections.get(conn_id)
        if msg.get("op") == "status":
            if conn is None:
                return {"summary": None, "devices": {}}
            return {"summary": server._conn_status(conn_id),
                    "devices": {str(d): conn.session.device_status(d)
                                for d in sorted(conn.session.devices)}}
        if msg.get("op") == "ring_dump":
            if conn is None:
                raise ControlError(errno.ENOENT, f"connection {conn_id}: no such connection")
            return ring_dump_to_json(conn.session.ring_dump(int(msg["devid"]),
                                                            int(msg["ring"])))
        raise ControlError(errno.EOPNOTSUPP, f"worker: unknown request {msg.get('op')!r}")

    view.channel = await Channel.open(chan, handle)
    vmm.setblocking(False)
    connection = server.adopt(vmm, conn_id, creds)
    if broker is not None:
        opener = Broker(broker)
        connection.session.device_extras.update(open_image=opener.open_image,
                                                open_tap=opener.open_tap)
    stop = loop.create_future()

    def request_stop(signame: str) -> None:
        log.info("worker_stopping", conn=conn_id, signal=signame)
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)
    # The worker ends with its connection, on a signal, or when the supervisor is gone.
    await asyncio.wait([connection.done, stop, view.channel.closed],
                       return_when=asyncio.FIRST_COMPLETED)
    await server.close()
    await view.channel.close()
    return 0
