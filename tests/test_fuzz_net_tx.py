"""Random tx slot chains into the pure netif tx packet parser: the only failure is
TxFatal; it reads only published slots; and every verdict keeps its bounds (slot counts,
each slot inside its page, the first slot's share of the packet at least an Ethernet
header, sizes adding up, a GSO size and type netback accepts)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples

from backendd.devices.net.tx import (
    FATAL_SKB_SLOTS,
    LEGACY_SLOTS_MAX,
    TxFatal,
    TxKind,
    TxPacket,
    decode_slot,
    parse_packet,
)
from rings.consts import (
    ETH_HLEN,
    NETIF_EXTRA_FLAG_MORE,
    PAGE_SIZE,
    NetExtraType,
    NetGsoType,
    NetTxFlags,
)
from rings.netif import TX_ENTRY_SIZE, TX_REQUEST

MORE, EXTRA = int(NetTxFlags.MORE_DATA), int(NetTxFlags.EXTRA_INFO)


def check_chain(slots: list[bytes], avail: int) -> TxPacket | None:
    """Parse the chain and check the verdict; None when the parser declared it fatal."""
    read_at: list[int] = []

    def read(i: int) -> bytes:
        assert 0 <= i < avail, f"read slot {i} of {avail} published"
        read_at.append(i)
        return slots[i]

    try:
        packet = parse_packet(read, avail)
    except TxFatal:
        return None
    assert packet.nslots <= avail
    assert max(read_at) < packet.nslots  # nothing read beyond its own slots
    assert packet.first == decode_slot(slots[0])
    assert packet.ids[0] == packet.first.id and len(packet.ids) == packet.nslots
    start = 1 + packet.extra_count
    assert packet.frags == [decode_slot(s) for s in slots[start:start + len(packet.frags)]]
    assert len(packet.frags) < FATAL_SKB_SLOTS
    if packet.kind in (TxKind.MCAST_ADD, TxKind.MCAST_DEL):
        assert len(packet.mcast) == 6 and not packet.frags
        return packet
    # The chain ends where the last slot says so.
    last = packet.frags[-1] if packet.frags else packet.first
    assert not last.flags & MORE
    for frag in packet.frags:
        assert frag.offset + frag.size <= PAGE_SIZE
    if packet.kind is TxKind.ERROR:
        assert packet.reason
        return packet
    assert len(packet.frags) <= LEGACY_SLOTS_MAX
    assert packet.first_len >= ETH_HLEN
    assert packet.first.offset + packet.first_len <= PAGE_SIZE
    assert packet.first_len + sum(f.size for f in packet.frags) == packet.first.size
    if packet.gso is not None:
        size, gtype = packet.gso
        assert size > 0 and gtype in (NetGsoType.TCPV4, NetGsoType.TCPV6)
    return packet


def slot(gref: int, offset: int, flags: int, rid: int, size: int) -> bytes:
    return TX_REQUEST.pack(gref, offset, flags, rid, size)


def extra(etype: int, flags: int, body: bytes) -> bytes:
    return (bytes([etype, flags]) + body + bytes(TX_ENTRY_SIZE))[:TX_ENTRY_SIZE]


u16 = st.integers(0, 0xFFFF)
small = st.one_of(st.integers(0, 4200), u16)
extras = st.tuples(st.one_of(st.integers(0, 5), st.integers(0, 255)),
                   st.sampled_from([0, NETIF_EXTRA_FLAG_MORE]) | st.integers(0, 255),
                   st.binary(min_size=10, max_size=10))
frags = st.tuples(small, small, st.sampled_from([0, MORE]) | u16, u16)


@st.composite
def chains(draw) -> tuple[list[bytes], int]:
    """A packet as a guest may write it: first slot, extras, data slots, noise after."""
    flags = draw(st.sampled_from([0, MORE, EXTRA, MORE | EXTRA]) | u16)
    first = slot(draw(u16), draw(small), flags, draw(u16), draw(small))
    out = [first]
    for etype, eflags, body in draw(st.lists(extras, max_size=4)):
        if etype == NetExtraType.GSO and draw(st.booleans()):
            body = draw(st.integers(0, 9000)).to_bytes(2, "little") + bytes(
                [draw(st.integers(0, 3))]) + body[3:]
        out.append(extra(etype, eflags, body))
    for offset, size, fflags, rid in draw(st.lists(frags, max_size=24)):
        out.append(slot(7, offset, fflags, rid, size))
    out += [slot(0, 0, MORE, 0, 0)] * draw(st.integers(0, 2))
    avail = draw(st.integers(1, len(out)))
    return out, avail


@settings(max_examples=examples(400), deadline=None)
@given(chain=chains())
def test_random_tx_chains(chain):
    slots, avail = chain
    check_chain(slots, avail)


def test_well_formed_chains_are_sent():
    """Guards the fuzzing above against checking only fatal and dropped chains: chains
    built by the rules are accepted, with their bounds checked the same way."""
    rng = random.Random(3)
    sent = 0
    for _ in range(500):
        nfrags = rng.randrange(0, LEGACY_SLOTS_MAX + 1)
        sizes = [rng.randrange(0, 2048) for _ in range(nfrags)]
        first_len = rng.randrange(ETH_HLEN, 2048)
        out = [slot(1, rng.randrange(0, PAGE_SIZE - first_len), MORE if nfrags else 0, 1,
                    first_len + sum(sizes))]
        for i, size in enumerate(sizes):
            out.append(slot(2, rng.randrange(0, PAGE_SIZE - size + 1),
                            MORE if i < nfrags - 1 else 0, i, size))
        if first_len + sum(sizes) > 0xFFFF:
            continue
        packet = check_chain(out, len(out))
        assert packet is not None and packet.kind is TxKind.SEND
        sent += 1
    assert sent > 400
