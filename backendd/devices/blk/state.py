"""A blk device's sections of the state blob (backendd/devstate.py; layouts in
docs/protocol.md, "The device state blob"). Pure: sections in, a checked BlkState out.

A suspended blk ring has answered and published everything it took, so each ring's
req_cons, rsp_prod_pvt and published rsp_prod are one value; a blob saying otherwise is
refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from backendd.devstate import (
    BLK_PGRANTS,
    BLK_RING,
    DeviceSection,
    Reader,
    Section,
    StateError,
    split,
)

from .keys import FrontendConfig, FrontendKeyError, parse_frontend_keys

_RING = struct.Struct("<IIIIII")
_PGRANTS = struct.Struct("<II")
# Grefs of one ring's persistent-grant cache (blkback's 1056 per ring, with room).
MAX_PGRANTS = 4096


@dataclass(frozen=True)
class RingState:
    index: int
    port: int
    ring_refs: tuple[int, ...]
    req_cons: int
    rsp_prod_pvt: int
    pushed: int

    def encode(self) -> Section:
        return Section(BLK_RING, _RING.pack(self.index, self.port, self.req_cons,
                                            self.rsp_prod_pvt, self.pushed,
                                            len(self.ring_refs))
                       + struct.pack(f"<{len(self.ring_refs)}I", *self.ring_refs))


@dataclass
class BlkState:
    device: DeviceSection
    front: FrontendConfig | None = None  # None: the device was not connected
    rings: list[RingState] = field(default_factory=list)
    # queue index -> (gref, writable), in the cache's purge order.
    pgrants: dict[int, list[tuple[int, bool]]] = field(default_factory=dict)


def encode_pgrants(index: int, grants: list[tuple[int, bool]]) -> Section:
    body = _PGRANTS.pack(index, len(grants)) + b"".join(
        struct.pack("<II", gref, int(w)) for gref, w in grants)
    return Section(BLK_PGRANTS, body)


def decode_state(sections: list[Section], max_queues: int) -> BlkState:
    device, rest = split(sections, {BLK_RING, BLK_PGRANTS})
    state = BlkState(device)
    if not device.connected:
        if rest:
            raise StateError("ring sections for a device that was not connected")
        return state
    try:
        state.front = parse_frontend_keys(device.keys, max_queues)
    except FrontendKeyError as e:
        raise StateError(f"the frontend keys in the state: {e}") from None
    rings: dict[int, RingState] = {}
    for s in rest:
        if s.type == BLK_RING:
            r = Reader(s, "blk ring section")
            index, port, req_cons, rsp_prod_pvt, pushed, nrefs = r.take("IIIIII")
            if nrefs > 64:
                raise StateError(f"blk ring section: {nrefs} ring pages")
            refs = r.take(f"{nrefs}I")
            r.end()
            if index in rings:
                raise StateError(f"two sections for blk ring {index}")
            if not req_cons == rsp_prod_pvt == pushed:
                raise StateError(f"blk ring {index}: req_cons {req_cons}, rsp_prod_pvt "
                                 f"{rsp_prod_pvt}, pushed {pushed}: a suspended ring has "
                                 "answered and published everything it took")
            rings[index] = RingState(index, port, tuple(refs), req_cons, rsp_prod_pvt, pushed)
        else:
            r = Reader(s, "blk persistent grants section")
            index, count = r.take("II")
            if count > MAX_PGRANTS:
                raise StateError(f"blk ring {index}: {count} persistent grants")
            pairs = r.take(f"{2 * count}I")
            r.end()
            if index in state.pgrants:
                raise StateError(f"two persistent-grant sections for blk ring {index}")
            if len(set(pairs[::2])) != count:
                raise StateError(f"blk ring {index}: a persistent grant is listed twice")
            if any(w > 1 for w in pairs[1::2]):
                raise StateError(f"blk ring {index}: a persistent grant's writable flag "
                                 "is not 0 or 1")
            state.pgrants[index] = [(g, bool(w)) for g, w in zip(pairs[::2], pairs[1::2],
                                                                  strict=True)]
    front = state.front
    if sorted(rings) != list(range(len(front.queues))):
        raise StateError(f"ring sections {sorted(rings)} for {len(front.queues)} queues")
    for i, qk in enumerate(front.queues):
        if (rings[i].ring_refs, rings[i].port) != (qk.ring_refs, qk.port):
            raise StateError(f"blk ring {i}: its refs and port differ from the state's keys")
    if any(i not in rings for i in state.pgrants):
        raise StateError("persistent grants for a ring the state does not have")
    state.rings = [rings[i] for i in range(len(front.queues))]
    return state
