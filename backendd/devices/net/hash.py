"""Receive-side steering as netif's control ring sets it up: the Toeplitz hash, the flow
fields it covers, the mapping table from hash to queue, and the answers to the control
requests that configure them (netback's rules, status for status). Pure: bytes in,
numbers out; the grant copies the requests name are done by the caller's `read`.

One `HashConfig` per vif holds everything a frontend configured. It is small and has a
fixed binary layout (`to_bytes`/`from_bytes`, docs/net.md "Receive-side steering"), so
device state can carry it.

What a frame's hash covers (io/netif.h "Hash types", with netback's choice of the
maximal type): an Ethernet frame (no VLAN tag) carrying IPv4 or IPv6; TCP ports only
when the packet is not a fragment, its TCP ports are in the frame and the TCP type is
enabled; otherwise the addresses alone if that type is enabled; otherwise no hash.
A frame with no hash goes to the queue of hash value 0, as in netback (the queue the
mapping's first entry names), without a hash extra-info slot.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from rings.consts import NetCtrlStatus, NetCtrlType

ALG_NONE = 0
ALG_TOEPLITZ = 1

# XEN_NETIF_CTRL_HASH_TYPE_* bit numbers (the extra-info slot carries the number).
TYPE_IPV4, TYPE_IPV4_TCP, TYPE_IPV6, TYPE_IPV6_TCP = 0, 1, 2, 3
FLAG_IPV4, FLAG_IPV4_TCP, FLAG_IPV6, FLAG_IPV6_TCP = 1, 2, 4, 8
ALL_FLAGS = FLAG_IPV4 | FLAG_IPV4_TCP | FLAG_IPV6 | FLAG_IPV6_TCP

MAX_KEY = 40  # netback's XEN_NETBK_MAX_HASH_KEY_SIZE
MAX_MAPPING = 128  # netback's XEN_NETBK_MAX_HASH_MAPPING_SIZE
PAGE_SIZE = 4096
HEAD_BYTES = 256  # how much of a frame's start the flow is parsed from

# to_bytes: version u8, algorithm u8, flags u8, reserved u8, mapping size u32 (LE),
# key[40], then `size` u32 (LE) mapping entries.
_HEAD = struct.Struct("<BBBBI")
LAYOUT_VERSION = 1

_ETH_P_IP, _ETH_P_IPV6 = 0x0800, 0x86DD
_IPV6_EXT = (0, 43, 60)  # hop-by-hop, routing, destination options
_IPV6_FRAGMENT = 44


def toeplitz(key: bytes, data: bytes) -> int:
    """The Toeplitz hash of io/netif.h: for each bit of `data`, left-most first, XOR in
    the 32 key bits starting at that bit's position when the data bit is 1. Key bits
    beyond the key are 0."""
    k = int.from_bytes(key.ljust(len(data) + 4, b"\0")[:len(data) + 4], "big")
    width = (len(data) + 4) * 8
    h = 0
    for i, byte in enumerate(data):
        for b in range(8):
            if byte & (0x80 >> b):
                h ^= (k >> (width - 32 - (i * 8 + b))) & 0xFFFFFFFF
    return h


def flow_input(head: bytes, flags: int) -> tuple[int, bytes] | None:
    """(hash type number, the bytes to hash) for a frame starting with `head`, or None
    when the frame has no hash under `flags`."""
    if len(head) < 14:
        return None
    ethertype = int.from_bytes(head[12:14], "big")
    ip = 14
    if ethertype == _ETH_P_IP:
        if not flags & (FLAG_IPV4 | FLAG_IPV4_TCP) or len(head) < ip + 20:
            return None
        ihl = (head[ip] & 0xF) * 4
        if head[ip] >> 4 != 4 or ihl < 20:
            return None
        addrs = head[ip + 12:ip + 20]
        fragment = int.from_bytes(head[ip + 6:ip + 8], "big") & 0x3FFF
        l4 = ip + ihl
        if (flags & FLAG_IPV4_TCP and head[ip + 9] == 6 and not fragment
                and len(head) >= l4 + 4):
            return TYPE_IPV4_TCP, addrs + head[l4:l4 + 4]
        if flags & FLAG_IPV4:
            return TYPE_IPV4, addrs
        return None
    if ethertype == _ETH_P_IPV6:
        if not flags & (FLAG_IPV6 | FLAG_IPV6_TCP) or len(head) < ip + 40:
            return None
        if head[ip] >> 4 != 6:
            return None
        addrs = head[ip + 8:ip + 40]
        proto, l4 = head[ip + 6], ip + 40
        while proto in _IPV6_EXT and len(head) >= l4 + 8:
            proto, l4 = head[l4], l4 + (head[l4 + 1] + 1) * 8
        if flags & FLAG_IPV6_TCP and proto == 6 and len(head) >= l4 + 4:
            return TYPE_IPV6_TCP, addrs + head[l4:l4 + 4]
        if flags & FLAG_IPV6:
            return TYPE_IPV6, addrs
        return None
    return None


@dataclass
class HashConfig:
    """What a frontend set through its control ring (netback's defaults: no algorithm,
    no flags, an all-zero key, no mapping table: hash modulo the number of queues)."""

    alg: int = ALG_NONE
    flags: int = 0
    key: bytes = bytes(MAX_KEY)
    mapping: list[int] = field(default_factory=list)
    _table: list[list[int]] | None = field(default=None, repr=False, compare=False)

    @property
    def steering(self) -> bool:
        """Whether rx frames are steered (and hashed): a Toeplitz algorithm is set."""
        return self.alg == ALG_TOEPLITZ

    @property
    def hashing(self) -> bool:
        """Whether some frames get a hash extra-info slot."""
        return self.alg == ALG_TOEPLITZ and self.flags != 0

    # --- the hash of a frame ----------------------------------------------------------

    def hash(self, data: bytes) -> int:
        """toeplitz(self.key, data), through per-byte tables built once per key."""
        table = self._table
        if table is None:
            table = self._table = _byte_tables(self.key)
        h = 0
        for i, byte in enumerate(data):
            h ^= table[i][byte]
        return h

    def steer(self, head: bytes, num_queues: int) -> tuple[int, tuple[int, int] | None]:
        """The queue a frame starting with `head` goes to, and its (hash type, value)
        for the extra-info slot, None when it has none. Only with `steering` set."""
        found = flow_input(head[:HEAD_BYTES], self.flags)
        value = 0 if found is None else self.hash(found[1])
        queue = self.mapping[value % len(self.mapping)] if self.mapping else value % num_queues
        if queue >= num_queues:  # not reached: entries are checked when set
            queue = 0
        return queue, (None if found is None else (found[0], value))

    # --- control requests (netback's xenvif hash functions) -------------------------

    def handle(self, req_type: int, data: tuple[int, int, int], num_queues: int,
               read: Callable[[int, int], bytes | None]) -> tuple[int, int]:
        """Apply one control request; (status, data) for its response. `read(gref, n)`
        copies the first n bytes of a grant the backend may read, None when the grant
        rules refuse it."""
        if req_type == NetCtrlType.SET_HASH_ALGORITHM:
            if data[0] not in (ALG_NONE, ALG_TOEPLITZ):
                return NetCtrlStatus.INVALID_PARAMETER, 0
            self.alg = data[0]
            return NetCtrlStatus.SUCCESS, 0
        if req_type == NetCtrlType.GET_HASH_FLAGS:
            if self.alg == ALG_NONE:
                return NetCtrlStatus.NOT_SUPPORTED, 0
            return NetCtrlStatus.SUCCESS, ALL_FLAGS
        if req_type == NetCtrlType.SET_HASH_FLAGS:
            if data[0] & ~ALL_FLAGS or self.alg == ALG_NONE:
                return NetCtrlStatus.INVALID_PARAMETER, 0
            self.flags = data[0]
            return NetCtrlStatus.SUCCESS, 0
        if req_type == NetCtrlType.SET_HASH_KEY:
            gref, size = data[0], data[1]
            if size > MAX_KEY:
                return NetCtrlStatus.INVALID_PARAMETER, 0
            key = b""
            if size:
                got = read(gref, size)
                if got is None:
                    return NetCtrlStatus.INVALID_PARAMETER, 0
                key = got
            self.key = key.ljust(MAX_KEY, b"\0")
            self._table = None
            return NetCtrlStatus.SUCCESS, 0
        if req_type == NetCtrlType.GET_HASH_MAPPING_SIZE:
            return NetCtrlStatus.SUCCESS, MAX_MAPPING
        if req_type == NetCtrlType.SET_HASH_MAPPING_SIZE:
            if data[0] > MAX_MAPPING:
                return NetCtrlStatus.INVALID_PARAMETER, 0
            self.mapping = [0] * data[0]
            return NetCtrlStatus.SUCCESS, 0
        if req_type == NetCtrlType.SET_HASH_MAPPING:
            gref, n, off = data
            if off + n > len(self.mapping) or n > PAGE_SIZE // 4:
                return NetCtrlStatus.INVALID_PARAMETER, 0
            entries: tuple[int, ...] = ()
            if n:
                got = read(gref, 4 * n)
                if got is None:
                    return NetCtrlStatus.INVALID_PARAMETER, 0
                entries = struct.unpack(f"<{n}I", got)
            # The table changes only when every new entry names a connected queue.
            if any(e >= num_queues for e in entries):
                return NetCtrlStatus.INVALID_PARAMETER, 0
            self.mapping[off:off + n] = entries
            return NetCtrlStatus.SUCCESS, 0
        return NetCtrlStatus.NOT_SUPPORTED, 0

    # --- device state ---------------------------------------------------------------

    def to_bytes(self) -> bytes:
        return (_HEAD.pack(LAYOUT_VERSION, self.alg, self.flags, 0, len(self.mapping))
                + self.key + struct.pack(f"<{len(self.mapping)}I", *self.mapping))

    @classmethod
    def from_bytes(cls, blob: bytes, num_queues: int | None = None) -> HashConfig:
        """The configuration `to_bytes` wrote; ValueError for anything else (and, given
        `num_queues`, for a mapping entry naming a queue beyond it)."""
        if len(blob) < _HEAD.size + MAX_KEY:
            raise ValueError("hash configuration: truncated")
        version, alg, flags, reserved, size = _HEAD.unpack_from(blob)
        if version != LAYOUT_VERSION:
            raise ValueError(f"hash configuration: version {version}, expected "
                             f"{LAYOUT_VERSION}")
        if alg not in (ALG_NONE, ALG_TOEPLITZ) or flags & ~ALL_FLAGS or reserved:
            raise ValueError("hash configuration: bad algorithm, flags or reserved byte")
        if size > MAX_MAPPING or len(blob) != _HEAD.size + MAX_KEY + 4 * size:
            raise ValueError("hash configuration: bad mapping size or length")
        start = _HEAD.size + MAX_KEY
        mapping = list(struct.unpack_from(f"<{size}I", blob, start))
        if num_queues is not None and any(e >= num_queues for e in mapping):
            raise ValueError(f"hash configuration: a mapping entry names a queue beyond "
                             f"{num_queues}")
        return cls(alg, flags, bytes(blob[_HEAD.size:start]), mapping)


def _byte_tables(key: bytes) -> list[list[int]]:
    """For each input byte position (up to 36) and byte value, its XOR contribution."""
    k = int.from_bytes(key.ljust(MAX_KEY, b"\0")[:MAX_KEY], "big")
    width = MAX_KEY * 8
    tables = []
    for i in range(MAX_KEY - 4):
        bits = [(k >> (width - 32 - (i * 8 + b))) & 0xFFFFFFFF for b in range(8)]
        row = [0] * 256
        for value in range(1, 256):
            h = 0
            for b in range(8):
                if value & (0x80 >> b):
                    h ^= bits[b]
            row[value] = h
        tables.append(row)
    return tables
