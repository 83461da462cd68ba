"""A VMM's side of the control protocol, for the simulated guest, tests, the demo and as a
reference for VMM authors (docs/protocol.md is the specification)."""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Mapping, Sequence

from backendd.errors import ControlError
from backendd.protocol.framing import Framer, Role, encode_request
from backendd.protocol.messages import (
    ALL_DEVICES,
    PROTOCOL_VERSION,
    AddDevice,
    AddMemRegion,
    ClearLog,
    Code,
    DaemonStatus,
    DeviceStateReply,
    DeviceType,
    ErrorReply,
    Flags,
    FrontendState,
    GetBackendState,
    GetDeviceState,
    GetStats,
    Hello,
    HelloReply,
    Message,
    RemoveDevice,
    RemoveMemRegion,
    Resume,
    SetDeviceState,
    SetGrantTable,
    SetInflight,
    SetLog,
    StateReply,
    StatsReply,
    Suspend,
    decode_notice,
    decode_reply,
)
from rings.consts import XenbusState

DEVICE_TYPES = {"blk": DeviceType.BLK, "net": DeviceType.NET}


class RequestFailed(ControlError):
    """The daemon answered a request with an error reply."""


class ConnectionLost(ConnectionError):
    """The daemon closed the connection before answering."""


class VmmClient:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.framer = Framer(Role.VMM)
        self.notices: asyncio.Queue[Message] = asyncio.Queue()
        self._seq = 0
        self._waiting: dict[int, tuple[int, asyncio.Future[Message | ErrorReply]]] = {}
        self._lock = asyncio.Lock()
        self._reader = self.loop.create_task(self._read_loop())
        self.closed = False
        self.version = 0
        self.features = 0
        self._lost_callbacks: list[Callable[[], None]] = []
        self.lost = False

    @classmethod
    async def connect(cls, path: str, features: int = 0, name: str | None = None) -> VmmClient:
        """Connect and send HELLO; `name` (optional) names the guest in the daemon's
        status and metrics."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, path)
        except BaseException:
            sock.close()
            raise
        client = cls(sock)
        try:
            info = {"name": name} if name is not None else {}
            reply = await client.request(Hello(PROTOCOL_VERSION, features, info))
        except BaseException:
            await client.close()
            raise
        assert isinstance(reply, HelloReply)
        client.version, client.features = reply.version, reply.features
        return client

    # --- transport ---------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.loop.sock_recv(self.sock, 65536)
                if not data:
                    break
                for frame in self.framer.feed(data):
                    h = frame.header
                    if h.flags & Flags.NOTICE:
                        self.notices.put_nowait(decode_notice(h.code, frame.payload))
                        continue
                    code, fut = self._waiting.pop(h.seq, (None, None))
                    if fut is None or code != h.code:
                        raise ConnectionLost(f"reply with unexpected seq {h.seq} code {h.code}")
                    if not fut.done():
                        try:
                            fut.set_result(decode_reply(h.code, frame.payload))
                        except Exception as exc:
                            fut.set_exception(exc)
        except (OSError, ConnectionError, ControlError) as exc:
            self._fail_all(exc)
        finally:
            self._fail_all(ConnectionLost("daemon closed the connection"))
            self._connection_lost()

    def add_lost_callback(self, callback: Callable[[], None]) -> None:
        """Call `callback` once when this connection ends, whichever side ends it (at
        once if it has ended already): what depended on the daemon can stop waiting."""
        if self.lost:
            callback()
        else:
            self._lost_callbacks.append(callback)

    def _connection_lost(self) -> None:
        if self.lost:
            return
        self.lost = True
        callbacks, self._lost_callbacks = self._lost_callbacks, []
        for callback in callbacks:
            callback()

    def _fail_all(self, exc: BaseException) -> None:
        for _, fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, ConnectionError)
                                  else ConnectionLost(str(exc)))
        self._waiting.clear()

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes (and fds with their first byte) as they are: for tests of bad input."""
        if fds:
            n = await self._sendmsg(data, fds)
            data = data[n:]
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def _sendmsg(self, data: bytes, fds: Sequence[int]) -> int:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        while True:
            try:
                return self.sock.sendmsg([data], anc)
            except BlockingIOError:
                fut = self.loop.create_future()
                self.loop.add_writer(self.sock.fileno(), fut.set_result, None)
                try:
                    await fut
                finally:
                    self.loop.remove_writer(self.sock.fileno())

    async def request(self, msg: Message, fds: Sequence[int] = ()) -> Message:
        """Send one request and wait for its reply; an error reply raises RequestFailed."""
        if self.closed:
            raise ConnectionLost("client closed")
        async with self._lock:  # one request's bytes and fds are never interleaved
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            seq = self._seq
            fut: asyncio.Future[Message | ErrorReply] = self.loop.create_future()
            self._waiting[seq] = (msg.code, fut)
            await self.send_raw(encode_request(seq, msg), fds)
        reply = await fut
        if isinstance(reply, ErrorReply):
            raise RequestFailed(reply.errno, f"{Code(msg.code).name}: {reply.message}")
        return reply

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        self.sock.close()
        self.framer.close()

    # --- requests ----------------------------------------------------------------

    async def add_mem_region(self, gpa: int, size: int, fd: int, offset: int = 0) -> None:
        await self.request(AddMemRegion(gpa, size, offset), [fd])

    async def remove_mem_region(self, gpa: int, size: int) -> None:
        await self.request(RemoveMemRegion(gpa, size))

    async def set_grant_table(self, fd: int, nr_frames: int, offset: int = 0,
                              version: int = 1, backend_domid: int = 0) -> None:
        await self.request(SetGrantTable(version, nr_frames, offset, backend_domid), [fd])

    async def add_device(self, devid: int, dtype: str,
                         config: Mapping[str, str]) -> tuple[int, dict[str, str]]:
        if dtype not in DEVICE_TYPES:
            raise ValueError(f"device type {dtype!r}: not one of {', '.join(DEVICE_TYPES)}")
        reply = await self.request(AddDevice(devid, DEVICE_TYPES[dtype], dict(config)))
        assert isinstance(reply, StateReply)
        return int(reply.state), reply.keys

    async def remove_device(self, devid: int) -> None:
        await self.request(RemoveDevice(devid))

    async def frontend_state(self, devid: int, state: int, keys: Mapping[str, str],
                             channels: Sequence[tuple[int, int, int]] = ()
                             ) -> tuple[int, dict[str, str]]:
        """`channels`: (port, kick_fd, call_fd) per event channel, in the device's order."""
        ports = tuple(port for port, _, _ in channels)
        fds = [fd for _, kick, call in channels for fd in (kick, call)]
        reply = await self.request(FrontendState(devid, XenbusState(state), dict(keys), ports),
                                   fds)
        assert isinstance(reply, StateReply)
        return int(reply.state), reply.keys

    async def set_inflight(self, devid: int, fd: int, size: int, offset: int = 0) -> None:
        await self.request(SetInflight(devid, offset, size), [fd])

    async def set_log(self, fd: int, size: int, ram_pages: int, offset: int = 0) -> None:
        """Start the dirty log (backendd.guest.dirtylog.DirtyLog makes one)."""
        await self.request(SetLog(offset, size, ram_pages), [fd])

    async def clear_log(self) -> None:
        await self.request(ClearLog())

    async def hand_over_channels(self, devid: int, state: int, keys: Mapping[str, str],
                                 channels: Sequence[tuple[int, int, int]]
                                 ) -> tuple[int, dict[str, str]]:
        """frontend_state() with channels whose fds are only for the daemon: once sent
        (the daemon receives its own copies), ours are closed, whatever the reply."""
        try:
            return await self.frontend_state(devid, state, keys, channels)
        finally:
            for _, kick, call in channels:
                for fd in (kick, call):
                    with contextlib.suppress(OSError):
                        os.close(fd)

    async def backend_state(self, devid: int) -> tuple[int, dict[str, str]]:
        reply = await self.request(GetBackendState(devid))
        assert isinstance(reply, StateReply)
        return int(reply.state), reply.keys

    async def daemon_status(self) -> dict[str, str]:
        """DAEMON_STATUS, every page of it, merged into one map (no `next.*` keys)."""
        out: dict[str, str] = {}
        cursor = (0, ALL_DEVICES)
        while True:
            reply = await self.request(DaemonStatus(*cursor))
            assert isinstance(reply, StatsReply)
            page = dict(reply.counters)
            nxt = page.pop("next.conn", None), page.pop("next.devid", None)
            out.update(page)
            if nxt[0] is None or nxt[1] is None:
                return out
            new = (int(nxt[0]), int(nxt[1]))
            if new == cursor:
                raise ConnectionLost(f"DAEMON_STATUS: page at {cursor} makes no progress")
            cursor = new

    async def stats(self, devid: int = ALL_DEVICES) -> dict[str, str]:
        reply = await self.request(GetStats(devid))
        assert isinstance(reply, StatsReply)
        return reply.counters

    # --- live migration ------------------------------------------------------------

    async def suspend(self, devid: int = ALL_DEVICES) -> None:
        """SUSPEND: when this returns, the device(s) answered what they took and write
        nothing into guest memory until resume()."""
        await self.request(Suspend(devid))

    async def resume(self, devid: int = ALL_DEVICES) -> None:
        await self.request(Resume(devid))

    async def get_device_state(self, devid: int, fd: int) -> int:
        """GET_DEVICE_STATE into memfd `fd` (at offset 0); returns the blob's size."""
        reply = await self.request(GetDeviceState(devid), [fd])
        assert isinstance(reply, DeviceStateReply)
        return reply.size

    async def set_device_state(self, devid: int, fd: int, size: int) -> None:
        """SET_DEVICE_STATE from the first `size` bytes of memfd `fd`."""
        await self.request(SetDeviceState(devid, size), [fd])


__all__ = ["ConnectionLost", "RequestFailed", "VmmClient"]
