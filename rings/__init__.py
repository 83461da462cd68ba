"""Xen shared-ring layouts and ring logic: the single source of truth for the bytes the
daemon and a guest exchange. Pure: no asyncio, no sockets, no files."""

from . import blkif, consts, grant, netif, sring
from .blkif import BLKIF, BLKIF_CODECS, BlkifCodecs, BlkifLayouts, blkif_segment
from .codec import Codec
from .ring import BackRing, FrontRing, RingCorrupted, SharedRing
from .sring import ring_entries, ring_entries_for_pages, sring_header

__all__ = [
    "BLKIF",
    "BLKIF_CODECS",
    "BackRing",
    "BlkifCodecs",
    "BlkifLayouts",
    "Codec",
    "FrontRing",
    "RingCorrupted",
    "SharedRing",
    "blkif",
    "blkif_segment",
    "consts",
    "grant",
    "netif",
    "ring_entries",
    "ring_entries_for_pages",
    "sring",
    "sring_header",
]
