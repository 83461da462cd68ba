"""Guest-physical memory as the VMM shares it: regions of fds mmap'd into the daemon.

Every address that reaches this module came from a guest or from the VMM, so each one is
range-checked here with plain integer arithmetic (Python ints never wrap, so a sum that
would wrap in C is caught by comparing with 2**64 instead).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import mmap
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rings.consts import PAGE_SHIFT, PAGE_SIZE

from .errors import ControlError, GuestError

if TYPE_CHECKING:
    from .dirtylog import DirtyBitmap

ADDR_LIMIT = 1 << 64


class GuestMemoryError(GuestError):
    """A guest address that is not backed by guest memory."""


@dataclass
class _Region:
    gpa: int
    size: int
    map: mmap.mmap

    @property
    def end(self) -> int:
        return self.gpa + self.size


def _check_range(gpa: int, length: int) -> None:
    if not isinstance(gpa, int) or not isinstance(length, int):
        raise GuestMemoryError(f"address {gpa!r} / length {length!r}: not integers")
    if gpa < 0 or gpa >= ADDR_LIMIT:
        raise GuestMemoryError(f"address {gpa:#x}: outside the 64-bit address space")
    if length < 0 or gpa + length > ADDR_LIMIT:
        raise GuestMemoryError(f"range {gpa:#x}+{length:#x}: wraps the 64-bit address space")


class GuestMemory:
    """The guest's RAM, made of page-aligned, non-overlapping regions."""

    def __init__(self) -> None:
        # Sorted by gpa so lookups are a bisect, not a scan.
        self._regions: list[_Region] = []
        self._starts: list[int] = []
        self.generation = 0  # changes whenever a region or the dirty log changes
        self._native: NativeRegions | None = None
        # SET_LOG's bitmap (backendd/dirtylog.py) while the VMM logs writes, else None.
        self.log: DirtyBitmap | None = None

    @property
    def regions(self) -> list[tuple[int, int]]:
        return [(r.gpa, r.size) for r in self._regions]

    def add_region(self, gpa: int, size: int, fd: int, offset: int = 0) -> None:
        for name, value in (("gpa", gpa), ("size", size), ("offset", offset)):
            if not isinstance(value, int) or value < 0 or value % PAGE_SIZE:
                raise ControlError(errno.EINVAL, f"region {name} {value!r}: not page-aligned")
        if size == 0:
            raise ControlError(errno.EINVAL, "region size 0")
        if gpa + size > ADDR_LIMIT or offset + size > ADDR_LIMIT:
            raise ControlError(errno.EINVAL, f"region {gpa:#x}+{size:#x}: beyond 2**64")
        if self.log is not None and gpa + size > self.log.ram_pages << PAGE_SHIFT:
            raise ControlError(errno.EINVAL, f"region {gpa:#x}+{size:#x}: beyond the "
                               f"dirty log's {self.log.ram_pages} RAM pages (SET_LOG "
                               "again with more, or CLEAR_LOG, first)")
        i = bisect.bisect_right(self._starts, gpa)
        prev = self._regions[i - 1] if i > 0 else None
        nxt = self._regions[i] if i < len(self._regions) else None
        if (prev is not None and prev.end > gpa) or (nxt is not None and nxt.gpa < gpa + size):
            raise ControlError(errno.EEXIST, f"region {gpa:#x}+{size:#x}: overlaps another")
        try:
            m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        except (OSError, ValueError, OverflowError) as e:
            raise ControlError(errno.EINVAL, f"region {gpa:#x}+{size:#x}: cannot map: {e}") from e
        self._regions.insert(i, _Region(gpa, size, m))
        self._starts.insert(i, gpa)
        self._native = None
        self.generation += 1

    def remove_region(self, gpa: int, size: int) -> None:
        i = bisect.bisect_left(self._starts, gpa)
        if i >= len(self._regions) or self._regions[i].gpa != gpa or self._regions[i].size != size:
            raise ControlError(errno.ENOENT, f"region {gpa:#x}+{size:#x}: no such region")
        # Our own snapshot of host addresses goes first; one a device still holds (a
        # compiled data plane mid-request) keeps the region exported, hence busy.
        self._native = None
        try:
            # mmap refuses to close while a memoryview still exports it: that is exactly
            # "a device still holds a view of this memory".
            self._regions[i].map.close()
        except BufferError as e:
            raise ControlError(errno.EBUSY, f"region {gpa:#x}+{size:#x}: still in use") from e
        del self._regions[i]
        del self._starts[i]
        self.generation += 1

    def set_log(self, log: DirtyBitmap | None) -> None:
        """Start logging into `log` (replacing any log), or stop (None); the old log is
        unmapped. Checks that every region lies below the log's ram_pages."""
        if log is not None:
            for r in self._regions:
                if r.end > log.ram_pages << PAGE_SHIFT:
                    raise ControlError(errno.EINVAL, f"SET_LOG: ram_pages {log.ram_pages} "
                                       f"does not cover region {r.gpa:#x}+{r.size:#x}")
        old, self.log = self.log, log
        self.generation += 1  # compiled data planes take the new log before their next call
        if old is not None:
            old.close()

    def _find(self, gpa: int) -> _Region | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self._regions[i].end:
            return self._regions[i]
        return None

    def view(self, gpa: int, length: int) -> memoryview:
        _check_range(gpa, length)
        r = self._find(gpa)
        if r is None or gpa + length > r.end:
            raise GuestMemoryError(f"range {gpa:#x}+{length:#x}: not inside one memory region")
        off = gpa - r.gpa
        return memoryview(r.map)[off:off + length]

    def page(self, gfn: int) -> memoryview:
        if not isinstance(gfn, int) or gfn < 0 or gfn >= ADDR_LIMIT >> PAGE_SHIFT:
            raise GuestMemoryError(f"frame {gfn!r}: outside the address space")
        return self.view(gfn << PAGE_SHIFT, PAGE_SIZE)

    def contains(self, gpa: int, length: int) -> bool:
        try:
            _check_range(gpa, length)
        except GuestMemoryError:
            return False
        r = self._find(gpa)
        return r is not None and gpa + length <= r.end

    def _chunks(self, gpa: int, n: int):
        """(region, offset, count) pieces of [gpa, gpa+n); regions must be adjacent."""
        _check_range(gpa, n)
        pos, left = gpa, n
        while left:
            r = self._find(pos)
            if r is None:
                raise GuestMemoryError(f"address {pos:#x}: not guest memory "
                                       f"(access {gpa:#x}+{n:#x})")
            k = min(left, r.end - pos)
            yield r, pos - r.gpa, k
            pos += k
            left -= k

    def read(self, gpa: int, n: int) -> bytes:
        # Check the whole range before copying anything, so a failure has no partial effect.
        pieces = list(self._chunks(gpa, n))
        return b"".join(r.map[off:off + k] for r, off, k in pieces)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        pieces = list(self._chunks(gpa, len(data)))
        done = 0
        for r, off, k in pieces:
            r.map[off:off + k] = data[done:done + k]
            done += k

    def mappings(self) -> list[mmap.mmap]:
        """Each region's mapping, in gpa order (the simulated guest remaps them when it
        migrates)."""
        return [r.map for r in self._regions]

    def native(self) -> NativeRegions:
        """Host addresses of every region, for compiled code (backendd/dataplane). The
        snapshot pins the mappings: while anyone holds it, its regions cannot be
        removed (EBUSY), as with a memoryview."""
        if self._native is None:
            self._native = NativeRegions([(r.gpa, r.size, r.map) for r in self._regions])
        return self._native

    def close(self) -> None:
        self._native = None
        if self.log is not None:
            self.log.close()
            self.log = None
        for r in self._regions:
            # A leftover view keeps its mapping alive until it is collected; the daemon
            # is tearing down, so dropping our reference is all we can do.
            with contextlib.suppress(BufferError):
                r.map.close()
        self._regions.clear()
        self._starts.clear()


