"""Back-end and front-end ring halves over real shared memory (an anonymous mmap)."""

import mmap
import os
import random
import struct

import pytest

from rings import BLKIF, BLKIF_CODECS, BackRing, FrontRing, RingCorrupted, SharedRing
from rings.consts import BlkifAbi
from rings.netif import CTRL_ENTRY_SIZE, RX_ENTRY_SIZE, TX_ENTRY_SIZE
from rings.sring import REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD, ring_entries_for_pages

ABI = BlkifAbi.X86_64
CODECS = BLKIF_CODECS[ABI]


def make_ring(pages: int = 1, start: int = 0) -> tuple[SharedRing, FrontRing, BackRing]:
    area = mmap.mmap(-1, pages * 4096)
    shared = SharedRing(memoryview(area), BLKIF[ABI].entry_size)
    shared.init()
    for word in (REQ_PROD, RSP_PROD):
        shared.idx[word] = start & 0xFFFFFFFF
    for word in (REQ_EVENT, RSP_EVENT):
        shared.idx[word] = (start + 1) & 0xFFFFFFFF
    return shared, FrontRing(shared, start), BackRing(shared, start)


def request(rid: int) -> bytes:
    return CODECS.request.pack(0, 1, 0, rid, rid * 8, *([0, 0, 7] * 11))


def request_id(raw: bytes) -> int:
    return CODECS.request.unpack_from(raw)[3]


@pytest.mark.parametrize(("entry", "pages", "expected"), [
    (BLKIF[BlkifAbi.X86_64].entry_size, 1, 32), (BLKIF[BlkifAbi.X86_32].entry_size, 1, 32),
    (BLKIF[BlkifAbi.X86_64].entry_size, 16, 512), (BLKIF[BlkifAbi.X86_64].entry_size, 3, 64),
    (TX_ENTRY_SIZE, 1, 256), (RX_ENTRY_SIZE, 1, 256), (CTRL_ENTRY_SIZE, 1, 128),
])
def test_ring_sizes(entry: int, pages: int, expected: int) -> None:
    assert ring_entries_for_pages(pages, entry) == expected


@pytest.mark.parametrize("start", [0, 0xFFFFFFF0, 0x7FFFFFFA])
def test_requests_and_responses_flow_across_wraparound(start: int) -> None:
    shared, front, back = make_ring(start=start)
    rng = random.Random(start)
    next_id, answered = 0, []
    for _ in range(200):
        for _ in range(rng.randint(0, front.free_requests())):
            front.put_request(request(next_id))
            next_id += 1
        front.push_requests()
        for raw in back.take_requests(rng.randint(1, 40)):
            back.put_response(CODECS.response.pack(request_id(raw), 0, 0))
        back.push_responses()
        answered += [CODECS.response.unpack_from(r)[0] for r in front.take_responses()]
    assert answered == list(range(len(answered)))
    assert len(answered) > 1000
    assert shared.idx[REQ_PROD] == (start + next_id) & 0xFFFFFFFF


def test_budget_is_respected_and_private_copies_are_taken() -> None:
    shared, front, back = make_ring()
    for i in range(10):
        front.put_request(request(i))
    front.push_requests()
    taken = back.take_requests(4)
    assert [request_id(r) for r in taken] == [0, 1, 2, 3]
    # The guest rewrites a slot after we copied it: our copy must not change.
    shared.write_slot(0, request(999))
    assert request_id(taken[0]) == 0
    assert back.unconsumed_requests() == 6


def test_overflowing_producer_is_ring_corruption() -> None:
    shared, _front, back = make_ring()
    shared.idx[REQ_PROD] = shared.size + 1
    with pytest.raises(RingCorrupted):
        back.take_requests(64)
    shared.idx[REQ_PROD] = 0x80000000
    with pytest.raises(RingCorrupted):
        back.take_requests(64)


def test_full_ring_of_requests_is_not_corruption() -> None:
    shared, front, back = make_ring()
    while front.free_requests():
        front.put_request(request(0))
    front.push_requests()
    assert len(back.take_requests(1000)) == shared.size


