"""The backend half of the grant table: checking a guest's grants and pinning them in use.

The table lives in guest-writable memory the VMM shares with us, so every field is read
fresh, checked, and the "in use" flags are set with compare-and-swap, exactly as Xen's
hypervisor does for a mapping: the GTF_reading/GTF_writing bits are the frontend's only
signal that the backend has finished with a page (gnttab_end_foreign_access refuses while
they are set).
"""

import errno
import mmap
import struct
from types import TracebackType

from rings.atomic import PinnedAddress, cmpxchg16, cmpxchg32, read_barrier
from rings.consts import (
    GTF_READING,
    GTF_READONLY,
    GTF_TYPE_MASK,
    GTF_WRITING,
    PAGE_SIZE,
    GrantType,
)
from rings.grant import GRANT_ENTRY_V1_SIZE

from .errors import ControlError, GuestError
from .memory import GuestMemory, GuestMemoryError

MAX_TRIES = 5  # Xen's GNTTAB cmpxchg retry limit before declaring the entry unstable


class GrantError(GuestError):
    """A grant the guest offered breaks a rule; the message names the gref and the rule."""


class GrantMapping:
    """One use of a granted page. Release it (or use it as a context manager) when done."""

    def __init__(self, table: "GrantTable", gref: int, writable: bool, frame: int,
                 page: memoryview) -> None:
        self.gref = gref
        self.writable = writable
        self.frame = frame
        self._table: GrantTable | None = table
        self._page: memoryview | None = page if writable else page.toreadonly()

    def page_view(self, start: int = 0, length: int = PAGE_SIZE) -> memoryview:
        if self._page is None:
            raise GrantError(f"gref {self.gref}: mapping already released")
        if start < 0 or length < 0 or start + length > PAGE_SIZE:
            raise GrantError(f"gref {self.gref}: range {start}+{length} outside the granted page")
        return self._page[start:start + length]

    def release(self) -> None:
        if self._table is None:
            return
        table, self._table = self._table, None
        self._page = None
        table._end_use(self.gref, self.writable)

    def __enter__(self) -> "GrantMapping":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class GrantTable:
    """The guest's grant table as seen by the backend domain `backend_domid`."""

    def __init__(self, memory: GuestMemory, backend_domid: int = 0) -> None:
        self.memory = memory
        self.backend_domid = backend_domid
        self.version = 0
        self.nr_frames = 0
        self._map: mmap.mmap | None = None
        self._pin: PinnedAddress | None = None
        # gref -> [uses, writable uses]; the shared flags mirror "uses > 0" and
        # "writable uses > 0", so they are cleared only when the last such use ends.
        self._uses: dict[int, list[int]] = {}

    @property
    def entries(self) -> int:
        return self.nr_frames * PAGE_SIZE // GRANT_ENTRY_V1_SIZE if self._map else 0

    def set_table(self, fd: int, offset: int, nr_frames: int, version: int = 1,
                  status_fd: int | None = None, status_offset: int = 0,
                  nr_status_frames: int = 0) -> None:
        if version != 1:
            raise ControlError(errno.EOPNOTSUPP, f"grant table version {version}: only v1")
        if nr_frames <= 0 or offset < 0 or offset % PAGE_SIZE:
            raise ControlError(errno.EINVAL, f"grant table {nr_frames} frames at {offset}")
        new_entries = nr_frames * PAGE_SIZE // GRANT_ENTRY_V1_SIZE
        if any(g >= new_entries for g in self._uses):
            raise ControlError(errno.EBUSY, "grant table shrink: grefs beyond it are in use")
        try:
            m = mmap.mmap(fd, nr_frames * PAGE_SIZE, flags=mmap.MAP_SHARED,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        except (OSError, ValueError, OverflowError) as e:
            raise ControlError(errno.EINVAL, f"grant table: cannot map: {e}") from e
        # Growing maps the table again; in-use grefs keep their flags because the
        # entries live in the shared fd, not in our mapping.
        self._drop_map()
        self._map = m
        self._pin = PinnedAddress(m)
        self.nr_frames = nr_frames
        self.version = version

    def _drop_map(self) -> None:
        if self._pin is not None:
            self._pin.release()
            self._pin = None
        if self._map is not None:
            self._map.close()
            self._map = None

    def _entry(self, gref: int) -> tuple[int, int, int]:
        assert self._map is not None
        return struct.unpack_from("<HHI", self._map, gref * GRANT_ENTRY_V1_SIZE)

    def map(self, gref: int, writable: bool) -> GrantMapping:
        if self._map is None or self._pin is None:
            raise GrantError(f"gref {gref}: no grant table set up")
        if not isinstance(gref, int) or gref < 0 or gref >= self.entries:
            raise GrantError(f"gref {gref}: beyond the grant table ({self.entries} entries)")
        addr = self._pin.address + gref * GRANT_ENTRY_V1_SIZE
        want = GTF_READING | (GTF_WRITING if writable else 0)
        flags, domid, _ = self._entry(gref)
        for _ in range(MAX_TRIES):
            if flags & GTF_TYPE_MASK != GrantType.PERMIT_ACCESS:
                raise GrantError(f"gref {gref}: type {flags & GTF_TYPE_MASK} is not "
                                 "permit_access (revoked or never granted)")
            if domid != self.backend_domid:
                raise GrantError(f"gref {gref}: granted to domain {domid}, "
                                 f"not to the backend ({self.backend_domid})")
            if writable and flags & GTF_READONLY:
                raise GrantError(f"gref {gref}: readonly grant used for writing")
            # flags and domid swap together (as Xen does for v1), so a guest cannot
            # re-target the grant to another domain between our check and our pin.
            old = flags | domid << 16
            ok, seen = cmpxchg32(addr, old, old | want)
            if ok:
                break
            flags, domid = seen & 0xFFFF, seen >> 16
        else:
            raise GrantError(f"gref {gref}: entry unstable, changed during "
                             f"{MAX_TRIES} tries")
        # The frame is read after pinning: from here on the guest cannot legitimately
        # change the entry (end_access refuses while our flags are set).
        read_barrier()
        frame = self._entry(gref)[2]
        uses = self._uses.setdefault(gref, [0, 0])
        uses[0] += 1
        uses[1] += bool(writable)
        try:
            page = self.memory.page(frame)
        except GuestMemoryError as e:
            self._end_use(gref, writable)
            raise GrantError(f"gref {gref}: frame {frame:#x} is not guest memory") from e
        return GrantMapping(self, gref, writable, frame, page)

    def in_use(self, gref: int) -> int:
        return self._uses.get(gref, [0, 0])[0]

    def _end_use(self, gref: int, writable: bool) -> None:
        uses = self._uses[gref]
        uses[0] -= 1
        clear = 0
        if writable:
            uses[1] -= 1
            if uses[1] == 0:
                clear |= GTF_WRITING
        if uses[0] == 0:
            clear |= GTF_READING
            del self._uses[gref]
        if not clear or self._pin is None:
            return
        addr = self._pin.address + gref * GRANT_ENTRY_V1_SIZE
        flags = self._entry(gref)[0]
        # Clear only our bits: the guest may change the others at any moment, so loop
        # until our swap lands on the value actually there.
        while True:
            ok, seen = cmpxchg16(addr, flags, flags & ~clear)
            if ok:
                return
            flags = seen

    def close(self) -> None:
        self._drop_map()
        self.nr_frames = 0
        self._uses.clear()
