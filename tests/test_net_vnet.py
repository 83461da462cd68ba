"""The virtio_net_hdr mapping both ways, the rx slot layout, and the credit scheduler."""

import struct

import pytest

from backendd.devices.net.ratelimit import CreditScheduler, parse_rate
from backendd.devices.net.rx import data_slot_sizes, rx_responses
from backendd.devices.net.vnet import (
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    VnetHeader,
    ones_sum,
    parse_l4,
    rx_gso,
    rx_netif_flags,
    tx_vnet_header,
)
from backendd.errors import ConfigError
from rings.consts import NetExtraType, NetGsoType, NetRxFlags, NetTxFlags
from rings.netif import EXTRA_GSO, RX_RESPONSE

SRC4, DST4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
SRC6, DST6 = bytes(range(16)), bytes(range(16, 32))
ETH = bytes.fromhex("020000000002020000000001")


def tcp(payload: bytes, options: bytes = b"") -> bytes:
    doff = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", 1234, 80, 1, 0, doff << 4, 0x18, 65535, 0xABCD, 0) \
        + options + payload


def udp(payload: bytes) -> bytes:
    return struct.pack("!HHHH", 53, 5353, 8 + len(payload), 0x1234) + payload


def ipv4(l4: bytes, proto: int, frag: int = 0) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, frag, 64, proto, 0,
                      SRC4, DST4)
    return ETH + b"\x08\x00" + hdr + l4


def ipv6(l4: bytes, proto: int, ext: bytes = b"", ext_proto: int | None = None) -> bytes:
    nh = ext_proto if ext else proto
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(ext) + len(l4), nh, 64, SRC6, DST6)
    return ETH + b"\x86\xdd" + hdr + ext + l4


def full_checksum_ok(frame: bytes, h) -> bool:
    """Independent check: pseudo header + L4 segment sums to 0xFFFF."""
    seg = frame[h.l4_off:]
    if h.ipv6:
        pseudo = h.src + h.dst + struct.pack("!IxxxB", len(seg), h.proto)
    else:
        pseudo = h.src + h.dst + struct.pack("!xBH", h.proto, len(seg))
    return ones_sum(pseudo + seg) == 0xFFFF


def complete(frame: bytearray, v: VnetHeader) -> bytes:
    """What the kernel does with NEEDS_CSUM: sum from csum_start, store the complement."""
    total = ones_sum(frame[v.csum_start:])
    struct.pack_into("!H", frame, v.csum_start + v.csum_offset, ~total & 0xFFFF)
    return bytes(frame)


def test_csum_blank_tcp4_offsets_and_pseudo_header():
    frame = bytearray(ipv4(tcp(b"x" * 101), 6))
    v = tx_vnet_header(NetTxFlags.CSUM_BLANK, None, frame, len(frame))
    assert v == VnetHeader(F_NEEDS_CSUM, GSO_NONE, 0, 0, 34, 16)
    done = complete(frame, v)
    assert full_checksum_ok(done, parse_l4(done))


def test_csum_blank_udp6_with_extension_header():
    ext = bytes([17, 0]) + bytes(6)  # hop-by-hop, next header UDP
    frame = bytearray(ipv6(udp(b"hello"), 17, ext, ext_proto=0))
    v = tx_vnet_header(NetTxFlags.CSUM_BLANK | NetTxFlags.DATA_VALIDATED, None, frame,
                       len(frame))
    assert (v.flags, v.csum_start, v.csum_offset) == (F_NEEDS_CSUM, 14 + 40 + 8, 6)
    assert full_checksum_ok(complete(frame, v), parse_l4(frame))


def test_gso_tcp4_and_tcp6_headers():
    frame = bytearray(ipv4(tcp(b"y" * 3000, options=bytes(12)), 6))
    v = tx_vnet_header(0, (1448, NetGsoType.TCPV4), frame, len(frame))
    assert (v.gso_type, v.gso_size, v.hdr_len) == (GSO_TCPV4, 1448, 34 + 32)
    assert v.flags == F_NEEDS_CSUM  # GSO implies a partial checksum, as netback forces
    frame6 = bytearray(ipv6(tcp(b"y" * 3000), 6))
    v6 = tx_vnet_header(NetTxFlags.CSUM_BLANK, (1400, NetGsoType.TCPV6), frame6,
                        len(frame6))
    assert (v6.gso_type, v6.csum_start, v6.hdr_len) == (GSO_TCPV6, 54, 74)


def test_gso_type_must_match_the_headers():
    frame = bytearray(ipv4(tcp(b"y" * 3000), 6))
    assert tx_vnet_header(0, (1448, NetGsoType.TCPV6), frame, len(frame)) is None
    frame = bytearray(ipv4(udp(b"y" * 3000), 17))
    assert tx_vnet_header(0, (1448, NetGsoType.TCPV4), frame, len(frame)) is None


