"""The host -> guest path of one queue: frames read from the tap with one readv straight
into the pages the guest posted on its rx ring, then one response per slot.

tun cannot tell a frame's length before it is read, so a read is attempted only once
enough buffers are posted for the largest frame the tap may hand us (the MTU, or 64 KiB
with GSO); a frame uses the first of them and the rest stay posted for the next frame.
Responses go in ring order, and Linux's netfront finds an rx buffer by the response's
ring index, not its id, so the data of slot k must be in the page of request k.

A GSO frame needs an extra-info slot right after its first data slot. When the frontend
takes GSO, the read therefore skips the second posted buffer (keeping it for that slot);
a frame that turns out not to be GSO and still spans pages (jumbo frames only) is moved
down one page afterwards. When the guest posts no buffers we stop reading and the frames
wait in the tap's queue, whose length (txqueuelen) bounds what a stalled guest costs
(XSA-392); the kernel drops and counts beyond it.

With receive-side steering set (hash.py), a hash extra-info slot is reserved the same
way, after the GSO one; and a frame read here that the frontend's mapping gives to
another queue is copied into that queue's inbox (vif.Inbox), the buffers it was read into
staying posted here; each queue delivers its inbox, in order, before reading its tap.

A posted request whose grant cannot be used (bad gref, revoked, read-only, a v2 sub-page)
fails alone, in its turn, as a failed grant copy does in netback: at the head of the
posted buffers it is answered ERROR by itself; further on, the frame is read with a
private scratch page in its place, and if the frame turns out to reach it, that slot of
the frame is answered ERROR (the frontend drops that one frame) while every other slot is
answered as usual. No other buffer ever fails because of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque

from backendd.errors import GuestError
from backendd.grants import GrantMapping, GrantTable
from rings.consts import (
    ETH_HLEN,
    NETIF_EXTRA_FLAG_MORE,
    PAGE_SIZE,
    NetExtraType,
    NetGsoType,
    NetifRsp,
    NetRxFlags,
)
from rings.netif import EXTRA_GSO, EXTRA_HASH, RX_ENTRY_SIZE, RX_REQUEST, RX_RESPONSE
from rings.ring import BackRing, RingCorrupted

from . import hash
from .vif import Steered, VifState
from .vnet import VNET_HDR_LEN, VnetHeader, rx_gso, rx_netif_flags

log = logging.getLogger(__name__)

BUDGET = 64  # frames per wakeup (XSA-332)
MAX_GSO_FRAME = 65536 + ETH_HLEN + 4  # a 64 KiB GSO super-frame plus a VLAN tag
VLAN_HLEN = 4


def pages_for(nbytes: int) -> int:
    return max(1, -(-nbytes // PAGE_SIZE))


def data_slot_sizes(frame_len: int) -> list[int]:
    """How a frame is spread over whole pages, each slot's data at offset 0."""
    sizes = [PAGE_SIZE] * (frame_len // PAGE_SIZE)
    if frame_len % PAGE_SIZE or not sizes:
        sizes.append(frame_len % PAGE_SIZE)
    return sizes


def rx_responses(ids: list[int], frame_len: int, csum_flags: int,
                 gso: tuple[int, int] | None, failed: frozenset[int] = frozenset(),
                 hash_info: tuple[int, int] | None = None) -> list[bytes]:
    """The ring slots for one frame, in order: the first data slot, the extra-info slots
    (GSO, then the hash, as netback orders them), then the other data slots. `ids` are
    the request ids of the slots used (an extra slot's id is not echoed: it holds extra
    info instead). Data slots at the positions in `failed` (their buffer was unusable)
    carry NETIF_RSP_ERROR instead of a size, with their flags kept so the frame's chain
    stays whole."""
    sizes = data_slot_sizes(frame_len)
    extras: list[bytes] = []
    if gso is not None:
        extras.append(EXTRA_GSO.pack(NetExtraType.GSO, 0, gso[0], gso[1], 0, 0))
    if hash_info is not None:
        extras.append(EXTRA_HASH.pack(NetExtraType.HASH, 0, hash_info[0],
                                      hash.ALG_TOEPLITZ,
                                      hash_info[1].to_bytes(4, "little")))
    for k in range(len(extras) - 1):  # all but the last say another follows
        extras[k] = bytes([extras[k][0], NETIF_EXTRA_FLAG_MORE]) + extras[k][2:]
    out: list[bytes] = []
    data_ids = [ids[0], *ids[1 + len(extras):]]
    for n, size in enumerate(sizes):
        flags = csum_flags if n == 0 else 0
        if n == 0 and extras:
            flags |= NetRxFlags.EXTRA_INFO
        if n < len(sizes) - 1:
            flags |= NetRxFlags.MORE_DATA
        if len(out) in failed:
            size = NetifRsp.ERROR
        out.append(RX_RESPONSE.pack(data_ids[n], 0, flags, size))
        if n == 0:
            out += extras
    return out


class _Posted:
    __slots__ = ("gref", "id", "mapping")

    def __init__(self, req_id: int, mapping: GrantMapping | None, gref: int) -> None:
        self.id = req_id
        self.mapping = mapping  # None: the grant was bad; answered with an error
        self.gref = gref


class RxPath:
    def __init__(self, ring: BackRing, grants: GrantTable, fd: int, vif: VifState,
                 loop: asyncio.AbstractEventLoop, name: str, gso_offload: bool,
                 index: int = 0) -> None:
        self.ring = ring
        self.grants = grants
        self.fd = fd
        self.vif = vif
        self.loop = loop
        self.name = name
        self.index = index  # the queue's number: frames steered to it wait in its inbox
        # The tap was told it may hand us GSO frames (TUN_F_TSO*): reserve the extra slot.
        self.gso_offload = gso_offload
        self.notify = lambda: None
        self.posted: deque[_Posted] = deque()
        self._hdr = bytearray(VNET_HDR_LEN)
        # Where the part of a frame bound for an unusable buffer is read (and discarded).
        self._scratch = memoryview(bytearray(PAGE_SIZE))
        self._reading = False
        self._poll: asyncio.TimerHandle | None = None
        self.stopped = False
        self.suspended = False  # SUSPEND: the tap is not read until resume()
        mtu_frame = vif.mtu + ETH_HLEN + VLAN_HLEN
        if gso_offload:
            self._data_pages = pages_for(MAX_GSO_FRAME)
        elif vif.features.sg:
            self._data_pages = pages_for(mtu_frame)
        else:
            self._data_pages = 1

    @property
    def reserve(self) -> int:
        """Posted buffers kept after the first for extra-info slots: one for GSO when the
        tap may hand us GSO frames, one for the hash when the frontend asked for it."""
        return int(self.gso_offload) + int(self.vif.hash.hashing)

    @property
    def need(self) -> int:
        """Buffers posted before a read: the largest frame's pages and the reserve."""
        return self._data_pages + self.reserve

    def start(self) -> None:
        self._resume()

    def _resume(self) -> None:
        if not self._reading and not self.stopped and not self.suspended \
                and not self.vif.halted:
            self._reading = True
            self.loop.add_reader(self.fd, self._readable)

    def _pause(self) -> None:
        if self._reading:
            self._reading = False
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.fd)

    def wake(self) -> None:
        """Frames were steered to this queue: deliver them (once buffers are posted)."""
        if self._reading and not self.stopped and not self.vif.halted:
            self.loop.call_soon(self._readable)

    def kick(self) -> None:
        """The frontend posted buffers."""
        if not self._reading and not self.stopped and not self.suspended \
                and not self.vif.halted:
            self._resume()
            self.loop.call_soon(self._readable)

    def suspend(self) -> None:
        """Stop reading the tap; every frame read is answered already (each wake-up
        publishes its responses), so only a publish is left to do. Posted buffers stay
        posted and pinned."""
        self.suspended = True
        self._pause()
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        if self.ring.push_responses():
            self.notify()

    def resume(self) -> None:
        self.suspended = False
        self.kick()

    def posted_buffers(self) -> list[tuple[int, bool, int]]:
        """(id, usable, gref) of the buffers taken from the ring and not used yet, in
        ring order (the first is the request at rsp_prod_pvt)."""
        return [(p.id, p.mapping is not None, p.gref) for p in self.posted]

    def adopt(self, posted: list[tuple[int, bool, int]]) -> None:
        """A migrated queue's posted buffers, pinned again (writable, whole pages); one
        that cannot be is kept in its place as unusable and answered ERROR in its turn."""
        for req_id, usable, gref in posted:
            self.posted.append(_Posted(req_id, self._pin(req_id, gref) if usable else None,
                                       gref))

    def _pin(self, req_id: int, gref: int) -> GrantMapping | None:
        mapping: GrantMapping | None = None
        try:
            mapping = self.grants.map(gref, writable=True)
            mapping.whole_page("an rx buffer")
        except GuestError as e:
            if mapping is not None:
                mapping.release()
            self.vif.counters["rx_bad_grant"] += 1
            self.vif.guest_error("rx_bad_grant", f"{self.name}: rx request id {req_id}: {e}")
            return None
        return mapping

    def stop(self) -> None:
        self.stopped = True
        self._pause()
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        while self.posted:
            p = self.posted.popleft()
            if p.mapping is not None:
                p.mapping.release()

    # --- buffers ------------------------------------------------------------------

    def _fill(self) -> bool:
        """Make sure `need` buffers are posted, the first of them usable; False if the
        guest has not posted enough. Unusable ones further on stay in their place."""
        while True:
            self._answer_bad_head()
            if len(self.posted) >= self.need:
                return True
            if not self._take(self.need - len(self.posted)):
                return False

    def _take(self, want: int) -> bool:
        try:
            raws = self.ring.take_requests(max(want, 1))
        except RingCorrupted as e:
            self.vif.counters["rx_fatal"] += 1
            self.vif.fatal(f"{self.name}: rx: {e}")
            return False
        if not raws:
            return False
        for raw in raws:
            req_id, gref = RX_REQUEST.unpack(raw)
            self.posted.append(_Posted(req_id, self._pin(req_id, gref), gref))
        return True

    def _answer_bad_head(self) -> None:
        while self.posted and self.posted[0].mapping is None:
            self._respond_error(self.posted.popleft())

    def _respond_error(self, p: _Posted) -> None:
        if p.mapping is not None:
            p.mapping.release()
        self.ring.put_response(RX_RESPONSE.pack(p.id, 0, 0, NetifRsp.ERROR))

    # --- frames -------------------------------------------------------------------

    def _readable(self) -> None:
        if self.stopped or self.vif.halted or not self._reading:
            return
        try:
            for _ in range(BUDGET):
                if not self._fill():
                    self._stall()
                    break
                inbox = self.vif.inboxes[self.index] if self.index < len(
                    self.vif.inboxes) else None
                if inbox is not None and inbox.frames:
                    self._deliver(inbox.take())
                    continue
                if not self._read_one():
                    break
        except GuestError as e:
            # Anything else the guest got wrong stops this vif, as a ring error does:
            # never an exception escaping the reader, which would fire again and again.
            self.vif.counters["rx_fatal"] += 1
            self.vif.fatal(f"{self.name}: rx: {e}")
        except Exception:
            log.exception("%s: rx stopped on an internal error", self.name)
            self.stop()
        if self.ring.push_responses():
            self.notify()

    def _stall(self) -> None:
        self._pause()
        self.vif.counters["rx_stalls"] += 1
        if self.vif.halted or self.stopped:
            return
        if self.ring.final_check_for_requests():
            self.kick()
        elif not self.vif.features.rx_notify:
            # A frontend that does not notify on rx requests is polled, as netback's
            # shortened drain timeout does.
            self._poll = self.loop.call_later(0.01, self._polled)

    def _polled(self) -> None:
        self._poll = None
        self.kick()

    def _page(self, p: _Posted) -> memoryview:
        """The page a posted buffer receives data in; scratch for an unusable one."""
        return p.mapping.page_view(0, PAGE_SIZE) if p.mapping is not None else self._scratch

    def _read_one(self) -> bool:
        """Read one frame into the posted buffers; False when the tap is empty."""
        posted = self.posted
        reserve = self.reserve
        bufs = [posted[0], *(posted[i] for i in range(1 + reserve, self.need))]
        views = [self._page(p) for p in bufs]
        try:
            n = os.readv(self.fd, [self._hdr, *views])
        except BlockingIOError:
            return False
        except OSError:
            self.vif.counters["rx_dropped"] += 1
            return True
        counters = self.vif.counters
        frame_len = n - VNET_HDR_LEN
        log = self.grants.memory.log
        if log is not None and frame_len > 0:
            # The guest pages the read reached, logged before any response shows them
            # (a frame filtered or dropped below has been written all the same).
            for p in bufs[:pages_for(frame_len)]:
                if p.mapping is not None:
                    log.mark(p.mapping.frame)
        if frame_len < ETH_HLEN or frame_len > len(views) * PAGE_SIZE:
            counters["rx_dropped"] += 1
            return True
        vnet = VnetHeader.unpack(self._hdr)
        try:
            gso = rx_gso(vnet)
        except ValueError:
            counters["rx_dropped"] += 1
            return True
        if gso is not None and not self._gso_allowed(gso[1]):
            counters["rx_dropped"] += 1
            return True
        if not self.vif.rx_wanted(bytes(views[0][:6])):
            # The frame was written into posted buffers we simply keep posted.
            counters["rx_mcast_filtered"] += 1
            return True
        hash_info: tuple[int, int] | None = None
        vif = self.vif
        if vif.hash.steering:
            # A private copy of the headers: the guest may rewrite its posted pages.
            head = bytes(views[0][:min(frame_len, hash.HEAD_BYTES)])
            queue, hash_info = vif.hash.steer(head, vif.num_queues)
            if queue != self.index:
                # Another queue's frame: it waits in that queue's inbox, and the buffers
                # it was read into stay posted here.
                data = b"".join(bytes(v) for v in views)[:frame_len]
                if vif.inbox(queue).put(Steered(bytes(self._hdr), data, hash_info)):
                    counters["rx_steered"] += 1
                    vif.wake_rx(queue)
                else:
                    counters["rx_dropped"] += 1
                return True
        npages = pages_for(frame_len)
        extras = (gso is not None) + (hash_info is not None)
        if npages + extras > len(posted):
            # Not reached: the reserve holds every extra slot a frame can need.
            counters["rx_dropped"] += 1
            return True
        if npages > 1 and extras < reserve:
            # Fewer extra-info slots than reserved: the data pages move down.
            for k in range(1, npages):
                self._page(posted[extras + k])[:] = self._page(posted[reserve + k])
                if log is not None and posted[extras + k].mapping is not None:
                    log.mark(posted[extras + k].mapping.frame)
        self._respond(vnet, frame_len, gso, hash_info)
        return True

    def _deliver(self, s: Steered) -> None:
        """A frame another queue read for this one: copied into the posted buffers,
        laid out as a frame read here would be."""
        vnet = VnetHeader.unpack(s.vnet)
        gso = rx_gso(vnet)
        frame_len = len(s.frame)
        extras = (gso is not None) + (s.hash is not None)
        if pages_for(frame_len) + extras > len(self.posted):
            # The frontend turned hashing off since (a smaller reserve): no room.
            self.vif.counters["rx_dropped"] += 1
            return
        log = self.grants.memory.log
        for k in range(pages_for(frame_len)):
            chunk = s.frame[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]
            dst = self.posted[extras + k if k else 0]
            if log is not None and dst.mapping is not None:
                log.mark(dst.mapping.frame)  # before the write, and the response
            self._page(dst)[:len(chunk)] = chunk
        self._respond(vnet, frame_len, gso, s.hash)

    def _respond(self, vnet: VnetHeader, frame_len: int, gso: tuple[int, int] | None,
                 hash_info: tuple[int, int] | None) -> None:
        """Answer a frame laid out in the posted buffers: the first data page in the
        first, the extra-info slots next, then the other data pages."""
        posted = self.posted
        counters = self.vif.counters
        extras = (gso is not None) + (hash_info is not None)
        used = pages_for(frame_len) + extras
        entries = [posted.popleft() for _ in range(used)]
        # The extra-info slots carry no data: their buffers are neither written nor needed.
        data_pos = [0, *range(1 + extras, used)]
        failed = frozenset(i for i in data_pos if entries[i].mapping is None)
        for p in entries:
            if p.mapping is not None:
                p.mapping.release()
        for slot in rx_responses([p.id for p in entries], frame_len,
                                 rx_netif_flags(vnet), gso, failed, hash_info):
            self.ring.put_response(slot + bytes(RX_ENTRY_SIZE - len(slot)))
        if failed:
            # Part of the frame went to scratch: the frontend drops it (the ERROR slot).
            counters["rx_dropped"] += 1
            return
        counters["rx_packets"] += 1
        counters["rx_bytes"] += frame_len
        if gso is not None:
            counters["rx_gso"] += 1

    def _gso_allowed(self, gtype: int) -> bool:
        f = self.vif.features
        return (f.gso_tcpv4 if gtype == NetGsoType.TCPV4 else f.gso_tcpv6)
