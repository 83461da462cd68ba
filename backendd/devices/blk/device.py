"""The blk Device: toolstack config -> backing image; frontend keys -> served rings."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from backendd import devstate
from backendd.dataplane import kernel as blk_kernel
from backendd.dataplane.blk import CompiledRingQueue
from backendd.dataplane.blknbd import NbdRingQueue
from backendd.devices.base import Device, DeviceContext, RingSnapshot, register
from backendd.dirtylog import RingLog
from backendd.errors import ConfigError, ControlError, GuestError
from backendd.inflight import InflightError, InflightRegion, ring_id
from rings.blkif import BLKIF_CODECS
from rings.consts import BLKIF_PROTOCOL_NAMES
from rings.ring import BackRing, SharedRing
from rings.sring import REQ_PROD, RSP_PROD

from .config import parse_config
from .image import Image
from .keys import (
    MAX_QUEUES,
    FrontendKeyError,
    connected_keys,
    feature_keys,
    parse_frontend_keys,
)
from .nbd import NbdImage, NbdPolicy, is_nbd_uri
from .persistent import DEFAULT_LIMIT, PersistentGrants
from .persistent import STAT_KEYS as PGRANT_STAT_KEYS
from .queue import BATCH, Counters, RingQueue
from .request import Geometry
from .state import BlkState, RingState, decode_state, encode_pgrants

if TYPE_CHECKING:
    from backendd.evtchn import EventChannel
    from backendd.grants import GrantMapping

log = logging.getLogger(__name__)

# How often a connected disk looks at its backing store's size. Like blkback's resize
# watch, a change is published ("sectors", via KEYS_CHANGED) for the frontend to pick up.
RESIZE_CHECK_SECONDS = 1.0


@register
class BlkDevice(Device):
    type_name = "blk"

    def __init__(self, devid: int, config: Mapping[str, str], ctx: DeviceContext) -> None:
        super().__init__(devid, config, ctx)
        daemon_config = ctx.extras.get("config")
        allowed = getattr(daemon_config, "image_allowed", None)
        nbd_disk = is_nbd_uri(config.get("path", ""))
        self.cfg = parse_config(config, None if nbd_disk else allowed)
        self.kernel = blk_kernel.load() if self.cfg.dataplane != "python" else None
        if nbd_disk and self.kernel is not None:
            # The kernel serves an NBD disk's rings (blknbd); it keeps no persistent
            # grants, and pinning in C costs less than the guest's copies through them.
            self.cfg = dataclasses.replace(self.cfg, persistent=False)
        self.image: Image | NbdImage
        if nbd_disk:  # connected in prepare(); I/O on the event loop, not the pool
            self.image = NbdImage(self.cfg, NbdPolicy.from_config(daemon_config),
                                  ctx.loop, name=str(devid))
        else:
            self.image = Image(self.cfg, ctx.extras.get("open_image", os.open))
            self._set_geometry()
        self.counters = Counters()
        self.batch = BATCH
        self.pgrant_limit = DEFAULT_LIMIT  # per ring
        self.persistent = False  # negotiated at the last connect
        # Persistent-grant counters of rings already disconnected (stats are per device).
        self._pgrant_done: dict[str, int] = {}
        if self.cfg.dataplane == "compiled" and self.kernel is None:
            self.image.close()
            raise ConfigError(f"dataplane: compiled, but {blk_kernel.library_path()} is "
                              "not built (make builds it)")
        self.compiled = False  # the compiled kernel serves the rings of this connection
        self.queues: list[RingQueue | CompiledRingQueue] = []
        self._channels: list[EventChannel] = []
        self._connected: dict[str, str] | None = None
        self._inflight: memoryview | None = None
        self._resize_timer: asyncio.TimerHandle | None = None
        # The frontend keys the rings were connected with (the state blob carries them),
        # and a migrated state the next connect resumes from (SET_DEVICE_STATE).
        self._front_keys: dict[str, str] = {}
        self._incoming: BlkState | None = None

    def _set_geometry(self) -> None:
        self.geometry = Geometry(sectors=self.image.sectors,
                                 sector_size=self.cfg.sector_size,
                                 readonly=self.image.cfg.readonly,
                                 discard=self.image.discard,
                                 discard_secure=self.image.discard_secure)

    async def prepare(self) -> None:
        if isinstance(self.image, NbdImage):
            try:
                await self.image.open()
            except BaseException:
                self.image.close()
                raise
            self._set_geometry()

    def backend_keys(self) -> dict[str, str]:
        return feature_keys(self.image)

    def set_inflight(self, region: memoryview) -> None:
        if self._inflight is not None:
            self._inflight.release()
        self._inflight = region

    def _submit(self, fn, *args) -> asyncio.Future:
        if self.ctx.run_blocking is not None:
            return self.ctx.run_blocking(fn, *args)
        return self.ctx.loop.run_in_executor(None, functools.partial(fn, *args))

    async def connect(self, frontend_keys: Mapping[str, str],
                      channels: Mapping[int, EventChannel]) -> dict[str, str]:
        if self._connected is not None:
            return dict(self._connected)  # Initialised then Connected: already serving
        # Every channel handed to us is ours to close, used or not.
        self._channels = list(channels.values())
        front = parse_frontend_keys(frontend_keys, MAX_QUEUES)
        for q in front.queues:
            if q.port not in channels:
                raise FrontendKeyError(f"event-channel: port {q.port} has no channel")
        codecs = BLKIF_CODECS[front.abi]
        # Used only when both ends say 1 (the frontend's key is read at every connect).
        self.persistent = self.cfg.persistent and front.persistent
        incoming = self._incoming if self._incoming and self._incoming.front else None
        if incoming is not None:
            self._check_incoming(incoming, front)
        # The kernel does not keep persistent grants: a connection that uses them is
        # served by the Python path.
        self.compiled = self.kernel is not None and not self.persistent
        queues: list[RingQueue | CompiledRingQueue] = []
        region = None
        if self._inflight is not None:
            try:
                region = InflightRegion(self._inflight, len(front.queues))
            except InflightError as e:
                raise ControlError(errno.EINVAL, f"blk {self.devid}: in-flight region: {e}") from e
        try:
            for i, qk in enumerate(front.queues):
                maps: list[GrantMapping] = []
                try:
                    # Ring pages stay mapped (and writable: we write responses) until
                    # disconnect.
                    for gref in qk.ring_refs:
                        maps.append(self.ctx.grants.map(gref, writable=True))
                    # Whole pages only: a v2 sub-page grant is the guest's error.
                    shared = SharedRing.over_pages(
                        [m.whole_page(f"ring page {n}") for n, m in enumerate(maps)],
                        codecs.entry_size)
                except BaseException:
                    for m in maps:
                        m.release()
                    raise
                table, rec = None, None
                if region is not None:
                    try:
                        table = region.queue(i, shared.size)
                        # Decide now, write once every queue is set up (a failed connect
                        # leaves the table as it was, for the next attempt).
                        rec = table.plan(shared.idx[REQ_PROD], shared.idx[RSP_PROD],
                                         ring_id(qk.ring_refs, qk.port))
                    except InflightError as e:
                        for m in maps:
                            m.release()
                        raise ControlError(errno.EINVAL,
                                           f"blk {self.devid} queue {i}: {e}") from e
                    if rec.reason:
                        log.warning("blk %d queue %d: in-flight table not resumed (%s): "
                                    "starting generation %d", self.devid, i, rec.reason,
                                    rec.generation)
                if incoming is not None:
                    # Migrated: where the source stopped, which it published (checked).
                    st = incoming.rings[i]
                    if shared.idx[RSP_PROD] != st.rsp_prod_pvt:
                        for m in maps:
                            m.release()
                        raise ControlError(errno.EINVAL, f"blk {self.devid} queue {i}: the "
                                           f"ring's rsp_prod is {shared.idx[RSP_PROD]}, the "
                                           f"device state says {st.rsp_prod_pvt}: this is "
                                           "not the guest's memory as it was at SUSPEND")
                    back = BackRing(shared, st.rsp_prod_pvt)
                    back.req_cons = st.req_cons
                elif rec is not None and not rec.fresh:
                    # Resume where the earlier daemon stopped, not at BACK_RING_INIT.
                    back = BackRing(shared, rec.rsp_prod)
                    back.req_cons = rec.req_cons
                else:
                    # A fresh ring, or a restart without a table: the shared rsp_prod says
                    # what was answered; everything past it is read again from the ring
                    # (BACK_RING_ATTACH). A fresh ring has it at 0.
                    back = BackRing.attach(shared)
                back.log = RingLog(self.ctx.memory, [m.frame for m in maps])
                args = dict(
                    index=i, back=back, ring_maps=maps, inflight=table, recovery=rec,
                    channel=channels[qk.port], codecs=codecs, geometry=self.geometry,
                    image=self.image, grants=self.ctx.grants,
                    submit=self.image.submit if isinstance(self.image, NbdImage)
                    else self._submit,
                    loop=self.ctx.loop, counters=self.counters,
                    on_corrupt=self._corrupt, on_refused=self._refused,
                    batch=self.batch)
                if self.compiled:
                    # An NBD disk's transfers go to libnbd (blknbd), a file's to the pool.
                    cls = NbdRingQueue if isinstance(self.image, NbdImage) \
                        else CompiledRingQueue
                    try:
                        queues.append(cls(kernel=self.kernel, **args))
                    except BaseException:
                        for m in maps:
                            m.release()
                        raise
                else:
                    queues.append(RingQueue(
                        **args, pgrants=PersistentGrants(self.ctx.grants, self.pgrant_limit)
                        if self.persistent else None))
                if incoming is not None:
                    queues[-1].migrated = True
                    self._restore_pgrants(queues[-1], incoming.pgrants.get(i, []))
        except BaseException:
            for q in queues:
                q.release()
            raise
        self.queues = queues
        self._front_keys = dict(frontend_keys)
        self._incoming = None
        if not self.suspended:  # suspended: RESUME starts them
            for q in queues:
                q.start()  # writes the table's decision first
        self._connected = connected_keys(self.image)
        self._resize_timer = self.ctx.loop.call_later(RESIZE_CHECK_SECONDS,
                                                      self._check_size)
        return dict(self._connected)

    def _check_incoming(self, st: BlkState, front: object) -> None:
        """The frontend keys of the connect must describe the rings the state has."""
        if front != st.front:
            raise ControlError(errno.EINVAL, f"blk {self.devid}: the frontend keys differ "
                               "from the device state's (rings, ports, protocol or "
                               "feature-persistent): connect with the frontend's keys as "
                               "they were at SUSPEND")
        if any(st.pgrants.values()) and not self.persistent:
            raise ControlError(errno.EINVAL, f"blk {self.devid}: the device state has "
                               "persistent grants, but this device does not use them "
                               "(config persistent=0?)")

    def _restore_pgrants(self, q: RingQueue | CompiledRingQueue,
                         grants: list[tuple[int, bool]]) -> None:
        if q.pgrants is None:
            return
        for gref, writable in grants:
            try:
                q.pgrants.restore(gref, writable)
            except GuestError as e:  # not cached: a later use pins it as a miss
                log.warning("blk %d queue %d: persistent grant not restored: %s",
                            self.devid, q.index, e)

    # --- live migration ---------------------------------------------------------------

    async def suspend(self) -> None:
        self.suspended = True
        started = [q for q in self.queues if q.started]
        if started:
            await asyncio.gather(*(q.suspend() for q in started))

    async def resume(self) -> None:
        if not self.suspended:
            return
        self.suspended = False
        for q in self.queues:
            q.resume()

    def save_state(self, xenbus_state: int) -> list[devstate.Section]:
        connected = self._connected is not None
        out = [devstate.DeviceSection(xenbus_state, connected,
                                      self._front_keys if connected else {}).encode()]
        if not connected:
            return out
        front = parse_frontend_keys(self._front_keys, MAX_QUEUES)
        for q, qk in zip(self.queues, front.queues, strict=True):
            req_cons, rsp_prod_pvt, pushed = q.saved_indices()
            out.append(RingState(q.index, qk.port, qk.ring_refs, req_cons, rsp_prod_pvt,
                                 pushed).encode())
            if q.pgrants is not None:
                out.append(encode_pgrants(q.index, q.pgrants.saved()))
        return out

    def drop_state(self) -> None:
        self._incoming = None

    def load_state(self, sections: list[devstate.Section]) -> None:
        if self._connected is not None:
            raise ControlError(errno.EBUSY, f"blk {self.devid}: SET_DEVICE_STATE on a "
                               "connected device")
        self._incoming = decode_state(sections, MAX_QUEUES)
        self.suspended = True

    def _check_size(self) -> None:
        self._resize_timer = None
        if self._connected is None:
            return
        try:
            changed = self.image.resized()
        except OSError as e:
            log.warning("blk %d: cannot read the backing store's size: %s", self.devid, e)
            changed = False
        if changed:
            # Requests validated from now on see the new bounds; those in flight were
            # checked against the old ones, which is what a guest may assume until told.
            self.geometry = dataclasses.replace(self.geometry, sectors=self.image.sectors)
            for q in self.queues:
                q.geo = self.geometry
            self._connected["sectors"] = str(self.image.sectors)
            log.info("blk %d: resized to %d sectors", self.devid, self.image.sectors)
            self.ctx.notices.keys_changed(self.devid, {"sectors": str(self.image.sectors)})
        self._resize_timer = self.ctx.loop.call_later(RESIZE_CHECK_SECONDS,
                                                      self._check_size)

    def _refused(self, message: str) -> None:
        # A guest can send bad requests as fast as it likes: at most guest_log_burst
        # lines a minute per device reach the log (docs/protocol.md, "Guest errors").
        if not self.guest_error("bad_request", message):  # outside a daemon: no noise
            log.debug("blk %d: %s", self.devid, message)

    def _corrupt(self, message: str) -> None:
        log.warning("blk %d: frontend misbehaved: %s", self.devid, message)
        self.ctx.notices.frontend_misbehaved(self.devid, message)

    async def disconnect(self) -> None:
        if self._resize_timer is not None:
            self._resize_timer.cancel()
            self._resize_timer = None
        queues, self.queues = self.queues, []
        self._connected = None
        nbd = self.image if isinstance(self.image, NbdImage) else None
        if nbd is not None:
            nbd.set_draining(True)  # no waiting for a server that is away
        if queues:
            await asyncio.gather(*(q.stop() for q in queues))
        if nbd is not None:
            nbd.set_draining(False)
        for q in queues:
            q.release()
            if q.pgrants is not None:
                for k, v in q.pgrants.stats().items():
                    self._pgrant_done[k] = self._pgrant_done.get(k, 0) + v
        for ch in self._channels:
            with contextlib.suppress(OSError):
                ch.close()
        self._channels = []

    def ring_snapshots(self) -> list[RingSnapshot]:
        out = []
        for q in self.queues:
            ring = q.back.ring
            pages = getattr(ring, "pages", [ring.area])
            abi = BLKIF_PROTOCOL_NAMES[q.codecs.abi].removesuffix("-abi")
            out.append(RingSnapshot(f"queue-{q.index}", f"blkif-{abi}",
                                    b"".join(bytes(p) for p in pages)))
        return out

    def ring_names(self) -> list[str]:
        return [f"queue-{q.index}" for q in self.queues]

    def stats(self) -> dict[str, int]:
        pg = dict.fromkeys(PGRANT_STAT_KEYS, 0)
        for k, v in self._pgrant_done.items():
            pg[k] += v
        for q in self.queues:
            if q.pgrants is not None:
                for k, v in q.pgrants.stats().items():
                    pg[k] += v
        pg["pgrants"] = sum(len(q.pgrants) for q in self.queues if q.pgrants is not None)
        for q in self.queues:
            fold = getattr(q, "fold_stats", None)  # counters kept in C until read
            if fold is not None:
                fold()
        extra = self.image.stats() if isinstance(self.image, NbdImage) else {}
        return self.counters.as_dict() | pg | {"queues": len(self.queues),
                                              "persistent": int(self.persistent),
                                              "compiled": int(self.compiled)} | extra

    async def close(self) -> None:
        await self.disconnect()
        self.image.close()
        if self._inflight is not None:
            self._inflight.release()
            self._inflight = None
