"""The device state blob of GET_DEVICE_STATE / SET_DEVICE_STATE: a header, then typed
sections. Pure codec: bytes in, sections out, and back; docs/protocol.md ("The device
state blob") is the specification.

Header (32 bytes, little-endian):
  0  8  magic, the ASCII bytes BKDSTATE
  8  4  u32 version (1)
  12 4  u32 device type (1 blk, 2 net: ADD_DEVICE's type)
  16 8  u64 length: the whole blob, header included
  24 4  u32 checksum: CRC-32 (zlib) of the whole blob with this field as zero
  28 4  u32 number of sections
Sections, one after the other up to `length`: u32 type, u32 body length, body. A type
with bit 31 set may be skipped by a reader that does not know it; an unknown type
without it makes the blob unusable (its meaning would be lost).

Every refusal is a StateError (EINVAL) whose message says what is wrong; a device that
refuses a blob is left as it was.
"""

from __future__ import annotations

import errno
import struct
import zlib
from dataclasses import dataclass

from .errors import ControlError
from .protocol.messages import decode_kv, encode_kv

MAGIC = b"BKDSTATE"
VERSION = 1
HEADER = struct.Struct("<8sIIQII")
HEADER_SIZE = HEADER.size  # 32
SECTION = struct.Struct("<II")
# What SET_DEVICE_STATE reads at most: 8 queues of the largest state (a net queue with a
# full rx ring posted, a blk ring with 1056 persistent grants) fit many times over.
MAX_BLOB = 1 << 20
OPTIONAL = 0x80000000

# Section types (docs/protocol.md lists each layout).
DEVICE = 1          # common: xenbus state, suspended, the frontend keys connected with
BLK_RING = 0x101    # one per blk queue: refs, port, indices
BLK_PGRANTS = 0x102  # one per blk queue using persistent grants
NET_VIF = 0x201     # features, mtu, queues, halted, tap name
NET_QUEUE = 0x202   # one per net queue: refs, ports, tx and rx indices, tx charge
NET_RX_POSTED = 0x203  # one per net queue: posted rx buffers not used yet
NET_MCAST = 0x204   # the multicast list
NET_RATE = 0x205    # one per net queue with a rate: the credit
NET_HASH = 0x206    # the control ring's hash configuration (HashConfig.to_bytes)
NET_CTRL = 0x207    # the control ring's ref, port and indices

TYPE_NAMES = {1: "blk", 2: "net"}


class StateError(ControlError):
    """A state blob that cannot be used: wrong magic, version, type, length, checksum or
    contents."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, f"device state: {message}")


@dataclass(frozen=True)
class Section:
    type: int
    body: bytes


def encode(device_type: int, sections: list[Section]) -> bytes:
    parts = [SECTION.pack(s.type, len(s.body)) + s.body for s in sections]
    length = HEADER_SIZE + sum(len(p) for p in parts)
    head = HEADER.pack(MAGIC, VERSION, device_type, length, 0, len(sections))
    blob = head + b"".join(parts)
    crc = zlib.crc32(blob)
    return blob[:24] + struct.pack("<I", crc) + blob[28:]


def decode(blob: bytes, device_type: int) -> list[Section]:
    """The sections of a blob for a device of `device_type`, checked; unknown optional
    sections are left out."""
    if len(blob) < HEADER_SIZE:
        raise StateError(f"truncated: {len(blob)} bytes, the header alone is {HEADER_SIZE}")
    magic, version, dtype, length, crc, count = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise StateError(f"not a state blob (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise StateError(f"version {version}; this daemon reads version {VERSION}")
    if dtype != device_type:
        raise StateError(f"the blob is for a {TYPE_NAMES.get(dtype, f'type {dtype}')} "
                         f"device, this is a {TYPE_NAMES.get(device_type, '?')} device")
    if length != len(blob):
        what = "truncated" if len(blob) < length else "too long"
        raise StateError(f"{what}: {len(blob)} bytes, the header says {length}")
    if zlib.crc32(blob[:24] + b"\0\0\0\0" + blob[28:]) != crc:
        raise StateError("checksum mismatch: the blob is corrupt")
    out: list[Section] = []
    off = HEADER_SIZE
    for n in range(count):
        if len(blob) - off < SECTION.size:
            raise StateError(f"section {n}: header runs past the blob")
        stype, size = SECTION.unpack_from(blob, off)
        off += SECTION.size
        if size > len(blob) - off:
            raise StateError(f"section {n} (type {stype:#x}): {size} bytes run past the blob")
        out.append(Section(stype, blob[off:off + size]))
        off += size
    if off != len(blob):
        raise StateError(f"{len(blob) - off} bytes after the last section")
    return out


class Reader:
    """Fields of one section body, each read checked against its end."""

    def __init__(self, section: Section, what: str) -> None:
        self.data = section.body
        self.off = 0
        self.what = what

    def take(self, fmt: str) -> tuple[int, ...]:
        st = struct.Struct("<" + fmt)
        if len(self.data) - self.off < st.size:
            raise StateError(f"{self.what}: section truncated")
        values = st.unpack_from(self.data, self.off)
        self.off += st.size
        return values

    def u32(self) -> int:
        return self.take("I")[0]

    def raw(self, n: int) -> bytes:
        if len(self.data) - self.off < n:
            raise StateError(f"{self.what}: section truncated")
        out = self.data[self.off:self.off + n]
        self.off += n
        return out

    def kv(self) -> dict[str, str]:
        try:
            kv, end = decode_kv(self.data, self.off)
        except ControlError as e:
            raise StateError(f"{self.what}: {e.message}") from None
        self.off = end
        return kv

    def end(self) -> None:
        if self.off != len(self.data):
            raise StateError(f"{self.what}: {len(self.data) - self.off} bytes left over")


@dataclass
class DeviceSection:
    """The DEVICE section: what every device type has."""

    xenbus_state: int
    connected: bool
    keys: dict[str, str]

    def encode(self) -> Section:
        return Section(DEVICE, struct.pack("<II", self.xenbus_state, int(self.connected))
                       + encode_kv(self.keys))

    @classmethod
    def decode(cls, section: Section) -> DeviceSection:
        r = Reader(section, "device section")
        state, connected = r.take("II")
        keys = r.kv()
        r.end()
        if connected not in (0, 1):
            raise StateError(f"device section: connected flag {connected}")
        return cls(state, bool(connected), keys)


def split(sections: list[Section], known: set[int]) -> tuple[DeviceSection, list[Section]]:
    """The DEVICE section and the others, checking that each is known (or optional)."""
    device = None
    rest = []
    for s in sections:
        if s.type == DEVICE:
            if device is not None:
                raise StateError("two device sections")
            device = DeviceSection.decode(s)
        elif s.type in known:
            rest.append(s)
        elif not s.type & OPTIONAL:
            raise StateError(f"unknown section type {s.type:#x}")
    if device is None:
        raise StateError("no device section")
    return device, rest
