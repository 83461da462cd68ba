"""The blk Device: toolstack config -> backing image; frontend keys -> served rings."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from backendd.dataplane import kernel as blk_kernel
from backendd.dataplane.blk import CompiledRingQueue
from backendd.devices.base import Device, DeviceContext, RingSnapshot, register
from backendd.errors import ConfigError, ControlError
from backendd.inflight import InflightError, InflightRegion
from rings.blkif import BLKIF_CODECS
from rings.consts import BLKIF_PROTOCOL_NAMES
from rings.ring import BackRing, SharedRing
from rings.sring import RSP_PROD

from .config import parse_config
from .image import Image
from .keys import (
    MAX_QUEUES,
    FrontendKeyError,
    connected_keys,
    feature_keys,
    parse_frontend_keys,
)
from .queue import BATCH, Counters, RingQueue
from .request import Geometry

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
        self.cfg = parse_config(config, allowed)
        self.image = Image(self.cfg)
        self.geometry = Geometry(sectors=self.image.sectors,
                                 sector_size=self.cfg.sector_size,
                                 readonly=self.cfg.readonly, discard=self.image.discard,
                                 discard_secure=self.image.discard_secure)
        self.counters = Counters()
        self.batch = BATCH
        self.kernel = blk_kernel.load() if self.cfg.dataplane != "python" else None
        if self.cfg.dataplane == "compiled" and self.kernel is None:
            self.image.close()
            raise ConfigError(f"dataplane: compiled, but {blk_kernel.library_path()} is "
                              "not built (make builds it)")
        self.queues: list[RingQueue | CompiledRingQueue] = []
        self._channels: list[EventChannel] = []
        self._connected: dict[str, str] | None = None
        self._inflight: memoryview | None = None
        self._resize_timer: asyncio.TimerHandle | None = None

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
                    shared = SharedRing.over_pages([m.page_view() for m in maps],
                                                   codecs.entry_size)
                except BaseException:
                    for m in maps:
                        m.release()
                    raise
                back = BackRing(shared)
                table, replay = None, []
                if region is not None:
                    try:
                        table = region.queue(i, shared.size)
                        rec = table.recover(shared.idx[RSP_PROD])
                    except InflightError as e:
                        for m in maps:
                            m.release()
                        raise ControlError(errno.EINVAL,
                                           f"blk {self.devid} queue {i}: {e}") from e
                    # Resume where the earlier daemon stopped, not at BACK_RING_INIT.
                    back.req_cons = rec.req_cons
                    back.rsp_prod_pvt = back._pushed = rec.rsp_prod
                    replay = rec.replay
                args = dict(
                    index=i, back=back, ring_maps=maps, inflight=table, replay=replay,
                    channel=channels[qk.port], codecs=codecs, geometry=self.geometry,
                    image=self.image, grants=self.ctx.grants, submit=self._submit,
                    loop=self.ctx.loop, counters=self.counters,
                    on_corrupt=self._corrupt, batch=self.batch)
                if self.kernel is not None:
                    try:
                        queues.append(CompiledRingQueue(kernel=self.kernel, **args))
                    except BaseException:
                        for m in maps:
                            m.release()
                        raise
                else:
                    queues.append(RingQueue(**args))
        except BaseException:
            for q in queues:
                q.release()
            raise
        self.queues = queues
        for q in queues:
            q.start()
        self._connected = connected_keys(self.image)
        self._resize_timer = self.ctx.loop.call_later(RESIZE_CHECK_SECONDS,
                                                      self._check_size)
        return dict(self._connected)

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

    def _corrupt(self, message: str) -> None:
        log.warning("blk %d: frontend misbehaved: %s", self.devid, message)
        self.ctx.notices.frontend_misbehaved(self.devid, message)

    async def disconnect(self) -> None:
        if self._resize_timer is not None:
            self._resize_timer.cancel()
            self._resize_timer = None
        queues, self.queues = self.queues, []
        self._connected = None
        if queues:
            await asyncio.gather(*(q.stop() for q in queues))
        for q in queues:
            q.release()
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

    def stats(self) -> dict[str, int]:
        return self.counters.as_dict() | {"queues": len(self.queues),
                                          "compiled": int(self.kernel is not None)}

    async def close(self) -> None:
        await self.disconnect()
        self.image.close()
        if self._inflight is not None:
            self._inflight.release()
            self._inflight = None
