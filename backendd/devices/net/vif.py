"""State one vif's queues share: what the frontend negotiated, its multicast list, counters
and the switch that turns the whole vif off when its frontend misbehaves."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from rings.consts import NETBK_MCAST_MAX

BROADCAST = b"\xff" * 6

# Every counter a vif keeps, reported from 0 (docs/net.md, "Counters", says what each
# one means).
COUNTERS = (
    "tx_packets", "tx_bytes", "tx_gso", "tx_errors", "tx_dropped_csum", "tx_dropped_tap",
    "tx_tap_full", "tx_rate_limited", "tx_fatal",
    "rx_packets", "rx_bytes", "rx_gso", "rx_dropped", "rx_mcast_filtered", "rx_bad_grant",
    "rx_stalls", "rx_fatal", "fatal",
)


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
