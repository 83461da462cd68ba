"""The netif control ring (feature-ctrl-ring): the frontend's requests that set up
receive-side steering, answered one by one as netback's xenvif_ctrl_action does.

Each request is copied off the ring before it is looked at (XSA-155) and answered with
its id, its type, a status and a data word; what it sets is applied to the vif's
`HashConfig` (hash.py has the rules). Key and mapping tables are read from the grants the
request names, with the grant rules of any backend read (GrantTable.map, read-only use,
released at once): the copy starts at offset 0 of the granted page and must stay inside
the granted window. A request index more than a ring ahead halts this ring only (the
data rings go on); nothing more is answered on it until the frontend connects again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from backendd.errors import GuestError
from backendd.grants import GrantTable
from rings.consts import NetCtrlStatus
from rings.netif import CTRL_ENTRY_SIZE, CTRL_REQUEST, CTRL_RESPONSE
from rings.ring import BackRing, RingCorrupted

from .vif import VifState

BUDGET = 64  # requests per wake-up


class CtrlRing:
    def __init__(self, ring: BackRing, grants: GrantTable, vif: VifState,
                 loop: asyncio.AbstractEventLoop, name: str) -> None:
        self.ring = ring
        self.grants = grants
        self.vif = vif
        self.loop = loop
        self.name = name
        self.notify: Callable[[], None] = lambda: None
        self.on_change: Callable[[], None] = lambda: None
        self.halted = False
        self.stopped = False
        self.suspended = False
        self._kicked_while_suspended = False
        self._scheduled = False

    def kick(self) -> None:
        if self.suspended:
            self._kicked_while_suspended = True
            return
        if not self._scheduled and not self.stopped and not self.halted:
            self._scheduled = True
            self.loop.call_soon(self._run)

    def stop(self) -> None:
        self.stopped = True

    def suspend(self) -> None:
        """No more requests taken, no write into the ring, no notify until resume()
        (every request taken so far is answered already: each wake-up answers what it
        takes before it returns)."""
        self.suspended = True

    def resume(self) -> None:
        """Serve again, first looking at the ring for requests posted meanwhile."""
        self.suspended = False
        self._kicked_while_suspended = False
        self.kick()

    def read_grant(self, gref: int, nbytes: int) -> bytes | None:
        """The first `nbytes` of grant `gref`, copied as a grant copy from offset 0
        would be; None when the grant rules refuse it."""
        try:
            mapping = self.grants.map(gref, writable=False)
        except GuestError:
            return None
        try:
            lo, hi = mapping.window
            if lo != 0 or nbytes > hi:
                return None
            return bytes(mapping.page_view(0, nbytes))
        finally:
            mapping.release()

    def _run(self) -> None:
        self._scheduled = False
        if self.stopped or self.halted:
            return
        if self.suspended:
            self._kicked_while_suspended = True
            return
        vif = self.vif
        changed = False
        try:
            raws = self.ring.take_requests(BUDGET)
        except RingCorrupted as e:
            self.halted = True
            vif.counters["ctrl_halted"] += 1
            vif.guest_error("ctrl_ring", f"{self.name}: {e}; the control ring is halted")
            return
        for raw in raws:
            req_id, req_type, d0, d1, d2 = CTRL_REQUEST.unpack(raw)
            status, data = vif.hash.handle(req_type, (d0, d1, d2), vif.num_queues,
                                           self.read_grant)
            vif.counters["ctrl_requests"] += 1
            if status != NetCtrlStatus.SUCCESS:
                vif.counters["ctrl_errors"] += 1
            else:
                changed = True
            # the slot's last 4 bytes zeroed: nothing stale beside the response
            self.ring.put_response(CTRL_RESPONSE.pack(req_id, req_type, status, data)
                                   + bytes(CTRL_ENTRY_SIZE - CTRL_RESPONSE.size))
        if changed:
            vif.hash_generation += 1
            self.on_change()
        if self.ring.push_responses():
            self.notify()
        if len(raws) == BUDGET or self.ring.final_check_for_requests():
            self.kick()
