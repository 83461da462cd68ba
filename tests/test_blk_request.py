"""The pure blkif request checks: every rule, on both guest ABIs."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples

from backendd.devices.blk.request import (
    BadRequest,
    Geometry,
    Request,
    pack_response,
    parse_indirect_segments,
    parse_request,
)
from rings.blkif import BLKIF_CODECS
from rings.consts import BlkifAbi, BlkifOp, BlkifStatus

ABIS = list(BlkifAbi)
DISK = Geometry(sectors=1 << 20, discard=True)


def entry(abi: BlkifAbi, body: bytes) -> bytes:
    """A slot as the ring code copies it: the request padded to the entry size with
    junk, since a slot keeps whatever was there before."""
    size = BLKIF_CODECS[abi].entry_size
    return body + bytes([0xA5]) * (size - len(body))


def rw(abi, op, rid, sector, segs) -> bytes:
    flat = []
    for i in range(11):
        flat += list(segs[i]) if i < len(segs) else [0, 0, 0]
    return entry(abi, BLKIF_CODECS[abi].request.pack(op, len(segs), 0, rid, sector, *flat))


def indirect(abi, inner, rid, sector, nseg, grefs=(100, 101, 102, 0, 0, 0, 0, 0)) -> bytes:
    return entry(abi, BLKIF_CODECS[abi].indirect.pack(BlkifOp.INDIRECT, inner, nseg, rid,
                                                      sector, 0, *grefs))


def discard(abi, rid, sector, n, flag=0) -> bytes:
    return entry(abi, BLKIF_CODECS[abi].discard.pack(BlkifOp.DISCARD, flag, 0, rid, sector, n))


def refused(raw: bytes, abi: BlkifAbi, geo: Geometry = DISK) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse_request(raw, BLKIF_CODECS[abi], geo)
    return info.value


@pytest.mark.parametrize("abi", ABIS)
def test_good_read_and_write(abi):
    segs = [(10, 0, 7), (11, 3, 5), (12, 7, 7)]
    for op in (BlkifOp.READ, BlkifOp.WRITE):
        req = parse_request(rw(abi, op, 0xDEADBEEF01, 64, segs), BLKIF_CODECS[abi], DISK)
        assert (req.id, req.op, req.sector, req.segments) == (0xDEADBEEF01, op, 64, segs)
        assert req.nr_sectors == 8 + 3 + 1
        assert req.writes is (op == BlkifOp.WRITE)


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("op", [BlkifOp.READ, BlkifOp.WRITE])
def test_zero_segments_only_for_flush(abi, op):
    bad = refused(rw(abi, op, 7, 0, []), abi)
    assert (bad.id, bad.op, bad.status) == (7, op, BlkifStatus.ERROR)
    for flush in (BlkifOp.FLUSH_DISKCACHE, BlkifOp.WRITE_BARRIER):
        req = parse_request(rw(abi, flush, 8, 0, []), BLKIF_CODECS[abi], DISK)
        assert (req.op, req.nr_sectors, req.segments) == (flush, 0, [])


@pytest.mark.parametrize("abi", ABIS)
def test_flush_may_carry_data(abi):
    req = parse_request(rw(abi, BlkifOp.WRITE_BARRIER, 1, 8, [(9, 0, 7)]),
                        BLKIF_CODECS[abi], DISK)
    assert req.nr_sectors == 8 and req.writes


@pytest.mark.parametrize("abi", ABIS)
def test_too_many_direct_segments(abi):
    raw = bytearray(rw(abi, BlkifOp.READ, 3, 0, [(1, 0, 7)] * 11))
    raw[1] = 12  # nr_segments beyond BLKIF_MAX_SEGMENTS_PER_REQUEST
    bad = refused(bytes(raw), abi)
    assert (bad.id, bad.status) == (3, BlkifStatus.ERROR)
    assert "12 segments" in bad.reason


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize(("first", "last"), [(0, 8), (5, 4), (255, 255), (8, 8)])
def test_segment_outside_page(abi, first, last):
    bad = refused(rw(abi, BlkifOp.WRITE, 4, 0, [(1, 0, 7), (2, first, last)]), abi)
    assert bad.status == BlkifStatus.ERROR and "segment 1" in bad.reason


@pytest.mark.parametrize("abi", ABIS)
def test_range_inside_disk(abi):
    geo = Geometry(sectors=100)
    assert parse_request(rw(abi, BlkifOp.READ, 1, 92, [(1, 0, 7)]),
                         BLKIF_CODECS[abi], geo).nr_sectors == 8
    bad = refused(rw(abi, BlkifOp.READ, 1, 93, [(1, 0, 7)]), abi, geo)
    assert "beyond the disk" in bad.reason
    bad = refused(rw(abi, BlkifOp.READ, 1, (1 << 64) - 4, [(1, 0, 7)]), abi, geo)
    assert "wrap" in bad.reason


@pytest.mark.parametrize("abi", ABIS)
def test_read_only_disk(abi):
    geo = Geometry(sectors=1000, readonly=True, discard=True)
    codecs = BLKIF_CODECS[abi]
    req = parse_request(rw(abi, BlkifOp.READ, 1, 0, [(1, 0, 7)]), codecs, geo)
    assert (req.id, req.op, req.sector, req.nr_sectors, req.writes) == (
        1, BlkifOp.READ, 0, 8, False)
    for raw in (rw(abi, BlkifOp.WRITE, 2, 0, [(1, 0, 7)]),
                rw(abi, BlkifOp.FLUSH_DISKCACHE, 2, 0, []),
                rw(abi, BlkifOp.WRITE_BARRIER, 2, 0, []),
                indirect(abi, BlkifOp.WRITE, 2, 0, 20),
                discard(abi, 2, 0, 8)):
        bad = refused(raw, abi, geo)
        assert (bad.id, bad.status) == (2, BlkifStatus.ERROR)
        assert "read-only" in bad.reason


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("op", [BlkifOp.RESERVED_1, 7, 0x80, 0xFF])
def test_unknown_operation_is_eopnotsupp(abi, op):
    raw = rw(abi, BlkifOp.READ, 0x1122334455, 0, [(1, 0, 7)])
    bad = refused(bytes([op]) + raw[1:], abi)
    assert (bad.id, bad.op, bad.status) == (0x1122334455, op, BlkifStatus.EOPNOTSUPP)


@pytest.mark.parametrize("abi", ABIS)
def test_indirect_header(abi):
    codecs = BLKIF_CODECS[abi]
    req = parse_request(indirect(abi, BlkifOp.WRITE, 9, 16, 256), codecs, DISK)
    assert (req.id, req.op, req.nr_segments, req.indirect_grefs) == (9, BlkifOp.WRITE, 256,
                                                                    (100,))
    wide = Geometry(sectors=1 << 30, max_indirect_segments=1024)
    req = parse_request(indirect(abi, BlkifOp.READ, 9, 16, 513), codecs, wide)
    assert req.indirect_grefs == (100, 101)  # only as many pages as the segments need
    for nseg in (0, 257, 0xFFFF):
        bad = refused(indirect(abi, BlkifOp.READ, 9, 0, nseg), abi)
        assert (bad.id, bad.op, bad.status) == (9, BlkifOp.READ, BlkifStatus.ERROR)
    for inner in (BlkifOp.FLUSH_DISKCACHE, BlkifOp.INDIRECT, BlkifOp.DISCARD, 99):
        bad = refused(indirect(abi, inner, 10, 0, 8), abi)
        assert (bad.id, bad.op, bad.status) == (10, inner, BlkifStatus.ERROR)


def seg_page(segs) -> bytes:
    page = bytearray(b"\xee" * 4096)  # the rest of the page is whatever the guest left
    for i, (gref, first, last) in enumerate(segs):
        BLKIF_CODECS[BlkifAbi.X86_64].segment.pack_into(page, i * 8, gref, first, last)
    return bytes(page)


@pytest.mark.parametrize("abi", ABIS)
def test_indirect_segments(abi):
    codecs = BLKIF_CODECS[abi]
    rng = random.Random(5)
    segs = [(rng.getrandbits(32), f, rng.randint(f, 7)) for f in
            (rng.randint(0, 7) for _ in range(200))]
    req = parse_request(indirect(abi, BlkifOp.READ, 1, 0, 200), codecs, DISK)
    parse_indirect_segments(req, [seg_page(segs)], codecs, DISK)
    assert req.segments == segs
    assert req.nr_sectors == sum(last - first + 1 for _, first, last in segs)

    bad_segs = [*segs[:150], (1, 6, 5), *segs[151:]]
    req = parse_request(indirect(abi, BlkifOp.READ, 2, 0, 200), codecs, DISK)
    with pytest.raises(BadRequest, match="segment 150"):
        parse_indirect_segments(req, [seg_page(bad_segs)], codecs, DISK)

    geo = Geometry(sectors=1000)
    req = parse_request(indirect(abi, BlkifOp.READ, 3, 900, 200), codecs, geo)
    with pytest.raises(BadRequest, match="beyond the disk"):
        parse_indirect_segments(req, [seg_page([(1, 0, 7)] * 200)], codecs, geo)


@pytest.mark.parametrize("abi", ABIS)
def test_4096_byte_sectors_need_whole_blocks(abi):
    geo = Geometry(sectors=1 << 20, sector_size=4096)
    codecs = BLKIF_CODECS[abi]
    req = parse_request(rw(abi, BlkifOp.READ, 1, 8, [(1, 0, 7)] * 3), codecs, geo)
    assert (req.id, req.sector, req.nr_sectors, req.segments) == (1, 8, 24, [(1, 0, 7)] * 3)
    for sector, seg in ((4, (1, 0, 7)), (8, (1, 0, 3)), (8, (1, 4, 7)), (8, (1, 1, 7))):
        bad = refused(rw(abi, BlkifOp.READ, 1, sector, [seg]), abi, geo)
        assert "aligned" in bad.reason


@pytest.mark.parametrize("abi", ABIS)
def test_discard(abi):
    codecs = BLKIF_CODECS[abi]
    req = parse_request(discard(abi, 5, 100, 50), codecs, DISK)
    assert (req.id, req.op, req.sector, req.nr_sectors, req.secure) == (5, BlkifOp.DISCARD,
                                                                       100, 50, False)
    assert refused(discard(abi, 5, 0, 8, flag=1), abi).status == BlkifStatus.EOPNOTSUPP
    secure = Geometry(sectors=1 << 20, discard=True, discard_secure=True)
    assert parse_request(discard(abi, 5, 0, 8, flag=1), codecs, secure).secure
    no = Geometry(sectors=1 << 20)
    assert refused(discard(abi, 5, 0, 8), abi, no).status == BlkifStatus.EOPNOTSUPP
    assert "beyond" in refused(discard(abi, 5, (1 << 20) - 7, 8), abi).reason
    assert "wrap" in refused(discard(abi, 5, 1, (1 << 64) - 1), abi).reason


@pytest.mark.parametrize("abi", ABIS)
def test_response_padding_is_zero(abi):
    raw = pack_response(BLKIF_CODECS[abi], (1 << 64) - 1, 0xFF, BlkifStatus.EOPNOTSUPP)
    if abi is BlkifAbi.X86_64:
        assert raw == b"\xff" * 8 + b"\xff\x00" + b"\xfe\xff" + bytes(4)
    else:
        assert raw == b"\xff" * 8 + b"\xff\x00" + b"\xfe\xff"


@settings(max_examples=examples(400), deadline=None)
@given(abi=st.sampled_from(ABIS), data=st.binary(min_size=112, max_size=112),
       op=st.integers(0, 8), readonly=st.booleans(), sector_size=st.sampled_from([512, 4096]))
def test_any_slot_is_a_request_or_a_bad_request(abi, data, op, readonly, sector_size):
    """Random slot contents: a validated request whose every field is in range, or a
    BadRequest carrying the slot's id; nothing else escapes."""
    codecs = BLKIF_CODECS[abi]
    raw = bytes([op]) + data[1:codecs.entry_size]
    geo = Geometry(sectors=1 << 24, sector_size=sector_size, readonly=readonly, discard=True)
    rid = codecs.discard.unpack_from(raw)[3]
    try:
        req = parse_request(raw, codecs, geo)
    except BadRequest as bad:
        assert bad.id == rid
        return
    assert isinstance(req, Request) and req.id == rid
    if req.indirect_grefs:
        return
    if req.nr_sectors:  # a flush without data names no range
        assert req.sector + req.nr_sectors <= geo.sectors
    assert not (readonly and req.writes)
    for _gref, first, last in req.segments:
        assert 0 <= first <= last <= 7
