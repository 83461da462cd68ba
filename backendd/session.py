"""One VMM connection: its guest's memory, grant table and devices, and the requests that
drive them.

The session is the single point where the two error families become replies: a
ControlError (including ProtocolError and ConfigError) or a GuestError raised while
handling a request becomes an error reply for that request and changes nothing; any other
exception is a local bug, logged with its traceback and answered with EIO. Requests are
handled one at a time, in order, so replies come back in request order.

Teardown (VMM disconnect) runs in dependency order: devices first (they hold grant
mappings and ring views), then the grant table, then guest memory, so no mapping outlives
what it points into.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import inspect
import mmap
import os
import re
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from rings.consts import PAGE_SIZE, XenbusState

from . import devstate
from .config import Config
from .devices.base import DEVICE_TYPES, Device, DeviceContext, NoticeSink
from .dirtylog import DirtyBitmap
from .errors import ControlError, GuestError
from .evtchn import EventChannel
from .fdrules import require_eventfd, require_sealed_memfd
from .grants import GrantTable
from .log import EventLog, GuestLogLimiter
from .memory import GuestMemory
from .protocol.framing import Frame, encode_error, encode_notice, encode_reply
from .protocol.messages import (
    ALL_DEVICES,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    AddDevice,
    AddMemRegion,
    ClearLog,
    Code,
    DaemonStatus,
    DeviceFailed,
    DeviceStateReply,
    DeviceType,
    EmptyReply,
    FrontendMisbehaved,
    FrontendState,
    GetBackendState,
    GetDeviceState,
    GetStats,
    Hello,
    HelloReply,
    KeysChanged,
    Message,
    ProtocolError,
    RemoveDevice,
    RemoveMemRegion,
    Resume,
    RingDump,
    RingDumpReply,
    SetDeviceState,
    SetGrantTable,
    SetInflight,
    SetLog,
    StateReply,
    StatsReply,
    Suspend,
    decode_request,
)
from .xenbus import Action, XenbusBackend

T = TypeVar("T")


class DaemonView(Protocol):
    """What a session may ask of the whole daemon (operator requests, guest names). A
    worker process answers them by asking its supervisor, so the answers may be
    awaitables."""

    def status(self, conn: int = 0, devid: int = ALL_DEVICES
               ) -> dict[str, str] | Awaitable[dict[str, str]]: ...

    def ring_dump(self, conn: int, devid: int, ring: int
                  ) -> RingDumpReply | Awaitable[RingDumpReply]: ...

    def guest_name_in_use(self, name: str) -> bool | Awaitable[bool]: ...


async def _resolved(value: T | Awaitable[T]) -> T:
    return await value if inspect.isawaitable(value) else value  # type: ignore[return-value]


# Features the daemon understands; none are defined by protocol version 1 yet.
SUPPORTED_FEATURES = 0
# HELLO's optional guest name: a metrics label and a status column.
GUEST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")

# Per-connection bounds (docs/hardening.md, "Per-connection bounds"). Each memory region
# holds one fd (the mapping's: CPython's mmap keeps a duplicate, and the daemon closes the
# one it received) and one mapping, so these also bound one peer's fds and mappings.
MAX_MEM_REGIONS = 128
# 32: GET_STATS for every device (a net device has about 20 counters) stays in one reply.
MAX_DEVICES = 32

DEVICE_TYPE_NAMES = {DeviceType.BLK: "blk", DeviceType.NET: "net"}
DEVICE_TYPE_CODES = {name: int(code) for code, name in DEVICE_TYPE_NAMES.items()}


def load_device_types() -> None:
    """Import the device packages so they register themselves in DEVICE_TYPES."""
    import importlib

    for name in ("backendd.devices.blk", "backendd.devices.net"):
        with contextlib.suppress(ModuleNotFoundError):
            importlib.import_module(name)


@dataclass
class DeviceSlot:
    device: Device
    type_name: str
    xenbus: XenbusBackend = field(default_factory=XenbusBackend)
    # Everything published so far under the backend's xenstore directory.
    keys: dict[str, str] = field(default_factory=dict)
    # SET_INFLIGHT's mapping; unmapped after the device is closed.
    inflight: mmap.mmap | None = None

    def release_inflight(self) -> None:
        if self.inflight is not None:
            with contextlib.suppress(BufferError):
                self.inflight.close()
            self.inflight = None


class Session(NoticeSink):
    def __init__(self, conn_id: int, config: Config, loop: asyncio.AbstractEventLoop,
                 send: Callable[[bytes], None], log: EventLog, guest_log: GuestLogLimiter,
                 submit: Callable[..., asyncio.Future], peer: str = "",
                 daemon: DaemonView | None = None) -> None:
        self.conn_id = conn_id
        self.config = config
        self.loop = loop
        self._send = send
        self.log = log
        self.guest_log = guest_log
        # submit(key, fn, *args): the shared I/O pool, served fairly per key (device).
        self.submit = submit
        self.peer = peer
        self.daemon = daemon
        self.hello_done = False
        self.guest_name = ""
        self.memory = GuestMemory()
        self.grants = GrantTable(self.memory)
        self.devices: dict[int, DeviceSlot] = {}
        self.closed = False
        # Added to every device's DeviceContext.extras (a worker's "open_image").
        self.device_extras: dict[str, Any] = {}
        self.requests = 0
        self.errors = 0

    # --- requests ----------------------------------------------------------------

    async def handle(self, frame: Frame) -> None:
        """Answer one request. Every fd that came with it is closed afterwards unless a
        handler took ownership (the eventfds of a connected device)."""
        header = frame.header
        fds = list(frame.fds)
        self.requests += 1
        try:
            msg = decode_request(header.code, frame.payload, len(fds))
            body = await self._dispatch(msg, fds)
            self._send(encode_reply(header.seq, header.code, 0, body))
        except (ControlError, GuestError) as exc:
            self.errors += 1
            code = exc.code if isinstance(exc, ControlError) else errno.EINVAL
            message = exc.message if isinstance(exc, ControlError) else str(exc)
            # A peer can fail requests as fast as it can send them: rate-limited per
            # connection, like a guest's errors.
            self.guest_log.log("info", (self.conn_id, "request_failed"), "request_failed",
                               conn=self.conn_id, code=_code_name(header.code),
                               errno=errno.errorcode.get(code, code), message=message)
            self._send(encode_error(header.seq, header.code, code, message))
        except Exception as exc:  # a local bug: answer, keep the daemon alive
            self.errors += 1
            self.log.error("request_crashed", conn=self.conn_id, code=_code_name(header.code),
                           error=repr(exc), traceback=traceback.format_exc())
            self._send(encode_error(header.seq, header.code, errno.EIO,
                                    f"internal error: {exc!r}"))
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    async def _dispatch(self, msg: Message, fds: list[int]) -> bytes | Message:
        if isinstance(msg, Hello):
            return await self._hello(msg)
        if not self.hello_done:
            raise ProtocolError(errno.EPROTO, f"{msg.code.name} before HELLO")
        match msg:
            case AddMemRegion():
                if len(self.memory.regions) >= MAX_MEM_REGIONS:
                    raise ControlError(errno.ENOSPC, f"ADD_MEM_REGION: limit of "
                                       f"{MAX_MEM_REGIONS} memory regions per connection")
                require_sealed_memfd(fds[0], "ADD_MEM_REGION", msg.mmap_offset, msg.size)
                self.memory.add_region(msg.gpa, msg.size, fds[0], msg.mmap_offset)
                return EmptyReply()
            case RemoveMemRegion():
                self.memory.remove_region(msg.gpa, msg.size)
                return EmptyReply()
            case SetGrantTable():
                pages = GrantTable.fd_pages(msg.nr_frames, msg.version)
                require_sealed_memfd(fds[0], "SET_GRANT_TABLE", msg.mmap_offset,
                                     pages * PAGE_SIZE)
                self.grants.set_table(fds[0], msg.mmap_offset, msg.nr_frames, msg.version)
                self.grants.backend_domid = msg.backend_domid
                return EmptyReply()
            case AddDevice():
                return await self._add_device(msg)
            case RemoveDevice():
                await self._remove_device(msg.devid)
                return EmptyReply()
            case FrontendState():
                return await self._frontend_state(msg, fds)
            case SetInflight():
                self._set_inflight(msg, fds[0])
                return EmptyReply()
            case SetLog():
                self._set_log(msg, fds[0])
                return EmptyReply()
            case ClearLog():
                self.memory.set_log(None)
                return EmptyReply()
            case GetBackendState():
                slot = self._slot(msg.devid)
                return StateReply(slot.xenbus.state, dict(slot.keys))
            case GetStats():
                return StatsReply(self._stats(msg.devid))
            case DaemonStatus():
                if self.daemon is None:
                    raise ControlError(errno.EOPNOTSUPP, "DAEMON_STATUS: no daemon view")
                # "self" names the asking connection, so a tool can leave itself out.
                return StatsReply(await _resolved(self.daemon.status(msg.conn, msg.devid))
                                  | {"self": str(self.conn_id)})
            case RingDump():
                if self.daemon is None:
                    raise ControlError(errno.EOPNOTSUPP, "RING_DUMP: no daemon view")
                return await _resolved(self.daemon.ring_dump(msg.conn, msg.devid, msg.ring))
            case Suspend() | Resume():
                await self._suspend_resume(msg)
                return EmptyReply()
            case GetDeviceState():
                return self._get_device_state(msg.devid, fds[0])
            case SetDeviceState():
                self._set_device_state(msg, fds[0])
                return EmptyReply()
        raise ProtocolError(errno.EOPNOTSUPP, f"{msg.code.name}: not handled")

    async def _hello(self, msg: Hello) -> HelloReply:
        if self.hello_done:
            raise ProtocolError(errno.EPROTO, "HELLO sent twice")
        if msg.version != PROTOCOL_VERSION:
            raise ProtocolError(errno.EOPNOTSUPP,
                                f"HELLO: version {msg.version}, daemon speaks {PROTOCOL_VERSION}")
        name = msg.info.get("name")  # other keys are reserved and ignored
        if name is not None:
            if not GUEST_NAME.fullmatch(name):
                raise ProtocolError(errno.EINVAL, f"HELLO: guest name {name!r}: 1-64 of "
                                    "A-Z a-z 0-9 . _ : -, starting with a letter or digit")
            if self.daemon is not None and await _resolved(
                    self.daemon.guest_name_in_use(name)):
                raise ControlError(errno.EEXIST, f"HELLO: guest name {name!r} is in use "
                                   "by another connection")
            self.guest_name = name
        self.hello_done = True
        return HelloReply(PROTOCOL_VERSION, msg.features & SUPPORTED_FEATURES)

    def _slot(self, devid: int) -> DeviceSlot:
        slot = self.devices.get(devid)
        if slot is None:
            raise ControlError(errno.ENOENT, f"device {devid}: no such device")
        return slot

    async def _add_device(self, msg: AddDevice) -> StateReply:
        if msg.devid in self.devices:
            raise ControlError(errno.EEXIST, f"device {msg.devid}: already added")
        if len(self.devices) >= MAX_DEVICES:
            raise ControlError(errno.ENOSPC, f"ADD_DEVICE: limit of {MAX_DEVICES} devices "
                               "per connection")
        type_name = DEVICE_TYPE_NAMES[msg.type]
        cls = DEVICE_TYPES.get(type_name)
        if cls is None:
            raise ControlError(errno.EOPNOTSUPP, f"device type {type_name}: not available")
        ctx = DeviceContext(memory=self.memory, grants=self.grants, loop=self.loop,
                            notices=self,
                            run_blocking=functools.partial(self.submit,
                                                           (self.conn_id, msg.devid)),
                            extras={"config": self.config, "log": self.log,
                                    "guest_log": self.guest_log, "conn": self.conn_id,
                                    **self.device_extras})
        device = cls(msg.devid, msg.config, ctx)
        slot = DeviceSlot(device, type_name)
        try:
            await device.prepare()
            slot.keys.update(device.backend_keys())
        except BaseException:
            await device.close()
            raise
        self.devices[msg.devid] = slot
        self.log.info("device_added", conn=self.conn_id, devid=msg.devid, type=type_name)
        return StateReply(slot.xenbus.state, dict(slot.keys))

    def _set_inflight(self, msg: SetInflight, fd: int) -> None:
        slot = self._slot(msg.devid)
        if slot.xenbus.state == XenbusState.CONNECTED:
            raise ControlError(errno.EBUSY, f"device {msg.devid}: SET_INFLIGHT after connect")
        require_sealed_memfd(fd, "SET_INFLIGHT", msg.mmap_offset, msg.size)
        try:
            region = mmap.mmap(fd, msg.size, flags=mmap.MAP_SHARED,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=msg.mmap_offset)
        except (OSError, ValueError, OverflowError) as e:
            raise ControlError(errno.EINVAL, f"SET_INFLIGHT: cannot map: {e}") from e
        view = memoryview(region)
        try:
            slot.device.set_inflight(view)
        except BaseException:
            view.release()
            region.close()
            raise
        slot.release_inflight()
        slot.inflight = region

    def _set_log(self, msg: SetLog, fd: int) -> None:
        require_sealed_memfd(fd, "SET_LOG", msg.mmap_offset, msg.size)
        log = DirtyBitmap(fd, msg.mmap_offset, msg.size, msg.ram_pages)
        try:
            if self.grants.pages > log.gnt_pages:
                raise ControlError(errno.EINVAL, f"SET_LOG: {msg.size} bytes leave bits for "
                                   f"{log.gnt_pages} grant-table pages after the "
                                   f"{msg.ram_pages} RAM pages; the table has "
                                   f"{self.grants.pages}")
            self.memory.set_log(log)
        except BaseException:
            log.close()
            raise

    async def _remove_device(self, devid: int) -> None:
        slot = self._slot(devid)
        del self.devices[devid]
        await slot.device.close()
        slot.release_inflight()
        self.guest_log.forget((self.conn_id, devid))
        self.log.info("device_removed", conn=self.conn_id, devid=devid)

    async def _frontend_state(self, msg: FrontendState, fds: list[int]) -> StateReply:
        slot = self._slot(msg.devid)
        for i, fd in enumerate(fds):
            require_eventfd(fd, f"FRONTEND_STATE: port {msg.ports[i // 2]} "
                            f"{'call' if i % 2 else 'kick'} fd")
        transition = slot.xenbus.on_frontend(msg.state)
        if transition.action is Action.CONNECT:
            if not msg.ports:
                raise ProtocolError(errno.EINVAL, f"device {msg.devid}: connecting "
                                    "without event channels")
            if len(set(msg.ports)) != len(msg.ports):
                raise ProtocolError(errno.EINVAL, f"device {msg.devid}: a port is repeated")
            # The channels own their eventfds from here on; take them out of `fds` so
            # handle() does not close them.
            channels = {port: EventChannel(port, fds[2 * i], fds[2 * i + 1])
                        for i, port in enumerate(msg.ports)}
            fds.clear()
            try:
                published = await slot.device.connect(msg.keys, channels)
            except BaseException:
                # The device may have taken some channels; closing twice is harmless.
                for ch in channels.values():
                    ch.close()
                with contextlib.suppress(Exception):
                    await slot.device.disconnect()
                raise
            slot.keys.update(published)
            self.log.info("device_connected", conn=self.conn_id, devid=msg.devid)
        elif transition.action is Action.DISCONNECT:
            await slot.device.disconnect()
            slot.device.drop_state()
            self.log.info("device_disconnected", conn=self.conn_id, devid=msg.devid,
                          frontend_state=XenbusState(msg.state).name)
        slot.xenbus.commit(transition)
        return StateReply(slot.xenbus.state, dict(slot.keys))

    # --- live migration ------------------------------------------------------------

    async def _suspend_resume(self, msg: Suspend | Resume) -> None:
        chosen = (list(self.devices.items()) if msg.devid == ALL_DEVICES
                  else [(msg.devid, self._slot(msg.devid))])
        verb = "suspend" if isinstance(msg, Suspend) else "resume"
        # Every device quiesces at once: the reply waits for the slowest, not the sum.
        # Each one is waited for even if another fails, so that an error reply never
        # goes out while a device is still writing to guest memory.
        results = await asyncio.gather(*(getattr(slot.device, verb)() for _, slot in chosen),
                                       return_exceptions=True)
        for (devid, _), result in zip(chosen, results, strict=True):
            if not isinstance(result, BaseException):
                self.log.info(f"device_{verb}d", conn=self.conn_id, devid=devid)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _get_device_state(self, devid: int, fd: int) -> DeviceStateReply:
        slot = self._slot(devid)
        if not slot.device.suspended:
            raise ControlError(errno.EBUSY, f"device {devid}: GET_DEVICE_STATE of a device "
                               "that is not suspended (SUSPEND it first)")
        require_sealed_memfd(fd, "GET_DEVICE_STATE", 0, 0)
        blob = devstate.encode(DEVICE_TYPE_CODES[slot.type_name],
                               slot.device.save_state(slot.xenbus.state))
        try:
            if os.fstat(fd).st_size < len(blob):
                os.ftruncate(fd, len(blob))
            if os.pwrite(fd, blob, 0) != len(blob):
                raise OSError(errno.EIO, "short write")
        except OSError as e:
            raise ControlError(errno.EINVAL, f"GET_DEVICE_STATE: cannot write the "
                               f"{len(blob)}-byte state into the memfd: {e.strerror}") from e
        return DeviceStateReply(len(blob))

    def _set_device_state(self, msg: SetDeviceState, fd: int) -> None:
        slot = self._slot(msg.devid)
        if slot.xenbus.state != XenbusState.INIT_WAIT:
            raise ControlError(errno.EBUSY, f"device {msg.devid}: SET_DEVICE_STATE in "
                               f"{slot.xenbus.state.name}; only right after ADD_DEVICE "
                               "(InitWait), before the frontend connects")
        if msg.size > devstate.MAX_BLOB:
            raise ControlError(errno.EINVAL, f"SET_DEVICE_STATE: {msg.size} bytes, at most "
                               f"{devstate.MAX_BLOB}")
        require_sealed_memfd(fd, "SET_DEVICE_STATE", 0, msg.size)
        try:
            blob = os.pread(fd, msg.size, 0)
        except OSError as e:
            raise ControlError(errno.EINVAL, f"SET_DEVICE_STATE: {e.strerror}") from e
        sections = devstate.decode(blob, DEVICE_TYPE_CODES[slot.type_name])
        slot.device.load_state(sections)
        self.log.info("device_state_set", conn=self.conn_id, devid=msg.devid,
                      bytes=len(blob))

    def status(self) -> dict[str, str]:
        """This connection's own part of DAEMON_STATUS, keys relative to "conn.<id>."."""
        return {"peer": self.peer, "guest": self.guest_name,
                "devices": str(len(self.devices)),
                "requests": str(self.requests), "errors": str(self.errors),
                "memory_bytes": str(sum(size for _, size in self.memory.regions)),
                "memory_regions": str(len(self.memory.regions)),
                "grant_frames": str(self.grants.nr_frames)}

    def device_status(self, devid: int) -> dict[str, str]:
        """One device's part of DAEMON_STATUS, keys relative to "conn.<id>."."""
        slot = self.devices[devid]
        out = {f"dev.{devid}.type": slot.type_name,
               f"dev.{devid}.state": slot.xenbus.state.name,
               f"dev.{devid}.rings": ",".join(slot.device.ring_names())}
        for name, value in slot.device.stats().items():
            out[f"dev.{devid}.stat.{name}"] = str(value)
        return out

    def ring_dump(self, devid: int, ring: int) -> RingDumpReply:
        slot = self._slot(devid)
        rings = slot.device.ring_snapshots()
        if not 0 <= ring < len(rings):
            raise ControlError(errno.ENOENT, f"device {devid}: no ring {ring} "
                               f"({len(rings)} connected)")
        snap = rings[ring]
        # Whole rings up to order 4 do not fit one reply; the header and the first slots
        # do, and the indices in the header say which slots matter.
        data = snap.data[:MAX_PAYLOAD - 1024]
        info = {"name": snap.name, "layout": snap.layout, "size": str(len(snap.data)),
                "truncated": str(int(len(data) < len(snap.data)))}
        return RingDumpReply(info, data)

    def _stats(self, devid: int) -> dict[str, str]:
        chosen = self.devices if devid == ALL_DEVICES else {devid: self._slot(devid)}
        return {f"{d}.{name}": str(value)
                for d, slot in chosen.items() for name, value in slot.device.stats().items()}

    # --- notices (NoticeSink) ----------------------------------------------------

    def _notice(self, msg: Message) -> None:
        if not self.closed:
            self._send(encode_notice(msg))

    def device_failed(self, devid: int, code: int, message: str) -> None:
        self.log.error("device_failed", conn=self.conn_id, devid=devid,
                       errno=errno.errorcode.get(code, code), message=message)
        self._notice(DeviceFailed(devid, code, message))

    def frontend_misbehaved(self, devid: int, message: str) -> None:
        self.guest_log.warning((self.conn_id, devid, "misbehaved"), "frontend_misbehaved",
                               conn=self.conn_id, devid=devid, message=message)
        self._notice(FrontendMisbehaved(devid, message))

    def keys_changed(self, devid: int, keys: Mapping[str, str]) -> None:
        slot = self.devices.get(devid)
        if slot is None:
            return
        slot.keys.update(keys)
        self.log.info("keys_changed", conn=self.conn_id, devid=devid, keys=",".join(keys))
        self._notice(KeysChanged(devid, slot.xenbus.state, dict(keys)))

    # --- teardown ----------------------------------------------------------------

    async def close(self) -> None:
        """The VMM went away: release devices, then grants, then memory. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for devid in list(self.devices):
            slot = self.devices.pop(devid)
            try:
                await slot.device.close()
            except Exception as exc:
                self.log.error("device_close_failed", conn=self.conn_id, devid=devid,
                               error=repr(exc), traceback=traceback.format_exc())
            slot.release_inflight()
            self.guest_log.forget((self.conn_id, devid))
        self.grants.close()
        self.memory.close()
        self.guest_log.forget((self.conn_id,))


def _code_name(code: int) -> str:
    try:
        return Code(code).name
    except ValueError:
        return f"{code:#x}"
