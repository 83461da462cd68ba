"""Moving the simulated guest onto copies of its memory, as a VMM does at the switch point
of a live migration: the destination's RAM and grant table are new memfds holding what
the source's held, and from then on the guest's pages are those.

The guest's own mappings are replaced in place (GuestRAM.rebase and GuestGrantTable.rebase:
mmap with MAP_FIXED at the same address), so every view the frontends hold (ring pages,
buffers, the grant table's flags) sees the new memory without being rebuilt, as a
migrated guest sees its RAM. backendd/guest/migration.py does the whole pre-copy
migration; these helpers serve a stop-and-copy one.
"""

from __future__ import annotations

import os

from .gnttab import GuestGrantTable
from .memory import GuestRAM, sealed_memfd


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


def move_ram(ram: GuestRAM, fd: int) -> None:
    """`ram` is memfd `fd` from now on (same layout); the old fd is closed."""
    os.close(ram.rebase(fd))


def move_gnttab(gnttab: GuestGrantTable, fd: int) -> None:
    """The grant table is memfd `fd` from now on; the old fd is closed."""
    os.close(gnttab.rebase(fd))
