"""The guest -> host path of one queue: tx requests off the ring, frames gathered straight
out of the granted pages into the tap with one writev, a response for every slot.

Only the first bytes of each frame (its headers) are copied, into private memory: the
kernel parses exactly the headers we checked and whose checksum field we rewrote, and a
guest cannot change them under it (XSA-423: headers split across slots are linearized).
The payload goes from the granted pages to the kernel's copy in writev; the mappings are
released as soon as writev returns, before the responses are published (XSA-396).

Each packet is answered before the next is parsed, so between packets the ring holds no
consumed-but-unanswered request and a parse can always start afresh at req_cons: when the
tap is full or the credit is used up, nothing is consumed and the same packet is parsed
again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from backendd.errors import GuestError
from backendd.grants import GrantMapping, GrantTable
from rings.atomic import read_barrier
from rings.consts import NETBK_MCAST_MAX, NetifRsp
from rings.netif import TX_ENTRY_SIZE, TX_RESPONSE
from rings.ring import U32, BackRing
from rings.sring import REQ_PROD

from .ratelimit import CreditScheduler
from .tx import TxFatal, TxKind, TxPacket, decode_slot, parse_packet
from .vif import VifState
from .vnet import MAX_HEADER_COPY, tx_vnet_header

BUDGET = 64  # packets per wakeup before yielding to other rings (XSA-332)
_PAD = bytes(TX_ENTRY_SIZE - TX_RESPONSE.size)


class TxPath:
    def __init__(self, ring: BackRing, grants: GrantTable, fd: int, vif: VifState,
                 loop: asyncio.AbstractEventLoop, name: str,
                 credit: CreditScheduler | None = None) -> None:
        self.ring = ring
        self.grants = grants
        self.fd = fd
        self.vif = vif
        self.loop = loop
        self.name = name
        self.credit = credit
        self.notify = lambda: None  # set by the owner: signal the tx event channel
        self._scheduled = False
        self._waiting_writable = False
        self._timer: asyncio.TimerHandle | None = None
        self._charged: int | None = None  # req_cons of a packet admitted but not yet sent
        self.stopped = False
        self.suspended = False  # SUSPEND: the ring is not looked at until resume()

    # --- scheduling ---------------------------------------------------------------

    def kick(self) -> None:
        if not self._scheduled and not self.stopped and not self.suspended:
            self._scheduled = True
            self.loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        if self.stopped or self.suspended or self.vif.halted or self._waiting_writable:
            return
        if self.credit is not None and self.credit.waiting:
            return
        try:
            more = self._process()
        except TxFatal as e:
            self.vif.counters["tx_fatal"] += 1
            self.vif.fatal(f"{self.name}: {e}")
            return
        if self.ring.push_responses():
            self.notify()
        if more or (not self._blocked() and self.ring.final_check_for_requests()):
            self.kick()

    def _blocked(self) -> bool:
        return self._waiting_writable or (self.credit is not None and self.credit.waiting)

    def _on_writable(self) -> None:
        self._stop_writer()
        self.kick()

    def _stop_writer(self) -> None:
        if self._waiting_writable:
            self._waiting_writable = False
            with contextlib.suppress(Exception):
                self.loop.remove_writer(self.fd)

    def _on_credit(self) -> None:
        self._timer = None
        if self.credit is not None:
            self.credit.timer_fired()
        self.kick()

    def suspend(self) -> None:
        """Nothing more is taken: every packet is answered before the next is parsed,
        so only responses may be left to publish (and signal). A packet waiting for the
        tap or for credit stays on the ring, untouched."""
        self.suspended = True
        self._stop_writer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.ring.push_responses():
            self.notify()

    def resume(self) -> None:
        self.suspended = False
        if self.stopped:
            return
        if self.credit is not None and self.credit.waiting:
            self._timer = self.loop.call_at(self.credit.resume_at, self._on_credit)
        else:
            self.kick()

    def stop(self) -> None:
        self.stopped = True
        self._stop_writer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- the ring -----------------------------------------------------------------

    def _process(self) -> bool:
        """Handle up to BUDGET packets; True if the budget ran out with work left."""
        return all(self._step() for _ in range(BUDGET))

    def _step(self) -> bool:
        """Handle the packet at req_cons; False when there is none, or it must wait (the
        tap is full, the credit is used up)."""
        ring = self.ring
        shared = ring.ring
        prod = shared.idx[REQ_PROD]  # read once
        read_barrier()
        avail = (prod - ring.req_cons) & U32
        if avail == 0:
            return False
        if avail > ring.size:
            raise TxFatal(f"tx: impossible number of requests: req_prod {prod}, "
                          f"req_cons {ring.req_cons}")
        cons = ring.req_cons
        if self.credit is not None and self._charged != cons:
            first = decode_slot(shared.read_slot(cons))
            if not self.credit.admit(first.size, self.loop.time()):
                self.vif.counters["tx_rate_limited"] += 1
                self._timer = self.loop.call_at(self.credit.resume_at, self._on_credit)
                return False
            self._charged = cons
        packet = parse_packet(lambda i, c=cons: shared.read_slot(c + i), avail)
        status = self._handle(packet)
        if status is None:  # the tap is full: retry this packet when writable
            return False
        self._respond(packet, status)
        return True

    def _handle(self, packet: TxPacket) -> NetifRsp | None:
        counters = self.vif.counters
        if packet.kind is TxKind.ERROR:
            counters["tx_errors"] += 1
            self._guest_error(packet, packet.reason)
            return NetifRsp.ERROR
        if packet.kind is TxKind.MCAST_ADD:
            if self.vif.mcast_add(packet.mcast):
                return NetifRsp.OKAY
            counters["tx_errors"] += 1
            self._guest_error(packet, "tx: multicast add beyond the list's "
                              f"{NETBK_MCAST_MAX} addresses")
            return NetifRsp.ERROR
        if packet.kind is TxKind.MCAST_DEL:
            self.vif.mcast_del(packet.mcast)
            return NetifRsp.OKAY
        return self._send(packet)

    def _send(self, packet: TxPacket) -> NetifRsp | None:
        counters = self.vif.counters
        maps: list[GrantMapping] = []
        try:
            views = [self._map(maps, packet.first.gref, packet.first.offset, packet.first_len)]
            for frag in packet.frags:
                # Zero-length slots are answered without touching their grants (XSA-448).
                if frag.size:
                    views.append(self._map(maps, frag.gref, frag.offset, frag.size))
            frame_len = packet.first.size
            headers, rest = _split_headers(views, min(frame_len, MAX_HEADER_COPY))
            vnet = tx_vnet_header(packet.first.flags, packet.gso, headers, frame_len)
            if vnet is None:
                # netback answers OKAY and drops when skb_checksum_setup fails.
                counters["tx_dropped_csum"] += 1
                return NetifRsp.OKAY
            try:
                os.writev(self.fd, [vnet.pack(), headers, *rest])
            except BlockingIOError:
                counters["tx_tap_full"] += 1
                self._waiting_writable = True
                self.loop.add_writer(self.fd, self._on_writable)
                return None
            except OSError:
                counters["tx_dropped_tap"] += 1
                return NetifRsp.OKAY
        except GuestError as e:
            counters["tx_errors"] += 1
            self._guest_error(packet, f"tx: {e}")
            return NetifRsp.ERROR
        finally:
            for m in maps:
                m.release()
        counters["tx_packets"] += 1
        counters["tx_bytes"] += frame_len
        if packet.gso is not None:
            counters["tx_gso"] += 1
        return NetifRsp.OKAY

    def _guest_error(self, packet: TxPacket, reason: str) -> None:
        self.vif.guest_error("tx_error", f"{self.name}: request id {packet.first.id} "
                             f"answered ERROR: {reason}")

    def _map(self, maps: list[GrantMapping], gref: int, offset: int,
             size: int) -> memoryview:
        m = self.grants.map(gref, writable=False)
        maps.append(m)
        return m.page_view(offset, size)

    def _respond(self, packet: TxPacket, status: NetifRsp) -> None:
        ring = self.ring
        ring.req_cons = (ring.req_cons + packet.nslots) & U32
        put = ring.put_response
        put(TX_RESPONSE.pack(packet.first.id, status) + _PAD)
        for _ in range(packet.extra_count):
            put(TX_RESPONSE.pack(0, NetifRsp.NULL) + _PAD)
        for frag in packet.frags:
            put(TX_RESPONSE.pack(frag.id, status) + _PAD)


def _split_headers(views: list[memoryview], n: int) -> tuple[bytearray, list[memoryview]]:
    """A private copy of the first n bytes across the views, and the views of the rest."""
    headers = bytearray()
    rest: list[memoryview] = []
    for v in views:
        need = n - len(headers)
        if need <= 0:
            rest.append(v)
        elif len(v) <= need:
            headers += v
        else:
            headers += v[:need]
            rest.append(v[need:])
    return headers, rest
