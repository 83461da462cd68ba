"""Live migration of a running simulated guest from one daemon to another: the VMM's side
of pre-copy (docs/migration.md is the sequence; docs/protocol.md the requests).

The guest runs on its own thread (GuestCpu, its one vCPU): its event loop drives the
frontends and whatever workload the guest runs. The VMM runs on the caller's event loop,
talks to both daemons and copies memory while the guest keeps running. To "pause the
guest" the VMM parks that thread, as a real VMM stops its vCPUs: nothing of the guest
runs until it is released, so no guest write can slip past the final copy.

What is dirty in a round is the union of
- the daemon's dirty log (its writes: block read data, net rx data, responses, ring
  indices, grant flags), read and cleared with DirtyLog;
- the guest's own writes, which the simulated VMM tracks: every write the guest makes
  through GuestRAM.write() and GuestGrantTable is recorded (a real VMM gets this from the
  hypervisor's dirty tracking of the vCPUs' writes);
- every page the guest holds a writable view of (GuestRAM.viewed: the frontends' rings,
  netfront's tx pages it reads frames into). Writes through such a view cannot be
  trapped one by one in this simulation, so these pages are counted dirty in every
  round, the final one included.

The switch: the destination's memory is a new memfd that the VMM fills with the copy.
Once the copy is final, the guest's own mappings are replaced by the destination's memfd
at the same addresses (mmap MAP_FIXED, GuestRAM.rebase): every memoryview the frontends
hold keeps its address and now reads and writes the destination's pages, as a migrated
guest finds its memory where it left it. The source's memfd stays with the source daemon
until its connection is closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from backendd.protocol.messages import ALL_DEVICES
from rings.consts import PAGE_SHIFT, PAGE_SIZE, XenbusState

from .blkfront import BlkFront
from .dirtylog import DirtyLog
from .machine import SimGuest
from .memory import sealed_memfd
from .netfront import NetFront
from .vmm import RequestFailed, VmmClient

T = TypeVar("T")


class GuestCpu:
    """The guest's vCPU: a thread running the guest's own event loop. The VMM can park
    it (pause) and, while it is parked, run functions on it (`while_paused`), e.g. give
    the frontends new event channels; nothing else of the guest runs meanwhile."""

    def __init__(self, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
                 ) -> None:
        self.loop = (loop_factory or asyncio.new_event_loop)()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]
                                      | None] = queue.SimpleQueue()
        self.paused = False
        self._thread = threading.Thread(target=self._run, name="guest-vcpu", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run `coro` on the guest; the returned future is thread-safe."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the guest and wait for it on the caller's loop."""
        return await asyncio.wrap_future(self.submit(coro))

    async def pause(self) -> None:
        """Park the guest's thread; returns once it is parked."""
        if self.paused:
            return
        parked: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.loop.call_soon_threadsafe(self._park, parked)
        await asyncio.wrap_future(parked)
        self.paused = True

    def _park(self, parked: concurrent.futures.Future[None]) -> None:
        parked.set_result(None)
        while (job := self._jobs.get()) is not None:
            fn, done = job
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed to the VMM, which raises it
                done.set_exception(exc)

    async def while_paused(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the parked guest's thread and return its result."""
        assert self.paused, "while_paused() needs pause() first"
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((fn, done))
        return await asyncio.wrap_future(done)

    def unpause(self) -> None:
        if self.paused:
            self.paused = False
            self._jobs.put(None)

    def close(self) -> None:
        """Cancel what still runs on the guest, then stop its thread."""
        self.unpause()
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self.submit(_cancel_all()).result(timeout=60)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
        self.loop.close()


async def _all(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run `coros` at once and wait for every one; then raise the first exception."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


async def _cancel_all() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Moving:
    """One device of the guest as the VMM moves it: ADD_DEVICE's config on the
    destination, and the guest's frontend (its current xenbus keys, its channels)."""

    devid: int
    dtype: str  # "blk" or "net"
    config: dict[str, str]
    front: BlkFront | NetFront
    inflight_size: int = 0  # blk: SET_INFLIGHT on the destination with a fresh memfd
    # Same-host net: the destination adopts the tap the source holds, which it may only
    # once the source's device is suspended (its tap queues detached), so this device's
    # ADD_DEVICE on the destination comes after SUSPEND, in the downtime.
    add_after_suspend: bool = False


@dataclass
class Report:
    precopy_pages: list[int] = field(default_factory=list)  # per round; round 0: all
    final_pages: int = 0
    pinned_pages: int = 0  # pages counted dirty every round (writable guest views)
    downtime: float = 0.0  # seconds, from sending SUSPEND to RESUME's reply
    steps: dict[str, float] = field(default_factory=dict)  # seconds per downtime step
    state_bytes: dict[int, int] = field(default_factory=dict)  # blob size per device
    ram_mismatch: list[int] = field(default_factory=list)  # gfns (with verify=True)
    gnttab_mismatch: list[int] = field(default_factory=list)  # table pages
    source_stats: dict[str, str] = field(default_factory=dict)  # GET_STATS, at the end


class CopyMismatch(Exception):
    """At the switch point the destination's memory differs from the source's."""

    def __init__(self, report: Report) -> None:
        super().__init__(f"destination differs from source: {len(report.ram_mismatch)} RAM "
                         f"pages (first {report.ram_mismatch[:8]}), "
                         f"{len(report.gnttab_mismatch)} grant-table pages")
        self.report = report


class MigrationAborted(Exception):
    """The destination refused the guest; the source was resumed and serves it still."""


class _Copier:
    """Source and destination mappings of one memfd, copied page by page."""

    def __init__(self, src_fd: int, size: int, name: str) -> None:
        self.size = size
        self.fd = sealed_memfd(name, size)
        self.src = mmap.mmap(src_fd, size, prot=mmap.PROT_READ)
        self.dst = mmap.mmap(self.fd, size)

    def copy_all(self) -> None:
        self.dst[:] = self.src[:]

    def copy(self, offsets: Iterable[int]) -> None:
        src, dst = self.src, self.dst
        for off in offsets:
            dst[off:off + PAGE_SIZE] = src[off:off + PAGE_SIZE]

    def differing(self) -> list[int]:
        """Offsets of the pages where destination and source differ."""
        src, dst = self.src, self.dst
        return [off for off in range(0, self.size, PAGE_SIZE)
                if src[off:off + PAGE_SIZE] != dst[off:off + PAGE_SIZE]]

    def close(self, keep_fd: bool) -> None:
        self.src.close()
        self.dst.close()
        if not keep_fd:
            os.close(self.fd)


class Migration:
    """One pre-copy migration of `guest` (whose devices the source connection `source`
    serves) to the daemon listening at `dest_path`.

    `use_daemon_log=False` breaks the copy on purpose: the VMM still sets the log and
    clears it every round, but ignores what it says, so pages only the daemon wrote are
    not copied again (the test shows that the switch-point comparison catches it)."""

    def __init__(self, guest: SimGuest, cpu: GuestCpu, source: VmmClient, dest_path: str,
                 devices: list[Moving], *, name: str | None = None,
                 use_daemon_log: bool = True, max_rounds: int = 8,
                 converge_pages: int = 512) -> None:
        self.guest = guest
        self.cpu = cpu
        self.source = source
        self.dest_path = dest_path
        self.devices = devices
        self.name = name
        self.use_daemon_log = use_daemon_log
        self.max_rounds = max_rounds
        self.converge_pages = converge_pages
        self.report = Report()
        # use_daemon_log=False: what the daemon's log said, and the VMM ignored.
        self.ignored_ram: set[int] = set()
        self.ignored_gnttab: set[int] = set()
        ram = guest.ram
        self.ram_pages = max(gpa + size for gpa, size, _, _ in ram.regions) >> PAGE_SHIFT
        # gfn -> offset in the RAM memfd (guest-physical holes have none).
        self._ram_offset = {gfn: offset + (gfn << PAGE_SHIFT) - gpa
                            for gpa, size, _, offset in ram.regions
                            for gfn in range(gpa >> PAGE_SHIFT, gpa + size >> PAGE_SHIFT)}
        self.gnttab_pages = guest.gnttab.size // PAGE_SIZE

    # --- dirty pages ----------------------------------------------------------------

    def _take(self, log: DirtyLog) -> tuple[set[int], set[int]]:
        """(gfns, grant-table pages) dirty since the last call; clears them."""
        daemon_ram, daemon_gnt = log.take_ram(), log.take_gnttab()
        if not self.use_daemon_log:
            self.ignored_ram |= daemon_ram
            self.ignored_gnttab |= daemon_gnt
            daemon_ram, daemon_gnt = set(), set()
        ram = daemon_ram | self.guest.ram.take_dirty() | self.guest.ram.viewed
        gnt = daemon_gnt | self.guest.gnttab.take_dirty()
        return ram, gnt

    def _copy(self, ram: _Copier, gnt: _Copier, gfns: set[int], pages: set[int]) -> int:
        offsets = self._ram_offset
        ram.copy(offsets[g] for g in gfns if g in offsets)
        gnt.copy(p * PAGE_SIZE for p in pages if p < self.gnttab_pages)
        return len(gfns) + len(pages)

    # --- the sequence -----------------------------------------------------------------

    async def run(self, verify: bool = False) -> VmmClient:
        """Migrate; returns the connection to the destination, which serves the guest
        now. `verify`: compare destination and source memory at the switch point and
        raise CopyMismatch (after resuming the source) when they differ."""
        guest, report = self.guest, self.report
        ram = _Copier(guest.ram.fd, guest.ram.size, "guest-ram")
        gnt = _Copier(guest.gnttab.fd, guest.gnttab.size, "guest-gnttab")
        log = DirtyLog(self.ram_pages, self.gnttab_pages)
        dest: VmmClient | None = None
        switched = False
        try:
            # The destination is set up ahead: its memory regions are the memfds the
            # copy goes into; the daemon does not read them before a device connects.
            dest = await VmmClient.connect(self.dest_path, name=self.name)
            for gpa, size, _, offset in guest.ram.regions:
                await dest.add_mem_region(gpa, size, ram.fd, offset)
            await dest.set_grant_table(gnt.fd, guest.gnttab.nr_frames,
                                       version=guest.gnttab.version)
            for dev in self.devices:
                if not dev.add_after_suspend:
                    await self._add_device(dest, dev)

            # Logging and tracking on before the first copy: every write after this
            # point is in the next round.
            await self.source.set_log(log.fd, log.size, self.ram_pages)
            guest.ram.track_writes(True)
            guest.gnttab.track_writes(True)
            ram.copy_all()
            gnt.copy_all()
            report.precopy_pages.append(len(self._ram_offset) + self.gnttab_pages)
            while len(report.precopy_pages) < self.max_rounds:
                # The guest runs on its own thread meanwhile; this loop answers notices.
                await asyncio.sleep(0)
                gfns, pages = self._take(log)
                report.precopy_pages.append(self._copy(ram, gnt, gfns, pages))
                if report.precopy_pages[-1] <= self.converge_pages:
                    break
            report.pinned_pages = len(guest.ram.viewed)

            await self.cpu.pause()
            switched = await self._stop_and_copy(dest, log, ram, gnt, verify)
        finally:
            guest.ram.track_writes(False)
            guest.gnttab.track_writes(False)
            log.close()  # the source keeps its own mapping until CLEAR_LOG or the end
            ram.close(keep_fd=switched)
            gnt.close(keep_fd=switched)
            if not switched:
                self.cpu.unpause()
                if dest is not None:
                    await dest.close()
                with contextlib.suppress(RequestFailed, ConnectionError):
                    await self.source.clear_log()  # the source serves on, unlogged
        assert dest is not None
        self.cpu.unpause()
        # The source, suspended since, serves nothing more: its counters are final.
        with contextlib.suppress(RequestFailed, ConnectionError):
            report.source_stats = await self.source.stats()
        await self.source.close()  # the source lets go of the guest and its devices
        return dest

    async def _add_device(self, dest: VmmClient, dev: Moving) -> None:
        await dest.add_device(dev.devid, dev.dtype, dev.config)
        if dev.inflight_size:
            fd = sealed_memfd(f"inflight-{dev.devid}", dev.inflight_size)
            try:
                await dest.set_inflight(dev.devid, fd, dev.inflight_size)
            finally:
                os.close(fd)

    async def _add_late(self, dest: VmmClient) -> None:
        for dev in self.devices:
            if dev.add_after_suspend:
                await self._add_device(dest, dev)

    async def _call_off(self, dest: VmmClient, late: asyncio.Future[None]) -> None:
        """Before anything connected on B: B lets go of its devices first (a same-host
        nic's tap queue with them), then A serves again."""
        with contextlib.suppress(RequestFailed, ConnectionError):
            await late
        for dev in self.devices:
            with contextlib.suppress(RequestFailed, ConnectionError):
                await dest.remove_device(dev.devid)
        await self.source.resume(ALL_DEVICES)

    async def _set_state(self, dest: VmmClient, dev: Moving, fd: int, size: int) -> None:
        await dest.set_device_state(dev.devid, fd, size)

    async def _stop_and_copy(self, dest: VmmClient, log: DirtyLog, ram: _Copier, gnt: _Copier,
                             verify: bool) -> bool:
        """The guest is paused. SUSPEND the source, final copy, move the devices' state,
        switch the guest to the destination's memory, RESUME there. True once switched;
        on a refusal before the switch, the source is resumed and MigrationAborted or
        CopyMismatch raised."""
        guest, report, steps = self.guest, self.report, self.report.steps
        start = time.perf_counter()
        mark = start

        def step(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            steps[name] = now - mark
            mark = now

        await self.source.suspend(ALL_DEVICES)
        step("suspend")
        # Devices B can only add now (a same-host nic adopting the suspended source's
        # tap) are added on B while the VMM copies and A hands out the state: two
        # daemons working at once.
        late = asyncio.ensure_future(self._add_late(dest))
        await asyncio.sleep(0)  # the task sends its first request before the copy
        blobs: dict[int, tuple[int, int]] = {}
        try:
            gfns, pages = self._take(log)
            report.final_pages = self._copy(ram, gnt, gfns, pages)
            step("final copy")
            if verify:
                differing = set(ram.differing())
                report.ram_mismatch = sorted(g for g, off in self._ram_offset.items()
                                             if off in differing)
                report.gnttab_mismatch = [off // PAGE_SIZE for off in gnt.differing()]
                step("verify")
                if report.ram_mismatch or report.gnttab_mismatch:
                    raise CopyMismatch(report)
            # Requests to one daemon are pipelined where their order does not matter:
            # it answers them in turn, without a round trip between them.
            for dev in self.devices:
                blobs[dev.devid] = (sealed_memfd(f"state-{dev.devid}", 0), 0)
            sizes = await _all(self.source.get_device_state(dev.devid, blobs[dev.devid][0])
                               for dev in self.devices)
            for dev, size in zip(self.devices, sizes, strict=True):
                blobs[dev.devid] = (blobs[dev.devid][0], size)
                report.state_bytes[dev.devid] = size
            step("get state")
            await late
            step("late add")
            await _all(self._set_state(dest, dev, *blobs[dev.devid]) for dev in self.devices)
            step("set state")
        except (RequestFailed, CopyMismatch) as exc:
            await self._call_off(dest, late)
            if isinstance(exc, CopyMismatch):
                raise
            raise MigrationAborted(str(exc)) from exc
        finally:
            for fd, _ in blobs.values():
                os.close(fd)
        # Fresh event channels for every frontend, made on the parked guest in one go.
        channels = await self.cpu.while_paused(
            lambda: [dev.front.new_channels() for dev in self.devices])
        step("new channels")
        # Only once every state was taken: a FRONTEND_STATE without one would connect the
        # device afresh.
        await _all(dest.hand_over_channels(dev.devid, XenbusState.CONNECTED,
                                           dev.front.frontend_keys(), chans)
                   for dev, chans in zip(self.devices, channels, strict=True))
        step("frontend state")
        old_ram = guest.ram.rebase(ram.fd)
        old_gnt = guest.gnttab.rebase(gnt.fd)
        os.close(old_ram)
        os.close(old_gnt)
        step("switch memory")
        await dest.resume(ALL_DEVICES)
        step("resume")
        report.downtime = time.perf_counter() - start
        return True


__all__ = ["CopyMismatch", "GuestCpu", "Migration", "MigrationAborted", "Moving", "Report"]
