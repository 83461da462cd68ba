"""Tap devices: the /dev/net/tun file descriptors we open ourselves, and the link setup
(MAC, MTU, up, bridge, network namespace) done over rtnetlink with pyroute2.

A tap belongs to one device. The daemon creates its taps with IFF_TUN_EXCL, so a name
that is taken already is refused rather than attached to; attaching to an existing tap is
an opt-in of the daemon's configuration, and even then refused when anyone else (another
device, another process) has a queue of it open: after our fds are attached, the kernel's
own count of the tap's queues (IFLA_TUN_NUM_QUEUES + IFLA_TUN_NUM_DISABLED_QUEUES) must be
exactly ours.

Moving a tap into a named network namespace needs only CAP_NET_ADMIN: the link is moved
and brought up by one RTM_SETLINK carrying the namespace's fd (IFLA_NET_NS_FD); the
kernel moves the link first and applies the flags in its new namespace. No thread ever
enters another namespace (setns would need CAP_SYS_ADMIN).

pyroute2's synchronous API runs its own event loop and refuses to run inside ours, and its
asyncio API does not work on uvloop (datagram endpoints of family AF_NETLINK), so link
setup runs in a worker thread, which has no running loop. Netlink requests take a few
milliseconds; the daemon waits for them only when a device is added or removed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from backendd.errors import ConfigError, ControlError

from .vnet import VNET_HDR_LEN

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9

IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_TUN_EXCL = 0x8000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

IFNAMSIZ = 16
NETLINK_TIMEOUT = 10.0

T = TypeVar("T")


def check_ifname(name: str) -> str:
    """Interface names the kernel accepts and that cannot escape sysfs paths."""
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name) \
            or name in (".", "..") or ":" in name or "\0" in name:
        raise ConfigError(f"net: interface name {name!r}: must be 1-15 bytes without "
                          "'/', ':' or whitespace")
    return name


def _ifreq(name: str, flags: int) -> bytes:
    return struct.pack("16sH22x", name.encode(), flags)


def open_tap(name: str, multi_queue: bool = False, create: bool = False) -> int:
    """Open a queue of tap `name`: a non-blocking fd with 10-byte vnet headers. With
    `create`, the tap must not exist yet (IFF_TUN_EXCL); otherwise it is created or, when
    it exists, attached to."""
    check_ifname(name)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if multi_queue else 0)
        if create:
            flags |= IFF_TUN_EXCL
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EBUSY:
            why = ("an interface of that name exists; attaching to an existing tap needs "
                   "[network] attach_existing_taps = true" if create
                   else "in use by another device or process")
            raise ControlError(errno.EBUSY, f"net: tap {name}: {why}") from e
        raise ControlError(e.errno or errno.EIO, f"net: tap {name}: {e.strerror}") from e
    return fd


def set_offload(fd: int, csum: bool, tso4: bool, tso6: bool) -> int:
    """Which offloaded frames the kernel may hand us (what the frontend can take)."""
    flags = 0
    if csum:
        flags = TUN_F_CSUM | (TUN_F_TSO4 if tso4 else 0) | (TUN_F_TSO6 if tso6 else 0)
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
    return flags


def set_queue_attached(fd: int, attached: bool) -> None:
    """Attach or detach one queue of a multi-queue tap: the kernel spreads frames over
    attached queues only, so queues nobody serves are detached."""
    fcntl.ioctl(fd, TUNSETQUEUE, _ifreq("", IFF_ATTACH_QUEUE if attached
                                        else IFF_DETACH_QUEUE))


# --- link setup (worker thread) -------------------------------------------------------

_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")


def preload_netlink() -> None:
    """Import pyroute2 on the netlink thread now, in the background. The import takes
    about 0.2 s, which the first nic added would otherwise wait for; the destination of
    a same-host migration adds its nic while the guest is paused."""
    import importlib

    _executor.submit(importlib.import_module, "pyroute2")


def run_netlink(fn: Callable[..., T], *args: Any) -> T:
    """Run a pyroute2 job in the netlink thread and wait for it."""
    return _executor.submit(fn, *args).result(timeout=NETLINK_TIMEOUT)


async def run_netlink_async(fn: Callable[..., T], *args: Any) -> T:
    import asyncio

    return await asyncio.wrap_future(_executor.submit(fn, *args))


def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join("/run/netns", name))


@dataclass(frozen=True)
class LinkConfig:
    name: str
    mac: str | None = None
    mtu: int | None = None
    bridge: str | None = None
    netns: str | None = None
    up: bool = True
    # The queue fds the caller holds: the tap must have exactly these open, no others.
    # None: not checked.
    queues: int | None = None


def make_tap(name: str, queues: int, mtu: int | None, bridge: str | None,
             netns: str | None, attach_existing: bool, adopt: bool = False) -> list[int]:
    """A nic's tap with `queues` queue fds, configured (MTU, bridge or namespace, up).
    Every queue's fd is opened now: once the tap moves to another namespace, a new fd
    could not find it by name. Queues beyond the first stay detached until a frontend asks
    for them. The first open creates the tap, and fails if the name is taken, unless
    `attach_existing`. The taps the daemon creates are multi-queue taps even with one
    queue, so that a same-host migration's destination can attach its queues while the
    source still holds its own (see adopt_tap). Blocking (netlink): called while a device
    is added."""
    if adopt:
        return adopt_tap(name, queues)
    fds: list[int] = []
    try:
        for i in range(queues):
            fds.append(open_tap(name, multi_queue=queues > 1 or not attach_existing,
                                create=i == 0 and not attach_existing))
        for fd in fds[1:]:
            set_queue_attached(fd, False)
        # configure_link first checks that no fd but ours holds a queue of the tap.
        run_netlink(configure_link, LinkConfig(name, mtu=mtu, bridge=bridge, netns=netns,
                                               queues=len(fds)))
    except BaseException:
        close_fds(fds)
        raise
    return fds


def adopt_tap(name: str, queues: int) -> list[int]:
    """The destination of a same-host migration takes over the tap its source holds:
    only a multi-queue tap none of whose queues is attached (the source's device is
    suspended: it detached them), so a running device's tap is never taken. Our queues
    are added (the first attached, so frames wait in it until the device is resumed; the
    others detached), and the source's go when it removes its device. Link settings
    (MTU, bridge, up) are the tap's already. Blocking (netlink)."""
    run_netlink(_check_adoptable, name, 0)
    fds: list[int] = []
    try:
        for _ in range(queues):
            fds.append(open_tap(name, multi_queue=True))
        for fd in fds[1:]:
            set_queue_attached(fd, False)
        # Still ours alone: the source did not resume meanwhile.
        run_netlink(_check_adoptable, name, 1)
    except BaseException:
        close_fds(fds)
        raise
    return fds


