"""Control messages between the VMM and the daemon: header, key/value maps, payloads.

Pure codecs: bytes in, dataclasses out, and back. docs/protocol.md is the specification;
this module follows it field for field. Every decoder checks the payload size before it
reads a field (a peer controls every length), then checks the values, and raises
`ProtocolError` with the errno the error reply will carry:

- EBADMSG: the bytes do not have the layout of the message (short, long, truncated map).
- EINVAL: the layout is right but a value is not allowed (unknown device type, NUL in a
  key, a key too long, a grant table version other than 1 or 2).
- EPROTO: the message is not allowed here (a notice code sent as a request).
- EOPNOTSUPP: an unknown code.
- EBADF: the request came with the wrong number of file descriptors.
"""

from __future__ import annotations

import errno as _errno
import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import ClassVar, Self

from backendd.errors import ControlError
from rings.consts import XenbusState

PROTOCOL_VERSION = 1
MAX_PAYLOAD = 65536
KV_MAX_KEY = 256
KV_MAX_VALUE = 4096
# 2 fds per channel must stay under the kernel's SCM_MAX_FD (253); 32 channels is
# already more than a 8-queue netif with split event channels needs (16).
MAX_CHANNELS = 32
ALL_DEVICES = 0xFFFFFFFF


class ProtocolError(ControlError):
    """A control message that cannot be decoded or is not allowed; answered, not fatal."""


class Code(IntEnum):
    HELLO = 1
    ADD_MEM_REGION = 2
    REMOVE_MEM_REGION = 3
    SET_GRANT_TABLE = 4
    ADD_DEVICE = 5
    REMOVE_DEVICE = 6
    FRONTEND_STATE = 7
    GET_BACKEND_STATE = 8
    GET_STATS = 9
    # Operator requests (backendd status / ring-dump): daemon-wide, read-only.
    DAEMON_STATUS = 10
    RING_DUMP = 11
    SET_INFLIGHT = 12
    SET_LOG = 13
    CLEAR_LOG = 14
    # Live migration: quiescing a device and moving its state (docs/protocol.md).
    SUSPEND = 15
    RESUME = 16
    GET_DEVICE_STATE = 17
    SET_DEVICE_STATE = 18
    # Notices have their own range so a stray one is never mistaken for a request.
    DEVICE_FAILED = 0x100
    FRONTEND_MISBEHAVED = 0x101
    KEYS_CHANGED = 0x102


REQUEST_CODES = frozenset(c for c in Code if c < 0x100)
NOTICE_CODES = frozenset(c for c in Code if c >= 0x100)


class Flags(IntFlag):
    VERSION_MASK = 0x3
    REPLY = 0x4
    NOTICE = 0x8


# A plain int: ~ on an IntFlag stays within the declared bits and would hide unknown ones.
KNOWN_FLAGS = int(Flags.VERSION_MASK | Flags.REPLY | Flags.NOTICE)


class DeviceType(IntEnum):
    BLK = 1
    NET = 2


HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size  # 16
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_KV_PAIR = struct.Struct("<HH")


@dataclass(frozen=True)
class Header:
    code: int
    flags: int
    size: int
    seq: int

    def pack(self) -> bytes:
        return HEADER.pack(self.code, self.flags, self.size, self.seq)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Header:
        if len(data) != HEADER_SIZE:
            raise ProtocolError(_errno.EBADMSG, f"header is {len(data)} bytes, not 16")
        return cls(*HEADER.unpack(data))

    @property
    def version(self) -> int:
        return self.flags & Flags.VERSION_MASK

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & Flags.REPLY)

    @property
    def is_notice(self) -> bool:
        return bool(self.flags & Flags.NOTICE)


# --- key/value maps -----------------------------------------------------------------