def test_more_responses_than_requests_is_refused() -> None:
    _shared, front, back = make_ring()
    front.put_request(request(1))
    front.push_requests()
    back.take_requests(8)
    back.put_response(CODECS.response.pack(1, 0, 0))
    with pytest.raises(RuntimeError):
        back.put_response(CODECS.response.pack(1, 0, 0))


def test_notify_follows_event_index() -> None:
    shared, front, back = make_ring()
    front.put_request(request(0))
    assert front.push_requests()  # req_event == 1: the first request notifies
    front.put_request(request(1))
    assert not front.push_requests()  # back end has not re-armed req_event
    back.take_requests(8)
    assert not back.final_check_for_requests()
    assert shared.idx[REQ_EVENT] == back.req_cons + 1
    front.put_request(request(2))
    assert front.push_requests()  # re-armed: notify again

    back.take_requests(8)
    for rid in range(3):
        back.put_response(CODECS.response.pack(rid, 0, 0))
    assert back.push_responses()  # rsp_event == 1 is inside the pushed range
    assert not back.push_responses()  # nothing new
    front.take_responses()
    shared.idx[RSP_EVENT] = front.rsp_cons + 5  # front end asks to be woken later
    assert not back.final_check_for_requests()


def test_final_check_sees_work_that_raced_in() -> None:
    _shared, front, back = make_ring()
    front.put_request(request(0))
    front.push_requests()
    assert back.final_check_for_requests()
    back.take_requests(8)
    assert not back.final_check_for_requests()


def test_front_refuses_responses_beyond_its_requests() -> None:
    shared, front, _back = make_ring()
    shared.idx[RSP_PROD] = 3
    with pytest.raises(RingCorrupted):
        front.take_responses()


def test_indices_are_native_single_words() -> None:
    shared, front, _back = make_ring(start=0xFFFFFFFF)
    front.put_request(request(0))
    front.push_requests()
    assert struct.unpack_from("<I", shared.area, 0)[0] == 0  # wrapped to 0


def _separate_page_maps(fd: int, pages: int) -> list[mmap.mmap]:
    """Each page of `fd` in its own mapping, mapped in reverse so that no two neighbours
    are adjacent in our address space (as grant mappings of ring-ref0..N are not)."""
    return [mmap.mmap(fd, 4096, offset=i * 4096) for i in reversed(range(pages))][::-1]


@pytest.mark.parametrize(("abi", "pages"), [(BlkifAbi.X86_64, 4), (BlkifAbi.X86_64, 16),
                                            (BlkifAbi.X86_32, 4), (BlkifAbi.X86_32, 16)])