class NativeRegions:
    """(gpa, size, host address) of each region, sorted by gpa, as a C array of
    `struct dp_region`; holding it keeps the mmaps exported (they cannot be closed)."""

    def __init__(self, regions: list[tuple[int, int, mmap.mmap]]) -> None:
        from backendd.dataplane.build import Region

        self._anchors = [(ctypes.c_char * size).from_buffer(m) for _, size, m in regions]
        self.array = (Region * max(1, len(regions)))()
        for k, ((gpa, size, _), anchor) in enumerate(zip(regions, self._anchors,
                                                          strict=True)):
            self.array[k] = Region(gpa, size, ctypes.addressof(anchor))
        self.count = len(regions)

    def host_address(self, gpa: int, length: int) -> int:
        """Host address of [gpa, gpa+length) inside one region."""
        for k in range(self.count):
            r = self.array[k]
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r.host + (gpa - r.gpa)
        raise GuestMemoryError(f"range {gpa:#x}+{length:#x}: not inside one memory region")

    def host_view(self, address: int, length: int) -> memoryview:
        """A view of [address, address+length) by host address (as compiled code names
        guest memory), inside one region."""
        views = self.__dict__.get("_views")
        if views is None:
            views = self._views = [(self.array[k].host, len(a), memoryview(a).cast("B"))
                                   for k, a in enumerate(self._anchors)]
        for host, size, view in views:
            if host <= address and address + length <= host + size:
                return view[address - host:address - host + length]
        raise GuestMemoryError(f"host address {address:#x}+{length:#x}: not guest memory")
