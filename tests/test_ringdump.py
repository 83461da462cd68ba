"""`backendd ring-dump`'s decoder on real ring bytes written by the ring code."""

from backendd.ringdump import decode
from rings.blkif import BLKIF
from rings.consts import BlkifAbi, BlkifOp
from rings.netif import TX_ENTRY_SIZE, netif_tx_request
from rings.ring import FrontRing, SharedRing

PAGE = 4096


def blk_ring(abi: BlkifAbi) -> tuple[bytearray, FrontRing]:
    area = bytearray(PAGE)
    shared = SharedRing(memoryview(area), BLKIF[abi].entry_size)
    shared.init()
    return area, FrontRing(shared)


def test_blkif_requests_decode_with_their_fields() -> None:
    for abi in BlkifAbi:
        area, front = blk_ring(abi)
        layouts = BLKIF[abi]
        seg = [dict(gref=100 + i, first_sect=0, last_sect=7) for i in range(11)]
        front.put_request(layouts.request.build(dict(
            operation=BlkifOp.READ, nr_segments=2, handle=0, id=0xABC,
            sector_number=2048, seg=seg)))
        front.put_request(layouts.discard.build(dict(
            operation=BlkifOp.DISCARD, flag=0, handle=0, id=7, sector_number=8,
            nr_sectors=16)))
        front.push_requests()
        lines = decode(f"blkif-{abi.name.lower()}", bytes(area), PAGE, slots=2)
        assert lines[0].startswith(f"layout=blkif-{abi.name.lower()} entries=32 req_prod=2")
        assert "outstanding=2" in lines[0]
        req = [line for line in lines if line.startswith("  req")]
        assert "id=2748" in req[0] and "sector_number=2048" in req[0]
        # Only the two segments the request claims are shown.
        assert "gref=100" in req[0] and "gref=101" in req[0] and "gref=102" not in req[0]
        assert "nr_sectors=16" in req[1]


def test_netif_tx_and_a_truncated_dump() -> None:
    area = bytearray(PAGE)
    shared = SharedRing(memoryview(area), TX_ENTRY_SIZE)
    shared.init()
    front = FrontRing(shared)
    front.put_request(netif_tx_request.build(dict(gref=9, offset=64, flags=0, id=3, size=60)))
    front.push_requests()
    lines = decode("netif-tx", bytes(area), PAGE, slots=1)
    assert "gref=9" in lines[2] and "size=60" in lines[2]
    # A dump cut after the header still describes the header and says what is missing.
    lines = decode("netif-tx", bytes(area[:64]), PAGE, slots=1)
    assert "not in the dump" in lines[2]
