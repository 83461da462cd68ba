"""In-flight request tracking in memory that outlives the daemon (like vhost-user's
inflight fd), so a restarted daemon answers every request exactly once.

The VMM owns the memory (a memfd it keeps and hands over with SET_INFLIGHT again after a
daemon restart); the guest never sees it. Layout (little-endian), see docs/protocol.md:

  region header (64 bytes): magic "BKDINFL1", u32 version (1), u32 nr_queues
  per queue q, at 64 + q * QUEUE_BYTES:
    queue header (64 bytes): u32 valid (1 once used), u32 ring_size, u32 req_cons
    MAX_ENTRIES entries of 128 bytes, entry for ring index i at (i % ring_size):
      u8 state (0 free, 1 in flight, 2 answered), 3 pad, u32 ring index,
      u32 response index (state 2), u32 pad, 112 bytes: the request as consumed

Why it is exact: a request is recorded (state 1) before req_cons moves past it, and its
response index is recorded (state 2) before the response is published, so after a crash
  - a request at or past the recorded req_cons is still in the ring: read it again;
  - state 1 below req_cons: consumed, never answered: run it again;
  - state 2 whose response index is below the ring's published rsp_prod: answered: drop;
  - state 2 at or past rsp_prod: the response never became visible: run it again.
The state byte is written last (one-byte store), so a daemon killed mid-record leaves the
previous state. Re-running a read or a write is harmless: the guest has had no response,
so its pages still hold the same data and grants.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"BKDINFL1"
VERSION = 1
REGION_HEADER = struct.Struct("<8sII")
REGION_HEADER_SIZE = 64
QUEUE_HEADER = struct.Struct("<III")
QUEUE_HEADER_SIZE = 64
ENTRY_HEADER = struct.Struct("<B3xIII")
ENTRY_HEADER_SIZE = ENTRY_HEADER.size  # 16
REQUEST_BYTES = 112  # sizeof(union blkif_sring_entry), the largest request we keep
ENTRY_SIZE = ENTRY_HEADER_SIZE + REQUEST_BYTES  # 128
MAX_ENTRIES = 1024
QUEUE_BYTES = QUEUE_HEADER_SIZE + MAX_ENTRIES * ENTRY_SIZE

FREE, IN_FLIGHT, ANSWERED = 0, 1, 2
U32 = 0xFFFFFFFF


def region_size(nr_queues: int) -> int:
    """Bytes a VMM must provide for a device with `nr_queues` queues."""
    return REGION_HEADER_SIZE + nr_queues * QUEUE_BYTES


class InflightError(Exception):
    """The region is too small, or holds something that is not our table."""


@dataclass(frozen=True)
class Recovery:
    """Where a restarted back end resumes one ring, and what it must run again."""

    req_cons: int
    rsp_prod: int
    replay: list[tuple[int, bytes]]  # (ring index, raw request), in ring order


class InflightQueue:
    """One ring's table. The owner records every consumed request and response."""

    def __init__(self, view: memoryview, ring_size: int) -> None:
        if not 0 < ring_size <= MAX_ENTRIES or ring_size & (ring_size - 1):
            raise InflightError(f"ring of {ring_size} entries: table holds up to "
                                f"{MAX_ENTRIES}, a power of two")
        self.view = view
        self.ring_size = ring_size

    def _entry_off(self, index: int) -> int:
        return QUEUE_HEADER_SIZE + (index % self.ring_size) * ENTRY_SIZE

    def recover(self, published_rsp_prod: int) -> Recovery:
        """Read the table left by an earlier daemon (or start one) for a ring whose shared
        rsp_prod is `published_rsp_prod`, and reset it to hold only what is replayed."""
        valid, size, req_cons = QUEUE_HEADER.unpack_from(self.view, 0)
        rsp_prod = published_rsp_prod & U32
        if not valid or size != self.ring_size:
            self._reset(rsp_prod)
            return Recovery(rsp_prod, rsp_prod, [])
        # Everything between rsp_prod and req_cons was consumed and not (visibly) answered;
        # more than a ring's worth cannot be.
        outstanding = (req_cons - rsp_prod) & U32
        if outstanding > self.ring_size:
            raise InflightError(f"table says {outstanding} requests outstanding in a ring "
                                f"of {self.ring_size}")
        replay: list[tuple[int, bytes]] = []
        for k in range(self.ring_size):
            off = self._entry_off(k)
            state, index, rsp_index, _ = ENTRY_HEADER.unpack_from(self.view, off)
            if state == FREE:
                continue
            consumed = (req_cons - index - 1) & U32 < self.ring_size
            published = state == ANSWERED and (rsp_prod - rsp_index - 1) & U32 < self.ring_size
            if consumed and not published:
                raw = bytes(self.view[off + ENTRY_HEADER_SIZE:off + ENTRY_SIZE])
                replay.append((index & U32, raw))
            self.view[off] = FREE
        replay.sort(key=lambda item: (item[0] - rsp_prod) & U32)
        if len(replay) > outstanding:
            raise InflightError(f"{len(replay)} requests to replay, {outstanding} outstanding")
        # The caller records each replayed request again (in_flight) before running it.
        return Recovery(req_cons, rsp_prod, replay)

    def _reset(self, req_cons: int) -> None:
        self.view[:QUEUE_HEADER_SIZE + self.ring_size * ENTRY_SIZE] = bytes(
            QUEUE_HEADER_SIZE + self.ring_size * ENTRY_SIZE)
        QUEUE_HEADER.pack_into(self.view, 0, 1, self.ring_size, req_cons & U32)

    def in_flight(self, index: int, raw: bytes) -> None:
        """Request at ring index `index` consumed (before req_cons moves past it)."""
        off = self._entry_off(index)
        raw = raw[:REQUEST_BYTES]
        self.view[off + ENTRY_HEADER_SIZE:off + ENTRY_HEADER_SIZE + len(raw)] = raw
        struct.pack_into("<I", self.view, off + 4, index & U32)
        self.view[off] = IN_FLIGHT

    def consumed_up_to(self, req_cons: int) -> None:
        struct.pack_into("<I", self.view, 8, req_cons & U32)

    def answering(self, index: int, rsp_index: int) -> None:
        """The response to the request at `index` goes to ring slot `rsp_index` (recorded
        before the response is published)."""
        off = self._entry_off(index)
        struct.pack_into("<I", self.view, off + 8, rsp_index & U32)
        self.view[off] = ANSWERED

    def answered(self, index: int) -> None:
        """The response to the request at `index` is published: forget the request."""
        self.view[self._entry_off(index)] = FREE


class InflightRegion:
    """The whole table of one device, over memory the VMM passed."""

    def __init__(self, view: memoryview, nr_queues: int) -> None:
        need = region_size(nr_queues)
        if len(view) < need:
            raise InflightError(f"in-flight region of {len(view)} bytes, {nr_queues} "
                                f"queue(s) need {need}")
        magic, version, queues = REGION_HEADER.unpack_from(view, 0)
        if magic != MAGIC or version != VERSION or queues != nr_queues:
            # A fresh region, or one laid out for another geometry: start over.
            view[:need] = bytes(need)
            REGION_HEADER.pack_into(view, 0, MAGIC, VERSION, nr_queues)
        self.view = view
        self.nr_queues = nr_queues

    def queue(self, q: int, ring_size: int) -> InflightQueue:
        if not 0 <= q < self.nr_queues:
            raise InflightError(f"queue {q}: the region has {self.nr_queues}")
        start = REGION_HEADER_SIZE + q * QUEUE_BYTES
        return InflightQueue(self.view[start:start + QUEUE_BYTES], ring_size)
