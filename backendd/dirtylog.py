"""The dirty log a VMM hands over with SET_LOG: one bit per guest page the daemon writes.

Layout (docs/protocol.md, "Dirty log"): bit n of the bitmap is guest frame n (byte n >> 3,
bit n & 7) for n < ram_pages; from byte G = align_up(ceil(ram_pages / 8), 8) on, bit k is
page k of the grant-table fd counted from its mmap_offset (the shared frames, then the v2
status frames). The daemon sets bits with an atomic OR on the byte while the VMM reads
and clears whole 64-bit words with an atomic exchange, so neither loses the other's bits.

When: a page's bit is set after the daemon's write to it has landed and before the
response or index that makes the write visible to the guest is published; a ring page
whose index the publication itself writes is marked again after it. A VMM that takes
(reads and clears) a bit and then copies the page therefore either copies the data, or
finds the bit set again at its next take; after SUSPEND every write is marked.

Who marks, on the Python path: grants.py (the grant-table entries and status words it
swaps), blk/queue.py (the pages a read filled), net/rx.py (the pages a frame was read
into) and `RingLog` (response slots, rsp_prod, req_event). The compiled kernels do the
same through core.h's dp_log_* helpers, given the log in `struct dp_env`.
"""

from __future__ import annotations

import errno
import mmap
from typing import TYPE_CHECKING

from rings.atomic import PinnedAddress, fetch_or8
from rings.consts import PAGE_SHIFT, PAGE_SIZE

from .errors import ControlError

if TYPE_CHECKING:
    from .memory import GuestMemory

# Frames above this would have guest-physical addresses beyond 2**64.
MAX_RAM_PAGES = 1 << (64 - PAGE_SHIFT)


def gnttab_offset(ram_pages: int) -> int:
    """G: the byte where the grant table's bits start, after the RAM bits, 8-aligned."""
    return (((ram_pages + 7) // 8) + 7) // 8 * 8


def log_size(ram_pages: int, gnttab_pages: int) -> int:
    """The bytes a log needs for `ram_pages` of RAM and a grant table of `gnttab_pages`
    pages (shared and status frames), rounded up to whole 64-bit words."""
    return gnttab_offset(ram_pages) + ((gnttab_pages + 63) // 64) * 8


class DirtyBitmap:
    """The daemon's side of one connection's log: the mapped bitmap and its marks."""

    def __init__(self, fd: int, offset: int, size: int, ram_pages: int) -> None:
        if offset % PAGE_SIZE:
            raise ControlError(errno.EINVAL, f"SET_LOG: mmap_offset {offset:#x} is not "
                               "page-aligned")
        if not 0 < ram_pages <= MAX_RAM_PAGES:
            raise ControlError(errno.EINVAL, f"SET_LOG: ram_pages {ram_pages} is not in "
                               f"1..{MAX_RAM_PAGES}")
        g = gnttab_offset(ram_pages)
        if size < g:
            raise ControlError(errno.EINVAL, f"SET_LOG: a log of {size} bytes cannot hold "
                               f"the bits of {ram_pages} RAM pages ({g} bytes)")
        try:
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        except (OSError, ValueError, OverflowError) as e:
            raise ControlError(errno.EINVAL, f"SET_LOG: cannot map: {e}") from e
        self._pin: PinnedAddress | None = PinnedAddress(self._map)
        self.address = self._pin.address
        self.size = size
        self.ram_pages = ram_pages
        self.gnt_offset = g
        # Grant-table pages the log has bits for: the rest of it after G.
        self.gnt_pages = (size - g) * 8

    def mark(self, gfn: int) -> None:
        """Guest frame `gfn` was written. Frames at or past ram_pages cannot be guest
        memory while this log is set (ADD_MEM_REGION beyond it is refused)."""
        if 0 <= gfn < self.ram_pages:
            fetch_or8(self.address + (gfn >> 3), 1 << (gfn & 7))

    def mark_gnttab(self, page: int) -> None:
        """Page `page` of the grant-table fd (from its mmap_offset) was written."""
        if 0 <= page < self.gnt_pages:
            fetch_or8(self.address + self.gnt_offset + (page >> 3), 1 << (page & 7))

    def bits(self) -> bytes:
        """A copy of the whole bitmap (for tests and the differential fuzz)."""
        return bytes(self._map)

    def close(self) -> None:
        if self._pin is not None:
            self._pin.release()
            self._pin = None
            self.address = 0
            self._map.close()


class RingLog:
    """Marks the pages of one shared ring the back end writes (rings.ring.BackRing.log):
    `gfns[i]` is the guest frame of ring page i. Costs one attribute test while the
    connection's memory has no log."""

    __slots__ = ("gfns", "memory")

    def __init__(self, memory: GuestMemory, gfns: list[int]) -> None:
        self.memory = memory
        self.gfns = gfns

    def wrote(self, offset: int, length: int) -> None:
        log = self.memory.log
        if log is None or length <= 0:
            return
        for page in range(offset >> PAGE_SHIFT, ((offset + length - 1) >> PAGE_SHIFT) + 1):
            if page < len(self.gfns):
                log.mark(self.gfns[page])
