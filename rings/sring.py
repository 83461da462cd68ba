"""The shared-ring header and ring sizing of io/ring.h."""

from construct import Bytes, Int32ul, Padding, Struct

from .consts import PAGE_SIZE

# struct <name>_sring: four free-running u32 indices, a 4-byte private union used by some
# protocols (netif's rsp_event mirror, blkif's nothing), padding to 64 bytes, then ring[].
sring_header = Struct(
    "req_prod" / Int32ul,
    "req_event" / Int32ul,
    "rsp_prod" / Int32ul,
    "rsp_event" / Int32ul,
    "pvt" / Bytes(4),
    Padding(44),
)
SRING_HEADER_SIZE = sring_header.sizeof()

# Word indices of the header fields, for index access through a u32 view.
REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT = 0, 1, 2, 3


def round_down_pow2(n: int) -> int:
    """__RD32: the largest power of two not above n (0 for 0)."""
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def ring_entries(ring_bytes: int, entry_size: int) -> int:
    """__RING_SIZE: how many entries a ring of `ring_bytes` holds."""
    if ring_bytes < SRING_HEADER_SIZE or entry_size <= 0:
        return 0
    return round_down_pow2((ring_bytes - SRING_HEADER_SIZE) // entry_size)


def ring_entries_for_pages(nr_pages: int, entry_size: int) -> int:
    return ring_entries(nr_pages * PAGE_SIZE, entry_size)
