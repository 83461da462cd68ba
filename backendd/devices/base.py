"""What the daemon needs from a device backend, and what a device gets from the daemon.

A device sees only consumer interfaces: GuestMemory, GrantTable, EventChannel, and a
notice sink. It never learns how memory was mapped or where the VMM is.

Lifecycle, driven by backendd.xenbus from the frontend's state changes:
  __init__(config)          -> validate the toolstack config (ConfigError on a bad key)
  await prepare()           -> open what takes time without blocking the loop (an NBD
                               disk's connection); the default does nothing
  backend_keys()            -> feature keys published at InitWait
  await connect(keys, chans)-> map rings, start serving; returns keys to publish at
                               Connected (blk: sectors, info, sector-size ...)
  await disconnect()        -> stop taking requests, wait for in-flight I/O, answer it,
                               release grants and ring mappings; idempotent
  stats()                   -> counters for `backendd stats`
  ring_snapshots()          -> copies of the live rings for `backendd ring-dump`

Live migration (docs/protocol.md, SUSPEND to SET_DEVICE_STATE):
  await suspend()           -> stop taking requests, complete and answer what was taken,
                               publish; then nothing is written into guest memory and no
                               event is sent until resume() or disconnect
  await resume()            -> serve again, looking at the rings first
  save_state(xenbus_state)  -> the state sections of a suspended device (backendd.devstate)
  load_state(sections)      -> on the destination, before connect(): the next connect
                               resumes the rings from this state, suspended
  drop_state()              -> the frontend closed before connecting: forget that state
"""

from __future__ import annotations

import abc
import asyncio
import errno
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from backendd.errors import ControlError
from backendd.log import GuestLogLimiter

if TYPE_CHECKING:
    from backendd.devstate import Section
    from backendd.evtchn import EventChannel
    from backendd.grants import GrantTable
    from backendd.memory import GuestMemory


class NoticeSink(abc.ABC):
    """Daemon -> VMM notices (sent unsolicited on the control socket)."""

    @abc.abstractmethod
    def device_failed(self, devid: int, code: int, message: str) -> None: ...

    @abc.abstractmethod
    def frontend_misbehaved(self, devid: int, message: str) -> None: ...

    @abc.abstractmethod
    def keys_changed(self, devid: int, keys: Mapping[str, str]) -> None: ...


@dataclass(frozen=True)
class RingSnapshot:
    """A copy of one shared ring, for debugging: `layout` names how to decode the slots
    ("blkif-x86_64", "blkif-x86_32", "netif-tx", "netif-rx", "netifctrl"), `data` is the
    ring's bytes (shared header then slots) concatenated across its pages."""

    name: str
    layout: str
    data: bytes


@dataclass
class DeviceContext:
    """What the daemon hands every device of one guest."""

    memory: GuestMemory
    grants: GrantTable
    loop: asyncio.AbstractEventLoop
    notices: NoticeSink
    # Runs blocking work (file I/O) off the event loop.
    run_blocking: Callable[..., asyncio.Future] | None = None
    extras: dict[str, object] = field(default_factory=dict)


class Device(abc.ABC):
    type_name: ClassVar[str]

    def __init__(self, devid: int, config: Mapping[str, str], ctx: DeviceContext) -> None:
        self.devid = devid
        self.config = dict(config)
        self.ctx = ctx
        # SUSPEND until RESUME; a device connected from a state blob starts suspended.
        self.suspended = False

    @abc.abstractmethod
    def backend_keys(self) -> dict[str, str]:
        """Keys the backend publishes before the frontend connects (features)."""

    @abc.abstractmethod
    async def connect(self, frontend_keys: Mapping[str, str],
                      channels: Mapping[int, EventChannel]) -> dict[str, str]:
        """Map the rings named in frontend_keys, start serving. `channels` maps each
        event-channel port named in the keys to its EventChannel. Returns the keys to
        publish on reaching Connected. Raises ControlError / GuestError on bad keys."""

    @abc.abstractmethod
    async def disconnect(self) -> None:
        """Stop serving, finish or answer in-flight requests, release every grant and
        mapping. Safe to call twice and when never connected."""

    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """Counters: requests, bytes, errors, drops ..."""

    def guest_error(self, kind: str, message: str) -> bool:
        """A request answered ERROR because of the guest: a warning, rate-limited per
        guest, device and kind ([daemon] guest_log_burst). False, nothing logged, outside
        a daemon (unit rigs: no limiter in the extras)."""
        limiter = self.ctx.extras.get("guest_log")
        if not isinstance(limiter, GuestLogLimiter):
            return False
        conn = self.ctx.extras.get("conn", 0)
        limiter.warning((conn, self.devid, kind), "guest_error", conn=conn,
                        devid=self.devid, kind=kind, message=message)
        return True

    async def prepare(self) -> None:
        """After __init__, before backend_keys(): open what takes time (a network
        disk's connection) without blocking the event loop."""
        return None

    def set_inflight(self, region: memoryview) -> None:
        """Memory that survives the daemon, for recording in-flight requests (see
        backendd/inflight.py). Devices that cannot replay requests refuse it."""
        raise ControlError(errno.EOPNOTSUPP,
                           f"{self.type_name} devices do not track in-flight requests")

    def ring_snapshots(self) -> list[RingSnapshot]:
        """Copies of the connected rings, in a stable order (queue 0 first)."""
        return []

    def ring_names(self) -> list[str]:
        """The names of ring_snapshots(), without copying the rings (DAEMON_STATUS)."""
        return [r.name for r in self.ring_snapshots()]

    async def close(self) -> None:
        """Device removal: disconnect, then release backing resources (files, taps)."""
        await self.disconnect()

    async def suspend(self) -> None:
        """Quiesce (see the module's docstring); a suspended device stays suspended."""
        raise ControlError(errno.EOPNOTSUPP, f"{self.type_name} devices cannot be suspended")

    async def resume(self) -> None:
        raise ControlError(errno.EOPNOTSUPP, f"{self.type_name} devices cannot be suspended")

    def save_state(self, xenbus_state: int) -> list[Section]:
        raise ControlError(errno.EOPNOTSUPP, f"{self.type_name} devices have no state blob")

    def drop_state(self) -> None:
        """Forget a state that load_state() took and no connect used: the frontend went
        away (Closing, Closed) before connecting, so its next connect is a fresh one.
        A device without state blobs has nothing to forget."""
        return None

    def load_state(self, sections: list[Section]) -> None:
        raise ControlError(errno.EOPNOTSUPP, f"{self.type_name} devices have no state blob")


DEVICE_TYPES: dict[str, type[Device]] = {}


def register(cls: type[Device]) -> type[Device]:
    DEVICE_TYPES[cls.type_name] = cls
    return cls
