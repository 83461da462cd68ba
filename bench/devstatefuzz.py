"""Mutated device state blobs through the daemon's own decoding and validation (the
`devstate` target of python -m bench.fuzz, and tests/test_fuzz_devstate.py).

Each input starts from a valid blob of one of a few devices (blk: not connected, one
ring, two two-page rings with persistent grants; net: not connected, one queue, two
queues with posted rx buffers, a rate and a multicast list) together with the guest
memory of its switch point (the rings as the source left them). It is mutated (fields
set to edge values, bytes flipped, sections cut, grown, repeated, dropped, reordered or
added), mostly with a right checksum so the contents are what gets tested, and goes
through devstate.decode, the device type's decode_state, and the checks a connect makes
against the frontend keys and the copied rings (blk: the keys; net: the ring indices
against the rings, the posted rx buffers against the rx ring's slots, the credit
restored). The verdict must be a refusal (StateError / ControlError with EINVAL and a
message) or a state that holds together: every bound kept, every index consistent with
the ring it will serve, no grant named twice, the credit within one burst and two
windows. Anything else (another exception, an accepted state breaking a bound) is a
violation.
"""

from __future__ import annotations

import errno
import random
import struct
import types
import zlib
from dataclasses import dataclass, field

from backendd import devstate
from backendd.devices.blk.device import BlkDevice
from backendd.devices.blk.keys import MAX_QUEUES as BLK_MAX_QUEUES
from backendd.devices.blk.keys import parse_frontend_keys
from backendd.devices.blk.state import MAX_PGRANTS, RingState, encode_pgrants
from backendd.devices.blk.state import decode_state as blk_decode
from backendd.devices.net.device import _back_ring, check_posted, restore_credit
from backendd.devices.net.ratelimit import CreditScheduler
from backendd.devices.net.state import (
    MAX_POSTED,
    MAX_QUEUES,
    QueueState,
    RateState,
    encode_mcast,
    encode_posted,
    encode_vif,
)
from backendd.devices.net.state import decode_state as net_decode
from backendd.devices.net.vif import Features
from backendd.devstate import DeviceSection, Section, StateError
from backendd.errors import ControlError
from rings.consts import NETBK_MCAST_MAX
from rings.netif import RX_ENTRY_SIZE, RX_REQUEST, TX_ENTRY_SIZE
from rings.ring import SharedRing
from rings.sring import REQ_PROD, RSP_PROD

BLK, NET = 1, 2
U32 = 0xFFFFFFFF
EDGES = (0, 1, 2, 7, 8, 63, 64, 65, 255, 256, 257, 1055, 1056, 4096, 4097, 0x7FFF,
         0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, U32 - 1, U32)
KNOWN_TYPES = (devstate.DEVICE, devstate.BLK_RING, devstate.BLK_PGRANTS, devstate.NET_VIF,
               devstate.NET_QUEUE, devstate.NET_RX_POSTED, devstate.NET_MCAST,
               devstate.NET_RATE, devstate.NET_HASH, devstate.NET_CTRL)
RATE = (50_000, 100_000)  # the destination's `rate` for the net cases with one


@dataclass
class Case:
    """A valid blob's sections and what the destination has at its switch point."""

    name: str
    dtype: int
    sections: list[Section]
    # net: per queue the (tx, rx) rings in the copied memory
    rings: list[tuple[SharedRing, SharedRing]] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # the frontend's keys at connect


def _ring(entry: int, rsp_prod: int, req_prod: int,
          slots: dict[int, bytes] | None = None) -> SharedRing:
    ring = SharedRing(memoryview(bytearray(4096)), entry)
    ring.idx[RSP_PROD] = rsp_prod & U32
    ring.idx[REQ_PROD] = req_prod & U32
    for index, data in (slots or {}).items():
        ring.write_slot(index, data)
    return ring


