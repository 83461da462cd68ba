"""The simulated guest's RAM: one memfd, laid out as one or more guest-physical regions,
with a page allocator for the front-end drivers and tests."""

import fcntl
import os

from rings.consts import PAGE_SHIFT, PAGE_SIZE

from ..memory import GuestMemory


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


class GuestRAM:
    """Guest RAM in a memfd, the way a VMM backs it.

    `layout` is a list of (gpa, size) regions, all carved in order from one memfd, so a
    test can leave a hole between them (as the PCI hole below 4 GiB does)."""

    def __init__(self, size: int, layout: list[tuple[int, int]] | None = None) -> None:
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

    @property
    def regions(self) -> list[tuple[int, int, int, int]]:
        """(gpa, size, fd, offset) for each region, as the VMM hands them to the daemon."""
        return list(self._regions)

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

    def page(self, gfn: int) -> memoryview:
        return self._mem.page(gfn)

    def read(self, gpa: int, n: int) -> bytes:
        return self._mem.read(gpa, n)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self._mem.write(gpa, data)

    def close(self) -> None:
        self._mem.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
