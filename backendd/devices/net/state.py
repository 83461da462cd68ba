"""A net device's sections of the state blob (backendd/devstate.py; layouts in
docs/protocol.md, "The device state blob"). Pure: sections in, a checked NetState out."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from backendd.devstate import (
    NET_CTRL,
    NET_HASH,
    NET_MCAST,
    NET_QUEUE,
    NET_RATE,
    NET_RX_POSTED,
    NET_VIF,
    DeviceSection,
    Reader,
    Section,
    StateError,
    split,
)
from backendd.protocol.messages import encode_kv
from rings.consts import NETBK_MCAST_MAX

from .hash import HashConfig
from .vif import Features

# Features as bits of NET_VIF's u32, in this order.
FEATURE_BITS = ("sg", "gso_tcpv4", "gso_tcpv6", "csum", "ipv6_csum", "multicast_control",
                "rx_notify")
_QUEUE = struct.Struct("<13I")
_RATE = struct.Struct("<IIQQQq")
_CTRL = struct.Struct("<5I")
MAX_POSTED = 256  # a one-page rx ring's entries
MAX_QUEUES = 8  # queues a net device serves at most (NetDevice's bound)


def features_to_bits(f: Features) -> int:
    return sum(1 << k for k, name in enumerate(FEATURE_BITS) if getattr(f, name))


def features_from_bits(bits: int) -> Features:
    if bits >> len(FEATURE_BITS):
        raise StateError(f"net vif section: unknown feature bits {bits:#x}")
    return Features(**{name: bool(bits >> k & 1) for k, name in enumerate(FEATURE_BITS)})


@dataclass(frozen=True)
class QueueState:
    index: int
    tx_ref: int
    rx_ref: int
    tx_port: int
    rx_port: int
    tx: tuple[int, int, int]  # req_cons, rsp_prod_pvt, pushed
    rx: tuple[int, int, int]
    charged: int | None  # tx req_cons of a packet charged to the credit, not sent yet

    def encode(self) -> Section:
        return Section(NET_QUEUE, _QUEUE.pack(
            self.index, self.tx_ref, self.rx_ref, self.tx_port, self.rx_port, *self.tx,
            *self.rx, int(self.charged is not None), self.charged or 0))


@dataclass(frozen=True)
class RateState:
    index: int
    waiting: bool
    credit_bytes: int
    credit_usec: int
    remaining: int
    window_left_usec: int  # until the current credit window ends (may be negative)

    def encode(self) -> Section:
        return Section(NET_RATE, _RATE.pack(self.index, int(self.waiting), self.credit_bytes,
                                            self.credit_usec, self.remaining,
                                            self.window_left_usec))


@dataclass(frozen=True)
class CtrlState:
    """The control ring: ctrl-ring-ref, event-channel-ctrl, and its back-end indices."""

    ref: int
    port: int
    indices: tuple[int, int, int]  # req_cons, rsp_prod_pvt, pushed

    def encode(self) -> Section:
        return Section(NET_CTRL, _CTRL.pack(self.ref, self.port, *self.indices))


def encode_hash(config: bytes) -> Section:
    """The steering configuration, as HashConfig.to_bytes lays it out."""
    return Section(NET_HASH, config)


@dataclass
class NetState:
    device: DeviceSection
    features: Features | None = None
    mtu: int = 0
    halted: bool = False
    tap: str = ""
    queues: list[QueueState] = field(default_factory=list)
    posted: dict[int, list[tuple[int, bool, int]]] = field(default_factory=dict)
    mcast: list[bytes] = field(default_factory=list)
    rates: dict[int, RateState] = field(default_factory=dict)
    ctrl: CtrlState | None = None
    hash: bytes | None = None  # HashConfig.to_bytes(), checked


def encode_vif(features: Features, mtu: int, nr_queues: int, halted: bool,
               tap: str) -> Section:
    return Section(NET_VIF, struct.pack("<IIII", features_to_bits(features), mtu, nr_queues,
                                        int(halted)) + encode_kv({"tap": tap}))


def encode_posted(index: int, posted: list[tuple[int, bool, int]]) -> Section:
    return Section(NET_RX_POSTED, struct.pack("<II", index, len(posted)) + b"".join(
        struct.pack("<HHI", req_id, int(ok), gref) for req_id, ok, gref in posted))


def encode_mcast(addrs: list[bytes]) -> Section:
    return Section(NET_MCAST, struct.pack("<I", len(addrs)) + b"".join(addrs))


def decode_state(sections: list[Section]) -> NetState:
    known = {NET_VIF, NET_QUEUE, NET_RX_POSTED, NET_MCAST, NET_RATE, NET_HASH, NET_CTRL}
    device, rest = split(sections, known)
    st = NetState(device)
    if not device.connected:
        if rest:
            raise StateError("queue sections for a device that was not connected")
        return st
    nq = None
    queues: dict[int, QueueState] = {}
    seen: set[int] = set()
    for s in rest:
        if s.type in (NET_VIF, NET_MCAST) and s.type in seen:
            raise StateError(f"two {'net vif' if s.type == NET_VIF else 'multicast'} "
                             "sections")
        seen.add(s.type)
        if s.type == NET_VIF:
            r = Reader(s, "net vif section")
            bits, st.mtu, nq, halted = r.take("IIII")
            st.features = features_from_bits(bits)
            if not 1 <= nq <= MAX_QUEUES:
                raise StateError(f"net vif section: {nq} queues (1..{MAX_QUEUES})")
            if not 68 <= st.mtu <= 65535:
                raise StateError(f"net vif section: mtu {st.mtu}")
            if halted > 1:
                raise StateError(f"net vif section: halted flag {halted}")
            st.halted = bool(halted)
            st.tap = r.kv().get("tap", "")
            r.end()
        elif s.type == NET_QUEUE:
            r = Reader(s, "net queue section")
            v = r.take("13I")
            r.end()
            if v[0] in queues:
                raise StateError(f"two sections for net queue {v[0]}")
            if v[11] > 1:
                raise StateError(f"net queue {v[0]}: charged flag {v[11]}")
            queues[v[0]] = QueueState(v[0], v[1], v[2], v[3], v[4], v[5:8], v[8:11],
                                      v[12] if v[11] else None)
        elif s.type == NET_RX_POSTED:
            r = Reader(s, "net rx posted section")
            index, count = r.take("II")
            if count > MAX_POSTED:
                raise StateError(f"net queue {index}: {count} posted rx buffers")
            triples = r.take("HHI" * count)
            r.end()
            if index in st.posted:
                raise StateError(f"two posted-buffer sections for net queue {index}")
            if any(u > 1 for u in triples[1::3]):
                raise StateError(f"net queue {index}: a posted buffer's usable flag is "
                                 "not 0 or 1")
            st.posted[index] = [(triples[k], bool(triples[k + 1]), triples[k + 2])
                                for k in range(0, len(triples), 3)]
        elif s.type == NET_MCAST:
            r = Reader(s, "net multicast section")
            (count,) = r.take("I")
            if count > NETBK_MCAST_MAX:
                raise StateError(f"net multicast list of {count} addresses")
            raw = r.raw(6 * count)
            r.end()
            st.mcast = [raw[k:k + 6] for k in range(0, len(raw), 6)]
        elif s.type == NET_RATE:
            r = Reader(s, "net rate section")
            index, waiting, cbytes, cusec, remaining, left = r.take("IIQQQq")
            r.end()
            if index in st.rates:
                raise StateError(f"two rate sections for net queue {index}")
            if waiting > 1:
                raise StateError(f"net queue {index}: rate waiting flag {waiting}")
            st.rates[index] = RateState(index, bool(waiting), cbytes, cusec, remaining, left)
        elif s.type == NET_CTRL:
            r = Reader(s, "net control ring section")
            ref, port, *indices = r.take("5I")
            r.end()
            if st.ctrl is not None:
                raise StateError("two net control ring sections")
            if indices[0] != indices[1]:
                raise StateError(f"net control ring: req_cons {indices[0]} != "
                                 f"rsp_prod_pvt {indices[1]}: every request taken is "
                                 "answered")
            st.ctrl = CtrlState(ref, port, (indices[0], indices[1], indices[2]))
        elif s.type == NET_HASH:
            if st.hash is not None:
                raise StateError("two net hash configuration sections")
            try:
                HashConfig.from_bytes(s.body)
            except ValueError as e:
                raise StateError(f"net {e}") from None
            st.hash = bytes(s.body)
    if nq is None or st.features is None:
        raise StateError("no net vif section")
    if sorted(queues) != list(range(nq)):
        raise StateError(f"queue sections {sorted(queues)} for {nq} queues")
    for index in [*st.posted, *st.rates]:
        if index not in queues:
            raise StateError(f"a section for net queue {index}, which the state lacks")
    for index, q in queues.items():
        rx_cons, rx_prod_pvt, _ = q.rx
        posted = st.posted.get(index, [])
        if (rx_cons - rx_prod_pvt) & 0xFFFFFFFF != len(posted):
            raise StateError(f"net queue {index}: {len(posted)} posted rx buffers, but "
                             f"req_cons - rsp_prod_pvt is {(rx_cons - rx_prod_pvt) & 0xFFFFFFFF}")
        tx_cons, tx_prod_pvt, _ = q.tx
        if tx_cons != tx_prod_pvt:
            raise StateError(f"net queue {index}: tx req_cons {tx_cons} != rsp_prod_pvt "
                             f"{tx_prod_pvt}: every tx request taken is answered")
    if (st.ctrl is None) != (st.hash is None):
        raise StateError("a control ring section without a hash configuration section, "
                         "or the other way round")
    st.queues = [queues[i] for i in range(nq)]
    return st
