"""The simulated guest's network frontend (what Linux's xen-netfront does, in asyncio).

Per queue it grants a tx and an rx ring page, keeps the rx ring full of granted pages and
puts frames on the tx ring as Linux lays them out: whole pages from offset 0, the first
slot carrying the whole packet size, NETTXF_more_data chains, a GSO extra-info slot after
the first slot, csum_blank for checksum-offloaded frames.

Frames come from, and go to, either the caller (send_frame / received) or a "guest" tap
opened like the daemon's, living in a network namespace of its own: then the kernel's
TCP/IP stack sits on both ends, and the guest tap's vnet header tells us which frames are
GSO or checksum-offloaded. Tx frames are read from the guest tap straight into granted
guest pages; rx frames are written to it straight from them. Nothing blocks the loop:
every fd is watched with loop.add_reader.

Tx and rx pages stay granted for the life of the frontend (grant refs are reused, as a
frontend with persistent grants would); after each response the page's grant entry must
show the backend no longer uses it, else it is recorded in `busy_after_response`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from backendd.devices.net.tap import (
    LinkConfig,
    close_fds,
    configure_link,
    open_tap,
    run_netlink_async,
    set_offload,
)
from backendd.devices.net.vnet import GSO_TCPV4 as VIRTIO_GSO_TCPV4
from backendd.devices.net.vnet import GSO_TCPV6 as VIRTIO_GSO_TCPV6
from backendd.devices.net.vnet import VNET_HDR_LEN, VnetHeader, guest_vnet_header
from rings.consts import (
    GTF_READING,
    GTF_WRITING,
    NETIF_EXTRA_FLAG_MORE,
    PAGE_SIZE,
    NetCtrlType,
    NetExtraType,
    NetGsoType,
    NetifRsp,
    NetRxFlags,
    NetTxFlags,
)
from rings.netif import (
    CTRL_ENTRY_SIZE,
    CTRL_REQUEST,
    CTRL_RESPONSE,
    EXTRA_GSO,
    EXTRA_HASH,
    EXTRA_MCAST,
    RX_ENTRY_SIZE,
    RX_REQUEST,
    RX_RESPONSE,
    TX_ENTRY_SIZE,
    TX_REQUEST,
    TX_RESPONSE,
)
from rings.ring import FrontRing, SharedRing

from .evtchn import GuestPort, new_channel_pair
from .gnttab import GuestGrantTable
from .memory import GuestRAM

MAX_TX_PAGES = 17  # a 64 KiB GSO frame in whole pages
TX_SLOTS_PER_FRAME = MAX_TX_PAGES + 1  # plus the GSO extra
MAX_FRAME = MAX_TX_PAGES * PAGE_SIZE
VIRTIO_TO_NETIF_GSO = {VIRTIO_GSO_TCPV4: NetGsoType.TCPV4, VIRTIO_GSO_TCPV6: NetGsoType.TCPV6}


@dataclass
class _TxSlot:
    rid: int | None  # None: an extra-info slot
    page: int = -1  # index into the queue's tx pages, -1 for none


@dataclass
class _Queue:
    index: int
    tx_page: int
    rx_page: int
    tx_gref: int
    rx_gref: int
    tx_shared: SharedRing
    rx_shared: SharedRing
    tx: FrontRing
    rx: FrontRing
    tx_port: GuestPort
    rx_port: GuestPort
    call_fds: list[int]
    daemon_fds: list[tuple[int, int, int]]
    tx_pages: list[tuple[int, int]] = field(default_factory=list)  # (gfn, readonly gref)
    tx_free_pages: list[int] = field(default_factory=list)
    tx_free_ids: list[int] = field(default_factory=list)
    tx_inflight: deque[_TxSlot] = field(default_factory=deque)
    rx_bufs: dict[int, tuple[int, int]] = field(default_factory=dict)  # id -> (gfn, gref)
    rx_partial: list[bytes] = field(default_factory=list)
    tap_fd: int = -1
    tap_reading: bool = False
    space: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Ctrl:
    page: int
    gref: int
    shared: SharedRing
    ring: FrontRing
    port: GuestPort
    call_fd: int
    daemon_fds: tuple[int, int, int]
    next_id: int = 0
    answers: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    answered: asyncio.Event = field(default_factory=asyncio.Event)


class NetFront:
    def __init__(self, ram: GuestRAM, gnttab: GuestGrantTable, devid: int, *,
                 queues: int = 1, split: bool = False, sg: bool = True, gso: bool = True,
                 csum: bool = True, multicast_control: bool = False, rx_notify: bool = True,
                 first_port: int = 1, domid: int = 0, tx_pages: int = 64,
                 rx_sub_page: tuple[int, int] | None = None, ctrl_ring: bool = False
                 ) -> None:
        self.ram = ram
        self.gnttab = gnttab
        self.devid = devid
        self.split = split
        self.sg = sg
        self.gso = gso and sg
        self.csum = csum
        self.multicast_control = multicast_control
        self.rx_notify = rx_notify
        self.domid = domid
        self.received: deque[tuple[VnetHeader, bytes, int]] = deque()
        self.on_rx: Callable[[VnetHeader, list[memoryview], int], None] | None = None
        self.counters: dict[str, int] = {}
        self.busy_after_response: list[int] = []
        self.raw_tx_responses: list[tuple[int, int]] = []
        self.rx_event = asyncio.Event()
        self.events = 0  # events (call eventfd wake-ups) received
        # A hostile frontend's rx buffers: granted as v2 sub-pages (offset, length), or,
        # for the ring indices in rx_bad_grefs, posted once with that gref instead.
        self.rx_sub_page = rx_sub_page
        self.rx_bad_grefs: dict[int, int] = {}
        self.rx_error_ids: list[int] = []  # request ids of rx slots answered with an error
        self._loop: asyncio.AbstractEventLoop | None = None
        self.queues: list[_Queue] = []
        port = first_port
        for q in range(queues):
            tx_page, rx_page = ram.alloc_page(), ram.alloc_page()
            tx_gref = gnttab.grant_access(tx_page, domid)
            rx_gref = gnttab.grant_access(rx_page, domid)
            tx_shared = SharedRing(ram.page(tx_page), TX_ENTRY_SIZE)
            rx_shared = SharedRing(ram.page(rx_page), RX_ENTRY_SIZE)
            tx_shared.init()
            rx_shared.init()
            pairs = [new_channel_pair(port + i) for i in range(2 if split else 1)]
            port += len(pairs)
            tx_port = pairs[0][0]
            rx_port = pairs[-1][0]
            queue = _Queue(q, tx_page, rx_page, tx_gref, rx_gref, tx_shared, rx_shared,
                           FrontRing(tx_shared), FrontRing(rx_shared), tx_port, rx_port,
                           [os.dup(call) for _, _, call in pairs],
                           [(p.port, kick, call) for p, kick, call in pairs])
            for _ in range(tx_pages):
                gfn = ram.alloc_page()
                queue.tx_pages.append((gfn, gnttab.grant_access(gfn, domid, readonly=True)))
            queue.tx_free_pages = list(range(tx_pages - 1, -1, -1))
            queue.tx_free_ids = list(range(tx_shared.size - 1, -1, -1))
            self.queues.append(queue)
        # Per frame delivered: (queue, (hash type, algorithm, value) from its hash
        # extra-info slot or None, the frame's first 128 bytes).
        self.rx_hashes: deque[tuple[int, tuple[int, int, int] | None, bytes]] = \
            deque(maxlen=1 << 16)
        self.ctrl: _Ctrl | None = None
        if ctrl_ring:
            page = ram.alloc_page()
            shared = SharedRing(ram.page(page), CTRL_ENTRY_SIZE)
            shared.init()
            guest_port, kick, call = new_channel_pair(port)
            self.ctrl = _Ctrl(page, gnttab.grant_access(page, domid), shared,
                              FrontRing(shared), guest_port, os.dup(call), (port, kick, call))

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # --- xenbus side ----------------------------------------------------------------

    def frontend_keys(self) -> dict[str, str]:
        keys = {
            "request-rx-copy": "1",
            "feature-rx-notify": "1" if self.rx_notify else "0",
            "feature-sg": "1" if self.sg else "0",
            "feature-gso-tcpv4": "1" if self.gso else "0",
            "feature-gso-tcpv6": "1" if self.gso else "0",
            "feature-ipv6-csum-offload": "1" if self.csum else "0",
        }
        if not self.csum:
            keys["feature-no-csum-offload"] = "1"
        if self.multicast_control:
            keys["request-multicast-control"] = "1"
        multi = len(self.queues) > 1
        if multi:
            keys["multi-queue-num-queues"] = str(len(self.queues))
        for q in self.queues:
            prefix = f"queue-{q.index}/" if multi else ""
            keys[prefix + "tx-ring-ref"] = str(q.tx_gref)
            keys[prefix + "rx-ring-ref"] = str(q.rx_gref)
            if self.split:
                keys[prefix + "event-channel-tx"] = str(q.tx_port.port)
                keys[prefix + "event-channel-rx"] = str(q.rx_port.port)
            else:
                keys[prefix + "event-channel"] = str(q.tx_port.port)
        if self.ctrl is not None:
            keys["ctrl-ring-ref"] = str(self.ctrl.gref)
            keys["event-channel-ctrl"] = str(self.ctrl.port.port)
        return keys

    def channels(self) -> list[tuple[int, int, int]]:
        """(port, kick_fd, call_fd): the daemon's ends; whoever takes them owns them."""
        out = [ch for q in self.queues for ch in q.daemon_fds]
        if self.ctrl is not None:
            out.append(self.ctrl.daemon_fds)
        return out

    # --- control ring ---------------------------------------------------------------

    def ctrl_post(self, req_type: int, d0: int = 0, d1: int = 0, d2: int = 0) -> int:
        """Put one control request on the ring and notify; returns its id."""
        c = self.ctrl
        assert c is not None, "no control ring (ctrl_ring=True)"
        rid = c.next_id & 0xFFFF
        c.next_id += 1
        c.ring.put_request(CTRL_REQUEST.pack(rid, req_type, d0, d1, d2))
        if c.ring.push_requests():
            c.port.send()
        return rid

    async def ctrl_request(self, req_type: int, d0: int = 0, d1: int = 0, d2: int = 0,
                           timeout: float = 5.0) -> tuple[int, int]:
        """One control request and its answer: (status, data)."""
        c = self.ctrl
        assert c is not None, "no control ring (ctrl_ring=True)"
        rid = self.ctrl_post(req_type, d0, d1, d2)

        async def answered() -> None:
            while rid not in c.answers:
                c.answered.clear()
                await c.answered.wait()
        await asyncio.wait_for(answered(), timeout)
        rtype, status, data = c.answers.pop(rid)
        assert rtype == req_type, f"response type {rtype} for a request of type {req_type}"
        return status, data

    async def ctrl_with_page(self, req_type: int, payload: bytes, d1: int, d2: int = 0,
                             readonly: bool = True) -> tuple[int, int]:
        """A control request naming a granted page holding `payload` (a key or a
        mapping table); the grant ends after the answer, as Linux's netfront does."""
        gfn = self.ram.alloc_page()
        self.ram.page(gfn)[:len(payload)] = payload
        gref = self.gnttab.grant_access(gfn, self.domid, readonly=readonly)
        try:
            return await self.ctrl_request(req_type, gref, d1, d2)
        finally:
            if self.gnttab.end_access(gref):
                self.ram.free_page(gfn)

    async def set_toeplitz(self, key: bytes, flags: int, mapping: list[int]) -> None:
        """Set up steering as a frontend does: algorithm, hash types, key, mapping table
        (every answer must be SUCCESS)."""
        steps = [
            await self.ctrl_request(NetCtrlType.SET_HASH_ALGORITHM, 1),
            await self.ctrl_request(NetCtrlType.SET_HASH_FLAGS, flags),
            await self.ctrl_with_page(NetCtrlType.SET_HASH_KEY, key, len(key)),
            await self.ctrl_request(NetCtrlType.SET_HASH_MAPPING_SIZE, len(mapping)),
        ]
        if mapping:
            steps.append(await self.ctrl_with_page(
                NetCtrlType.SET_HASH_MAPPING,
                b"".join(e.to_bytes(4, "little") for e in mapping), len(mapping), 0))
        assert all(status == 0 for status, _ in steps), steps

    def _ctrl_responses(self) -> None:
        c = self.ctrl
        assert c is not None
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(c.call_fd)
        while True:
            for raw in c.ring.take_responses():
                rid, rtype, status, data = CTRL_RESPONSE.unpack(raw[:CTRL_RESPONSE.size])
                c.answers[rid] = (rtype, status, data)
            if not c.ring.final_check_for_responses():
                break
        c.answered.set()

    def new_channels(self) -> list[tuple[int, int, int]]:
        """Fresh event channels (the same port numbers) for every queue, as a VMM makes
        for the destination of a migration. Returns the daemon's ends, like channels();
        rings, grants and buffers are kept. A notification pending on an old channel is
        carried over to the new one, as a VMM carries an event channel's pending bit."""
        for q in self.queues:
            pending = False
            for fd in q.call_fds:
                if self._loop is not None:
                    self._loop.remove_reader(fd)
                with contextlib.suppress(BlockingIOError):
                    pending |= os.eventfd_read(fd) > 0
            close_fds(q.call_fds)
            old_ports = [q.tx_port] if not self.split else [q.tx_port, q.rx_port]
            for port in old_ports:
                port.close()
            pairs = [new_channel_pair(port.port) for port in old_ports]
            q.tx_port, q.rx_port = pairs[0][0], pairs[-1][0]
            q.call_fds = [os.dup(call) for _, _, call in pairs]
            q.daemon_fds = [(p.port, kick, call) for p, kick, call in pairs]
            if pending:
                os.eventfd_write(q.call_fds[0], 1)
            if self._loop is not None:
                for fd in q.call_fds:
                    self._loop.add_reader(fd, self._on_call, q, fd)
        return self.channels()

    @property
    def started(self) -> bool:
        """Whether start() ran: responses are being collected."""
        return self._loop is not None

    def start(self) -> None:
        """Fill the rx rings and begin collecting responses (on the running loop)."""
        self._loop = asyncio.get_running_loop()
        for q in self.queues:
            q.space.set()
            for fd in q.call_fds:
                self._loop.add_reader(fd, self._on_call, q, fd)
            self._post_rx(q)
        if self.ctrl is not None:
            self._loop.add_reader(self.ctrl.call_fd, self._ctrl_responses)

    # --- guest tap ------------------------------------------------------------------

    async def attach_tap(self, name: str, netns: str | None = None, mac: str | None = None,
                         mtu: int | None = None) -> None:
        """Bridge the rings to tap `name` (one fd per queue), moved into `netns`."""
        multi = len(self.queues) > 1
        fds: list[int] = []
        try:
            for _ in self.queues:
                fds.append(open_tap(name, multi_queue=multi))
            for fd in fds:
                set_offload(fd, self.csum, self.gso, self.gso)
            await run_netlink_async(configure_link, LinkConfig(name, mac=mac, mtu=mtu,
                                                               netns=netns))
        except BaseException:
            close_fds(fds)
            raise
        for q, fd in zip(self.queues, fds, strict=True):
            q.tap_fd = fd
        self.on_rx = self._to_tap
        if self._loop is not None:
            for q in self.queues:
                self._tap_resume(q)

    def _tap_resume(self, q: _Queue) -> None:
        if q.tap_fd >= 0 and not q.tap_reading and self._loop is not None:
            q.tap_reading = True
            self._loop.add_reader(q.tap_fd, self._tap_readable, q)

    def _tap_pause(self, q: _Queue) -> None:
        if q.tap_reading and self._loop is not None:
            q.tap_reading = False
            self._loop.remove_reader(q.tap_fd)

    def _tap_readable(self, q: _Queue) -> None:
        hdr = bytearray(VNET_HDR_LEN)
        for _ in range(64):
            if len(q.tx_free_pages) < MAX_TX_PAGES or \
                    q.tx.free_requests() < TX_SLOTS_PER_FRAME:
                self._tap_pause(q)  # resumed when tx responses free space
                break
            pages = q.tx_free_pages[-MAX_TX_PAGES:][::-1]
            views = [self.ram.page(q.tx_pages[p][0]) for p in pages]
            try:
                n = os.readv(q.tap_fd, [hdr, *views])
            except BlockingIOError:
                break
            frame_len = n - VNET_HDR_LEN
            if frame_len <= 0 or frame_len > MAX_FRAME:
                self._count("tx_tap_bad")
                continue
            npages = -(-frame_len // PAGE_SIZE)
            del q.tx_free_pages[-npages:]
            self._put_tx(q, VnetHeader.unpack(hdr), pages[:npages], frame_len)
        self._push_tx(q)

    def _to_tap(self, vnet: VnetHeader, views: list[memoryview], q_index: int) -> None:
        q = self.queues[q_index]
        try:
            os.writev(q.tap_fd, [vnet.pack(), *views])
        except OSError:
            self._count("rx_tap_dropped")

    # --- tx -------------------------------------------------------------------------

    async def send_frame(self, frame: bytes, vnet: VnetHeader | None = None,
                         queue: int = 0) -> None:
        """Queue one frame on the tx ring (waiting for ring space and pages)."""
        q = self.queues[queue]
        npages = max(1, -(-len(frame) // PAGE_SIZE))
        if npages > MAX_TX_PAGES:
            raise ValueError(f"{len(frame)}-byte frame")
        while len(q.tx_free_pages) < npages or q.tx.free_requests() < npages + 1:
            q.space.clear()
            await q.space.wait()
        pages = [q.tx_free_pages.pop() for _ in range(npages)]
        for i, p in enumerate(pages):
            chunk = frame[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            self.ram.write(q.tx_pages[p][0] * PAGE_SIZE, chunk)
        self._put_tx(q, vnet or VnetHeader(), pages, len(frame))
        self._push_tx(q)

    def _put_tx(self, q: _Queue, vnet: VnetHeader, pages: list[int], frame_len: int) -> None:
        flags = 0
        if vnet.flags & 1:  # NEEDS_CSUM
            flags |= NetTxFlags.CSUM_BLANK | NetTxFlags.DATA_VALIDATED
        elif vnet.flags & 2:  # DATA_VALID
            flags |= NetTxFlags.DATA_VALIDATED
        gso = VIRTIO_TO_NETIF_GSO.get(vnet.gso_type & 0x7F)
        if gso is not None:
            flags |= NetTxFlags.EXTRA_INFO
            self._count("tx_gso")
        remaining = frame_len
        for i, p in enumerate(pages):
            size = frame_len if i == 0 else min(PAGE_SIZE, remaining)
            slot_flags = flags if i == 0 else 0
            remaining -= min(PAGE_SIZE, remaining)
            if i < len(pages) - 1:
                slot_flags |= NetTxFlags.MORE_DATA
            rid = q.tx_free_ids.pop()
            q.tx.put_request(TX_REQUEST.pack(q.tx_pages[p][1], 0, slot_flags, rid, size))
            q.tx_inflight.append(_TxSlot(rid, p))
            if i == 0 and gso is not None:
                q.tx.put_request(EXTRA_GSO.pack(NetExtraType.GSO, 0, vnet.gso_size, gso, 0,
                                                0) + bytes(TX_ENTRY_SIZE - EXTRA_GSO.size))
                q.tx_inflight.append(_TxSlot(None))
        self._count("tx_packets")
        self._count("tx_bytes", frame_len)

    def put_tx_raw(self, slots: list[bytes], queue: int = 0, push: bool = True) -> None:
        """Put request slots exactly as given (tests of malformed requests); their
        responses are collected into `raw_tx_responses`."""
        q = self.queues[queue]
        for raw in slots:
            q.tx.put_request(raw)
            q.tx_inflight.append(_TxSlot(-1))
        if push:
            self._push_tx(q)

    def tx_page(self, index: int, queue: int = 0) -> tuple[int, int]:
        """(gfn, readonly gref) of one of the queue's tx pages, for hand-made requests."""
        return self.queues[queue].tx_pages[index]

    def mcast(self, addr: bytes, add: bool = True, queue: int = 0) -> None:
        """XEN_NETIF_EXTRA_TYPE_MCAST_ADD/DEL on a dummy request, as netfront sends it."""
        q = self.queues[queue]
        rid = q.tx_free_ids.pop()
        q.tx.put_request(TX_REQUEST.pack(q.tx_pages[0][1], 0, NetTxFlags.EXTRA_INFO, rid, 0))
        q.tx_inflight.append(_TxSlot(rid))
        etype = NetExtraType.MCAST_ADD if add else NetExtraType.MCAST_DEL
        q.tx.put_request(EXTRA_MCAST.pack(etype, 0, addr) + bytes(TX_ENTRY_SIZE - 8))
        q.tx_inflight.append(_TxSlot(None))
        self._push_tx(q)

    def _push_tx(self, q: _Queue) -> None:
        if q.tx.push_requests():
            q.tx_port.send()

    def _tx_responses(self, q: _Queue) -> None:
        while True:
            for raw in q.tx.take_responses():
                rid, status = TX_RESPONSE.unpack_from(raw)
                slot = q.tx_inflight.popleft()
                if slot.rid == -1:
                    self.raw_tx_responses.append((rid, status))
                    continue
                if slot.rid is None:
                    if status != NetifRsp.NULL:
                        self._count("tx_bad_extra_status")
                    continue
                if rid != slot.rid:
                    self._count("tx_bad_id")
                if status != NetifRsp.OKAY:
                    self._count("tx_errors")
                q.tx_free_ids.append(slot.rid)
                if slot.page >= 0:
                    gref = q.tx_pages[slot.page][1]
                    if self.gnttab.entry(gref)[0] & (GTF_READING | GTF_WRITING):
                        self.busy_after_response.append(gref)
                    q.tx_free_pages.append(slot.page)
            if not q.tx.final_check_for_responses():
                break
        q.space.set()
        self._tap_resume(q)

    # --- rx -------------------------------------------------------------------------

    def _post_rx(self, q: _Queue) -> None:
        while q.rx.free_requests() > 0:
            index = q.rx.req_prod_pvt
            rid = index & (q.rx.size - 1)
            buf = q.rx_bufs.get(rid)
            if buf is None:
                gfn = self.ram.alloc_page()
                buf = (gfn, self.gnttab.grant_access(gfn, self.domid,
                                                     sub_page=self.rx_sub_page))
                q.rx_bufs[rid] = buf
            gref = self.rx_bad_grefs.pop(index, buf[1])
            q.rx.put_request(RX_REQUEST.pack(rid, gref))
        if q.rx.push_requests():
            q.rx_port.send()

    def _rx_responses(self, q: _Queue) -> None:
        while True:
            for raw in q.rx.take_responses():
                q.rx_partial.append(raw)
                self._rx_try_frame(q)
            if not q.rx.final_check_for_responses():
                break
        self._post_rx(q)

    def _rx_try_frame(self, q: _Queue) -> None:
        """Deliver the frame in rx_partial once its last slot has arrived."""
        slots = q.rx_partial
        first_id, _, first_flags, first_status = RX_RESPONSE.unpack(slots[0])
        pos = 1
        gso: tuple[int, int] | None = None
        hashed: tuple[int, int, int] | None = None
        if first_status >= 0 and first_flags & NetRxFlags.EXTRA_INFO:
            while True:
                if pos >= len(slots):
                    return
                etype, eflags, size, gtype, _, _ = EXTRA_GSO.unpack(slots[pos])
                if etype == NetExtraType.HASH:
                    _, _, htype, alg, value = EXTRA_HASH.unpack(slots[pos])
                    hashed = (htype, alg, int.from_bytes(value, "little"))
                pos += 1
                if etype == NetExtraType.GSO:
                    gso = (size, gtype)
                if not eflags & NETIF_EXTRA_FLAG_MORE:
                    break
        data = [(first_id, first_status, first_flags, slots[0])]
        flags = first_flags
        while flags & NetRxFlags.MORE_DATA and first_status >= 0:
            if pos >= len(slots):
                return
            rid, _, flags, status = RX_RESPONSE.unpack(slots[pos])
            data.append((rid, status, flags, slots[pos]))
            pos += 1
        if pos < len(slots):
            raise AssertionError("rx slots after a complete frame")
        q.rx_partial = []
        if any(status < 0 for _, status, _, _ in data):
            self.rx_error_ids += [rid for rid, status, _, _ in data if status < 0]
            self._count("rx_errors")
            return
        views = []
        for rid, status, _, raw in data:
            offset = RX_RESPONSE.unpack(raw)[1]
            gfn, gref = q.rx_bufs[rid]
            if self.gnttab.entry(gref)[0] & (GTF_READING | GTF_WRITING):
                self.busy_after_response.append(gref)
            views.append(self.ram.page(gfn, readonly=True)[offset:offset + status])
        frame_len = sum(len(v) for v in views)
        head = bytes(views[0][:256])
        self.rx_hashes.append((q.index, hashed, head[:128]))
        vnet = guest_vnet_header(first_flags, gso, head)
        self._count("rx_packets")
        self._count("rx_bytes", frame_len)
        if gso:
            self._count("rx_gso")
        if self.on_rx is not None:
            self.on_rx(vnet, views, q.index)
        else:
            self.received.append((vnet, b"".join(bytes(v) for v in views), first_flags))
            self.rx_event.set()

    # --- events ---------------------------------------------------------------------

    def _on_call(self, q: _Queue, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)
            self.events += 1
        self._tx_responses(q)
        self._rx_responses(q)

    async def wait_rx(self, count: int, timeout: float = 5.0) -> list[tuple[VnetHeader, bytes,
                                                                           int]]:
        """Wait until `count` frames were received (without a tap); returns them."""
        async def enough() -> None:
            while len(self.received) < count:
                self.rx_event.clear()
                await self.rx_event.wait()
        await asyncio.wait_for(enough(), timeout)
        return [self.received.popleft() for _ in range(count)]

    async def wait_tx_done(self, timeout: float = 5.0) -> None:
        """Wait until every tx request has its response."""
        async def drained() -> None:
            while any(q.tx_inflight for q in self.queues):
                await asyncio.sleep(0.002)
        await asyncio.wait_for(drained(), timeout)

    # --- teardown -------------------------------------------------------------------

    def close(self) -> None:
        for q in self.queues:
            if self._loop is not None:
                for fd in q.call_fds:
                    self._loop.remove_reader(fd)
                self._tap_pause(q)
            close_fds(q.call_fds)
            if q.tap_fd >= 0:
                close_fds([q.tap_fd])
                q.tap_fd = -1
            for port in {id(q.tx_port): q.tx_port, id(q.rx_port): q.rx_port}.values():
                port.close()
            q.tx_shared.release()
            q.rx_shared.release()
            pages = [(q.tx_page, q.tx_gref), (q.rx_page, q.rx_gref), *q.tx_pages,
                     *q.rx_bufs.values()]
            for gfn, gref in pages:
                # A page the backend still holds is never given back to the allocator.
                if self.gnttab.end_access(gref):
                    self.ram.free_page(gfn)
        self.queues = []
        c, self.ctrl = self.ctrl, None
        if c is not None:
            if self._loop is not None:
                self._loop.remove_reader(c.call_fd)
            close_fds([c.call_fd])
            c.port.close()
            c.shared.release()
            if self.gnttab.end_access(c.gref):
                self.ram.free_page(c.page)