def cases() -> list[Case]:
    out = [Case("blk not connected", BLK, [DeviceSection(2, False, {}).encode()]),
           Case("net not connected", NET, [DeviceSection(2, False, {}).encode()])]
    keys = {"ring-ref": "8", "event-channel": "3", "protocol": "x86_64-abi"}
    out.append(Case("blk one ring", BLK, [
        DeviceSection(4, True, keys).encode(),
        RingState(0, 3, (8,), 1000, 1000, 1000).encode()], keys=keys))
    keys = {"multi-queue-num-queues": "2", "ring-page-order": "1", "feature-persistent": "1",
            "queue-0/ring-ref0": "8", "queue-0/ring-ref1": "9", "queue-0/event-channel": "3",
            "queue-1/ring-ref0": "10", "queue-1/ring-ref1": "11",
            "queue-1/event-channel": "4"}
    secs = [DeviceSection(4, True, keys).encode()]
    for q in range(2):
        secs.append(RingState(q, 3 + q, (8 + 2 * q, 9 + 2 * q), U32 - 5 + q,
                              U32 - 5 + q, U32 - 5 + q).encode())
        secs.append(encode_pgrants(q, [(100 + 50 * q + k, k % 3 != 0) for k in range(40)]))
    out.append(Case("blk two rings, persistent grants", BLK, secs, keys=keys))
    for nq, posted_n, rate in ((1, 0, False), (2, 20, True)):
        feats = Features(sg=True, gso_tcpv4=True, gso_tcpv6=True, csum=True, ipv6_csum=True,
                         multicast_control=nq > 1, rx_notify=True)
        fkeys = {"request-rx-copy": "1", "feature-sg": "1"}
        secs = [DeviceSection(4, True, fkeys).encode(),
                encode_vif(feats, 1500, nq, False, "vif1.0")]
        rings = []
        for q in range(nq):
            tx_pvt, rx_pvt = 300 + q, U32 - 3 - q  # the rx indices wrap
            rx_slots = {rx_pvt + k: RX_REQUEST.pack((rx_pvt + k) & 255, 500 + 256 * q + k)
                        for k in range(40)}
            rings.append((_ring(TX_ENTRY_SIZE, tx_pvt, tx_pvt + 3),
                          _ring(RX_ENTRY_SIZE, rx_pvt, rx_pvt + 40, rx_slots)))
            posted = [((rx_pvt + k) & 255, k != 5, 500 + 256 * q + k)
                      for k in range(posted_n)]
            secs.append(QueueState(q, 20 + q, 30 + q, 5 + q, 5 + q, (tx_pvt,) * 3,
                                   ((rx_pvt + posted_n) & U32, rx_pvt, rx_pvt),
                                   tx_pvt if rate else None).encode())
            secs.append(encode_posted(q, posted))
            if rate:
                secs.append(RateState(q, q == 1, *RATE, 1234, 40_000).encode())
        secs.append(encode_mcast([bytes([1, 0, 0x5E, 0, 0, m]) for m in range(3 if rate else 0)]))
        out.append(Case(f"net {nq} queue(s), {posted_n} posted", NET, secs, rings))
    return out


# --- mutations -----------------------------------------------------------------------


def _poke(rng: random.Random, body: bytes) -> bytes:
    if not body:
        return body
    buf = bytearray(body)
    width = rng.choice((1, 2, 4, 4, 4, 8))
    if width > len(buf):
        width = 1
    off = rng.randrange(0, len(buf) - width + 1)
    if rng.random() < 0.7:  # aligned fields are the interesting ones
        off -= off % width
    value = rng.choice(EDGES) if rng.random() < 0.6 else rng.getrandbits(8 * width)
    if rng.random() < 0.3:  # a neighbour of what is there
        value = int.from_bytes(buf[off:off + width], "little") + rng.choice((-1, 1, 2, -2))
    buf[off:off + width] = (value % (1 << 8 * width)).to_bytes(width, "little")
    return bytes(buf)


