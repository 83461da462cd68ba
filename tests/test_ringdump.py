"""`backendd ring-dump`'s decoder on real ring bytes written by the ring code: the live
window (rsp_prod..req_prod) is decoded as requests, answered slots as responses, and
slots overwritten since are never decoded as what they once held."""

import json

from backendd.ringdump import decode, describe
from rings.blkif import BLKIF
from rings.consts import BlkifAbi, BlkifOp, NetCtrlStatus, NetCtrlType
from rings.netif import (
    CTRL_ENTRY_SIZE,
    CTRL_REQUEST,
    CTRL_RESPONSE,
    TX_ENTRY_SIZE,
    netif_tx_request,
)
from rings.ring import BackRing, FrontRing, SharedRing

PAGE = 4096


def blk_ring(abi: BlkifAbi) -> tuple[bytearray, FrontRing, BackRing]:
    area = bytearray(PAGE)
    shared = SharedRing(memoryview(area), BLKIF[abi].entry_size)
    shared.init()
    return area, FrontRing(shared), BackRing(shared)


def read(abi: BlkifAbi, req_id: int, grefs: list[int]) -> bytes:
    seg = [dict(gref=g, first_sect=0, last_sect=7) for g in grefs]
    seg += [dict(gref=0xDEAD, first_sect=1, last_sect=2)] * (11 - len(seg))
    return BLKIF[abi].request.build(dict(operation=BlkifOp.READ, nr_segments=len(grefs),
                                         handle=0, id=req_id, sector_number=2048 + req_id,
                                         seg=seg))


def test_live_window_pending_requests_and_answered_responses() -> None:
    """Five requests, three answered: slots 0-2 hold responses, 3-4 are pending."""
    for abi in BlkifAbi:
        area, front, back = blk_ring(abi)
        layouts = BLKIF[abi]
        for i in range(5):
            front.put_request(read(abi, 0x100 + i, [100 + i, 200 + i]))
        front.push_requests()
        back.take_requests(5)
        for i in range(3):
            back.put_response(layouts.response.build(dict(id=0x100 + i, operation=0,
                                                          status=0)))
        back.push_responses()
        desc = describe(f"blkif-{abi.name.lower()}", bytes(area), PAGE, slots=8)
        assert (desc["req_prod"], desc["rsp_prod"], desc["pending"]) == (5, 3, 2)
        states = [(e["index"], e["state"]) for e in desc["slots"]]
        assert states == [(0, "answered"), (1, "answered"), (2, "answered"),
                          (3, "pending"), (4, "pending")]
        # Answered slots are decoded as responses, not as the requests they overwrote.
        assert desc["slots"][0]["fields"] == {"id": 0x100, "operation": 0, "status": 0}
        pending = desc["slots"][3]
        assert pending["fields"]["id"] == 0x103
        # Only the segments the request claims, readable: gref:first-last.
        assert "seg=[103:0-7 203:0-7]" in pending["text"]
        assert "operation=read(0)" in pending["text"]
        assert "57005" not in pending["text"]  # 0xDEAD, an unclaimed segment slot
        lines = decode(f"blkif-{abi.name.lower()}", bytes(area), PAGE, slots=2)
        assert lines[1] == "pending (rsp_prod..req_prod): 2"
        rows = [line.split() for line in lines[3:]]
        assert [(r[0], r[2]) for r in rows] == [("1", "answered"), ("2", "answered"),
                                                ("3", "pending"), ("4", "pending")]
        assert "status=okay(0)" in lines[3]
        # The whole description is JSON as it stands.
        assert json.loads(json.dumps(desc)) == desc


def test_wrapped_ring_never_shows_overwritten_slots() -> None:
    """40 requests through a 32-slot ring, all answered, then two pending: the pending
    ones are slots 8 and 9 (indices 40, 41); no slot is shown twice."""
    abi = BlkifAbi.X86_64
    area, front, back = blk_ring(abi)
    layouts = BLKIF[abi]
    for i in range(40):
        front.put_request(read(abi, i, [i]))
        front.push_requests()
        back.take_requests(1)
        back.put_response(layouts.response.build(dict(id=i, operation=0, status=0)))
        back.push_responses()
        front.take_responses()
    for i in (40, 41):
        front.put_request(layouts.discard.build(dict(operation=BlkifOp.DISCARD, flag=0,
                                                     handle=0, id=i, sector_number=8,
                                                     nr_sectors=16)))
    front.push_requests()
    desc = describe("blkif-x86_64", bytes(area), PAGE, slots=100)
    pending = [e for e in desc["slots"] if e["state"] == "pending"]
    answered = [e for e in desc["slots"] if e["state"] == "answered"]
    assert [(e["index"], e["slot"]) for e in pending] == [(40, 8), (41, 9)]
    assert "nr_sectors=16" in pending[0]["text"] and "operation=discard(5)" in pending[0]["text"]
    # 32 slots in all: 30 answered ones fit beside the two pending.
    assert [e["index"] for e in answered] == list(range(10, 40))
    assert len({e["slot"] for e in desc["slots"]}) == 32


def test_corrupt_indices_are_reported_not_decoded() -> None:
    area, _, _ = blk_ring(BlkifAbi.X86_64)
    area[0:4] = (1000).to_bytes(4, "little")  # req_prod far past rsp_prod + 32
    desc = describe("blkif-x86_64", bytes(area), PAGE)
    assert desc["slots"] == [] and "exceeds the 32 slots" in desc["corrupt"]
    assert any(line.startswith("ring corrupt") for line in decode("blkif-x86_64",
                                                                  bytes(area), PAGE))


def test_netif_tx_and_a_truncated_dump() -> None:
    area = bytearray(PAGE)
    shared = SharedRing(memoryview(area), TX_ENTRY_SIZE)
    shared.init()
    front = FrontRing(shared)
    front.put_request(netif_tx_request.build(dict(gref=9, offset=64, flags=0, id=3, size=60)))
    front.push_requests()
    desc = describe("netif-tx", bytes(area), PAGE, slots=1)
    assert desc["slots"][0]["state"] == "pending"
    assert "gref=9" in desc["slots"][0]["text"] and "size=60" in desc["slots"][0]["text"]
    # A dump cut after the header still describes the header and says what is missing.
    lines = decode("netif-tx", bytes(area[:64]), PAGE, slots=1)
    assert "not in the dump" in lines[-1]


def test_netif_control_ring_names_types_and_statuses() -> None:
    area = bytearray(PAGE)
    shared = SharedRing(memoryview(area), CTRL_ENTRY_SIZE)
    shared.init()
    front = FrontRing(shared)
    front.put_request(CTRL_REQUEST.pack(7, NetCtrlType.SET_HASH_KEY, 12, 40, 0))
    front.put_request(CTRL_REQUEST.pack(8, NetCtrlType.GET_HASH_MAPPING_SIZE, 0, 0, 0))
    front.push_requests()
    back = BackRing.attach(shared)
    back.take_requests(1)
    back.put_response(CTRL_RESPONSE.pack(7, NetCtrlType.SET_HASH_KEY,
                                         NetCtrlStatus.INVALID_PARAMETER, 0) + bytes(4))
    back.push_responses()
    desc = describe("netifctrl", bytes(area), PAGE, slots=1)
    texts = [s["text"] for s in desc["slots"]]
    assert texts == ["id=7 type=set_hash_key(3) status=invalid_parameter(2) data=0",
                     "id=8 type=get_hash_mapping_size(4) data=[0 0 0]"]  # still pending
