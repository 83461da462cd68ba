"""The simulated guest's grant table, in its own memfd as a VMM keeps it, with the
frontend operations of Linux's grant-table driver (v1)."""

import mmap
import os
import struct

from rings.atomic import PinnedAddress, cmpxchg16, write_barrier
from rings.consts import GTF_READING, GTF_READONLY, GTF_WRITING, PAGE_SIZE, GrantType
from rings.grant import GRANT_ENTRY_V1_SIZE

# Linux keeps the first 8 entries for the toolstack (console, xenstore rings).
NR_RESERVED_ENTRIES = 8


class GuestGrantTable:
    def __init__(self, nr_frames: int = 4) -> None:
        self.nr_frames = nr_frames
        self.size = nr_frames * PAGE_SIZE
        self.entries = self.size // GRANT_ENTRY_V1_SIZE
        self.fd = os.memfd_create("guest-gnttab", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self._map = mmap.mmap(self.fd, self.size)
        self._pin = PinnedAddress(self._map)
        # A native u16 view: one aligned 2-byte store, never torn for the backend.
        self._flags = memoryview(self._map).cast("H")
        self._free = list(range(self.entries - 1, NR_RESERVED_ENTRIES - 1, -1))

    def grant_access(self, gfn: int, domid: int = 0, readonly: bool = False) -> int:
        if not self._free:
            raise MemoryError("grant table full")
        gref = self._free.pop()
        off = gref * GRANT_ENTRY_V1_SIZE
        struct.pack_into("<HI", self._map, off + 2, domid, gfn)
        # domid and frame must be visible before the flags make the entry valid.
        write_barrier()
        self._flags[off // 2] = GrantType.PERMIT_ACCESS | (GTF_READONLY if readonly else 0)
        return gref

    def end_access(self, gref: int) -> bool:
        """Revoke a grant unless the backend still uses it (gnttab_end_foreign_access_ref)."""
        addr = self._pin.address + gref * GRANT_ENTRY_V1_SIZE
        flags = self._flags[gref * GRANT_ENTRY_V1_SIZE // 2]
        while True:
            if flags & (GTF_READING | GTF_WRITING):
                return False
            ok, seen = cmpxchg16(addr, flags, 0)
            if ok:
                break
            flags = seen
        if gref >= NR_RESERVED_ENTRIES and gref not in self._free:
            self._free.append(gref)
        return True

    def entry(self, gref: int) -> tuple[int, int, int]:
        """(flags, domid, frame) as they are in shared memory now."""
        return struct.unpack_from("<HHI", self._map, gref * GRANT_ENTRY_V1_SIZE)

    def set_entry(self, gref: int, flags: int, domid: int, frame: int) -> None:
        """Write an entry directly, as a misbehaving guest may."""
        struct.pack_into("<HHI", self._map, gref * GRANT_ENTRY_V1_SIZE, flags, domid, frame)

    def close(self) -> None:
        if self.fd < 0:
            return
        self._flags.release()
        self._pin.release()
        self._map.close()
        os.close(self.fd)
        self.fd = -1
