"""Parsing and validating blkif requests: pure, no I/O.

Every function here works on a private `bytes` copy of a ring slot (or of an indirect
segment page), taken once by the ring code, so the guest cannot change a field between
our check and our use (XSA-155). The checks are the ones xen-blkback makes: segment
counts, sector ranges inside a page, the request's sector range inside the disk with
no wrap, logical-block alignment, no writes to a read-only disk, and known operations.

A request that fails a check raises `BadRequest`, carrying the id and operation to answer
with and the status (ERROR, or EOPNOTSUPP for an operation we do not do): a bad request
always gets a response for its id and never stops the ring.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rings.blkif import BlkifCodecs
from rings.consts import (
    BLKIF_DISCARD_SECURE,
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_SEGMENTS_PER_INDIRECT_FRAME,
    SECTOR_SIZE,
    SECTORS_PER_PAGE,
    BlkifOp,
    BlkifStatus,
)

MAX_INDIRECT_SEGMENTS = 256  # what we advertise, as Linux blkback does
SEGMENT_SIZE = 8  # sizeof(struct blkif_request_segment)
_RW_OPS = (BlkifOp.READ, BlkifOp.WRITE, BlkifOp.WRITE_BARRIER, BlkifOp.FLUSH_DISKCACHE)
_FLUSH_OPS = (BlkifOp.WRITE_BARRIER, BlkifOp.FLUSH_DISKCACHE)
_U64 = 1 << 64


@dataclass(frozen=True, slots=True)
class Geometry:
    """What the validation needs to know about the disk."""

    sectors: int  # size in 512-byte units
    sector_size: int = SECTOR_SIZE  # logical block size: 512 or 4096
    readonly: bool = False
    discard: bool = False
    discard_secure: bool = False
    max_indirect_segments: int = MAX_INDIRECT_SEGMENTS


class BadRequest(Exception):
    """A request to answer with `status` and do nothing else."""

    def __init__(self, rid: int, op: int, status: BlkifStatus, reason: str) -> None:
        super().__init__(reason)
        self.id = rid
        self.op = op
        self.status = status
        self.reason = reason


Segment = tuple[int, int, int]  # (gref, first_sect, last_sect)


@dataclass(slots=True)
class Request:
    """A validated request. `op` is the operation to perform and to answer with (for an
    indirect request, its inner READ or WRITE). An indirect request comes out of
    `parse_request` with `indirect_grefs` set and no segments yet: its segments live in
    granted pages the caller copies and hands to `parse_indirect_segments`."""

    id: int
    op: int
    sector: int
    nr_segments: int = 0
    segments: list[Segment] = field(default_factory=list)
    indirect_grefs: tuple[int, ...] = ()
    nr_sectors: int = 0  # total 512-byte sectors moved (or discarded)
    secure: bool = False  # discard: BLKIF_DISCARD_SECURE

    @property
    def writes(self) -> bool:
        return self.op != BlkifOp.READ

    @property
    def nbytes(self) -> int:
        return self.nr_sectors * SECTOR_SIZE


def pack_response(codecs: BlkifCodecs, rid: int, op: int, status: int) -> bytes:
    """A whole response slot: struct's pad bytes are zeros, so no stale byte leaks
    (XSA-216)."""
    return codecs.response.pack(rid, op, status)


def parse_request(raw: bytes, codecs: BlkifCodecs, geo: Geometry) -> Request:
    """Decode and check one request slot (the private copy)."""
    op = raw[0]
    if op in _RW_OPS:
        return _parse_direct(raw, codecs, geo)
    if op == BlkifOp.INDIRECT:
        return _parse_indirect(raw, codecs, geo)
    if op == BlkifOp.DISCARD:
        return _parse_discard(raw, codecs, geo)
    # Every request starts with operation, then id at the same offset in each variant.
    rid = codecs.discard.unpack_from(raw)[3]
    raise BadRequest(rid, op, BlkifStatus.EOPNOTSUPP, f"unknown operation {op}")


def _parse_direct(raw: bytes, codecs: BlkifCodecs, geo: Geometry) -> Request:
    f = codecs.request.unpack_from(raw)
    op, nseg, rid, sector = f[0], f[1], f[3], f[4]
    if nseg == 0 and op not in _FLUSH_OPS:
        raise BadRequest(rid, op, BlkifStatus.ERROR, "no segments")
    if nseg > BLKIF_MAX_SEGMENTS_PER_REQUEST:
        raise BadRequest(rid, op, BlkifStatus.ERROR,
                         f"{nseg} segments (at most {BLKIF_MAX_SEGMENTS_PER_REQUEST})")
    segments = [(f[5 + 3 * i], f[6 + 3 * i], f[7 + 3 * i]) for i in range(nseg)]
    req = Request(rid, op, sector, nseg, segments)
    _check_transfer(req, geo)
    return req


def _parse_indirect(raw: bytes, codecs: BlkifCodecs, geo: Geometry) -> Request:
    f = codecs.indirect.unpack_from(raw)
    inner, nseg, rid, sector = f[1], f[2], f[3], f[4]
    if inner not in (BlkifOp.READ, BlkifOp.WRITE):
        # blkback answers with the inner operation, as it would for a good request.
        raise BadRequest(rid, inner, BlkifStatus.ERROR, f"indirect operation {inner}")
    if nseg == 0 or nseg > geo.max_indirect_segments:
        raise BadRequest(rid, inner, BlkifStatus.ERROR,
                         f"{nseg} indirect segments (1..{geo.max_indirect_segments})")
    if inner == BlkifOp.WRITE and geo.readonly:
        raise BadRequest(rid, inner, BlkifStatus.ERROR, "write to a read-only disk")
    pages = -(-nseg // BLKIF_SEGMENTS_PER_INDIRECT_FRAME)
    if pages > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST:  # unreachable with our limit; kept as
        raise BadRequest(rid, inner, BlkifStatus.ERROR,  # the layout's own bound
                         f"{pages} indirect pages")
    grefs = f[6:6 + pages]
    return Request(rid, inner, sector, nseg, indirect_grefs=tuple(grefs))


def parse_indirect_segments(req: Request, pages: list[bytes], codecs: BlkifCodecs,
                            geo: Geometry) -> Request:
    """Fill in and check an indirect request's segments from private copies of its
    indirect pages (one `bytes` per gref in `req.indirect_grefs`)."""
    if len(pages) != len(req.indirect_grefs):
        raise ValueError("one page copy per indirect gref")
    unpack = codecs.segment.struct.iter_unpack
    left = req.nr_segments
    segments: list[Segment] = []
    for page in pages:
        n = min(left, BLKIF_SEGMENTS_PER_INDIRECT_FRAME)
        segments.extend(unpack(page[:n * SEGMENT_SIZE]))
        left -= n
    req.segments = segments
    _check_transfer(req, geo)
    return req


def _check_transfer(req: Request, geo: Geometry) -> None:
    """Segments inside their page, alignment, range inside the disk, write permission."""
    rid, op = req.id, req.op
    if req.op != BlkifOp.READ and geo.readonly:
        raise BadRequest(rid, op, BlkifStatus.ERROR, "write to a read-only disk")
    mask = geo.sector_size // SECTOR_SIZE - 1
    total = 0
    for i, (_gref, first, last) in enumerate(req.segments):
        if last >= SECTORS_PER_PAGE or last < first:
            raise BadRequest(rid, op, BlkifStatus.ERROR,
                             f"segment {i}: sectors {first}..{last} outside a page")
        nsec = last - first + 1
        if (first | nsec) & mask:
            raise BadRequest(rid, op, BlkifStatus.ERROR,
                             f"segment {i}: not aligned to {geo.sector_size}-byte sectors")
        total += nsec
    if total and req.sector & mask:  # a data-less flush names no sector
        raise BadRequest(rid, op, BlkifStatus.ERROR,
                         f"sector {req.sector} not aligned to {geo.sector_size}-byte sectors")
    _check_range(req, total, geo)
    req.nr_sectors = total


def _check_range(req: Request, nsectors: int, geo: Geometry) -> None:
    if not nsectors:
        return
    end = req.sector + nsectors
    if end >= _U64:  # would wrap as a u64 sector number in C
        raise BadRequest(req.id, req.op, BlkifStatus.ERROR,
                         f"sectors {req.sector}+{nsectors} wrap")
    if end > geo.sectors:
        raise BadRequest(req.id, req.op, BlkifStatus.ERROR,
                         f"sectors {req.sector}+{nsectors} beyond the disk ({geo.sectors})")


def _parse_discard(raw: bytes, codecs: BlkifCodecs, geo: Geometry) -> Request:
    op, flag, _handle, rid, sector, nsectors = codecs.discard.unpack_from(raw)
    secure = bool(flag & BLKIF_DISCARD_SECURE)
    if not geo.discard or (secure and not geo.discard_secure):
        raise BadRequest(rid, op, BlkifStatus.EOPNOTSUPP,
                         "secure discard not supported" if geo.discard else
                         "discard not supported")
    if geo.readonly:
        raise BadRequest(rid, op, BlkifStatus.ERROR, "discard on a read-only disk")
    req = Request(rid, op, sector, nr_sectors=nsectors, secure=secure)
    _check_range(req, nsectors, geo)
    return req
