"""Shared-ring logic of io/ring.h over a memoryview: the back-end half the daemon runs and
the front-end half the simulated guest runs. No I/O, no event loop.

Indices are free-running u32 values that wrap; every difference is taken modulo 2**32.
Shared indices are read once into a local, then checked, never re-read (XSA-155): the
other side may change them at any moment.

Barriers (see docs/rings.md): ring.h needs a full barrier (`xen_mb`) in exactly two
places per side, between publishing an index and reading the other side's event index
(push-and-check-notify) and between writing our event index and re-checking the producer
(final check). Both call `atomic.full_barrier()`. `xen_wmb`/`xen_rmb` order a slot write
before the index store, and an index load before slot reads; on x86 they are free.
"""

from typing import Protocol

from .atomic import full_barrier, read_barrier, write_barrier
from .sring import REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD, SRING_HEADER_SIZE, ring_entries

U32 = 0xFFFFFFFF
SRING_INDEX_BYTES = 16  # req_prod, req_event, rsp_prod, rsp_event


class RingWriteLog(Protocol):
    def wrote(self, offset: int, length: int) -> None: ...


class RingCorrupted(Exception):
    """The other side broke the ring protocol (e.g. published more requests than fit).
    Fatal for this ring only: the owner stops serving it."""


def _sub(a: int, b: int) -> int:
    return (a - b) & U32


class SharedRing:
    """Index and slot access to one shared ring area (header + entries)."""

    __slots__ = ("area", "entry_size", "idx", "mask", "size")

    def __init__(self, area: memoryview, entry_size: int) -> None:
        size = ring_entries(len(area), entry_size)
        if size < 1:
            raise ValueError(f"ring area of {len(area)} bytes holds no {entry_size}-byte entry")
        self.area = area
        self.entry_size = entry_size
        self.size = size
        self.mask = size - 1
        # Native u32 words: one aligned 4-byte load/store per access (never torn).
        self.idx = area[:16].cast("I")

    def slot_offset(self, index: int) -> int:
        return SRING_HEADER_SIZE + (index & self.mask) * self.entry_size

    def read_slot(self, index: int) -> bytes:
        """A private copy of one slot: validate and use only this copy."""
        off = SRING_HEADER_SIZE + (index & self.mask) * self.entry_size
        return bytes(self.area[off:off + self.entry_size])

    def write_slot(self, index: int, data: bytes) -> None:
        if len(data) > self.entry_size:
            raise ValueError(f"{len(data)}-byte message in a {self.entry_size}-byte slot")
        off = SRING_HEADER_SIZE + (index & self.mask) * self.entry_size
        self.area[off:off + len(data)] = data

    def init(self) -> None:
        """SHARED_RING_INIT: producers at 0, both event indices at 1 (front end does this)."""
        self.area[:SRING_HEADER_SIZE] = bytes(SRING_HEADER_SIZE)
        self.idx[REQ_EVENT] = 1
        self.idx[RSP_EVENT] = 1

    def release(self) -> None:
        self.idx.release()

    @classmethod
    def over_pages(cls, pages: "list[memoryview]", entry_size: int) -> "SharedRing":
        """A ring over separately mapped pages (multi-page rings: ring-ref0..N each name
        their own grant, so the pages are not contiguous in our address space). One page
        gives the plain SharedRing, so the single-page path costs nothing extra."""
        if not pages:
            raise ValueError("a ring needs at least one page")
        if len(pages) == 1:
            return cls(pages[0], entry_size)
        return PagedSharedRing(pages, entry_size)


class PagedSharedRing(SharedRing):
    """A shared ring laid over equal-sized pages that are contiguous only in the other
    side's view: the header sits in page 0 and a slot may straddle two pages."""

    __slots__ = ("page_size", "pages")

    def __init__(self, pages: "list[memoryview]", entry_size: int) -> None:
        page_size = len(pages[0])
        if page_size < SRING_HEADER_SIZE or any(len(p) != page_size for p in pages):
            raise ValueError("ring pages must all have the same size")
        self.pages = list(pages)
        self.page_size = page_size
        size = ring_entries(page_size * len(pages), entry_size)
        if size < 1:
            raise ValueError(f"{len(pages)} pages hold no {entry_size}-byte entry")
        self.area = pages[0]
        self.entry_size = entry_size
        self.size = size
        self.mask = size - 1
        self.idx = pages[0][:16].cast("I")

    def read_slot(self, index: int) -> bytes:
        off = SRING_HEADER_SIZE + (index & self.mask) * self.entry_size
        page, start = divmod(off, self.page_size)
        end = start + self.entry_size
        if end <= self.page_size:
            return bytes(self.pages[page][start:end])
        return bytes(self.pages[page][start:]) + bytes(self.pages[page + 1][:end - self.page_size])

    def write_slot(self, index: int, data: bytes) -> None:
        if len(data) > self.entry_size:
            raise ValueError(f"{len(data)}-byte message in a {self.entry_size}-byte slot")
        off = SRING_HEADER_SIZE + (index & self.mask) * self.entry_size
        page, start = divmod(off, self.page_size)
        first = min(len(data), self.page_size - start)
        self.pages[page][start:start + first] = data[:first]
        if first < len(data):
            self.pages[page + 1][:len(data) - first] = data[first:]


