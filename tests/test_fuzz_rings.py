"""BackRing against a hostile front end: random req_prod/rsp_event values and random slot
bytes, on one page and over separately placed pages. The back end must never take more
than the ring holds, fail only with RingCorrupted (exactly when the front end claims more
outstanding requests than fit), copy each slot from exactly its place in the ring, and
write nothing but its own header words and the response slots it owns."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples

from rings.blkif import BLKIF_CODECS
from rings.consts import PAGE_SIZE, BlkifAbi
from rings.netif import RX_ENTRY_SIZE, TX_ENTRY_SIZE
from rings.ring import BackRing, RingCorrupted, SharedRing
from rings.sring import REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD, SRING_HEADER_SIZE

U32 = 0xFFFFFFFF
ENTRY_SIZES = [BLKIF_CODECS[BlkifAbi.X86_64].entry_size, TX_ENTRY_SIZE, RX_ENTRY_SIZE]
CANARY = 0xC5


def sub(a: int, b: int) -> int:
    return (a - b) & U32


class HostileRing:
    """Ring pages placed inside one buffer with a canary page before, between and after
    them, so a stray access lands on a canary. `logical(off, n)` reads the ring as the
    front end lays it out (pages contiguous)."""

    def __init__(self, nr_pages: int, entry_size: int) -> None:
        self.buf = bytearray([CANARY]) * ((2 * nr_pages + 1) * PAGE_SIZE)
        self.page_offsets = [(2 * i + 1) * PAGE_SIZE for i in range(nr_pages)]
        for off in self.page_offsets:
            self.buf[off:off + PAGE_SIZE] = bytes(PAGE_SIZE)
        self.view = memoryview(self.buf)
        self.pages = [self.view[off:off + PAGE_SIZE] for off in self.page_offsets]
        self.shared = SharedRing.over_pages(self.pages, entry_size)
        self.shared.init()
        self.entry_size = entry_size
        self.size = self.shared.size

    def _locate(self, logical_off: int) -> int:
        page, within = divmod(logical_off, PAGE_SIZE)
        return self.page_offsets[page] + within

    def logical(self, off: int, n: int) -> bytes:
        return bytes(self.buf[self._locate(off + i)] for i in range(n))

    def slot_offset(self, index: int) -> int:
        return SRING_HEADER_SIZE + (index & (self.size - 1)) * self.entry_size

    def write_slot(self, index: int, data: bytes) -> None:
        off = self.slot_offset(index)
        for i, b in enumerate(data):
            self.buf[self._locate(off + i)] = b

    def set_index(self, which: int, value: int) -> None:
        struct.pack_into("<I", self.buf, self.page_offsets[0] + 4 * which, value)

    def index(self, which: int) -> int:
        return struct.unpack_from("<I", self.buf, self.page_offsets[0] + 4 * which)[0]

    def allowed_writes(self, rsp_from: int, rsp_to: int) -> set[int]:
        """Buffer offsets the back end may change: req_event, rsp_prod and the response
        slots [rsp_from, rsp_to)."""
        first = self.page_offsets[0]
        allowed = set(range(first + 4 * REQ_EVENT, first + 4 * REQ_EVENT + 4))
        allowed |= set(range(first + 4 * RSP_PROD, first + 4 * RSP_PROD + 4))
        i = rsp_from
        while i != rsp_to:
            off = self.slot_offset(i)
            allowed |= {self._locate(off + k) for k in range(self.entry_size)}
            i = (i + 1) & U32
        return allowed

    def close(self) -> None:
        self.shared.release()
        for p in self.pages:
            p.release()
        self.view.release()


# One step of the hostile front end followed by one step of the back end.
step = st.tuples(
    st.one_of(st.integers(0, U32), st.integers(0, 80)),  # req_prod (absolute or small)
    st.booleans(),                                         # req_prod relative to rsp_prod?
    st.integers(0, U32),                                   # rsp_event
    st.lists(st.tuples(st.integers(0, 600), st.binary(min_size=1, max_size=120)),
             max_size=4),                                  # slot scribbles
    st.integers(0, 300),                                   # take budget
    st.integers(0, 300),                                   # responses to put
)


def run_session(nr_pages: int, entry_size: int, start: int, steps: list) -> None:
    ring = HostileRing(nr_pages, entry_size)
    try:
        _run(ring, start, steps)
    finally:
        ring.close()


def _run(ring: HostileRing, start: int, steps: list) -> None:
    ring.set_index(RSP_PROD, start)
    back = BackRing.attach(ring.shared)
    for req_prod, relative, rsp_event, scribbles, budget, nrsp in steps:
        prod = (back.rsp_prod_pvt + req_prod) & U32 if relative else req_prod
        ring.set_index(REQ_PROD, prod)
        ring.set_index(RSP_EVENT, rsp_event)
        for index, data in scribbles:
            ring.write_slot(back.req_cons + index, data[:ring.entry_size])
        before = bytes(ring.buf)
        cons_before = back.req_cons
        rsp_before = back.rsp_prod_pvt
        try:
            taken = back.take_requests(budget)
        except RingCorrupted:
            # Only when the claim truly exceeds the ring (blkback's check); then the
            # owner halts the ring and nothing was taken.
            assert sub(prod, rsp_before) > ring.size
            assert back.req_cons == cons_before
            assert bytes(ring.buf) == before
            return
        assert sub(prod, rsp_before) <= ring.size
        assert len(taken) <= min(budget, ring.size)
        assert len(taken) == sub(back.req_cons, cons_before)
        assert back.pending_responses() <= ring.size
        for k, slot in enumerate(taken):
            index = (cons_before + k) & U32
            assert slot == ring.logical(ring.slot_offset(index), ring.entry_size)
        assert bytes(ring.buf) == before  # taking requests writes nothing

        nrsp = min(nrsp, back.pending_responses())
        pushed_from = ring.index(RSP_PROD)
        for k in range(nrsp):
            back.put_response(bytes([k & 0xFF]) * ring.entry_size)
        back.push_responses()
        assert ring.index(RSP_PROD) == back.rsp_prod_pvt
        back.final_check_for_requests()
        changed = {i for i, (a, b) in enumerate(zip(before, ring.buf, strict=True)) if a != b}
        assert changed <= ring.allowed_writes(pushed_from, back.rsp_prod_pvt)
        assert ring.index(REQ_PROD) == prod  # never the back end's to write


@settings(max_examples=examples(150), deadline=None)
@given(entry_size=st.sampled_from(ENTRY_SIZES), start=st.integers(0, U32),
       steps=st.lists(step, min_size=1, max_size=8))
def test_back_ring_on_one_page_survives_a_hostile_front(entry_size, start, steps):
    run_session(1, entry_size, start, steps)


@settings(max_examples=examples(60), deadline=None)
@given(nr_pages=st.sampled_from([2, 4]), entry_size=st.sampled_from(ENTRY_SIZES),
       start=st.integers(0, U32), steps=st.lists(step, min_size=1, max_size=6))
def test_back_ring_over_pages_survives_a_hostile_front(nr_pages, entry_size, start, steps):
    run_session(nr_pages, entry_size, start, steps)


@pytest.mark.parametrize("nr_pages", [1, 2, 8])
def test_every_overflowing_claim_is_refused(nr_pages):
    """Each req_prod more than a ring ahead of rsp_prod, around the u32 wrap too."""
    rng = random.Random(nr_pages)
    ring = HostileRing(nr_pages, ENTRY_SIZES[0])
    try:
        for start in (0, U32 - 3, rng.randrange(1 << 32)):
            ring.set_index(RSP_PROD, start)
            back = BackRing.attach(ring.shared)
            for ahead in (ring.size + 1, ring.size + 2, 1 << 31, U32):
                ring.set_index(REQ_PROD, (start + ahead) & U32)
                with pytest.raises(RingCorrupted):
                    back.take_requests(1 << 20)
            ring.set_index(REQ_PROD, (start + ring.size) & U32)
            assert len(back.take_requests(1 << 20)) == ring.size
    finally:
        ring.close()