def _check_adoptable(name: str, attached: int) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        found = ip.link_lookup(ifname=name)
        if not found:
            raise ControlError(errno.ENOENT, f"net: tap {name}: no such interface to adopt "
                               "(adopt-tap is for a same-host migration, whose source "
                               "daemon holds the tap)")
        data = None
        for link in ip.link("get", index=found[0]):
            info = link.get_attr("IFLA_LINKINFO")
            if info is not None and info.get_attr("IFLA_INFO_KIND") == "tun":
                data = info.get_attr("IFLA_INFO_DATA")
        if data is None or data.get_attr("IFLA_TUN_TYPE") != IFF_TAP:
            raise ConfigError(f"net: {name}: not a tap")
        if not data.get_attr("IFLA_TUN_MULTI_QUEUE"):
            raise ControlError(errno.EINVAL, f"net: tap {name}: not a multi-queue tap, so "
                               "it cannot be handed over while its holder has it open")
        now = data.get_attr("IFLA_TUN_NUM_QUEUES") or 0
        if now != attached:
            raise ControlError(errno.EBUSY, f"net: tap {name}: {now} queues attached: "
                               "its holder is serving it (SUSPEND the source's device "
                               "before adopting its tap)")


def open_netns(name: str) -> int:
    """An fd of the named network namespace (/run/netns/<name>), for IFLA_NET_NS_FD."""
    try:
        return os.open(os.path.join("/run/netns", name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"net: netns {name!r}: {e.strerror}") from e


def configure_link(cfg: LinkConfig) -> None:
    """MAC, MTU, bridge, namespace, up: the toolstack's hotplug work for a vif. Runs in
    the netlink thread; raises ConfigError naming what is wrong, ControlError(EBUSY) when
    someone else holds the tap."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ip:
            found = ip.link_lookup(ifname=cfg.name)
            if not found:
                raise ConfigError(f"net: tap {cfg.name}: not found after creation")
            index = found[0]
            if cfg.queues is not None:
                _check_holders(ip, index, cfg.name, cfg.queues)
            settings: dict[str, Any] = {}
            if cfg.mac:
                settings["address"] = cfg.mac
            if cfg.mtu:
                settings["mtu"] = cfg.mtu
            if settings:
                ip.link("set", index=index, **settings)
            if cfg.bridge:
                bridges = ip.link_lookup(ifname=cfg.bridge)
                if not bridges or not _is_bridge(ip, bridges[0]):
                    raise ConfigError(f"net: bridge {cfg.bridge}: no such bridge")
                ip.link("set", index=index, master=bridges[0])
            if cfg.netns:
                # One request: the kernel moves the link (which takes it down), then
                # applies the flags in the new namespace.
                ns_fd = open_netns(cfg.netns)
                try:
                    up = {"state": "up"} if cfg.up else {}
                    ip.link("set", index=index, net_ns_fd=ns_fd, **up)
                finally:
                    os.close(ns_fd)
            elif cfg.up:
                ip.link("set", index=index, state="up")
    except NetlinkError as e:
        raise ConfigError(f"net: tap {cfg.name}: link setup failed: {e}") from e


def tap_queue_count(ip: Any, index: int) -> int | None:
    """Queues open on multi-queue tap `index`, attached or detached. A single-queue tap
    (the kernel lets one fd at a time attach) counts 1. None: not a tap."""
    for link in ip.link("get", index=index):
        info = link.get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "tun":
            return None
        data = info.get_attr("IFLA_INFO_DATA")
        if data is None or data.get_attr("IFLA_TUN_TYPE") != IFF_TAP:
            return None
        if not data.get_attr("IFLA_TUN_MULTI_QUEUE"):
            return 1
        return (data.get_attr("IFLA_TUN_NUM_QUEUES") or 0) + \
            (data.get_attr("IFLA_TUN_NUM_DISABLED_QUEUES") or 0)
    return None


def _check_holders(ip: Any, index: int, name: str, ours: int) -> None:
    count = tap_queue_count(ip, index)
    if count is None:
        raise ConfigError(f"net: {name}: not a tap")
    if count != ours:
        raise ControlError(errno.EBUSY, f"net: tap {name}: in use by another device or "
                           f"process ({count} queues open, {ours} of them ours)")


def _is_bridge(ip: Any, index: int) -> bool:
    for link in ip.link("get", index=index):
        info = link.get_attr("IFLA_LINKINFO")
        if info is not None and info.get_attr("IFLA_INFO_KIND") == "bridge":
            return True
    return False


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