class BackRing:
    """The back end's private state (req_cons, rsp_prod_pvt) over a shared ring."""

    __slots__ = ("_pushed", "log", "req_cons", "ring", "rsp_prod_pvt", "size")

    def __init__(self, ring: SharedRing, start: int = 0) -> None:
        # BACK_RING_INIT starts at 0; BACK_RING_ATTACH resumes at the published rsp_prod.
        self.ring = ring
        # Told of every write into the shared ring (byte offset, length in the ring's
        # pages), e.g. for a dirty log; None: nobody asks.
        self.log: RingWriteLog | None = None
        self.size = ring.size
        self.req_cons = start & U32
        self.rsp_prod_pvt = start & U32
        self._pushed = start & U32

    @classmethod
    def attach(cls, ring: SharedRing) -> "BackRing":
        return cls(ring, ring.idx[RSP_PROD])

    def unconsumed_requests(self) -> int:
        """XEN_RING_NR_UNCONSUMED_REQUESTS, capped by the space left for responses."""
        req = _sub(self.ring.idx[REQ_PROD], self.req_cons)
        rsp = self.size - _sub(self.req_cons, self.rsp_prod_pvt)
        return min(req, rsp)

    def take_requests(self, budget: int) -> list[bytes]:
        """Copy out up to `budget` new requests (each a private copy of its slot).

        Raises RingCorrupted when the front end claims more outstanding requests than the
        ring holds (blkback's "bogus ring requests")."""
        prod = self.ring.idx[REQ_PROD]  # read once
        read_barrier()
        if _sub(prod, self.rsp_prod_pvt) > self.size:
            raise RingCorrupted(
                f"req_prod {prod} is {_sub(prod, self.rsp_prod_pvt)} ahead of rsp_prod "
                f"{self.rsp_prod_pvt} on a ring of {self.size}")
        out: list[bytes] = []
        cons = self.req_cons
        read_slot = self.ring.read_slot
        while cons != prod and len(out) < budget:
            if _sub(cons, self.rsp_prod_pvt) >= self.size:  # RING_REQUEST_CONS_OVERFLOW
                break
            out.append(read_slot(cons))
            cons = (cons + 1) & U32
        self.req_cons = cons
        return out

    def pending_responses(self) -> int:
        """Requests taken but not yet answered."""
        return _sub(self.req_cons, self.rsp_prod_pvt)

    def put_response(self, data: bytes) -> None:
        if self.rsp_prod_pvt == self.req_cons:
            raise RuntimeError("more responses than requests taken")
        self.ring.write_slot(self.rsp_prod_pvt, data)
        if self.log is not None:
            self.log.wrote(self.ring.slot_offset(self.rsp_prod_pvt), len(data))
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & U32

    def push_responses(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish, then say whether to notify."""
        old = self._pushed  # our own copy: the guest cannot skew it
        new = self.rsp_prod_pvt
        if new == old:
            return False
        write_barrier()  # front end sees the responses before the index
        if self.log is not None:
            self.log.wrote(0, SRING_INDEX_BYTES)  # before the index is visible ...
        self.ring.idx[RSP_PROD] = new
        if self.log is not None:
            self.log.wrote(0, SRING_INDEX_BYTES)  # ... and after it has landed
        self._pushed = new
        full_barrier()  # front end sees the index before we read rsp_event
        return _sub(new, self.ring.idx[RSP_EVENT]) < _sub(new, old)

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: True if work remains; otherwise arm req_event
        so the front end notifies on its next request."""
        if self.unconsumed_requests():
            return True
        self.ring.idx[REQ_EVENT] = (self.req_cons + 1) & U32
        if self.log is not None:
            self.log.wrote(0, SRING_INDEX_BYTES)
        full_barrier()  # req_event is visible before we look at req_prod again
        return self.unconsumed_requests() > 0


class FrontRing:
    """The front end's private state (req_prod_pvt, rsp_cons): the simulated guest's side."""

    __slots__ = ("_pushed", "req_prod_pvt", "ring", "rsp_cons", "size")

    def __init__(self, ring: SharedRing, start: int = 0) -> None:
        self.ring = ring
        self.size = ring.size
        self.req_prod_pvt = start & U32
        self.rsp_cons = start & U32
        self._pushed = start & U32

    def free_requests(self) -> int:
        return self.size - _sub(self.req_prod_pvt, self.rsp_cons)

    def put_request(self, data: bytes) -> int:
        """Write a request into the next slot; returns its ring index."""
        if self.free_requests() <= 0:
            raise RuntimeError("ring full")
        index = self.req_prod_pvt
        self.ring.write_slot(index, data)
        self.req_prod_pvt = (index + 1) & U32
        return index

    def push_requests(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY."""
        old = self._pushed
        new = self.req_prod_pvt
        if new == old:
            return False
        write_barrier()
        self.ring.idx[REQ_PROD] = new
        self._pushed = new
        full_barrier()
        return _sub(new, self.ring.idx[REQ_EVENT]) < _sub(new, old)

    def unconsumed_responses(self) -> int:
        return _sub(self.ring.idx[RSP_PROD], self.rsp_cons)

    def take_responses(self, budget: int | None = None) -> list[bytes]:
        prod = self.ring.idx[RSP_PROD]
        read_barrier()
        if _sub(prod, self.rsp_cons) > _sub(self.req_prod_pvt, self.rsp_cons):
            raise RingCorrupted(f"rsp_prod {prod} is beyond the requests made")
        out: list[bytes] = []
        cons = self.rsp_cons
        while cons != prod and (budget is None or len(out) < budget):
            out.append(self.ring.read_slot(cons))
            cons = (cons + 1) & U32
        self.rsp_cons = cons
        return out

    def final_check_for_responses(self) -> bool:
        """RING_FINAL_CHECK_FOR_RESPONSES."""
        if self.unconsumed_responses():
            return True
        self.ring.idx[RSP_EVENT] = (self.rsp_cons + 1) & U32
        full_barrier()
        return self.unconsumed_responses() > 0