def test_unparseable_offload_is_refused():
    arp = bytearray(ETH + b"\x08\x06" + bytes(28))
    assert tx_vnet_header(NetTxFlags.CSUM_BLANK, None, arp, len(arp)) is None
    frag = bytearray(ipv4(tcp(b"z" * 10), 6, frag=0x2000))
    assert tx_vnet_header(NetTxFlags.CSUM_BLANK, None, frag, len(frag)) is None
    truncated = bytearray(ipv4(tcp(b""), 6)[:40])
    assert tx_vnet_header(NetTxFlags.CSUM_BLANK, None, truncated, 80) is None


def test_vlan_tag_shifts_offsets():
    inner = ipv4(tcp(b"v"), 6)
    frame = bytearray(inner[:12] + b"\x81\x00\x00\x05" + inner[12:])
    v = tx_vnet_header(NetTxFlags.CSUM_BLANK, None, frame, len(frame))
    assert v.csum_start == 38


def test_plain_and_validated_packets():
    frame = bytearray(ipv4(tcp(b""), 6))
    assert tx_vnet_header(0, None, frame, len(frame)) == VnetHeader()
    assert tx_vnet_header(NetTxFlags.DATA_VALIDATED, None, frame, len(frame)).flags \
        == F_DATA_VALID


def test_rx_flag_mapping():
    assert rx_netif_flags(VnetHeader(F_NEEDS_CSUM)) == NetRxFlags.CSUM_BLANK \
        | NetRxFlags.DATA_VALIDATED
    assert rx_netif_flags(VnetHeader(F_DATA_VALID)) == NetRxFlags.DATA_VALIDATED
    assert rx_netif_flags(VnetHeader()) == 0
    assert rx_gso(VnetHeader(F_NEEDS_CSUM, GSO_TCPV6, 74, 1400)) == (1400, NetGsoType.TCPV6)
    assert rx_gso(VnetHeader()) is None
    with pytest.raises(ValueError):
        rx_gso(VnetHeader(F_NEEDS_CSUM, GSO_UDP, 42, 1400))
    with pytest.raises(ValueError):
        rx_gso(VnetHeader(F_NEEDS_CSUM, GSO_TCPV4 | 0x80, 54, 1400))


def test_rx_slot_sizes():
    assert data_slot_sizes(60) == [60]
    assert data_slot_sizes(4096) == [4096]
    assert data_slot_sizes(9018) == [4096, 4096, 826]


def test_rx_responses_gso_frame_layout():
    flags = NetRxFlags.CSUM_BLANK | NetRxFlags.DATA_VALIDATED
    slots = rx_responses([10, 11, 12, 13], 10000, flags, (1448, NetGsoType.TCPV4))
    assert len(slots) == 4
    first = RX_RESPONSE.unpack(slots[0])
    assert first == (10, 0, flags | NetRxFlags.EXTRA_INFO | NetRxFlags.MORE_DATA, 4096)
    assert EXTRA_GSO.unpack(slots[1]) == (NetExtraType.GSO, 0, 1448, NetGsoType.TCPV4, 0, 0)
    assert RX_RESPONSE.unpack(slots[2]) == (12, 0, NetRxFlags.MORE_DATA, 4096)
    assert RX_RESPONSE.unpack(slots[3]) == (13, 0, 0, 10000 - 8192)


def test_rx_responses_plain_frame():
    slots = rx_responses([5], 1514, NetRxFlags.DATA_VALIDATED, None)
    assert [RX_RESPONSE.unpack(s) for s in slots] == [(5, 0, NetRxFlags.DATA_VALIDATED, 1514)]


def test_parse_rate():
    assert parse_rate("100000,20000") == (100000, 20000)
    for bad in ("", "1", "1,2,3", "-1,5", "0,10", "10,0", "a,b", "1.5,3"):
        with pytest.raises(ConfigError):
            parse_rate(bad)


def test_credit_scheduler_windows():
    c = CreditScheduler(1000, 100_000, now=0.0)  # 1000 bytes per 100 ms
    assert c.admit(600, 0.0)
    assert not c.admit(600, 0.01)  # 400 left
    assert c.waiting and c.resume_at == pytest.approx(0.1)
    assert not c.admit(10, 0.05)  # nothing passes while the refill timer is pending
    c.timer_fired()
    assert c.admit(600, 0.1) and c.remaining == 800
    # A long idle gap is one refill, not one per missed window.
    assert c.admit(1800, 100.0)
    assert not c.admit(1, 100.0)
    c2 = CreditScheduler(1000, 100_000, now=0.0)
    c2.remaining = 0
    assert c2.admit(1000, 0.5)  # one refill when the window has passed


def test_credit_burst_cap():
    c = CreditScheduler(100_000, 1000, now=0.0)
    for step in range(1, 10):
        c.admit(0, step * 0.002)
    assert c.remaining == 131072
