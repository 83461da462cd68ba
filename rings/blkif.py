"""blkif layouts (io/blkif.h) for the x86_64 and x86_32 guest ABIs.

The two ABIs differ only in uint64_t alignment inside structs: 8 on x86_64, 4 on x86_32.
That moves `id` (and everything after it) and changes the response size, so each layout is
built per ABI from one description, inserting the alignment padding explicitly."""

from dataclasses import dataclass

from construct import Array, Int8ul, Int16sl, Int16ul, Int32ul, Int64ul, Padding, Struct

from .codec import Codec
from .consts import (
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BlkifAbi,
)

blkif_segment = Struct(
    "gref" / Int32ul,
    "first_sect" / Int8ul,
    "last_sect" / Int8ul,
    Padding(2),
)


def _pad(abi: BlkifAbi, n: int) -> list:
    """Padding that exists only where u64 is 8-aligned (x86_64)."""
    return [Padding(n)] if abi is BlkifAbi.X86_64 else []


@dataclass(frozen=True)
class BlkifLayouts:
    abi: BlkifAbi
    request: Struct  # read / write / barrier / flush
    discard: Struct
    indirect: Struct
    response: Struct
    entry_size: int  # sizeof(union blkif_sring_entry)


def _build(abi: BlkifAbi) -> BlkifLayouts:
    request = Struct(
        "operation" / Int8ul,
        "nr_segments" / Int8ul,
        "handle" / Int16ul,
        *_pad(abi, 4),
        "id" / Int64ul,
        "sector_number" / Int64ul,
        "seg" / Array(BLKIF_MAX_SEGMENTS_PER_REQUEST, blkif_segment),
    )
    discard = Struct(
        "operation" / Int8ul,
        "flag" / Int8ul,
        "handle" / Int16ul,
        *_pad(abi, 4),
        "id" / Int64ul,
        "sector_number" / Int64ul,
        "nr_sectors" / Int64ul,
    )
    # x86_64: the u64 id forces 4 bytes after nr_segments and the struct to round up to 64;
    # x86_32 declares an explicit trailing u64 pad to reach the same 64 bytes.
    indirect = Struct(
        "operation" / Int8ul,
        "indirect_op" / Int8ul,
        "nr_segments" / Int16ul,
        *_pad(abi, 4),
        "id" / Int64ul,
        "sector_number" / Int64ul,
        "handle" / Int16ul,
        Padding(2),
        "indirect_grefs" / Array(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, Int32ul),
        Padding(4 if abi is BlkifAbi.X86_64 else 8),
    )
    response = Struct(
        "id" / Int64ul,
        "operation" / Int8ul,
        Padding(1),
        "status" / Int16sl,
        *_pad(abi, 4),
    )
    entry = max(s.sizeof() for s in (request, discard, indirect, response))
    return BlkifLayouts(abi, request, discard, indirect, response, entry)


BLKIF = {abi: _build(abi) for abi in BlkifAbi}


@dataclass(frozen=True)
class BlkifCodecs:
    """The hot-path struct codecs of one ABI, derived from its construct layouts."""

    abi: BlkifAbi
    request: Codec
    discard: Codec
    indirect: Codec
    response: Codec
    segment: Codec
    entry_size: int


def _codecs(layouts: BlkifLayouts) -> BlkifCodecs:
    return BlkifCodecs(layouts.abi, Codec(layouts.request), Codec(layouts.discard),
                       Codec(layouts.indirect), Codec(layouts.response), Codec(blkif_segment),
                       layouts.entry_size)


BLKIF_CODECS = {abi: _codecs(layouts) for abi, layouts in BLKIF.items()}
