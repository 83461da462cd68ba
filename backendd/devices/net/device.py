"""The netif backend device: a tap per vif (one fd per queue), and per queue a tx and an
rx ring served on the event loop.

Config keys (ADD_DEVICE): tap, mac, mtu, bridge, rate, netns, queues, dataplane. The tap
is created
when the device is added (so the host side can be wired before the guest connects) and
removed when the device is; the rings live from connect to disconnect. `dataplane`
("compiled" or "python") picks who serves the tx and rx rings: the compiled kernel
(backendd/dataplane, the default when it is built) or the pure-Python reference.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from backendd import devstate
from backendd.dataplane import netkernel
from backendd.dataplane.netkernel import NetKernel
from backendd.devices.base import Device, DeviceContext, RingSnapshot, register
from backendd.dirtylog import RingLog
from backendd.errors import ConfigError, ControlError
from backendd.grants import GrantMapping
from rings.netif import CTRL_ENTRY_SIZE, RX_ENTRY_SIZE, RX_REQUEST, TX_ENTRY_SIZE
from rings.ring import BackRing, SharedRing
from rings.sring import REQ_PROD, RSP_PROD

from .ctrl import CtrlRing
from .hash import HashConfig
from .ratelimit import CreditScheduler, parse_rate
from .rx import RxPath
from .state import (
    MAX_QUEUES,
    CtrlState,
    NetState,
    QueueState,
    RateState,
    decode_state,
    encode_hash,
    encode_mcast,
    encode_posted,
    encode_vif,
)
from .tap import (
    check_ifname,
    close_fds,
    make_tap,
    netns_exists,
    set_offload,
    set_queue_attached,
)
from .txpath import TxPath
from .vif import COUNTERS, Features, VifState

if TYPE_CHECKING:
    from backendd.evtchn import EventChannel

CONFIG_KEYS = {"tap", "mac", "mtu", "bridge", "rate", "netns", "queues", "dataplane",
               "adopt-tap"}
log = logging.getLogger(__name__)
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
DEFAULT_MTU = 1500


@dataclass
class _Ctrl:
    ring: CtrlRing
    mapping: GrantMapping
    shared: SharedRing
    channel: EventChannel
    refs: tuple[int, int]  # ctrl-ring-ref, event-channel-ctrl

    def close(self) -> None:
        self.ring.stop()
        self.channel.close()
        self.shared.release()
        self.mapping.release()


@dataclass
class _Queue:
    index: int
    fd: int
    tx_map: GrantMapping
    rx_map: GrantMapping
    tx_shared: SharedRing
    rx_shared: SharedRing
    tx: TxPath
    rx: RxPath
    channels: list[EventChannel] = field(default_factory=list)
    # (channel, what a kick runs): listened to while the queue is served.
    listen: list[tuple[EventChannel, Callable[[], None]]] = field(default_factory=list)
    refs: tuple[int, int, int, int] = (0, 0, 0, 0)  # tx_ref, rx_ref, tx_port, rx_port

    def close(self) -> None:
        self.tx.stop()
        self.rx.stop()
        for ch in self.channels:
            ch.close()
        for shared in (self.tx_shared, self.rx_shared):
            shared.release()
        self.tx_map.release()
        self.rx_map.release()


def _back_ring(shared: SharedRing, st: tuple[int, int, int] | None, name: str) -> BackRing:
    """The back end of a ring: attached at its rsp_prod, or where a migrated state says
    (which the source published: the ring in this memory must show it)."""
    if st is None:
        return BackRing.attach(shared)
    req_cons, rsp_prod_pvt, pushed = st
    if pushed != rsp_prod_pvt or shared.idx[RSP_PROD] != pushed:
        raise ControlError(errno.EINVAL, f"{name}: the ring's rsp_prod is "
                           f"{shared.idx[RSP_PROD]}, the device state says {pushed} "
                           f"(rsp_prod_pvt {rsp_prod_pvt}): this is not the guest's memory "
                           "as it was at SUSPEND")
    back = BackRing(shared, rsp_prod_pvt)
    back.req_cons = req_cons
    return back


def check_posted(rx: SharedRing, st: QueueState, posted: list[tuple[int, bool, int]],
                  name: str) -> None:
    """The posted rx buffers of a state must be the requests the guest put in the rx
    ring's slots from rsp_prod_pvt on (taken, not answered: still there in the copy),
    and the ring's req_prod must be at or past the state's req_cons."""
    _, rsp_prod_pvt, _ = st.rx
    ahead = (rx.idx[REQ_PROD] - rsp_prod_pvt) & 0xFFFFFFFF
    if len(posted) > min(ahead, rx.size):
        raise ControlError(errno.EINVAL, f"{name}: the state has {len(posted)} posted rx "
                           f"buffers, the rx ring holds {ahead} requests past rsp_prod "
                           f"{rsp_prod_pvt} (of {rx.size}): req_cons beyond req_prod")
    for k, (req_id, _, gref) in enumerate(posted):
        slot = RX_REQUEST.unpack_from(rx.read_slot(rsp_prod_pvt + k))
        if slot != (req_id, gref):
            raise ControlError(errno.EINVAL, f"{name}: posted rx buffer {k} is id {req_id} "
                               f"gref {gref} in the state, id {slot[0]} gref {slot[1]} in "
                               "the rx ring")


def restore_credit(credit: CreditScheduler, rs: RateState, now: float) -> bool:
    """A migrated queue's credit carried on, if it was kept for the same rate (else
    False: it starts afresh). Clamped to what the credit can hold: no more than a burst
    banked, and the current window ending within two windows from `now` (a queue
    waiting for credit is between the end of one window and the next)."""
    if (rs.credit_bytes, rs.credit_usec) != (credit.credit_bytes,
                                              round(credit.credit_window * 1e6)):
        return False
    credit.remaining = min(rs.remaining, credit.max_burst)
    credit.waiting = rs.waiting
    left = min(max(rs.window_left_usec, 0), 2 * rs.credit_usec)
    credit.window_start = now + left / 1e6 - credit.credit_window
    return True


def _flag(keys: Mapping[str, str], name: str, default: bool = False) -> bool:
    value = keys.get(name)
    if value is None:
        return default
    return value.strip() == "1"


def _uint(keys: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = keys.get(name)
    if value is None:
        if default is None:
            raise ControlError(errno.EINVAL, f"net: frontend key {name} missing")
        return default
    value = value.strip()
    if not value.isdigit() or len(value) > 10:
        raise ControlError(errno.EINVAL, f"net: frontend key {name}={value!r}: not a number")
    return int(value)


@register
class NetDevice(Device):
    type_name = "net"

    def __init__(self, devid: int, config: Mapping[str, str], ctx: DeviceContext) -> None:
        super().__init__(devid, config, ctx)
        unknown = sorted(set(config) - CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"net: unknown config key {unknown[0]!r}")
        conn = ctx.extras.get("conn", 0)
        self.tap_name = check_ifname(config.get("tap") or f"vif{conn}.{devid}")
        self.mac = config.get("mac", "00:16:3e:00:00:01")
        if not MAC_RE.match(self.mac):
            raise ConfigError(f"net: mac {self.mac!r}: expected xx:xx:xx:xx:xx:xx")
        self.mtu = self._int_key("mtu", DEFAULT_MTU, 68, 65535)
        self.max_queues = self._int_key("queues", min(4, os.cpu_count() or 1), 1, MAX_QUEUES)
        self.rate = parse_rate(config["rate"]) if "rate" in config else None
        self.kernel = self._dataplane(config.get("dataplane"))
        self.bridge = config.get("bridge") or None
        daemon_config = ctx.extras.get("config")
        if self.bridge is not None:
            check_ifname(self.bridge)
            allowed = getattr(daemon_config, "bridge_allowed", None)
            if allowed is not None and not allowed(self.bridge):
                raise ConfigError(f"net: bridge {self.bridge}: not allowed by the daemon's "
                                  "configuration")
        self.netns = config.get("netns") or None
        if self.netns is not None:
            if "/" in self.netns or self.netns in (".", "..") or not netns_exists(self.netns):
                raise ConfigError(f"net: netns {self.netns!r}: no such network namespace")
            if self.bridge is not None:
                raise ConfigError("net: bridge and netns: a bridge port cannot move to "
                                  "another namespace")
        # The destination of a same-host migration: take over the tap the suspended
        # source holds instead of creating one (tap.adopt_tap).
        adopt = config.get("adopt-tap", "0")
        if adopt not in ("0", "1"):
            raise ConfigError(f"net: adopt-tap {adopt!r}: expected 0 or 1")
        self.adopt = adopt == "1"
        if self.adopt and not config.get("tap"):
            raise ConfigError("net: adopt-tap=1 needs the tap's name (tap)")
        if self.adopt and self.netns is not None:
            raise ConfigError("net: adopt-tap with netns: a tap in another namespace "
                              "cannot be found by name; migrate it as across hosts")
        self.counters_base: dict[str, int] = {}
        self.fds: list[int] = []
        self.queues: list[_Queue] = []
        self.ctrl: _Ctrl | None = None
        self.vif: VifState | None = None
        self._front_keys: dict[str, str] = {}
        self._incoming: NetState | None = None
        self._detached = False  # suspend() detached our tap queues
        network = getattr(daemon_config, "network", None)
        self._open_tap(bool(getattr(network, "attach_existing_taps", False)))

    @staticmethod
    def _dataplane(value: str | None) -> NetKernel | None:
        """The compiled kernel to serve tx and rx with, or None for the Python path."""
        if value not in (None, "compiled", "python"):
            raise ConfigError(f"net: dataplane {value!r}: expected compiled or python")
        if value == "python":
            return None
        kernel = netkernel.load()
        if kernel is None and value == "compiled":
            raise ConfigError("net: dataplane compiled: the kernel is not built "
                              "(make kernel)")
        return kernel

    def _int_key(self, key: str, default: int, low: int, high: int) -> int:
        value = self.config.get(key)
        if value is None:
            return default
        if not value.isdigit() or not low <= int(value) <= high:
            raise ConfigError(f"net: {key} {value!r}: expected {low}..{high}")
        return int(value)

    def _open_tap(self, attach_existing: bool) -> None:
        # A worker process has the supervisor make the tap (open_tap in its extras); the
        # fds come back in the same state.
        make = self.ctx.extras.get("open_tap")
        if make is None:
            self.fds = make_tap(self.tap_name, self.max_queues, self.mtu, self.bridge,
                                self.netns, attach_existing, self.adopt)
        elif self.adopt:
            self.fds = make(self.tap_name, self.max_queues, self.mtu, self.bridge,
                            self.netns, adopt=True)
        else:
            self.fds = make(self.tap_name, self.max_queues, self.mtu, self.bridge,
                            self.netns)

    # --- xenbus -------------------------------------------------------------------

    def backend_keys(self) -> dict[str, str]:
        keys = {
            "feature-sg": "1",
            "feature-gso-tcpv4": "1",
            "feature-gso-tcpv6": "1",
            "feature-ipv6-csum-offload": "1",
            "feature-rx-copy": "1",
            "feature-rx-flip": "0",
            "feature-split-event-channels": "1",
            "feature-multicast-control": "1",
            "feature-ctrl-ring": "1",
            "multi-queue-max-queues": str(self.max_queues),
            "mac": self.mac,
            "mtu": str(self.mtu),
        }
        return keys

    async def connect(self, frontend_keys: Mapping[str, str],
                      channels: Mapping[int, EventChannel]) -> dict[str, str]:
        await self.disconnect()
        taken: set[int] = set()
        try:
            self._connect(frontend_keys, channels, taken)
        except BaseException:
            self._teardown()
            raise
        else:
            self._front_keys = dict(frontend_keys)
            self._incoming = None
        finally:
            # Channels no key named are ours too (the session handed them over).
            for port, ch in channels.items():
                if port not in taken:
                    ch.close()
        return {}

    def _connect(self, keys: Mapping[str, str], channels: Mapping[int, EventChannel],
                 taken: set[int]) -> None:
        if not _flag(keys, "request-rx-copy"):
            raise ControlError(errno.EOPNOTSUPP, "net: frontend must request rx-copy "
                               "(rx-flip is not supported)")
        features = Features(
            sg=_flag(keys, "feature-sg"),
            gso_tcpv4=_flag(keys, "feature-gso-tcpv4") and _flag(keys, "feature-sg"),
            gso_tcpv6=_flag(keys, "feature-gso-tcpv6") and _flag(keys, "feature-sg"),
            csum=not _flag(keys, "feature-no-csum-offload"),
            ipv6_csum=_flag(keys, "feature-ipv6-csum-offload"),
            multicast_control=_flag(keys, "request-multicast-control"),
            rx_notify=_flag(keys, "feature-rx-notify"),
        )
        nq = _uint(keys, "multi-queue-num-queues", 1)
        if not 1 <= nq <= self.max_queues:
            raise ControlError(errno.EINVAL, f"net: {nq} queues requested, at most "
                               f"{self.max_queues}")
        mtu = self.mtu if features.sg else min(self.mtu, DEFAULT_MTU)
        incoming = self._incoming if self._incoming and self._incoming.features else None
        if incoming is not None and (incoming.features, incoming.mtu,
                                     len(incoming.queues)) != (features, mtu, nq):
            raise ControlError(errno.EINVAL, f"net {self.devid}: the frontend keys differ "
                               "from the device state's (features or queues): connect with "
                               "the frontend's keys as they were at SUSPEND")
        self.vif = vif = VifState(self.devid, features, mtu, self._on_fatal,
                                  self.guest_error, num_queues=nq)
        if incoming is not None:
            vif.halted = incoming.halted
            vif.mcast = set(incoming.mcast)
            if incoming.hash is not None:
                # Checked against this connect's queues (mapping entries name queues).
                try:
                    vif.hash = HashConfig.from_bytes(incoming.hash, nq)
                except ValueError as e:
                    raise ControlError(errno.EINVAL, f"net {self.devid}: {e}") from None
                vif.hash_generation += 1
        self._connect_ctrl(keys, channels, taken, vif,
                           incoming.ctrl if incoming is not None else None,
                           incoming is not None)
        # Offloads the kernel may hand us: only what the frontend takes, for v4 and v6.
        csum = features.csum and features.ipv6_csum
        for q in range(nq):
            # Each queue has its own credit, as in netback.
            credit = (CreditScheduler(*self.rate, self.ctx.loop.time())
                      if self.rate else None)
            prefix = "" if nq == 1 else f"queue-{q}/"
            fd = self.fds[q]
            offload = set_offload(fd, csum, features.gso_tcpv4, features.gso_tcpv6)
            if q and not self._detached:
                set_queue_attached(fd, True)
            st = incoming.queues[q] if incoming is not None else None
            if st is not None and credit is not None and q in incoming.rates:
                self._restore_credit(credit, incoming.rates[q])
            self.queues.append(self._connect_queue(q, prefix, keys, channels, taken, fd,
                                                   vif, offload, credit, st))
            if st is not None:
                queue = self.queues[-1]
                posted = incoming.posted.get(q, [])
                check_posted(queue.rx_shared, st, posted, f"net {self.devid} queue {q}")
                queue.rx.adopt(posted)
                queue.tx._charged = st.charged
        vif.rx_wake = [queue.rx.wake for queue in self.queues]
        if not self.suspended:  # suspended: RESUME starts them
            for queue in self.queues:
                self._serve(queue)
            if self.ctrl is not None:
                self.ctrl.channel.start(self.ctx.loop, self.ctrl.ring.kick)
                self.ctrl.ring.kick()  # requests posted before Connected are answered

    def _serve(self, queue: _Queue) -> None:
        for ch, on_kick in queue.listen:
            ch.start(self.ctx.loop, on_kick)
        queue.rx.start()
        queue.tx.kick()

    def _restore_credit(self, credit: CreditScheduler, rs: RateState) -> None:
        if not restore_credit(credit, rs, self.ctx.loop.time()):
            log.info("net %d: rate changed across the migration: credit starts afresh",
                     self.devid)

    def _connect_ctrl(self, keys: Mapping[str, str], channels: Mapping[int, EventChannel],
                      taken: set[int], vif: VifState, st: CtrlState | None,
                      migrated: bool) -> None:
        """The control ring, when the frontend gives ctrl-ring-ref (netback's
        connect_ctrl_ring): one whole page granted writable, its own event channel. From
        a device state (`migrated`), at the indices the state gives, with the same refs."""
        if "ctrl-ring-ref" not in keys:
            if st is not None:
                raise ControlError(errno.EINVAL, f"net {self.devid}: the device state has "
                                   "a control ring, the frontend keys none")
            return
        ref = _uint(keys, "ctrl-ring-ref")
        port = _uint(keys, "event-channel-ctrl")
        if port not in channels or port in taken:
            raise ControlError(errno.EINVAL, f"net: event channel {port}: not given "
                               "or used twice")
        if migrated and (st is None or (st.ref, st.port) != (ref, port)):
            raise ControlError(errno.EINVAL, f"net {self.devid}: the control ring's keys "
                               "differ from the device state's")
        mapping = self.ctx.grants.map(ref, writable=True)
        try:
            page = mapping.whole_page("the control ring")
            shared = SharedRing(page, CTRL_ENTRY_SIZE)
            try:
                back = _back_ring(shared, st.indices if st else None,
                                  f"net{self.devid}/ctrl")
            except BaseException:
                shared.release()
                raise
        except BaseException:
            mapping.release()
            raise
        back.log = RingLog(self.ctx.grants.memory, [mapping.frame])  # the dirty log
        ring = CtrlRing(back, self.ctx.grants, vif, self.ctx.loop, f"net{self.devid}/ctrl")
        channel = channels[port]
        taken.add(port)
        self.ctrl = _Ctrl(ring, mapping, shared, channel, (ref, port))
        ring.notify = channel.notify
        if self.suspended:
            ring.suspend()

    def hash_state(self) -> bytes:
        """The steering configuration the frontend set (HashConfig.to_bytes)."""
        return (self.vif.hash if self.vif is not None else HashConfig()).to_bytes()

    def _connect_queue(self, q: int, prefix: str, keys: Mapping[str, str],
                       channels: Mapping[int, EventChannel], taken: set[int], fd: int,
                       vif: VifState, offload: int, credit: CreditScheduler | None,
                       st: QueueState | None = None) -> _Queue:
        grants = self.ctx.grants
        loop = self.ctx.loop
        if prefix + "event-channel-tx" in keys:
            tx_port = _uint(keys, prefix + "event-channel-tx")
            rx_port = _uint(keys, prefix + "event-channel-rx")
        else:
            tx_port = rx_port = _uint(keys, prefix + "event-channel")
        for port in {tx_port, rx_port}:
            if port not in channels or port in taken:
                raise ControlError(errno.EINVAL, f"net: event channel {port}: not given "
                                   "or used twice")
        tx_ref = _uint(keys, prefix + "tx-ring-ref")
        rx_ref = _uint(keys, prefix + "rx-ring-ref")
        maps: list[GrantMapping] = []
        try:
            tx_map = grants.map(tx_ref, writable=True)
            maps.append(tx_map)
            rx_map = grants.map(rx_ref, writable=True)
            maps.append(rx_map)
            # A ring is a whole page: a v2 sub-page grant is the guest's error (EINVAL).
            tx_page = tx_map.whole_page("the tx ring")
            rx_page = rx_map.whole_page("the rx ring")
        except BaseException:
            for m in maps:
                m.release()
            raise
        tx_shared = SharedRing(tx_page, TX_ENTRY_SIZE)
        rx_shared = SharedRing(rx_page, RX_ENTRY_SIZE)
        name = f"net{self.devid}/queue-{q}"
        try:
            if st is not None and (st.tx_ref, st.rx_ref, st.tx_port, st.rx_port) != (
                    tx_ref, rx_ref, tx_port, rx_port):
                raise ControlError(errno.EINVAL, f"net {self.devid} queue {q}: the "
                                   "frontend keys differ from the device state's (ring "
                                   "refs or ports)")
            tx_back = _back_ring(tx_shared, st.tx if st else None, f"{name} tx")
            rx_back = _back_ring(rx_shared, st.rx if st else None, f"{name} rx")
        except BaseException:
            for shared in (tx_shared, rx_shared):
                shared.release()
            for m in maps:
                m.release()
            raise
        tx_back.log = RingLog(grants.memory, [tx_map.frame])
        rx_back.log = RingLog(grants.memory, [rx_map.frame])
        tx: TxPath
        if self.kernel is not None:
            from backendd.dataplane.net import CompiledTxPath  # it builds on TxPath

            tx = CompiledTxPath(self.kernel, tx_back, grants, fd, vif, loop, name, credit)
        else:
            tx = TxPath(tx_back, grants, fd, vif, loop, name, credit)
        rx: RxPath
        if self.kernel is not None:
            from backendd.dataplane.net import CompiledRxPath

            rx = CompiledRxPath(self.kernel, rx_back, grants, fd, vif,
                                loop, name, gso_offload=bool(offload & 0x6), index=q)
        else:
            rx = RxPath(rx_back, grants, fd, vif, loop, name,
                        gso_offload=bool(offload & 0x6), index=q)
        queue = _Queue(q, fd, tx_map, rx_map, tx_shared, rx_shared, tx, rx)
        queue.refs = (tx_ref, rx_ref, tx_port, rx_port)
        tx_ch, rx_ch = channels[tx_port], channels[rx_port]
        taken.update({tx_port, rx_port})
        queue.channels = [tx_ch] if tx_ch is rx_ch else [tx_ch, rx_ch]
        tx.notify = tx_ch.notify
        rx.notify = rx_ch.notify
        if self.kernel is not None:  # a polled kernel call reads kicks and signals itself
            tx.channel = tx_ch
            rx.channel = rx_ch
        if tx_ch is rx_ch:
            def both() -> None:
                tx.kick()
                rx.kick()
            queue.listen = [(tx_ch, both)]
        else:
            queue.listen = [(tx_ch, tx.kick), (rx_ch, rx.kick)]
        return queue

    # --- live migration ---------------------------------------------------------------

    async def suspend(self) -> None:
        if not self.suspended:
            self.suspended = True
            for queue in self.queues:
                for ch, _ in queue.listen:
                    ch.stop()  # kicks stay counted in the eventfd
                queue.tx.suspend()
                queue.rx.suspend()
            if self.ctrl is not None:
                self.ctrl.channel.stop()
                self.ctrl.ring.suspend()
        if not self._detached:
            # No frame waits in our queues while we do not read them, and the tap is
            # free for a same-host destination to adopt (tap.adopt_tap).
            self._detached = True
            for fd in self.fds:
                with contextlib.suppress(OSError):  # a single-queue tap cannot detach
                    set_queue_attached(fd, False)

    async def resume(self) -> None:
        if self._detached:
            self._detached = False
            for i, fd in enumerate(self.fds):
                if i == 0 or i < len(self.queues):
                    with contextlib.suppress(OSError):
                        set_queue_attached(fd, True)
        if not self.suspended:
            return
        self.suspended = False
        for queue in self.queues:
            for ch, on_kick in queue.listen:
                ch.start(self.ctx.loop, on_kick)
            queue.tx.resume()
            queue.rx.resume()
        if self.ctrl is not None:
            self.ctrl.channel.start(self.ctx.loop, self.ctrl.ring.kick)
            self.ctrl.ring.resume()

    def save_state(self, xenbus_state: int) -> list[devstate.Section]:
        vif = self.vif
        connected = bool(self.queues) and vif is not None
        out = [devstate.DeviceSection(xenbus_state, connected,
                                      self._front_keys if connected else {}).encode()]
        if not connected or vif is None:
            return out
        out.append(encode_vif(vif.features, vif.mtu, len(self.queues), vif.halted,
                              self.tap_name))
        now = self.ctx.loop.time()
        for queue in self.queues:
            tx, rx = queue.tx.ring, queue.rx.ring
            out.append(QueueState(queue.index, *queue.refs,
                                  (tx.req_cons, tx.rsp_prod_pvt, tx._pushed),
                                  (rx.req_cons, rx.rsp_prod_pvt, rx._pushed),
                                  queue.tx._charged).encode())
            out.append(encode_posted(queue.index, queue.rx.posted_buffers()))
            c = queue.tx.credit
            if c is not None:
                out.append(RateState(queue.index, c.waiting, c.credit_bytes,
                                     round(c.credit_window * 1e6), c.remaining,
                                     round((c.next_credit - now) * 1e6)).encode())
        out.append(encode_mcast(sorted(vif.mcast)))
        if self.ctrl is not None:
            c = self.ctrl.ring.ring
            out.append(CtrlState(*self.ctrl.refs,
                                 (c.req_cons, c.rsp_prod_pvt, c._pushed)).encode())
            out.append(encode_hash(vif.hash.to_bytes()))
        return out

    def drop_state(self) -> None:
        self._incoming = None

    def load_state(self, sections: list[devstate.Section]) -> None:
        if self.queues:
            raise ControlError(errno.EBUSY, f"net {self.devid}: SET_DEVICE_STATE on a "
                               "connected device")
        st = decode_state(sections)
        if st.features is not None and st.tap != self.tap_name and self.adopt:
            raise devstate.StateError(f"the source's tap is {st.tap}, this device adopted "
                                      f"{self.tap_name}")
        self._incoming = st
        self.suspended = True

    def _on_fatal(self, message: str) -> None:
        # netbk_fatal_tx_err: the whole vif stops; its rings stay mapped until the
        # frontend disconnects, so nothing it does afterwards reaches the host.
        for queue in self.queues:
            queue.tx.stop()
            queue.rx.stop()
        self.ctx.notices.frontend_misbehaved(self.devid, message)

    def _teardown(self) -> None:
        if self.ctrl is not None:
            self.ctrl.close()
            self.ctrl = None
        for queue in self.queues:
            queue.close()
            if queue.index:
                with contextlib.suppress(OSError):
                    set_queue_attached(queue.fd, False)
        self.queues = []
        if self.vif is not None:
            # The vif no longer wakes the paths (nor keeps them, and the ring views they
            # hold, alive: guest memory must be removable once the device is gone).
            self.vif.rx_wake = []
            for inbox in self.vif.inboxes:
                inbox.clear()
            for key, value in self.vif.counters.items():
                self.counters_base[key] = self.counters_base.get(key, 0) + value
            self.vif.counters.clear()

    async def disconnect(self) -> None:
        self._teardown()

    async def close(self) -> None:
        await self.disconnect()
        close_fds(self.fds)
        self.fds = []

    # --- reporting ------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        out = dict.fromkeys(COUNTERS, 0)
        live = self.vif.counters if self.vif is not None else {}
        for counters in (self.counters_base, live):
            for key, value in counters.items():
                out[key] = out.get(key, 0) + value
        out["queues"] = len(self.queues)
        out["ctrl_ring"] = int(self.ctrl is not None)
        return out

    def ring_snapshots(self) -> list[RingSnapshot]:
        out = []
        for q in self.queues:
            out.append(RingSnapshot(f"queue-{q.index}/tx", "netif-tx",
                                    bytes(q.tx_map.page_view())))
            out.append(RingSnapshot(f"queue-{q.index}/rx", "netif-rx",
                                    bytes(q.rx_map.page_view())))
        if self.ctrl is not None:
            out.append(RingSnapshot("ctrl", "netifctrl", bytes(self.ctrl.mapping.page_view())))
        return out

    def ring_names(self) -> list[str]:
        names = [f"queue-{q.index}/{way}" for q in self.queues for way in ("tx", "rx")]
        return names + (["ctrl"] if self.ctrl is not None else [])

