"""The VMM's side of the dirty log (docs/protocol.md, "Dirty log"): a sealed memfd holding
the bitmap the daemon sets bits in, read and cleared here with an atomic exchange on each
64-bit word, so a bit the daemon sets meanwhile is never lost: it is either in the word
taken or stays in the log for the next take.

    log = DirtyLog(ram_pages, gnttab_pages)
    await vmm.set_log(log.fd, log.size, log.ram_pages)
    ...
    pages = log.take_ram()        # guest frames written since the last take
    table = log.take_gnttab()     # grant-table pages (from the table's mmap_offset)
"""

from __future__ import annotations

import contextlib
import mmap
import os

from backendd.dirtylog import gnttab_offset, log_size
from rings.atomic import PinnedAddress, exchange64

from .memory import sealed_memfd


class DirtyLog:
    """A log for `ram_pages` guest frames and a grant table of up to `gnttab_pages`
    pages (shared frames, then v2 status frames)."""

    def __init__(self, ram_pages: int, gnttab_pages: int = 0) -> None:
        if ram_pages <= 0 or gnttab_pages < 0:
            raise ValueError(f"ram_pages {ram_pages}, gnttab_pages {gnttab_pages}")
        self.ram_pages = ram_pages
        self.gnttab_pages = gnttab_pages
        self.gnt_offset = gnttab_offset(ram_pages)
        self.size = log_size(ram_pages, gnttab_pages)
        self.fd = sealed_memfd("dirty-log", self.size)
        self._map = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._pin: PinnedAddress | None = PinnedAddress(self._map)

    def _take(self, start: int, nbits: int) -> set[int]:
        """Read and clear bits [0, nbits) of the bitmap at byte `start` (8-aligned)."""
        assert self._pin is not None, "closed"
        out: set[int] = set()
        base = self._pin.address + start
        for w in range((nbits + 63) // 64):
            word = exchange64(base + 8 * w, 0)
            while word:
                low = word & -word
                bit = 64 * w + low.bit_length() - 1
                word ^= low
                if bit < nbits:
                    out.add(bit)
        return out

    def take_ram(self) -> set[int]:
        """Guest frames the daemon wrote since the last take; their bits are cleared."""
        return self._take(0, self.ram_pages)

    def take_gnttab(self) -> set[int]:
        """Grant-table pages the daemon wrote since the last take; cleared likewise."""
        return self._take(self.gnt_offset, self.gnttab_pages)

    def peek(self) -> bytes:
        """The whole bitmap as it is now, without clearing it."""
        return bytes(self._map)

    def close(self) -> None:
        if self._pin is not None:
            self._pin.release()
            self._pin = None
            self._map.close()
            with contextlib.suppress(OSError):
                os.close(self.fd)