def mutate(rng: random.Random, case: Case) -> bytes:
    sections = list(case.sections)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(9)
        k = rng.randrange(len(sections)) if sections else 0
        if op <= 3 and sections:  # a field to an edge value
            s = sections[k]
            sections[k] = Section(s.type, _poke(rng, s.body))
        elif op == 4 and sections:  # cut or grow a body
            s = sections[k]
            cut = rng.randrange(len(s.body) + 1)
            body = s.body[:cut] if rng.random() < 0.5 else s.body + rng.randbytes(
                rng.choice((1, 2, 4, 6, 8, 13)))
            sections[k] = Section(s.type, body)
        elif op == 5 and sections:  # repeat one
            sections.insert(rng.randrange(len(sections) + 1), sections[k])
        elif op == 6 and sections:  # drop one
            del sections[k]
        elif op == 7 and len(sections) > 1:  # reorder
            j = rng.randrange(len(sections))
            sections[k], sections[j] = sections[j], sections[k]
        else:  # a section of any type with a plausible or random body
            stype = rng.choice(KNOWN_TYPES) if rng.random() < 0.8 else rng.getrandbits(32)
            template = next((s.body for s in case.sections if s.type == stype), b"")
            body = _poke(rng, template) if template and rng.random() < 0.7 else \
                rng.randbytes(rng.randrange(64))
            if stype == devstate.NET_MCAST and rng.random() < 0.3:  # a huge list
                n = rng.choice((64, 65, 1000, U32))
                body = struct.pack("<I", n) + bytes(6 * min(n, 70))
            sections.insert(rng.randrange(len(sections) + 1), Section(stype, body))
    blob = devstate.encode(case.dtype, sections)
    r = rng.random()
    if r < 0.05:  # a raw byte anywhere, checksum not fixed
        buf = bytearray(blob)
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        blob = bytes(buf)
    elif r < 0.12:  # the header's count, length or type, checksum fixed
        buf = bytearray(blob)
        field_off, fmt = rng.choice(((28, "<I"), (16, "<Q"), (12, "<I"), (8, "<I")))
        struct.pack_into(fmt, buf, field_off, rng.choice(EDGES))
        if rng.random() < 0.5:
            del buf[rng.randrange(32, len(buf) + 1):]
        buf[24:28] = bytes(4)
        buf[24:28] = struct.pack("<I", zlib.crc32(bytes(buf)))
        blob = bytes(buf)
    return blob


# --- the verdict ---------------------------------------------------------------------


class Inconsistent(AssertionError):
    pass


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise Inconsistent(what)


def _refusal(exc: ControlError) -> None:
    _need(exc.code == errno.EINVAL and bool(exc.message), f"refusal {exc.code} "
          f"{exc.message!r}")


def check(case: Case, blob: bytes) -> str:
    """'refused' or 'accepted'; raises Inconsistent (or anything else) on a violation."""
    try:
        sections = devstate.decode(blob, case.dtype)
        if case.dtype == BLK:
            _check_blk(case, sections)
        else:
            _check_net(case, sections)
    except ControlError as exc:
        _refusal(exc)
        return "refused"
    return "accepted"


def _check_blk(case: Case, sections: list[Section]) -> None:
    st = blk_decode(sections, BLK_MAX_QUEUES)
    if not st.device.connected:
        _need(st.front is None and not st.rings and not st.pgrants, "rings while unconnected")
        return
    front = st.front
    _need(front is not None and 1 <= len(front.queues) <= BLK_MAX_QUEUES, "queues")
    assert front is not None
    _need(len(st.rings) == len(front.queues), "a ring per queue")
    for i, (ring, qk) in enumerate(zip(st.rings, front.queues, strict=True)):
        _need(ring.index == i and (ring.ring_refs, ring.port) == (qk.ring_refs, qk.port),
              f"ring {i} differs from the keys")
        _need(ring.req_cons == ring.rsp_prod_pvt == ring.pushed, f"ring {i} indices")
    for i, grants in st.pgrants.items():
        _need(0 <= i < len(st.rings), f"grants of ring {i}")
        _need(len(grants) <= MAX_PGRANTS, f"{len(grants)} grants")
        _need(len({g for g, _ in grants}) == len(grants), "a grant twice")
        _need(all(0 <= g <= U32 and isinstance(w, bool) for g, w in grants), "a grant")
    # The connect's own check against the frontend's keys (the destination's device).
    dev = types.SimpleNamespace(devid=1, persistent=front.persistent)
    BlkDevice._check_incoming(dev, st, parse_frontend_keys(case.keys))  # type: ignore[arg-type]


