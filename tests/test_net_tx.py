"""Tx slot-chain parsing: every netback check, and which ones drop a packet (ERROR for
each of its slots) versus shut the frontend down."""

import pytest

from backendd.devices.net.tx import TxFatal, TxKind, parse_packet
from rings.consts import NetExtraType, NetGsoType, NetTxFlags
from rings.netif import EXTRA_GSO, EXTRA_MCAST, TX_REQUEST

MORE = NetTxFlags.MORE_DATA
EXTRA = NetTxFlags.EXTRA_INFO


def req(size: int, flags: int = 0, rid: int = 0, offset: int = 0, gref: int = 9) -> bytes:
    return TX_REQUEST.pack(gref, offset, flags, rid, size)


def gso(size: int = 1448, gtype: int = NetGsoType.TCPV4, more: bool = False) -> bytes:
    return EXTRA_GSO.pack(NetExtraType.GSO, int(more), size, gtype, 0, 0) + bytes(4)


def raw_extra(etype: int, flags: int = 0) -> bytes:
    return bytes([etype, flags]) + bytes(10)


def parse(slots: list[bytes]):
    return parse_packet(lambda i: slots[i], len(slots))


def chain(total: int, sizes: list[int], first_flags: int = 0) -> list[bytes]:
    """A first slot announcing `total` followed by data slots of `sizes`."""
    out = [req(total, first_flags | (MORE if sizes else 0), rid=0)]
    for n, size in enumerate(sizes):
        out.append(req(size, MORE if n < len(sizes) - 1 else 0, rid=n + 1))
    return out


def test_single_slot_packet():
    p = parse([req(60, rid=7)])
    assert p.kind is TxKind.SEND
    assert (p.first_len, p.nslots, p.ids) == (60, 1, [7])


def test_chain_first_slot_holds_the_remainder():
    p = parse(chain(5000, [1000, 904]))
    assert p.kind is TxKind.SEND
    assert p.first_len == 3096
    assert [f.size for f in p.frags] == [1000, 904]
    assert p.ids == [0, 1, 2]


def test_zero_size_slot_is_part_of_the_packet():
    p = parse(chain(100, [0, 40]))
    assert p.kind is TxKind.SEND and p.nslots == 3 and p.frags[0].size == 0


def test_slot_larger_than_remaining_drops_whole_chain():
    p = parse(chain(3000, [2000, 2000]))
    assert p.kind is TxKind.ERROR
    assert p.nslots == 3  # every slot of the chain answered, none left behind
    assert "remaining" in p.reason


def test_first_slot_smaller_than_ethernet_header_drops():
    p = parse(chain(1013, [1000]))
    assert p.kind is TxKind.ERROR and p.first_len == 13 and p.nslots == 2


def test_eighteen_following_slots_pass_nineteen_drop_twenty_one_fatal():
    ok = parse(chain(18 * 100 + 100, [100] * 18))
    assert ok.kind is TxKind.SEND and ok.nslots == 19
    dropped = parse(chain(19 * 100 + 100, [100] * 19))
    assert dropped.kind is TxKind.ERROR and dropped.nslots == 20
    assert "too many slots" in dropped.reason
    dropped = parse(chain(20 * 100 + 100, [100] * 20))
    assert dropped.kind is TxKind.ERROR and dropped.nslots == 21
    with pytest.raises(TxFatal, match="malicious"):
        parse(chain(21 * 100 + 100, [100] * 21))


def test_chain_past_published_requests_is_fatal():
    slots = chain(3000, [1000, 1000])
    with pytest.raises(TxFatal, match="published"):
        parse_packet(lambda i: slots[i], 2)


def test_frag_crossing_page_is_fatal():
    slots = [req(2000, MORE), req(1000, offset=3500)]
    with pytest.raises(TxFatal, match="crosses"):
        parse(slots)


def test_first_slot_crossing_page_is_fatal():
    with pytest.raises(TxFatal, match="first slot crosses"):
        parse([req(200, offset=4000)])


def test_extra_info_missing_is_fatal():
    with pytest.raises(TxFatal, match="missing extra"):
        parse([req(100, EXTRA)])


@pytest.mark.parametrize("etype", [0, 5, 200])
def test_bad_extra_type_is_fatal(etype):
    with pytest.raises(TxFatal, match="invalid extra type"):
        parse([req(100, EXTRA), raw_extra(etype)])


def test_gso_extra_parsed_and_answered_null():
    p = parse([req(3000, EXTRA | MORE, rid=4), gso(1448), req(1000, rid=5)])
    assert p.kind is TxKind.SEND and p.gso == (1448, NetGsoType.TCPV4)
    assert p.extra_count == 1 and p.nslots == 3 and p.ids == [4, 0, 5]


def test_chained_extras_counted():
    p = parse([req(100, EXTRA, rid=1), gso(1000, more=True),
               raw_extra(NetExtraType.HASH)])
    assert p.extra_count == 2 and p.nslots == 3


def test_gso_size_zero_is_fatal():
    with pytest.raises(TxFatal, match="GSO size"):
        parse([req(100, EXTRA), gso(0)])


@pytest.mark.parametrize("gtype", [0, 3, 255])
def test_bad_gso_type_is_fatal(gtype):
    with pytest.raises(TxFatal, match="bad GSO type"):
        parse([req(100, EXTRA), gso(1000, gtype)])


def test_multicast_add_consumes_only_first_and_extra():
    addr = bytes.fromhex("01005e000001")
    slots = [req(0, EXTRA | MORE, rid=3),
             EXTRA_MCAST.pack(NetExtraType.MCAST_ADD, 0, addr) + bytes(4), req(60)]
    p = parse(slots)
    assert p.kind is TxKind.MCAST_ADD and p.mcast == addr
    assert p.nslots == 2  # the slot after is a packet of its own, as in netback


def test_multicast_del():
    addr = bytes.fromhex("333300000001")
    p = parse([req(0, EXTRA), EXTRA_MCAST.pack(NetExtraType.MCAST_DEL, 0, addr) + bytes(4)])
    assert p.kind is TxKind.MCAST_DEL and p.mcast == addr
