"""The simulated guest's grant table, in its own memfd as a VMM keeps it, with the
frontend operations of Linux's grant-table driver (v1 and v2).

v2 keeps the status words (where the backend marks a grant in use) in status frames that
follow the shared frames in the same memfd, as SET_GRANT_TABLE describes."""

import mmap
import os
import struct

from rings.atomic import PinnedAddress, cmpxchg16, full_barrier, write_barrier
from rings.consts import (
    GTF_READING,
    GTF_READONLY,
    GTF_SUB_PAGE,
    GTF_WRITING,
    PAGE_SIZE,
    GrantType,
)
from rings.grant import GRANT_ENTRY_V1_SIZE, GRANT_ENTRY_V2_SIZE

from .memory import remap_fixed, sealed_memfd
from .writes import WriteTracker

# Linux keeps the first 8 entries for the toolstack (console, xenstore rings).
NR_RESERVED_ENTRIES = 8


class GuestGrantTable(WriteTracker):
    """The guest's grant table. While a migration tracks writes (WriteTracker), it
    collects the table pages this side wrote, counted from the start of the memfd."""

    def __init__(self, nr_frames: int = 4, version: int = 1) -> None:
        super().__init__()
        if version not in (1, 2):
            raise ValueError(f"grant table version {version}")
        self.version = version
        self.nr_frames = nr_frames
        self.entry_size = GRANT_ENTRY_V2_SIZE if version == 2 else GRANT_ENTRY_V1_SIZE
        self.entries = nr_frames * PAGE_SIZE // self.entry_size
        self.status_base = nr_frames * PAGE_SIZE
        status_frames = -(-self.entries * 2 // PAGE_SIZE) if version == 2 else 0
        self.size = (nr_frames + status_frames) * PAGE_SIZE
        self.fd = sealed_memfd("guest-gnttab", self.size)
        self._map = mmap.mmap(self.fd, self.size)
        self._pin = PinnedAddress(self._map)
        # A native u16 view: one aligned 2-byte store, never torn for the backend.
        self._flags = memoryview(self._map).cast("H")
        self._free = list(range(self.entries - 1, NR_RESERVED_ENTRIES - 1, -1))
        self._granted: set[int] = set()  # so a double revoke never frees a gref twice

    def _wrote_entry(self, gref: int) -> None:
        """Called after each write to gref's entry."""
        page = gref * self.entry_size // PAGE_SIZE
        self._wrote(page, page)

    def grant_access(self, gfn: int, domid: int = 0, readonly: bool = False,
                     sub_page: tuple[int, int] | None = None) -> int:
        """Grant a frame; with v2, `sub_page` = (offset, length) grants part of it."""
        if not self._free:
            raise MemoryError("grant table full")
        if sub_page is not None and self.version != 2:
            raise ValueError("sub-page grants need grant table v2")
        gref = self._free.pop()
        self._granted.add(gref)
        off = gref * self.entry_size
        flags = GrantType.PERMIT_ACCESS | (GTF_READONLY if readonly else 0)
        if self.version == 2:
            page_off, length = sub_page or (0, 0)
            struct.pack_into("<HHHQ", self._map, off + 2, domid, page_off, length, gfn)
            flags |= GTF_SUB_PAGE if sub_page is not None else 0
        else:
            struct.pack_into("<HI", self._map, off + 2, domid, gfn)
        # domid and frame must be visible before the flags make the entry valid.
        write_barrier()
        self._flags[off // 2] = flags
        self._wrote_entry(gref)
        return gref

    def rebase(self, fd: int) -> int:
        """Put memfd `fd` (same size) under the table in place of ours, at the same
        address (remap_fixed). Returns the old fd, which the caller closes."""
        remap_fixed(self._map, fd)
        old, self.fd = self.fd, fd
        return old

    def status(self, gref: int) -> int:
        """v2: the status word the backend sets while it uses the grant."""
        return struct.unpack_from("<H", self._map, self.status_base + gref * 2)[0]

    def end_access(self, gref: int) -> bool:
        """Revoke a grant unless the backend still uses it (gnttab_end_foreign_access_ref)."""
        if self.version == 2:
            # v2 clears the entry first, then looks at the status the backend sets before
            # re-checking the entry: one of the two sides always sees the other.
            self._flags[gref * self.entry_size // 2] = 0
            self._wrote_entry(gref)
            full_barrier()
            if self.status(gref) & (GTF_READING | GTF_WRITING):
                return False
            self._release(gref)
            return True
        addr = self._pin.address + gref * GRANT_ENTRY_V1_SIZE
        flags = self._flags[gref * GRANT_ENTRY_V1_SIZE // 2]
        while True:
            if flags & (GTF_READING | GTF_WRITING):
                return False
            ok, seen = cmpxchg16(addr, flags, 0)
            if ok:
                self._wrote_entry(gref)
                break
            flags = seen
        self._release(gref)
        return True

    def _release(self, gref: int) -> None:
        if gref in self._granted:
            self._granted.discard(gref)
            self._free.append(gref)

    def entry(self, gref: int) -> tuple[int, int, int]:
        """(flags, domid, frame) as they are in shared memory now."""
        if self.version == 2:
            flags, domid, _, _, frame = struct.unpack_from("<HHHHQ", self._map,
                                                           gref * GRANT_ENTRY_V2_SIZE)
            return flags, domid, frame
        return struct.unpack_from("<HHI", self._map, gref * GRANT_ENTRY_V1_SIZE)

    def set_entry(self, gref: int, flags: int, domid: int, frame: int,
                  sub_page: tuple[int, int] = (0, 0)) -> None:
        """Write an entry directly, as a misbehaving guest may."""
        if self.version == 2:
            struct.pack_into("<HHHHQ", self._map, gref * GRANT_ENTRY_V2_SIZE, flags, domid,
                             *sub_page, frame)
        else:
            struct.pack_into("<HHI", self._map, gref * GRANT_ENTRY_V1_SIZE, flags, domid,
                             frame)
        self._wrote_entry(gref)

    def close(self) -> None:
        if self.fd < 0:
            return
        self._flags.release()
        self._pin.release()
        self._map.close()
        os.close(self.fd)
        self.fd = -1