def _check_net(case: Case, sections: list[Section]) -> None:
    st = net_decode(sections)
    if not st.device.connected:
        _need(st.features is None and not st.queues, "queues while unconnected")
        return
    _need(st.features is not None and 1 <= len(st.queues) <= MAX_QUEUES, "queues")
    _need(68 <= st.mtu <= 65535 and len(st.mcast) <= NETBK_MCAST_MAX, "mtu or mcast")
    _need(all(len(a) == 6 for a in st.mcast), "a multicast address")
    for i, q in enumerate(st.queues):
        _need(q.index == i, "queue order")
        _need(q.tx[0] == q.tx[1], f"queue {i}: tx taken and not answered")
        posted = st.posted.get(i, [])
        _need(len(posted) <= MAX_POSTED and len(posted) == (q.rx[0] - q.rx[1]) & U32,
              f"queue {i}: posted count")
    _need(set(st.posted) <= set(range(len(st.queues))), "posted of no queue")
    _need(set(st.rates) <= set(range(len(st.queues))), "rate of no queue")
    # The connect: a queue the destination's memory does not have is a frontend whose
    # keys differ (refused there); each queue the memory has goes through the checks.
    if len(st.queues) != len(case.rings):
        raise StateError("queues differ from the frontend's")
    for i, q in enumerate(st.queues):
        tx_ring, rx_ring = case.rings[i]
        tx = _back_ring(tx_ring, q.tx, "tx")
        rx = _back_ring(rx_ring, q.rx, "rx")
        posted = st.posted.get(i, [])
        check_posted(rx_ring, q, posted, "rx")
        # What the ring logic then sees: no more outstanding than the ring holds.
        for back in (tx, rx):
            _need(back.rsp_prod_pvt == back.ring.idx[RSP_PROD], "rsp_prod")
            _need((back.req_cons - back.rsp_prod_pvt) & U32 <= back.size, "req_cons ahead")
            _need((back.ring.idx[REQ_PROD] - back.req_cons) & U32
                  <= (back.ring.idx[REQ_PROD] - back.rsp_prod_pvt) & U32, "req_cons beyond")
        for k, (req_id, _, gref) in enumerate(posted):
            _need(RX_REQUEST.unpack_from(rx_ring.read_slot(q.rx[1] + k)) == (req_id, gref),
                  "a posted buffer not in the ring")
        rs = st.rates.get(i)
        if rs is not None:
            credit = CreditScheduler(*RATE, 1000.0)
            if restore_credit(credit, rs, 1000.0):
                _need(0 <= credit.remaining <= credit.max_burst, "credit beyond a burst")
                _need(0 <= credit.next_credit - 1000.0 <= 2 * credit.credit_window + 1e-6,
                      "window beyond two windows")


def run(n: int, seed: int) -> tuple[int, dict[str, int], list[str]]:
    """n mutated blobs; (inputs, verdict counts, violations)."""
    rng = random.Random(seed)
    all_cases = cases()
    counts = {"refused": 0, "accepted": 0}
    bad: list[str] = []
    for _ in range(n):
        case = rng.choice(all_cases)
        blob = mutate(rng, case)
        try:
            counts[check(case, blob)] += 1
        except Exception as exc:
            bad.append(f"{case.name}: {exc!r} on blob {blob.hex()}")
    return n, counts, bad