def test_multi_page_ring_over_separate_mappings(abi: BlkifAbi, pages: int) -> None:
    """The front end sees the ring contiguous; the back end sees the same pages mapped one
    by one. Every request crosses both views intact, including slots straddling pages."""

    codecs, entry = BLKIF_CODECS[abi], BLKIF[abi].entry_size
    fd = os.memfd_create("ring")
    os.ftruncate(fd, pages * 4096)
    whole = mmap.mmap(fd, pages * 4096)
    maps = _separate_page_maps(fd, pages)
    front_shared = SharedRing(memoryview(whole), entry)
    front_shared.init()
    back_shared = SharedRing.over_pages([memoryview(m) for m in maps], entry)
    assert back_shared.size == front_shared.size == ring_entries_for_pages(pages, entry)
    straddling = [i for i in range(back_shared.size)
                  if (64 + i * entry) // 4096 != (64 + (i + 1) * entry - 1) // 4096]
    assert straddling  # the layout really makes slots cross page boundaries
    front, back = FrontRing(front_shared, 0xFFFFFF00), BackRing(back_shared, 0xFFFFFF00)
    for word, value in ((REQ_PROD, 0xFFFFFF00), (RSP_PROD, 0xFFFFFF00)):
        front_shared.idx[word] = value
    rng = random.Random(pages)
    sent: list[bytes] = []
    seen: list[bytes] = []
    answered: list[int] = []
    for _ in range(3 * back_shared.size // 16 + 40):
        for _ in range(rng.randint(0, min(16, front.free_requests()))):
            raw = codecs.request.pack(0, rng.randint(0, 11), 0, len(sent), rng.getrandbits(64),
                                      *[rng.getrandbits(v) for _ in range(11)
                                        for v in (32, 8, 8)])
            front.put_request(raw)
            sent.append(raw)
        front.push_requests()
        for raw in back.take_requests(rng.randint(1, 64)):
            seen.append(raw)
            back.put_response(codecs.response.pack(codecs.request.unpack_from(raw)[3], 0, -1))
        back.push_responses()
        answered += [codecs.response.unpack_from(r)[0] for r in front.take_responses()]
    assert seen == sent[:len(seen)]
    assert answered == list(range(len(answered)))
    assert len(seen) > back_shared.size  # wrapped the ring index at least once
    # Responses written by the paged back end land byte-exact in the contiguous view.
    slot = straddling[0]
    back_shared.write_slot(slot, bytes(range(entry)))
    assert front_shared.read_slot(slot) == bytes(range(entry))
    # The mappings go with their views when collected; the fd is ours to close.
    os.close(fd)


def test_single_page_over_pages_is_the_plain_ring() -> None:
    area = mmap.mmap(-1, 4096)
    shared = SharedRing.over_pages([memoryview(area)], BLKIF[ABI].entry_size)
    assert type(shared) is SharedRing
    with pytest.raises(ValueError):
        SharedRing.over_pages([], BLKIF[ABI].entry_size)
    shared.release()


@pytest.mark.parametrize("start", [0, 0xFFFFFFF0])
def test_overflow_is_measured_from_the_responses_not_the_consumer(start: int) -> None:
    """With requests taken and not yet answered, req_cons runs ahead of rsp_prod_pvt: the
    ring holds `size` requests counted from the last response, not from req_cons."""
    shared, front, back = make_ring(start=start)
    for i in range(5):
        front.put_request(request(i))
    front.push_requests()
    assert len(back.take_requests(64)) == 5
    assert back.pending_responses() == 5
    # Exactly a ring's worth ahead of rsp_prod is a full ring, not corruption ...
    shared.idx[REQ_PROD] = (start + shared.size) & 0xFFFFFFFF
    assert len(back.take_requests(64)) == shared.size - 5
    # ... one more is, although it is only size - 4 ahead of req_cons.
    shared.idx[REQ_PROD] = (start + shared.size + 1) & 0xFFFFFFFF
    with pytest.raises(RingCorrupted):
        back.take_requests(64)
    assert back.req_cons == (start + shared.size) & 0xFFFFFFFF  # nothing more taken


@pytest.mark.parametrize("start", [0, 0xFFFFFFFE])
def test_response_notify_boundary(start: int) -> None:
    """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY at every position of rsp_event around the
    pushed range (old, new]: notify exactly when rsp_event lies inside it."""
    for event_at, notify in ((0, False), (1, True), (3, True), (4, False)):
        shared, front, back = make_ring(start=start)
        for i in range(3):
            front.put_request(request(i))
        front.push_requests()
        for raw in back.take_requests(8):
            back.put_response(CODECS.response.pack(request_id(raw), 0, 0))
        # old == start, new == start + 3
        shared.idx[RSP_EVENT] = (start + event_at) & 0xFFFFFFFF
        assert back.push_responses() is notify, f"rsp_event at old+{event_at}"


@pytest.mark.parametrize("start", [0, 0xFFFFFFFE])
def test_request_notify_boundary(start: int) -> None:
    """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, the same rule on the front end's side."""
    for event_at, notify in ((0, False), (1, True), (3, True), (4, False)):
        shared, front, _back = make_ring(start=start)
        for i in range(3):
            front.put_request(request(i))
        shared.idx[REQ_EVENT] = (start + event_at) & 0xFFFFFFFF
        assert front.push_requests() is notify, f"req_event at old+{event_at}"
