"""Parsing one guest tx packet off the ring: its first slot, the extra-info slots after
it, and the chain of data slots, with netback's checks and its split between a packet
that is merely dropped and a frontend that is shut down. Pure: slot copies in, a verdict
out.

The verdicts, in netback's order (xenvif_tx_build_gops, xenvif_get_extras,
xenvif_count_requests):
- fatal (TxFatal; netback calls xenvif_fatal_tx_err and turns the vif off): extra info
  missing or of type 0/unknown; a data chain longer than the requests published, or of 20
  following slots or more; any slot crossing its page; the first slot crossing its page;
  GSO size 0 or a GSO type other than TCPv4/TCPv6.
- ERROR for every slot of the packet (xenvif_tx_err): 18 following slots or more; a slot
  larger than what remains of the packet size the first slot announced; a first slot
  holding fewer than ETH_HLEN bytes.
- multicast add/delete: consumed with the extras and answered OKAY (ERROR when the list
  is full), never transmitted; data slots after it are not part of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from backendd.errors import GuestError
from rings.consts import (
    ETH_HLEN,
    NETIF_EXTRA_FLAG_MORE,
    NETIF_EXTRA_TYPE_MAX,
    PAGE_SIZE,
    XEN_NETIF_NR_SLOTS_MIN,
    NetExtraType,
    NetGsoType,
    NetTxFlags,
)
from rings.netif import EXTRA_GSO, TX_REQUEST

LEGACY_SLOTS_MAX = XEN_NETIF_NR_SLOTS_MIN  # following slots at which a packet is dropped
FATAL_SKB_SLOTS = 20  # following slots at which the frontend is deemed malicious


class TxFatal(GuestError):
    """The frontend broke the tx protocol: stop serving this vif."""


class TxKind(Enum):
    SEND = "send"
    ERROR = "error"  # answer every slot NETIF_RSP_ERROR, transmit nothing
    MCAST_ADD = "mcast_add"
    MCAST_DEL = "mcast_del"


@dataclass(frozen=True)
class TxSlot:
    gref: int
    offset: int
    flags: int
    id: int
    size: int


@dataclass
class TxPacket:
    kind: TxKind
    first: TxSlot  # size: the whole packet as the guest announced it
    first_len: int = 0  # bytes in the first slot itself
    frags: list[TxSlot] = field(default_factory=list)
    extra_count: int = 0
    gso: tuple[int, int] | None = None  # (size, NetGsoType)
    mcast: bytes = b""
    reason: str = ""

    @property
    def nslots(self) -> int:
        """Ring slots the packet occupies (all answered before the ring moves on)."""
        return 1 + self.extra_count + len(self.frags)

    @property
    def ids(self) -> list[int]:
        """Request ids in response order: first, then one per extra, then the frags."""
        return [self.first.id] + [0] * self.extra_count + [f.id for f in self.frags]


def decode_slot(raw: bytes) -> TxSlot:
    return TxSlot(*TX_REQUEST.unpack(raw))


def parse_packet(read: Callable[[int], bytes], avail: int) -> TxPacket:
    """Parse the packet starting at the first unconsumed request. `read(i)` returns a
    private copy of the i-th unconsumed slot; `avail` is how many are published. Raises
    TxFatal when the frontend must be shut down."""
    if avail < 1:
        raise ValueError("no request to parse")
    first = decode_slot(read(0))
    pos = 1
    extras: dict[int, bytes] = {}
    extra_count = 0
    if first.flags & NetTxFlags.EXTRA_INFO:
        while True:
            if pos >= avail:
                raise TxFatal("tx: missing extra info (the chain runs past the "
                              "published requests)")
            raw = read(pos)
            pos += 1
            etype, eflags = raw[0], raw[1]
            if etype == NetExtraType.NONE or etype >= NETIF_EXTRA_TYPE_MAX:
                raise TxFatal(f"tx: invalid extra type {etype}")
            extras[etype] = raw
            extra_count += 1
            if not eflags & NETIF_EXTRA_FLAG_MORE:
                break

    if NetExtraType.MCAST_ADD in extras:
        return TxPacket(TxKind.MCAST_ADD, first, extra_count=extra_count,
                        mcast=extras[NetExtraType.MCAST_ADD][2:8])
    if NetExtraType.MCAST_DEL in extras:
        return TxPacket(TxKind.MCAST_DEL, first, extra_count=extra_count,
                        mcast=extras[NetExtraType.MCAST_DEL][2:8])

    frags, remaining, drop = _count_slots(first, read, pos, avail)
    packet = TxPacket(TxKind.SEND, first, first_len=remaining, frags=frags,
                      extra_count=extra_count)
    if drop:
        packet.kind, packet.reason = TxKind.ERROR, drop
        return packet
    if remaining < ETH_HLEN:
        packet.kind = TxKind.ERROR
        packet.reason = f"tx: bad packet size: {remaining} bytes in the first slot"
        return packet
    if first.offset + remaining > PAGE_SIZE:
        raise TxFatal(f"tx: first slot crosses its page: offset {first.offset} "
                      f"size {remaining}")
    raw_gso = extras.get(NetExtraType.GSO)
    if raw_gso is not None:
        _, _, size, gtype, _, _ = EXTRA_GSO.unpack_from(raw_gso)
        if not size:
            raise TxFatal("tx: GSO size must not be zero")
        if gtype not in (NetGsoType.TCPV4, NetGsoType.TCPV6):
            raise TxFatal(f"tx: bad GSO type {gtype}")
        packet.gso = (size, gtype)
    return packet


def _count_slots(first: TxSlot, read: Callable[[int], bytes], pos: int,
                 avail: int) -> tuple[list[TxSlot], int, str]:
    """The data slots following `first` (xenvif_count_requests). Returns the slots, the
    bytes left for the first slot, and a drop reason ('' to send)."""
    frags: list[TxSlot] = []
    remaining = first.size
    drop = ""
    more = bool(first.flags & NetTxFlags.MORE_DATA)
    slots = 0
    while more:
        if slots >= avail - pos:
            raise TxFatal(f"tx: asked for {slots + 1} slots but only {avail - pos} "
                          "requests are published")
        if slots >= FATAL_SKB_SLOTS:
            raise TxFatal(f"tx: malicious frontend using {slots + 1} slots, "
                          f"threshold {FATAL_SKB_SLOTS}")
        if slots >= LEGACY_SLOTS_MAX and not drop:
            drop = f"tx: too many slots ({slots + 1}) exceeding limit ({LEGACY_SLOTS_MAX})"
        txp = decode_slot(read(pos + slots))
        if not drop and txp.size > remaining:
            drop = (f"tx: invalid tx request, slot size {txp.size} > remaining size "
                    f"{remaining}")
        remaining = (remaining - txp.size) & 0xFFFF
        slots += 1
        if txp.offset + txp.size > PAGE_SIZE:
            raise TxFatal(f"tx: slot crosses its page: offset {txp.offset} size {txp.size}")
        frags.append(txp)
        more = bool(txp.flags & NetTxFlags.MORE_DATA)
    return frags, remaining, drop
