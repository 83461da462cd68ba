"""State one vif's queues share: what the frontend negotiated, its multicast list, counters
and the switch that turns the whole vif off when its frontend misbehaves."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rings.consts import NETBK_MCAST_MAX

from .hash import HashConfig

BROADCAST = b"\xff" * 6

# Every counter a vif keeps, reported from 0 (docs/net.md, "Counters", says what each
# one means).
COUNTERS = (
    "tx_packets", "tx_bytes", "tx_gso", "tx_errors", "tx_dropped_csum", "tx_dropped_tap",
    "tx_tap_full", "tx_rate_limited", "tx_fatal",
    "rx_packets", "rx_bytes", "rx_gso", "rx_dropped", "rx_mcast_filtered", "rx_bad_grant",
    "rx_stalls", "rx_fatal", "fatal", "rx_steered", "ctrl_requests", "ctrl_errors",
    "ctrl_halted", "parallel",
)

# A frame one queue read from the tap for another queue (receive-side steering) waits in
# that queue's inbox: at most this many frames and bytes each; beyond, it is dropped.
INBOX_FRAMES = 128
INBOX_BYTES = 512 * 1024


@dataclass
class Steered:
    """A frame read by one queue for another: its virtio-net header, the frame, and
    its (hash type, value) for the extra-info slot."""

    vnet: bytes
    frame: bytes
    hash: tuple[int, int] | None


class Inbox:
    """The frames steered to one queue, oldest first (the reference of the kernel's
    nk_inbox: the same bounds, so the same frames are dropped)."""

    def __init__(self) -> None:
        self.frames: deque[Steered] = deque()
        self.bytes = 0

    def put(self, s: Steered) -> bool:
        if len(self.frames) >= INBOX_FRAMES or self.bytes + len(s.frame) > INBOX_BYTES:
            return False
        self.frames.append(s)
        self.bytes += len(s.frame)
        return True

    def take(self) -> Steered:
        s = self.frames.popleft()
        self.bytes -= len(s.frame)
        return s

    def clear(self) -> None:
        self.frames.clear()
        self.bytes = 0


@dataclass(frozen=True)
class Features:
    """What the frontend said it can take (its keys), as far as we also offer it."""

    sg: bool = False
    gso_tcpv4: bool = False
    gso_tcpv6: bool = False
    csum: bool = True  # not feature-no-csum-offload
    ipv6_csum: bool = False
    multicast_control: bool = False
    rx_notify: bool = True

    @property
    def rx_gso(self) -> bool:
        return self.gso_tcpv4 or self.gso_tcpv6


@dataclass
class VifState:
    devid: int
    features: Features
    mtu: int
    on_fatal: Callable[[str], None]
    # (kind, message): a guest error answered on the ring, for the rate-limited log.
    on_guest_error: Callable[[str, str], None] = lambda kind, message: None
    counters: Counter[str] = field(default_factory=Counter)
    mcast: set[bytes] = field(default_factory=set)
    halted: bool = False
    num_queues: int = 1
    # The receive-side steering the frontend set on its control ring; `hash_generation`
    # moves on each change, so compiled queues know to reload it.
    hash: HashConfig = field(default_factory=HashConfig)
    hash_generation: int = 0
    # Per queue (Python path): frames steered to it, and how to wake its rx path.
    inboxes: list[Inbox] = field(default_factory=list)
    rx_wake: list[Callable[[], None]] = field(default_factory=list)
    # The compiled queues' copy of `hash` and their inboxes (dataplane.net.NativeSteer).
    native_steer: Any = None

    def inbox(self, queue: int) -> Inbox:
        while len(self.inboxes) <= queue:
            self.inboxes.append(Inbox())
        return self.inboxes[queue]

    def wake_rx(self, queue: int) -> None:
        if queue < len(self.rx_wake):
            self.rx_wake[queue]()

    def mcast_add(self, addr: bytes) -> bool:
        """XEN_NETIF_EXTRA_TYPE_MCAST_ADD: False when the list is full (netback's 64)."""
        if addr in self.mcast:
            return True
        if len(self.mcast) >= NETBK_MCAST_MAX:
            return False
        self.mcast.add(addr)
        return True

    def mcast_del(self, addr: bytes) -> None:
        self.mcast.discard(addr)

    def rx_wanted(self, dst: bytes) -> bool:
        """The multicast filter: with multicast control, a multicast frame reaches the
        guest only if its address was added (broadcast always does)."""
        if not self.features.multicast_control or not dst[0] & 1 or dst == BROADCAST:
            return True
        return dst in self.mcast

    def fatal(self, message: str) -> None:
        if self.halted:
            return
        self.halted = True
        self.counters["fatal"] += 1
        self.on_fatal(message)

    def guest_error(self, kind: str, message: str) -> None:
        self.on_guest_error(kind, message)
