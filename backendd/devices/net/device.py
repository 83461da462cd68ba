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
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from backendd.dataplane import netkernel
from backendd.dataplane.netkernel import NetKernel
from backendd.devices.base import Device, DeviceContext, RingSnapshot, register
from backendd.dirtylog import RingLog
from backendd.errors import ConfigError, ControlError
from backendd.grants import GrantMapping
from rings.netif import RX_ENTRY_SIZE, TX_ENTRY_SIZE
from rings.ring import BackRing, SharedRing

from .ratelimit import CreditScheduler, parse_rate
from .rx import RxPath
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

CONFIG_KEYS = {"tap", "mac", "mtu", "bridge", "rate", "netns", "queues", "dataplane"}
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
DEFAULT_MTU = 1500
MAX_QUEUES = 8


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

    def close(self) -> None:
        self.tx.stop()
        self.rx.stop()
        for ch in self.channels:
            ch.close()
        for shared in (self.tx_shared, self.rx_shared):
            shared.release()
        self.tx_map.release()
        self.rx_map.release()


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
        self.counters_base: dict[str, int] = {}
        self.fds: list[int] = []
        self.queues: list[_Queue] = []
        self.vif: VifState | None = None
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
                                self.netns, attach_existing)
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
        self.vif = vif = VifState(self.devid, features, mtu, self._on_fatal,
                                  self.guest_error)
        # Offloads the kernel may hand us: only what the frontend takes, for v4 and v6.
        csum = features.csum and features.ipv6_csum
        for q in range(nq):
            # Each queue has its own credit, as in netback.
            credit = (CreditScheduler(*self.rate, self.ctx.loop.time())
                      if self.rate else None)
            prefix = "" if nq == 1 else f"queue-{q}/"
            fd = self.fds[q]
            offload = set_offload(fd, csum, features.gso_tcpv4, features.gso_tcpv6)
            if q:
                set_queue_attached(fd, True)
            self.queues.append(self._connect_queue(q, prefix, keys, channels, taken, fd,
                                                   vif, offload, credit))
        for queue in self.queues:
            queue.rx.start()
            queue.tx.kick()

    def _connect_queue(self, q: int, prefix: str, keys: Mapping[str, str],
                       channels: Mapping[int, EventChannel], taken: set[int], fd: int,
                       vif: VifState, offload: int, credit: CreditScheduler | None) -> _Queue:
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
        tx_back, rx_back = BackRing.attach(tx_shared), BackRing.attach(rx_shared)
        tx_back.log = RingLog(grants.memory, [tx_map.frame])
        rx_back.log = RingLog(grants.memory, [rx_map.frame])
        tx: TxPath
        if self.kernel is not None:
            from backendd.dataplane.net import CompiledTxPath  # it builds on TxPath

            tx = CompiledTxPath(self.kernel, tx_back, grants, fd, vif,
                                loop, name, credit)
        else:
            tx = TxPath(tx_back, grants, fd, vif, loop, name, credit)
        rx: RxPath
        if self.kernel is not None:
            from backendd.dataplane.net import CompiledRxPath

            rx = CompiledRxPath(self.kernel, rx_back, grants, fd, vif,
                                loop, name, gso_offload=bool(offload & 0x6))
        else:
            rx = RxPath(rx_back, grants, fd, vif, loop, name,
                        gso_offload=bool(offload & 0x6))
        queue = _Queue(q, fd, tx_map, rx_map, tx_shared, rx_shared, tx, rx)
        tx_ch, rx_ch = channels[tx_port], channels[rx_port]
        taken.update({tx_port, rx_port})
        queue.channels = [tx_ch] if tx_ch is rx_ch else [tx_ch, rx_ch]
        tx.notify = tx_ch.notify
        rx.notify = rx_ch.notify
        if tx_ch is rx_ch:
            def both() -> None:
                tx.kick()
                rx.kick()
            tx_ch.start(loop, both)
        else:
            tx_ch.start(loop, tx.kick)
            rx_ch.start(loop, rx.kick)
        return queue

    def _on_fatal(self, message: str) -> None:
        # netbk_fatal_tx_err: the whole vif stops; its rings stay mapped until the
        # frontend disconnects, so nothing it does afterwards reaches the host.
        for queue in self.queues:
            queue.tx.stop()
            queue.rx.stop()
        self.ctx.notices.frontend_misbehaved(self.devid, message)

    def _teardown(self) -> None:
        for queue in self.queues:
            queue.close()
            if queue.index:
                with contextlib.suppress(OSError):
                    set_queue_attached(queue.fd, False)
        self.queues = []
        if self.vif is not None:
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
        return out

    def ring_snapshots(self) -> list[RingSnapshot]:
        out = []
        for q in self.queues:
            out.append(RingSnapshot(f"queue-{q.index}/tx", "netif-tx",
                                    bytes(q.tx_map.page_view())))
            out.append(RingSnapshot(f"queue-{q.index}/rx", "netif-rx",
                                    bytes(q.rx_map.page_view())))
        return out

    def ring_names(self) -> list[str]:
        return [f"queue-{q.index}/{way}" for q in self.queues for way in ("tx", "rx")]

