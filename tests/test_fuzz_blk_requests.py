"""Random ring slots into the pure blkif request parser, for both guest ABIs and random
disk geometries: the only failure is BadRequest (with the slot's own id and an ERROR or
EOPNOTSUPP status), and every accepted request keeps within its bounds: segments inside
their page and aligned, the sector range inside the disk, segment counts within limits,
no write to a read-only disk, indirect pages matching the segment count."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples

from backendd.devices.blk.request import (
    BadRequest,
    Geometry,
    Request,
    parse_indirect_segments,
    parse_request,
)
from rings.blkif import BLKIF_CODECS
from rings.consts import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_SEGMENTS_PER_INDIRECT_FRAME,
    SECTORS_PER_PAGE,
    BlkifAbi,
    BlkifOp,
    BlkifStatus,
)

ENTRY = BLKIF_CODECS[BlkifAbi.X86_64].entry_size
ID_OFFSET = {BlkifAbi.X86_64: 8, BlkifAbi.X86_32: 4}
DIRECT_OPS = (BlkifOp.READ, BlkifOp.WRITE, BlkifOp.WRITE_BARRIER, BlkifOp.FLUSH_DISKCACHE)
U64 = (1 << 64) - 1

geometries = st.builds(
    Geometry,
    sectors=st.one_of(st.sampled_from([0, 1, 8, 2048, 1 << 21, U64]), st.integers(0, U64)),
    sector_size=st.sampled_from([512, 4096]),
    readonly=st.booleans(), discard=st.booleans(), discard_secure=st.booleans(),
    max_indirect_segments=st.sampled_from([0, 1, 32, 256, 1024]))

segments = st.tuples(st.integers(0, (1 << 32) - 1),
                     st.one_of(st.integers(0, 8), st.integers(0, 255)),
                     st.one_of(st.integers(0, 8), st.integers(0, 255)))
sectors = st.one_of(st.integers(0, 4096), st.integers(0, U64), st.sampled_from([U64, U64 - 7]))


@st.composite
def slots(draw, abi: BlkifAbi) -> bytes:
    """A slot as the guest may fill it: pure noise, or a request of each kind with
    random (often nearly valid) fields over noise."""
    codecs = BLKIF_CODECS[abi]
    noise = draw(st.binary(min_size=ENTRY, max_size=ENTRY))
    kind = draw(st.sampled_from(["noise", "direct", "indirect", "discard"]))
    rid = draw(st.integers(0, U64))
    sector = draw(sectors)
    if kind == "direct":
        op = draw(st.one_of(st.sampled_from(DIRECT_OPS), st.integers(0, 255)))
        segs = draw(st.lists(segments, max_size=BLKIF_MAX_SEGMENTS_PER_REQUEST))
        nseg = draw(st.one_of(st.just(len(segs)), st.integers(0, 255)))
        flat = [x for s in segs + [(0, 0, 0)] * (11 - len(segs)) for x in s]
        body = codecs.request.struct.pack(op, nseg, 0, rid, sector, *flat)
    elif kind == "indirect":
        inner = draw(st.one_of(st.sampled_from([BlkifOp.READ, BlkifOp.WRITE]),
                               st.integers(0, 255)))
        nseg = draw(st.one_of(st.integers(0, 1100), st.integers(0, 0xFFFF)))
        grefs = draw(st.lists(st.integers(0, (1 << 32) - 1), min_size=8, max_size=8))
        body = codecs.indirect.struct.pack(BlkifOp.INDIRECT, inner, nseg, rid, sector, 0,
                                           *grefs)
    elif kind == "discard":
        flag = draw(st.integers(0, 255))
        n = draw(st.one_of(st.integers(0, 4096), st.integers(0, U64)))
        body = codecs.discard.struct.pack(BlkifOp.DISCARD, flag, 0, rid, sector, n)
    else:
        return noise
    return body + noise[len(body):]


def check_segments(req: Request, geo: Geometry) -> None:
    align = geo.sector_size // 512
    total = 0
    for _gref, first, last in req.segments:
        assert 0 <= first <= last < SECTORS_PER_PAGE
        assert first % align == 0 and (last - first + 1) % align == 0
        total += last - first + 1
    assert req.nr_sectors == total
    if total:
        assert req.sector % align == 0
        assert req.sector + total <= geo.sectors


def check_slot(raw: bytes, abi: BlkifAbi, geo: Geometry, pages: list[bytes]) -> Request | None:
    """Parse one slot (and, for an indirect request, its pages) and check the result."""
    codecs = BLKIF_CODECS[abi]
    (rid,) = struct.unpack_from("<Q", raw, ID_OFFSET[abi])
    try:
        req = parse_request(raw, codecs, geo)
        if req.indirect_grefs:
            assert raw[0] == BlkifOp.INDIRECT
            assert req.op in (BlkifOp.READ, BlkifOp.WRITE)
            assert 1 <= req.nr_segments <= geo.max_indirect_segments
            npages = -(-req.nr_segments // BLKIF_SEGMENTS_PER_INDIRECT_FRAME)
            assert len(req.indirect_grefs) == npages
            req = parse_indirect_segments(req, pages[:npages], codecs, geo)
            assert len(req.segments) == req.nr_segments
    except BadRequest as bad:
        assert bad.id == rid
        assert bad.status in (BlkifStatus.ERROR, BlkifStatus.EOPNOTSUPP)
        assert bad.op == (raw[1] if raw[0] == BlkifOp.INDIRECT else raw[0])
        return None
    assert req.id == rid
    if req.writes:
        assert not geo.readonly
    if req.op == BlkifOp.DISCARD:
        assert geo.discard and (geo.discard_secure or not req.secure)
        assert req.segments == []
        if req.nr_sectors:
            assert req.sector + req.nr_sectors <= geo.sectors
        return req
    if not req.indirect_grefs:
        assert req.op in DIRECT_OPS
        assert req.nr_segments == len(req.segments) <= BLKIF_MAX_SEGMENTS_PER_REQUEST
        if req.nr_segments == 0:
            assert req.op in (BlkifOp.WRITE_BARRIER, BlkifOp.FLUSH_DISKCACHE)
    check_segments(req, geo)
    return req


def _page(pattern: bytes) -> bytes:
    """A whole indirect page, tiled from a short pattern (keeps examples small)."""
    return (pattern * (4096 // len(pattern) + 1))[:4096]


indirect_pages = st.lists(
    st.one_of(st.binary(min_size=1, max_size=64),
              st.lists(segments, min_size=1, max_size=4).map(
                  lambda segs: b"".join(struct.pack("<IBBxx", *s) for s in segs))).map(_page),
    min_size=8, max_size=8)


@settings(max_examples=examples(200), deadline=None)
@given(raw=slots(BlkifAbi.X86_64), geo=geometries, pages=indirect_pages)
def test_random_slots_x86_64(raw, geo, pages):
    check_slot(raw, BlkifAbi.X86_64, geo, pages)


@settings(max_examples=examples(200), deadline=None)
@given(raw=slots(BlkifAbi.X86_32), geo=geometries, pages=indirect_pages)
def test_random_slots_x86_32(raw, geo, pages):
    check_slot(raw, BlkifAbi.X86_32, geo, pages)


def test_the_generator_reaches_accepted_requests_of_every_kind():
    """Guards the fuzzing above against testing only refusals."""
    import random

    rng = random.Random(5)
    geo = Geometry(sectors=1 << 21, discard=True, discard_secure=True)
    seen = set()
    for _ in range(3000):
        abi = rng.choice(list(BlkifAbi))
        raw = _quick_slot(rng, abi)
        pages = [_quick_page(rng) for _ in range(8)]
        req = check_slot(raw, abi, geo, pages)
        if req is not None:
            seen.add("indirect" if req.indirect_grefs else int(req.op))
    assert seen >= {"indirect", 0, 1, 2, 3, 5}


def _quick_slot(rng, abi: BlkifAbi) -> bytes:
    codecs = BLKIF_CODECS[abi]
    rid, sector = rng.getrandbits(64), rng.randrange(4096)
    kind = rng.randrange(3)
    if kind == 0:
        nseg = rng.randrange(12)
        segs = [(rng.getrandbits(32), 0, 7) for _ in range(nseg)] + [(0, 0, 0)] * (11 - nseg)
        body = codecs.request.struct.pack(rng.randrange(4), nseg, 0, rid, sector & ~7,
                                          *[x for s in segs for x in s])
    elif kind == 1:
        body = codecs.indirect.struct.pack(BlkifOp.INDIRECT, rng.randrange(2),
                                           rng.randrange(1, 300), rid, sector & ~7, 0,
                                           *[1] * 8)
    else:
        body = codecs.discard.struct.pack(BlkifOp.DISCARD, 0, 0, rid, sector, 8)
    return body + bytes(ENTRY - len(body))


def _quick_page(rng) -> bytes:
    return struct.pack("<IBBxx", rng.getrandbits(32), 0, 7) * 512
