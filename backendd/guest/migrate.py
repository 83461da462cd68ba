"""Moving the simulated guest onto copies of its memory, as a VMM does at the switch point
of a live migration: the destination's RAM and grant table are new memfds holding what
the source's held, and from then on the guest's pages are those.

The guest's own mappings are replaced in place (mmap with MAP_FIXED at the same
address), so every view the frontends hold (ring pages, buffers, the grant table's
flags) sees the new memory without being rebuilt, as a migrated guest sees its RAM.
"""

from __future__ import annotations

import ctypes
import mmap
import os

from .gnttab import GuestGrantTable
from .memory import GuestRAM, sealed_memfd

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_MAP_FIXED = 0x10


def clone_memfd(fd: int, name: str) -> int:
    """A new sealed memfd with the same bytes as `fd` (the whole file)."""
    size = os.fstat(fd).st_size
    new = sealed_memfd(name, size)
    try:
        off = 0
        while off < size:
            n = os.copy_file_range(fd, new, size - off, off, off)
            if n <= 0:
                raise OSError(f"copy_file_range stopped at {off} of {size} bytes")
            off += n
    except BaseException:
        os.close(new)
        raise
    return new


def remap_onto(m: mmap.mmap, fd: int, offset: int = 0) -> None:
    """Make the memory `m` maps be `fd` at `offset` from now on, at the same address."""
    anchor = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(anchor)
    del anchor
    got = _libc.mmap(addr, len(m), mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_SHARED | _MAP_FIXED, fd, offset)
    if got != addr:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap MAP_FIXED: {os.strerror(err)}")


def move_ram(ram: GuestRAM, fd: int) -> None:
    """`ram` is memfd `fd` from now on (same layout); the old fd is closed."""
    regions = ram._mem._regions
    for region, (_, _, _, offset) in zip(regions, ram._regions, strict=True):
        remap_onto(region.map, fd, offset)
    ram._regions = [(gpa, size, fd, offset) for gpa, size, _, offset in ram._regions]
    os.close(ram.fd)
    ram.fd = fd


def move_gnttab(gnttab: GuestGrantTable, fd: int) -> None:
    """The grant table is memfd `fd` from now on; the old fd is closed."""
    remap_onto(gnttab._map, fd, 0)
    os.close(gnttab.fd)
    gnttab.fd = fd
