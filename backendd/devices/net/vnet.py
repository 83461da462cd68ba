"""The virtio_net_hdr a tap with IFF_VNET_HDR puts in front of every frame, and its mapping
to and from netif's checksum flags and GSO extra info. Pure: bytes in, bytes out.

Checksum offload in both worlds means "the L4 checksum field holds the pseudo-header sum
and the receiver finishes it". netif says it with one flag (NETTXF_csum_blank) and leaves
the receiver to find the L4 header; virtio needs the offsets (csum_start, csum_offset),
so on tx we parse the Ethernet/IP/L4 headers as netback's skb_checksum_setup does and
fail (drop) when they cannot be parsed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from rings.consts import NetGsoType, NetRxFlags, NetTxFlags

# struct virtio_net_hdr: flags u8, gso_type u8, hdr_len, gso_size, csum_start, csum_offset
# (u16 each, little-endian: the tap's default on x86).
VNET_HDR = struct.Struct("<BBHHHH")
VNET_HDR_LEN = VNET_HDR.size  # 10: plain virtio_net_hdr, no num_buffers

F_NEEDS_CSUM = 1
F_DATA_VALID = 2

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_ECN = 0x80

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPV6_EXT_HEADERS = {0, 43, 60}  # hop-by-hop, routing, destination options
IPV6_FRAGMENT = 44
CSUM_OFFSET = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}

# Enough to hold Ethernet + VLAN + IPv6 with extension headers + TCP with options.
MAX_HEADER_COPY = 256

_NETIF_TO_VIRTIO_GSO = {NetGsoType.TCPV4: GSO_TCPV4, NetGsoType.TCPV6: GSO_TCPV6}
_VIRTIO_TO_NETIF_GSO = {GSO_TCPV4: NetGsoType.TCPV4, GSO_TCPV6: NetGsoType.TCPV6}


@dataclass(frozen=True)
class VnetHeader:
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def pack(self) -> bytes:
        return VNET_HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                             self.csum_start, self.csum_offset)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> VnetHeader:
        return cls(*VNET_HDR.unpack_from(data))


@dataclass(frozen=True)
class L4Headers:
    """Where the transport header of a frame is, as skb_checksum_setup finds it."""

    ipv6: bool
    proto: int
    l4_off: int
    l4_end: int  # end of the TCP/UDP header: what a GSO receiver must replicate
    src: bytes
    dst: bytes
    l3_payload_len: int  # the L4 length the IP header claims

    @property
    def csum_offset(self) -> int:
        return CSUM_OFFSET[self.proto]


def parse_l4(frame: bytes | bytearray) -> L4Headers | None:
    """Locate the TCP/UDP header of an Ethernet frame (one VLAN tag allowed). None when the
    frame is not TCP/UDP over IPv4/IPv6, is a fragment, or is truncated."""
    if len(frame) < 14:
        return None
    off = 12
    (ethertype,) = struct.unpack_from("!H", frame, off)
    off += 2
    if ethertype == ETH_P_8021Q:
        if len(frame) < off + 4:
            return None
        (ethertype,) = struct.unpack_from("!H", frame, off + 2)
        off += 4
    if ethertype == ETH_P_IP:
        if len(frame) < off + 20:
            return None
        ver_ihl, total_len, frag, proto = (frame[off], *struct.unpack_from("!H", frame, off + 2),
                                           *struct.unpack_from("!H", frame, off + 6),
                                           frame[off + 9])
        ihl = (ver_ihl & 0xF) * 4
        if ver_ihl >> 4 != 4 or ihl < 20 or len(frame) < off + ihl:
            return None
        if frag & 0x3FFF:  # MF set or a non-zero offset: a fragment has no whole L4 header
            return None
        src, dst = bytes(frame[off + 12:off + 16]), bytes(frame[off + 16:off + 20])
        l4_off = off + ihl
        payload = total_len - ihl
        ipv6 = False
    elif ethertype == ETH_P_IPV6:
        if len(frame) < off + 40 or frame[off] >> 4 != 6:
            return None
        (payload,) = struct.unpack_from("!H", frame, off + 4)
        proto = frame[off + 6]
        src, dst = bytes(frame[off + 8:off + 24]), bytes(frame[off + 24:off + 40])
        l4_off = off + 40
        while proto in IPV6_EXT_HEADERS:
            if len(frame) < l4_off + 8:
                return None
            ext_len = (frame[l4_off + 1] + 1) * 8
            proto = frame[l4_off]
            l4_off += ext_len
            payload -= ext_len
        if proto == IPV6_FRAGMENT:
            return None
        ipv6 = True
    else:
        return None
    if proto == IPPROTO_TCP:
        if len(frame) < l4_off + 20:
            return None
        l4_end = l4_off + (frame[l4_off + 12] >> 4) * 4
        if l4_end < l4_off + 20:
            return None
    elif proto == IPPROTO_UDP:
        l4_end = l4_off + 8
    else:
        return None
    if len(frame) < l4_end or payload < l4_end - l4_off:
        return None
    return L4Headers(ipv6, proto, l4_off, l4_end, src, dst, payload)


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit one's complement sum of big-endian words (odd tail zero-padded)."""
    data = bytes(data)
    if len(data) % 2:
        data += b"\0"
    # Summing one big integer's 16-bit limbs: reduce with the end-around carry.
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    return _fold(total)


