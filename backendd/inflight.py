"""In-flight request tracking in memory that outlives the daemon (like vhost-user's
inflight fd), so a restarted daemon answers every request exactly once.

The VMM owns the memory (a memfd it keeps and hands over with SET_INFLIGHT again after a
daemon restart and across the guest's driver reloads); the guest never sees it. The
layout is specified byte by byte in docs/protocol.md ("The in-flight table"); in short,
little-endian:

  region header (64 bytes): magic "BKDINFL1", u32 version (2), u32 nr_queues
  per queue q, at 64 + q * QUEUE_BYTES:
    queue header (64 bytes): u32 live, u32 ring_size, u32 req_cons, u32 generation,
      u32 rsp_prod (last published, as recorded), u32 ring_id
    MAX_ENTRIES entries of 128 bytes, of which the first 2 * ring_size are used, each
    request in any free one: u8 state (0 free, 1 in flight, 2 answered), 3 pad,
    u32 ring index, u32 response index (state 2), u32 generation, 112 bytes: the request
    as consumed. (Not one entry per slot: answered out of order, request i may still be
    in flight when request i + ring_size is taken.)

Generations: every ring a frontend sets up is served under one generation of the queue's
table. A connect that finds no live generation for the same ring (first use, a driver
reload after a clean disconnect, a ring whose identity or indices do not match) starts
generation + 1, which voids every older entry in one store; a restarted daemon that finds
the live generation of the same ring resumes it and replays its entries.

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
import zlib
from dataclasses import dataclass, field

MAGIC = b"BKDINFL1"
VERSION = 2
REGION_HEADER = struct.Struct("<8sII")
REGION_HEADER_SIZE = 64
QUEUE_HEADER = struct.Struct("<IIIIII")  # live, ring_size, req_cons, generation, rsp_prod, ring_id
QUEUE_HEADER_SIZE = 64
ENTRY_HEADER = struct.Struct("<B3xIII")  # state, ring index, response index, generation
ENTRY_HEADER_SIZE = ENTRY_HEADER.size  # 16
REQUEST_BYTES = 112  # sizeof(union blkif_sring_entry), the largest request we keep
ENTRY_SIZE = ENTRY_HEADER_SIZE + REQUEST_BYTES  # 128
MAX_ENTRIES = 1024
MAX_RING = MAX_ENTRIES // 2  # a blkif ring has at most 512 slots (16 pages)
QUEUE_BYTES = QUEUE_HEADER_SIZE + MAX_ENTRIES * ENTRY_SIZE

# Queue header field offsets
Q_LIVE, Q_RING_SIZE, Q_REQ_CONS, Q_GENERATION, Q_RSP_PROD, Q_RING_ID = 0, 4, 8, 12, 16, 20
# Entry field offsets
E_STATE, E_INDEX, E_RSP_INDEX, E_GENERATION, E_REQUEST = 0, 4, 8, 12, 16

FREE, IN_FLIGHT, ANSWERED = 0, 1, 2
U32 = 0xFFFFFFFF


def region_size(nr_queues: int) -> int:
    """Bytes a VMM must provide for a device with `nr_queues` queues."""
    return REGION_HEADER_SIZE + nr_queues * QUEUE_BYTES


def ring_id(ring_refs: tuple[int, ...] | list[int], port: int) -> int:
    """The identity a table records for the ring it serves: CRC-32 (zlib's) of the ring's
    grant references, then its event-channel port, each as a little-endian u32."""
    return zlib.crc32(struct.pack(f"<{len(ring_refs) + 1}I", *ring_refs, port)) & U32


class InflightError(Exception):
    """The region is too small, or the ring cannot be served with a table."""


@dataclass(frozen=True)
class Recovery:
    """Where a back end starts one ring, and what it must run again.

    `fresh`: a new generation starts (nothing to replay); otherwise the live generation of
    the same ring resumes. `reason` says why a table that held a live generation was not
    resumed (empty when there was none)."""

    req_cons: int
    rsp_prod: int
    replay: list[tuple[int, bytes]]  # (ring index, raw request), in ring order
    generation: int
    fresh: bool
    reason: str = ""
    ring_id: int = 0
    _drop: list[int] = field(default_factory=list, repr=False)  # entry slots to free


def _sub(a: int, b: int) -> int:
    return (a - b) & U32


class InflightQueue:
    """One ring's table. The owner records every consumed request and response."""

    def __init__(self, view: memoryview, ring_size: int) -> None:
        if not 0 < ring_size <= MAX_RING or ring_size & (ring_size - 1):
            raise InflightError(f"ring of {ring_size} entries: table holds rings of up to "
                                f"{MAX_RING}, a power of two")
        self.view = view
        self.ring_size = ring_size
        # Taken and not answered: at most ring_size; answered, not yet published: at
        # most ring_size more. Which entry holds which ring index is ours to remember.
        self.capacity = 2 * ring_size
        self._pos: dict[int, int] = {}  # ring index -> entry offset
        self._free: list[int] = []
        self._scan()

    def _offsets(self) -> range:
        return range(QUEUE_HEADER_SIZE, QUEUE_HEADER_SIZE + self.capacity * ENTRY_SIZE,
                     ENTRY_SIZE)

    def _scan(self) -> None:
        """Learn which entries hold requests of the current generation."""
        gen = self.generation
        self._pos, self._free = {}, []
        for off in reversed(self._offsets()):
            state, index, _, egen = ENTRY_HEADER.unpack_from(self.view, off)
            if state != FREE and egen == gen and index not in self._pos:
                self._pos[index] = off
            else:
                self._free.append(off)

    def _entry_off(self, index: int) -> int:
        return self._pos[index & U32]

    @property
    def generation(self) -> int:
        return struct.unpack_from("<I", self.view, Q_GENERATION)[0]

    def plan(self, req_prod: int, rsp_prod: int, rid: int) -> Recovery:
        """Decide, without writing anything, how to start the ring whose shared indices
        are `req_prod` / `rsp_prod` and whose identity is `rid` (see ring_id)."""
        live, size, req_cons, gen, rec_rsp, rec_id = QUEUE_HEADER.unpack_from(self.view, 0)
        req_prod &= U32
        rsp_prod &= U32
        reason = ""
        if live != 1:
            pass  # nothing was being served: quietly start a new generation
        elif size != self.ring_size:
            reason = f"table for a ring of {size}, this ring has {self.ring_size}"
        elif rec_id != rid:
            reason = "the table was kept for another ring (other ring-ref or port)"
        elif _sub(rsp_prod, rec_rsp) > self.ring_size:
            reason = (f"ring's rsp_prod {rsp_prod} is not within a ring of the recorded "
                      f"{rec_rsp}")
        elif _sub(req_cons, rsp_prod) > self.ring_size:
            reason = (f"table says {_sub(req_cons, rsp_prod)} requests outstanding in a ring "
                      f"of {self.ring_size}")
        elif _sub(req_prod, req_cons) > self.ring_size:
            reason = f"ring's req_prod {req_prod} is behind the recorded req_cons {req_cons}"
        if live != 1 or reason:
            return Recovery(rsp_prod, rsp_prod, [], (gen + 1) & U32, True, reason, rid)
        outstanding = _sub(req_cons, rsp_prod)
        replay: list[tuple[int, bytes]] = []
        drop: list[int] = []
        seen: set[int] = set()
        for off in self._offsets():
            state, index, rsp_index, egen = ENTRY_HEADER.unpack_from(self.view, off)
            if state == FREE or egen != gen:
                continue  # free, or left by an older generation: void
            # Recorded at or past req_cons: the daemon died before moving req_cons, the
            # request is still in the ring and is read again from there. Anything before
            # req_cons was taken, however long ago (one slow request may stay in flight
            # while many later ones are answered).
            consumed = _sub(index, req_cons) >= self.ring_size
            # A response not yet published sits at or past rsp_prod, within a ring.
            published = state == ANSWERED and _sub(rsp_index, rsp_prod) >= self.ring_size
            if consumed and not published and index not in seen:
                seen.add(index)
                raw = bytes(self.view[off + ENTRY_HEADER_SIZE:off + ENTRY_SIZE])
                replay.append((index & U32, raw))
            else:
                drop.append(off)
        # Oldest first: a request answered out of order may leave older ones below
        # rsp_prod, so order by distance back from req_cons.
        replay.sort(key=lambda item: -_sub(req_cons, item[0]))
        if len(replay) > outstanding:
            reason = f"{len(replay)} requests to replay, {outstanding} outstanding"
            return Recovery(rsp_prod, rsp_prod, [], (gen + 1) & U32, True, reason, rid)
        return Recovery(req_cons, rsp_prod, replay, gen, False, "", rid, drop)

    def begin(self, rec: Recovery) -> None:
        """Write the decision of plan(): start the new generation, or resume the live one
        (free what is not replayed; the caller records each replayed request again,
        in_flight, before running it)."""
        v = self.view
        if rec.fresh:
            # live goes to 0 first and back to 1 last: a daemon killed in between leaves
            # no live generation, and the next connect starts afresh again.
            struct.pack_into("<I", v, Q_LIVE, 0)
            struct.pack_into("<III", v, Q_RING_SIZE, self.ring_size, rec.req_cons & U32,
                             rec.generation & U32)
            struct.pack_into("<II", v, Q_RSP_PROD, rec.rsp_prod & U32, rec.ring_id)
            struct.pack_into("<I", v, Q_LIVE, 1)
        else:
            for off in rec._drop:
                v[off] = FREE
            struct.pack_into("<I", v, Q_RSP_PROD, rec.rsp_prod & U32)
        self._scan()

    def recover(self, req_prod: int, rsp_prod: int, rid: int) -> Recovery:
        """plan() then begin()."""
        rec = self.plan(req_prod, rsp_prod, rid)
        self.begin(rec)
        return rec

    def in_flight(self, index: int, raw: bytes) -> None:
        """Request at ring index `index` consumed (before req_cons moves past it); a
        replayed request is recorded again in the entry it has."""
        index &= U32
        off = self._pos.get(index)
        if off is None:
            if not self._free:  # more than the ring protocol allows: a bug of ours
                raise InflightError(f"no free entry for ring index {index}")
            off = self._pos[index] = self._free.pop()
            if self.view[off] != FREE:  # void (an older generation): make it free first
                self.view[off] = FREE
        raw = raw[:REQUEST_BYTES]
        self.view[off + E_REQUEST:off + E_REQUEST + len(raw)] = raw
        struct.pack_into("<I", self.view, off + E_INDEX, index & U32)
        self.view[off + E_GENERATION:off + E_GENERATION + 4] = \
            self.view[Q_GENERATION:Q_GENERATION + 4]
        self.view[off] = IN_FLIGHT

    def consumed_up_to(self, req_cons: int) -> None:
        struct.pack_into("<I", self.view, Q_REQ_CONS, req_cons & U32)

    def answering(self, index: int, rsp_index: int) -> None:
        """The response to the request at `index` goes to ring slot `rsp_index` (recorded
        before the response is published)."""
        off = self._entry_off(index)
        struct.pack_into("<I", self.view, off + E_RSP_INDEX, rsp_index & U32)
        self.view[off] = ANSWERED

    def answered(self, index: int) -> None:
        """The response to the request at `index` is published: forget the request."""
        off = self._pos.pop(index & U32)
        self.view[off] = FREE
        self._free.append(off)

    def published(self, rsp_prod: int) -> None:
        """The ring's rsp_prod is now `rsp_prod` (recorded after publishing)."""
        struct.pack_into("<I", self.view, Q_RSP_PROD, rsp_prod & U32)

    def close(self) -> None:
        """The ring is no longer served (disconnect: everything taken was answered, or the
        ring was halted): the next ring, even on the same pages, starts a new generation."""
        struct.pack_into("<I", self.view, Q_LIVE, 0)


class InflightRegion:
    """The whole table of one device, over memory the VMM passed."""

    def __init__(self, view: memoryview, nr_queues: int) -> None:
        need = region_size(nr_queues)
        if len(view) < need:
            raise InflightError(f"in-flight region of {len(view)} bytes, {nr_queues} "
                                f"queue(s) need {need}")
        magic, version, queues = REGION_HEADER.unpack_from(view, 0)
        if magic != MAGIC or version != VERSION or queues != nr_queues:
            # A fresh region, or one laid out for another geometry or version: start over.
            view[:need] = bytes(need)
            REGION_HEADER.pack_into(view, 0, MAGIC, VERSION, nr_queues)
        self.view = view
        self.nr_queues = nr_queues

    def queue(self, q: int, ring_size: int) -> InflightQueue:
        if not 0 <= q < self.nr_queues:
            raise InflightError(f"queue {q}: the region has {self.nr_queues}")
        start = REGION_HEADER_SIZE + q * QUEUE_BYTES
        return InflightQueue(self.view[start:start + QUEUE_BYTES], ring_size)
