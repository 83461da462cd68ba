"""The simulated guest's RAM: one memfd, laid out as one or more guest-physical regions,
with a page allocator for the front-end drivers and tests."""

import ctypes
import fcntl
import mmap
import os

from rings.consts import PAGE_SHIFT, PAGE_SIZE

from ..memory import GuestMemory
from .writes import WriteTracker


def sealed_memfd(name: str, size: int, flags: int = 0) -> int:
    """A memfd of `size` bytes carrying F_SEAL_SHRINK, as the daemon requires of every
    memory fd (guest RAM, grant table, in-flight region): it may grow, never shrink.
    `flags`: extra memfd_create flags, e.g. os.MFD_HUGETLB."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | flags)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except BaseException:
        os.close(fd)
        raise
    return fd


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
MAP_FIXED = 0x10


def remap_fixed(m: mmap.mmap, fd: int, offset: int = 0) -> None:
    """Map `fd` from `offset` at the very address `m` maps, in place of what is there
    (MAP_FIXED): every memoryview and pointer into `m` now sees the new file, without
    knowing. A migrated guest moves to the destination's memory this way."""
    size = len(m)
    anchor = (ctypes.c_char * size).from_buffer(m)
    addr = ctypes.addressof(anchor)
    del anchor  # the address stays valid: `m` keeps the mapping
    got = _libc.mmap(addr, size, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_SHARED | MAP_FIXED, fd, offset)
    if got != addr:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap(MAP_FIXED) over {size:#x} bytes: {os.strerror(err)}")


class GuestRAM(WriteTracker):
    """Guest RAM in a memfd, the way a VMM backs it.

    `layout` is a list of (gpa, size) regions, all carved in order from one memfd, so a
    test can leave a hole between them (as the PCI hole below 4 GiB does)."""

    def __init__(self, size: int, layout: list[tuple[int, int]] | None = None) -> None:
        super().__init__()
        if layout is None:
            layout = [(0, size)]
        if sum(s for _, s in layout) != size:
            raise ValueError("layout sizes must add up to size")
        self.size = size
        self.fd = sealed_memfd("guest-ram", size)
        self._regions: list[tuple[int, int, int, int]] = []
        # The guest's own view goes through the same checked region code the daemon uses.
        self._mem = GuestMemory()
        offset = 0
        for gpa, rsize in layout:
            self._mem.add_region(gpa, rsize, self.fd, offset)
            self._regions.append((gpa, rsize, self.fd, offset))
            offset += rsize
        # Reversed so that pop() hands out the lowest frame first.
        self._free = [gfn for gpa, rsize in reversed(layout)
                      for gfn in reversed(range(gpa >> PAGE_SHIFT, gpa + rsize >> PAGE_SHIFT))]
        self._allocated: set[int] = set()
        # Live migration: the simulated VMM tracks the guest's own writes (see
        # backendd/guest/migration.py). WriteTracker collects the frames written through
        # write() while tracking is on; `viewed` holds every frame handed out as a
        # writable view, whose later writes nobody can see (the frontends' rings,
        # netfront's tx pages), so a migration must count them dirty in every round.
        self.viewed: set[int] = set()

    @property
    def regions(self) -> list[tuple[int, int, int, int]]:
        """(gpa, size, fd, offset) for each region, as the VMM hands them to the daemon."""
        return list(self._regions)

    def rebase(self, fd: int) -> int:
        """Put memfd `fd` (same size and layout) under the guest's RAM in place of ours,
        at the same addresses (remap_fixed), so that every view the guest holds now sees
        `fd`'s pages. Returns the old fd, which the caller closes."""
        offsets = {gpa: offset for gpa, _, _, offset in self._regions}
        for (gpa, _), region in zip(self._mem.regions, self._mem.mappings(), strict=True):
            remap_fixed(region, fd, offsets[gpa])
        old, self.fd = self.fd, fd
        self._regions = [(gpa, size, fd, offset) for gpa, size, _, offset in self._regions]
        return old

    def alloc_page(self) -> int:
        if not self._free:
            raise MemoryError("guest RAM exhausted")
        gfn = self._free.pop()
        self._allocated.add(gfn)
        self.write(gfn << PAGE_SHIFT, bytes(PAGE_SIZE))
        return gfn

    def free_page(self, gfn: int) -> None:
        if gfn not in self._allocated:
            raise ValueError(f"frame {gfn:#x} is not allocated")
        self._allocated.remove(gfn)
        self._free.append(gfn)

    def page(self, gfn: int, readonly: bool = False) -> memoryview:
        """A view of one frame; a writable one puts the frame in `viewed` for good."""
        view = self._mem.page(gfn)
        if readonly:
            return view.toreadonly()
        self.viewed.add(gfn)
        return view

    def read(self, gpa: int, n: int) -> bytes:
        return self._mem.read(gpa, n)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self._mem.write(gpa, data)
        if self._dirty is not None:
            end = gpa + memoryview(data).nbytes
            self._wrote(gpa >> PAGE_SHIFT, end - 1 >> PAGE_SHIFT)

    def close(self) -> None:
        self._mem.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