def _check_text(kind: str, raw: bytes, limit: int, allow_empty: bool) -> str:
    if len(raw) > limit:
        raise ProtocolError(_errno.EINVAL, f"{kind} is {len(raw)} bytes, limit {limit}")
    if not raw and not allow_empty:
        raise ProtocolError(_errno.EINVAL, f"empty {kind}")
    if b"\0" in raw:
        raise ProtocolError(_errno.EINVAL, f"{kind} contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(_errno.EINVAL, f"{kind} is not valid UTF-8") from None


def encode_kv(kv: dict[str, str]) -> bytes:
    parts = [_U32.pack(len(kv))]
    for key, value in kv.items():
        k = key.encode("utf-8")
        v = value.encode("utf-8")
        # Same rules as decoding, so the daemon never sends what it would refuse.
        _check_text("key", k, KV_MAX_KEY, allow_empty=False)
        _check_text(f"value of {key!r}", v, KV_MAX_VALUE, allow_empty=True)
        parts += [_KV_PAIR.pack(len(k), len(v)), k, v]
    return b"".join(parts)


def decode_kv(data: bytes | memoryview, offset: int = 0) -> tuple[dict[str, str], int]:
    """Decode a map at `offset`; returns it and the offset just past it."""
    buf = bytes(data)
    if len(buf) - offset < 4:
        raise ProtocolError(_errno.EBADMSG, "key/value map: count truncated")
    (count,) = _U32.unpack_from(buf, offset)
    offset += 4
    # Each pair takes at least 4 bytes: refuse a huge count before looping over it.
    if count * _KV_PAIR.size > len(buf) - offset:
        raise ProtocolError(_errno.EBADMSG, f"key/value map: {count} pairs do not fit")
    kv: dict[str, str] = {}
    for _ in range(count):
        if len(buf) - offset < _KV_PAIR.size:
            raise ProtocolError(_errno.EBADMSG, "key/value map: pair header truncated")
        klen, vlen = _KV_PAIR.unpack_from(buf, offset)
        offset += _KV_PAIR.size
        if klen + vlen > len(buf) - offset:
            raise ProtocolError(_errno.EBADMSG, "key/value map: pair truncated")
        key = _check_text("key", buf[offset : offset + klen], KV_MAX_KEY, False)
        offset += klen
        value = _check_text(f"value of {key!r}", buf[offset : offset + vlen], KV_MAX_VALUE, True)
        offset += vlen
        if key in kv:
            raise ProtocolError(_errno.EINVAL, f"key/value map: duplicate key {key!r}")
        kv[key] = value
    return kv, offset


# --- payload helpers ----------------------------------------------------------------


def _fixed(name: str, st: struct.Struct, payload: bytes | memoryview) -> tuple[int, ...]:
    if len(payload) != st.size:
        raise ProtocolError(
            _errno.EBADMSG, f"{name}: payload is {len(payload)} bytes, expected {st.size}"
        )
    return st.unpack(payload)


def _prefix(name: str, st: struct.Struct, payload: bytes | memoryview) -> tuple[int, ...]:
    if len(payload) < st.size:
        raise ProtocolError(
            _errno.EBADMSG, f"{name}: payload is {len(payload)} bytes, at least {st.size} needed"
        )
    return st.unpack_from(payload)


def _end(name: str, payload: bytes | memoryview, offset: int) -> None:
    if offset != len(payload):
        raise ProtocolError(_errno.EBADMSG, f"{name}: {len(payload) - offset} trailing bytes")


def _xenbus_state(name: str, value: int) -> XenbusState:
    try:
        return XenbusState(value)
    except ValueError:
        raise ProtocolError(_errno.EINVAL, f"{name}: unknown xenbus state {value}") from None


def _check_range(name: str, gpa: int, size: int) -> None:
    if size == 0:
        raise ProtocolError(_errno.EINVAL, f"{name}: size is 0")
    if gpa + size > 1 << 64:
        raise ProtocolError(_errno.EINVAL, f"{name}: gpa {gpa:#x} + size {size:#x} wraps")


class Message:
    """A payload with a fixed code. `fd_count()` is how many fds must come with it."""

    code: ClassVar[Code]
    fds: ClassVar[int] = 0

    def fd_count(self) -> int:
        return self.fds

    def encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        raise NotImplementedError


# --- requests -----------------------------------------------------------------------


@dataclass(frozen=True)
class Hello(Message):
    code: ClassVar[Code] = Code.HELLO
    _S: ClassVar[struct.Struct] = struct.Struct("<IQ")
    _NAME: ClassVar[str] = "HELLO"
    version: int
    features: int
    # Optional, after the fixed part: a kv map (e.g. {"name": "vm1"}). Left out when empty,
    # so a HELLO without it is the original 12 bytes.
    info: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        body = self._S.pack(self.version, self.features)
        return body + encode_kv(self.info) if self.info else body

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        if len(payload) == cls._S.size:
            return cls(*cls._S.unpack(payload))
        version, features = _prefix(cls._NAME, cls._S, payload)
        info, end = decode_kv(payload, cls._S.size)
        _end(cls._NAME, payload, end)
        return cls(version, features, info)


@dataclass(frozen=True)
class AddMemRegion(Message):
    code: ClassVar[Code] = Code.ADD_MEM_REGION
    fds: ClassVar[int] = 1
    _S: ClassVar[struct.Struct] = struct.Struct("<QQQ")
    gpa: int
    size: int
    mmap_offset: int

    def encode(self) -> bytes:
        return self._S.pack(self.gpa, self.size, self.mmap_offset)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        gpa, size, offset = _fixed("ADD_MEM_REGION", cls._S, payload)
        _check_range("ADD_MEM_REGION", gpa, size)
        return cls(gpa, size, offset)


@dataclass(frozen=True)
class RemoveMemRegion(Message):
    code: ClassVar[Code] = Code.REMOVE_MEM_REGION
    _S: ClassVar[struct.Struct] = struct.Struct("<QQ")
    gpa: int
    size: int

    def encode(self) -> bytes:
        return self._S.pack(self.gpa, self.size)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        gpa, size = _fixed("REMOVE_MEM_REGION", cls._S, payload)
        _check_range("REMOVE_MEM_REGION", gpa, size)
        return cls(gpa, size)


@dataclass(frozen=True)
class SetGrantTable(Message):
    code: ClassVar[Code] = Code.SET_GRANT_TABLE
    fds: ClassVar[int] = 1
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQHH")
    version: int
    nr_frames: int
    mmap_offset: int
    backend_domid: int

    def encode(self) -> bytes:
        return self._S.pack(self.version, self.nr_frames, self.mmap_offset, self.backend_domid, 0)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        version, nr_frames, offset, domid, pad = _fixed("SET_GRANT_TABLE", cls._S, payload)
        if version not in (1, 2):
            raise ProtocolError(_errno.EINVAL, f"SET_GRANT_TABLE: version {version}, not 1 or 2")
        if nr_frames == 0:
            raise ProtocolError(_errno.EINVAL, "SET_GRANT_TABLE: nr_frames is 0")
        # Reserved bytes must be zero so they can be given a meaning later.
        if pad != 0:
            raise ProtocolError(_errno.EINVAL, "SET_GRANT_TABLE: padding is not zero")
        return cls(version, nr_frames, offset, domid)


@dataclass(frozen=True)
class AddDevice(Message):
    code: ClassVar[Code] = Code.ADD_DEVICE
    _S: ClassVar[struct.Struct] = struct.Struct("<II")
    devid: int
    type: DeviceType
    config: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return self._S.pack(self.devid, self.type) + encode_kv(self.config)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        devid, dtype = _prefix("ADD_DEVICE", cls._S, payload)
        try:
            kind = DeviceType(dtype)
        except ValueError:
            raise ProtocolError(_errno.EINVAL, f"ADD_DEVICE: unknown device type {dtype}") from None
        config, end = decode_kv(payload, cls._S.size)
        _end("ADD_DEVICE", payload, end)
        return cls(devid, kind, config)


@dataclass(frozen=True)
class _DevidOnly(Message):
    _S: ClassVar[struct.Struct] = _U32
    devid: int

    def encode(self) -> bytes:
        return self._S.pack(self.devid)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        return cls(*_fixed(cls.code.name, cls._S, payload))


@dataclass(frozen=True)
class RemoveDevice(_DevidOnly):
    code: ClassVar[Code] = Code.REMOVE_DEVICE


@dataclass(frozen=True)
class GetBackendState(_DevidOnly):
    code: ClassVar[Code] = Code.GET_BACKEND_STATE


@dataclass(frozen=True)
class GetStats(_DevidOnly):
    """devid ALL_DEVICES (0xFFFFFFFF) asks for every device's counters."""

    code: ClassVar[Code] = Code.GET_STATS


@dataclass(frozen=True)
class FrontendState(Message):
    code: ClassVar[Code] = Code.FRONTEND_STATE
    _S: ClassVar[struct.Struct] = struct.Struct("<II")
    devid: int
    state: XenbusState
    keys: dict[str, str] = field(default_factory=dict)
    ports: tuple[int, ...] = ()

    def fd_count(self) -> int:
        # A kick and a call eventfd per channel, in port order.
        return 2 * len(self.ports)

    def encode(self) -> bytes:
        return b"".join(
            [
                self._S.pack(self.devid, self.state),
                encode_kv(self.keys),
                _U32.pack(len(self.ports)),
                struct.pack(f"<{len(self.ports)}I", *self.ports),
            ]
        )

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        devid, raw_state = _prefix("FRONTEND_STATE", cls._S, payload)
        state = _xenbus_state("FRONTEND_STATE", raw_state)
        keys, offset = decode_kv(payload, cls._S.size)
        if len(payload) - offset < 4:
            raise ProtocolError(_errno.EBADMSG, "FRONTEND_STATE: nr_channels truncated")
        (nr,) = _U32.unpack_from(payload, offset)
        offset += 4
        if nr > MAX_CHANNELS:
            raise ProtocolError(
                _errno.EINVAL, f"FRONTEND_STATE: {nr} channels, limit {MAX_CHANNELS}"
            )
        if len(payload) - offset != 4 * nr:
            raise ProtocolError(
                _errno.EBADMSG,
                f"FRONTEND_STATE: {len(payload) - offset} bytes for {nr} ports",
            )
        ports = struct.unpack_from(f"<{nr}I", payload, offset)
        return cls(devid, state, keys, tuple(ports))


@dataclass(frozen=True)
class SetInflight(Message):
    """Memory the VMM keeps across daemon restarts, where a device records its in-flight
    requests (backendd/inflight.py); sent after ADD_DEVICE, before the frontend connects."""

    code: ClassVar[Code] = Code.SET_INFLIGHT
    fds: ClassVar[int] = 1
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQQ")
    devid: int
    mmap_offset: int
    size: int

    def encode(self) -> bytes:
        return self._S.pack(self.devid, 0, self.mmap_offset, self.size)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        devid, pad, offset, size = _fixed("SET_INFLIGHT", cls._S, payload)
        if pad:
            raise ProtocolError(_errno.EINVAL, "SET_INFLIGHT: padding is not zero")
        if size == 0 or offset % 4096:
            raise ProtocolError(_errno.EINVAL, "SET_INFLIGHT: empty or unaligned region")
        return cls(devid, offset, size)


@dataclass(frozen=True)
class SetLog(Message):
    """Start logging the guest pages the daemon writes into the bitmap of the fd (the
    dirty log, docs/protocol.md; backendd/dirtylog.py), replacing any earlier log."""

    code: ClassVar[Code] = Code.SET_LOG
    fds: ClassVar[int] = 1
    _S: ClassVar[struct.Struct] = struct.Struct("<QQQ")
    mmap_offset: int
    size: int
    ram_pages: int

    def encode(self) -> bytes:
        return self._S.pack(self.mmap_offset, self.size, self.ram_pages)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        offset, size, ram_pages = _fixed("SET_LOG", cls._S, payload)
        if size == 0 or offset % 4096:
            raise ProtocolError(_errno.EINVAL, "SET_LOG: empty log or unaligned mmap_offset")
        if ram_pages == 0:
            raise ProtocolError(_errno.EINVAL, "SET_LOG: ram_pages is 0")
        return cls(offset, size, ram_pages)


@dataclass(frozen=True)
class ClearLog(Message):
    """Stop logging and unmap the log."""

    code: ClassVar[Code] = Code.CLEAR_LOG

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        _end("CLEAR_LOG", payload, 0)
        return cls()


@dataclass(frozen=True)
class Suspend(_DevidOnly):
    """devid ALL_DEVICES: every device of the connection."""

    code: ClassVar[Code] = Code.SUSPEND


@dataclass(frozen=True)
class Resume(_DevidOnly):
    """devid ALL_DEVICES: every device of the connection."""

    code: ClassVar[Code] = Code.RESUME


@dataclass(frozen=True)
class GetDeviceState(Message):
    """The state blob of a suspended device, written at offset 0 of the fd (a sealed
    memfd, grown if needed); the reply says how many bytes."""

    code: ClassVar[Code] = Code.GET_DEVICE_STATE
    fds: ClassVar[int] = 1
    _S: ClassVar[struct.Struct] = struct.Struct("<II")
    devid: int

    def encode(self) -> bytes:
        return self._S.pack(self.devid, 0)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        devid, pad = _fixed("GET_DEVICE_STATE", cls._S, payload)
        if pad:
            raise ProtocolError(_errno.EINVAL, "GET_DEVICE_STATE: padding is not zero")
        return cls(devid)


@dataclass(frozen=True)
class SetDeviceState(Message):
    """`size` bytes at offset 0 of the fd: a blob GET_DEVICE_STATE wrote, for a device
    just added and not connected yet."""

    code: ClassVar[Code] = Code.SET_DEVICE_STATE
    fds: ClassVar[int] = 1
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQ")
    devid: int
    size: int

    def encode(self) -> bytes:
        return self._S.pack(self.devid, 0, self.size)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        devid, pad, size = _fixed("SET_DEVICE_STATE", cls._S, payload)
        if pad:
            raise ProtocolError(_errno.EINVAL, "SET_DEVICE_STATE: padding is not zero")
        return cls(devid, size)


@dataclass(frozen=True)
class DaemonStatus(Message):
    """Every connection and device of the daemon, not only the asker's, one page per
    request: the page starts at connection `conn` (the lowest id >= conn), with its own
    entries when `devid` is ALL_DEVICES, else at its device `devid`. The reply carries
    `next.conn`/`next.devid` to ask for next, until a page comes without them. An empty
    payload asks for the first page."""

    code: ClassVar[Code] = Code.DAEMON_STATUS
    _S: ClassVar[struct.Struct] = struct.Struct("<II")
    conn: int = 0
    devid: int = ALL_DEVICES

    def encode(self) -> bytes:
        if (self.conn, self.devid) == (0, ALL_DEVICES):
            return b""
        return self._S.pack(self.conn, self.devid)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        if len(payload) == 0:
            return cls()
        return cls(*_fixed("DAEMON_STATUS", cls._S, payload))


@dataclass(frozen=True)
class RingDump(Message):
    code: ClassVar[Code] = Code.RING_DUMP
    _S: ClassVar[struct.Struct] = struct.Struct("<III")
    conn: int
    devid: int
    ring: int  # index into the device's rings, in the order DAEMON_STATUS lists them

    def encode(self) -> bytes:
        return self._S.pack(self.conn, self.devid, self.ring)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        return cls(*_fixed("RING_DUMP", cls._S, payload))


# --- reply bodies -------------------------------------------------------------------


@dataclass(frozen=True)
class HelloReply(Hello):
    """The daemon's version and the accepted features: HELLO's fixed part, never a map."""

    _NAME: ClassVar[str] = "HELLO reply"

    def encode(self) -> bytes:
        return self._S.pack(self.version, self.features)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        return cls(*_fixed(cls._NAME, cls._S, payload))


@dataclass(frozen=True)
class EmptyReply(Message):
    """The success body of ADD/REMOVE_MEM_REGION, SET_GRANT_TABLE and REMOVE_DEVICE."""

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        _end("reply", payload, 0)
        return cls()


@dataclass(frozen=True)
class StateReply(Message):
    """ADD_DEVICE, FRONTEND_STATE and GET_BACKEND_STATE: backend state + keys to publish."""

    state: XenbusState
    keys: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return _U32.pack(self.state) + encode_kv(self.keys)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        (raw,) = _prefix("state reply", _U32, payload)
        keys, end = decode_kv(payload, 4)
        _end("state reply", payload, end)
        return cls(_xenbus_state("state reply", raw), keys)


@dataclass(frozen=True)
class StatsReply(Message):
    """Counters as "devid.name" = decimal value."""

    counters: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return encode_kv(self.counters)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        counters, end = decode_kv(payload, 0)
        _end("GET_STATS reply", payload, end)
        return cls(counters)


@dataclass(frozen=True)
class RingDumpReply(Message):
    """kv {name, layout, entry_size, size} then the ring's raw bytes (header + slots)."""

    info: dict[str, str]
    data: bytes

    def encode(self) -> bytes:
        return encode_kv(self.info) + self.data

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        info, end = decode_kv(payload, 0)
        return cls(info, bytes(payload[end:]))


@dataclass(frozen=True)
class DeviceStateReply(Message):
    """GET_DEVICE_STATE: the size of the blob written."""

    _S: ClassVar[struct.Struct] = struct.Struct("<Q")
    size: int

    def encode(self) -> bytes:
        return self._S.pack(self.size)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        return cls(*_fixed("GET_DEVICE_STATE reply", cls._S, payload))


@dataclass(frozen=True)
class ErrorReply:
    """A failed request: `errno` is positive here, sent as -errno."""

    errno: int
    message: str


# --- notices ------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceFailed(Message):
    code: ClassVar[Code] = Code.DEVICE_FAILED
    _S: ClassVar[struct.Struct] = struct.Struct("<Ii")
    devid: int
    errno: int  # positive; sent as -errno
    message: str

    def encode(self) -> bytes:
        return self._S.pack(self.devid, -self.errno) + encode_kv({"message": self.message})

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        devid, result = _prefix("DEVICE_FAILED", cls._S, payload)
        if result >= 0:
            raise ProtocolError(_errno.EINVAL, f"DEVICE_FAILED: result {result} is not -errno")
        kv, end = decode_kv(payload, cls._S.size)
        _end("DEVICE_FAILED", payload, end)
        return cls(devid, -result, kv.get("message", ""))


@dataclass(frozen=True)
class FrontendMisbehaved(Message):
    code: ClassVar[Code] = Code.FRONTEND_MISBEHAVED
    devid: int
    message: str

    def encode(self) -> bytes:
        return _U32.pack(self.devid) + encode_kv({"message": self.message})

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        (devid,) = _prefix("FRONTEND_MISBEHAVED", _U32, payload)
        kv, end = decode_kv(payload, 4)
        _end("FRONTEND_MISBEHAVED", payload, end)
        return cls(devid, kv.get("message", ""))


@dataclass(frozen=True)
class KeysChanged(Message):
    code: ClassVar[Code] = Code.KEYS_CHANGED
    _S: ClassVar[struct.Struct] = struct.Struct("<II")
    devid: int
    state: XenbusState
    keys: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return self._S.pack(self.devid, self.state) + encode_kv(self.keys)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        devid, raw = _prefix("KEYS_CHANGED", cls._S, payload)
        state = _xenbus_state("KEYS_CHANGED", raw)
        keys, end = decode_kv(payload, cls._S.size)
        _end("KEYS_CHANGED", payload, end)
        return cls(devid, state, keys)


# --- dispatch by code ---------------------------------------------------------------

REQUESTS: dict[Code, type[Message]] = {
    m.code: m
    for m in (
        Hello,
        AddMemRegion,
        RemoveMemRegion,
        SetGrantTable,
        AddDevice,
        RemoveDevice,
        FrontendState,
        GetBackendState,
        GetStats,
        DaemonStatus,
        RingDump,
        SetInflight,
        SetLog,
        ClearLog,
        Suspend,
        Resume,
        GetDeviceState,
        SetDeviceState,
    )
}
NOTICES: dict[Code, type[Message]] = {
    m.code: m for m in (DeviceFailed, FrontendMisbehaved, KeysChanged)
}
REPLIES: dict[Code, type[Message]] = {
    Code.HELLO: HelloReply,
    Code.ADD_MEM_REGION: EmptyReply,
    Code.REMOVE_MEM_REGION: EmptyReply,
    Code.SET_GRANT_TABLE: EmptyReply,
    Code.ADD_DEVICE: StateReply,
    Code.REMOVE_DEVICE: EmptyReply,
    Code.FRONTEND_STATE: StateReply,
    Code.GET_BACKEND_STATE: StateReply,
    Code.GET_STATS: StatsReply,
    Code.DAEMON_STATUS: StatsReply,
    Code.RING_DUMP: RingDumpReply,
    Code.SET_INFLIGHT: EmptyReply,
    Code.SET_LOG: EmptyReply,
    Code.CLEAR_LOG: EmptyReply,
    Code.SUSPEND: EmptyReply,
    Code.RESUME: EmptyReply,
    Code.GET_DEVICE_STATE: DeviceStateReply,
    Code.SET_DEVICE_STATE: EmptyReply,
}
# Fixed fd counts, checked before decoding. None: depends on the payload
# (FRONTEND_STATE: 2 per channel), checked right after decoding.
FD_COUNTS: dict[Code, int | None] = {
    code: (None if cls is FrontendState else cls.fds) for code, cls in REQUESTS.items()
}


def _request_code(code: int) -> Code:
    if code in NOTICE_CODES:
        raise ProtocolError(_errno.EPROTO, f"code {code:#x} is a notice, not a request")
    if code not in REQUEST_CODES:
        raise ProtocolError(_errno.EOPNOTSUPP, f"unknown request code {code:#x}")
    return Code(code)


def decode_request(code: int, payload: bytes | memoryview, nfds: int) -> Message:
    """Decode one request and check the number of fds that came with it."""
    c = _request_code(code)
    expected = FD_COUNTS[c]
    if expected is not None and nfds != expected:
        raise ProtocolError(_errno.EBADF, f"{c.name}: {nfds} fds, expected {expected}")
    msg = REQUESTS[c].decode(payload)
    if nfds != msg.fd_count():
        raise ProtocolError(_errno.EBADF, f"{c.name}: {nfds} fds, expected {msg.fd_count()}")
    return msg


def decode_notice(code: int, payload: bytes | memoryview) -> Message:
    if code not in NOTICE_CODES:
        raise ProtocolError(_errno.EPROTO, f"code {code:#x} is not a notice")
    return NOTICES[Code(code)].decode(payload)


def encode_reply_payload(result: int, body: bytes = b"", message: str = "") -> bytes:
    """result 0: i32 0 + body. result -errno: i32 result + u32 length + UTF-8 message."""
    if result > 0:
        raise ValueError("result is 0 or -errno")
    if result == 0:
        return _I32.pack(0) + body
    text = message.encode("utf-8")
    # Keep the whole reply within MAX_PAYLOAD: cut the message, never the framing.
    text = text[: MAX_PAYLOAD - 8].decode("utf-8", "ignore").encode("utf-8")
    return _I32.pack(result) + _U32.pack(len(text)) + text


def decode_reply(code: int, payload: bytes | memoryview) -> Message | ErrorReply:
    """Decode the reply to request `code`: its body, or an ErrorReply."""
    c = _request_code(code)
    (result,) = _prefix(f"{c.name} reply", _I32, payload)
    if result == 0:
        return REPLIES[c].decode(memoryview(payload)[4:])
    if result > 0:
        raise ProtocolError(_errno.EBADMSG, f"{c.name} reply: result {result} is positive")
    if len(payload) < 8:
        raise ProtocolError(_errno.EBADMSG, f"{c.name} reply: message length truncated")
    (length,) = _U32.unpack_from(payload, 4)
    if length != len(payload) - 8:
        raise ProtocolError(_errno.EBADMSG, f"{c.name} reply: message length {length} wrong")
    try:
        text = bytes(payload[8:]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(_errno.EINVAL, f"{c.name} reply: message not UTF-8") from None
    return ErrorReply(-result, text)