def pseudo_header_sum(h: L4Headers, l4_len: int) -> int:
    """The folded (not inverted) pseudo-header sum that goes in the L4 checksum field of a
    CHECKSUM_PARTIAL frame."""
    if h.ipv6:
        extra = struct.pack("!IxxxB", l4_len, h.proto)
    else:
        extra = struct.pack("!xBH", h.proto, l4_len)
    return ones_sum(h.src + h.dst + extra)


def tx_vnet_header(flags: int, gso: tuple[int, int] | None, headers: bytearray,
                   frame_len: int) -> VnetHeader | None:
    """The vnet header for a guest tx packet, from its netif flags and GSO extra.

    `headers` is our private copy of the frame's first bytes; for a checksum-offload or
    GSO packet the pseudo-header sum is (re)written into it, as netback does for GSO,
    so the kernel never trusts a guest-supplied partial sum. None: the headers cannot be
    parsed for the offload asked for (netback drops such a packet)."""
    partial = bool(flags & NetTxFlags.CSUM_BLANK) or gso is not None
    if not partial:
        if flags & NetTxFlags.DATA_VALIDATED:
            return VnetHeader(flags=F_DATA_VALID)
        return VnetHeader()
    h = parse_l4(headers)
    if h is None:
        return None
    if gso is not None:
        size, gtype = gso
        if h.proto != IPPROTO_TCP or h.ipv6 != (gtype == NetGsoType.TCPV6):
            return None
        virtio_gso = _NETIF_TO_VIRTIO_GSO[NetGsoType(gtype)]
    else:
        size, virtio_gso = 0, GSO_NONE
    l4_len = frame_len - h.l4_off
    if l4_len < h.l4_end - h.l4_off:
        return None
    struct.pack_into("!H", headers, h.l4_off + h.csum_offset, pseudo_header_sum(h, l4_len))
    return VnetHeader(flags=F_NEEDS_CSUM, gso_type=virtio_gso,
                      hdr_len=h.l4_end if virtio_gso else 0, gso_size=size,
                      csum_start=h.l4_off, csum_offset=h.csum_offset)


def rx_netif_flags(vnet: VnetHeader) -> int:
    """NETRXF checksum flags for a frame the tap gave us (netback's mapping of
    CHECKSUM_PARTIAL / CHECKSUM_UNNECESSARY)."""
    if vnet.flags & F_NEEDS_CSUM:
        return NetRxFlags.CSUM_BLANK | NetRxFlags.DATA_VALIDATED
    if vnet.flags & F_DATA_VALID:
        return NetRxFlags.DATA_VALIDATED
    return 0


def rx_gso(vnet: VnetHeader) -> tuple[int, int] | None:
    """(gso_size, netif GSO type) for a GSO frame; None for a plain frame. Raises
    ValueError for a GSO type netif cannot express (UDP, ECN)."""
    if vnet.gso_type == GSO_NONE:
        return None
    gtype = _VIRTIO_TO_NETIF_GSO.get(vnet.gso_type)
    if gtype is None or not vnet.gso_size:
        raise ValueError(f"virtio GSO type {vnet.gso_type:#x} has no netif equivalent")
    return vnet.gso_size, int(gtype)


def guest_vnet_header(rx_flags: int, gso: tuple[int, int] | None,
                      frame: bytes | bytearray) -> VnetHeader:
    """What a frontend hands its own stack for an rx frame: the inverse mapping, used by
    the simulated guest's netfront (netfront's skb_checksum_setup on csum_blank)."""
    if rx_flags & NetRxFlags.CSUM_BLANK:
        h = parse_l4(frame)
        if h is not None:
            vgso = _NETIF_TO_VIRTIO_GSO.get(NetGsoType(gso[1])) if gso else None
            return VnetHeader(flags=F_NEEDS_CSUM, gso_type=vgso or GSO_NONE,
                              hdr_len=h.l4_end if vgso else 0,
                              gso_size=gso[0] if vgso and gso else 0,
                              csum_start=h.l4_off, csum_offset=h.csum_offset)
    if rx_flags & NetRxFlags.DATA_VALIDATED:
        return VnetHeader(flags=F_DATA_VALID)
    return VnetHeader()
