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

from rings.atomic import PinnedAddress, cmpxchg16, cmpxchg32, full_barrier, read_barrier
from rings.consts import (
    GTF_READING,
    GTF_READONLY,
    GTF_SUB_PAGE,
    GTF_TYPE_MASK,
    GTF_WRITING,
    PAGE_SIZE,
    GrantType,
)
from rings.grant import GRANT_ENTRY_V1_SIZE, GRANT_ENTRY_V2_SIZE, GRANT_STATUS_SIZE

from .errors import ControlError, GuestError
from .memory import GuestMemory, GuestMemoryError

MAX_TRIES = 5  # Xen's GNTTAB cmpxchg retry limit before declaring the entry unstable


class GrantError(GuestError):
    """A grant the guest offered breaks a rule; the message names the gref and the rule."""


class GrantMapping:
    """One use of a granted page. Release it (or use it as a context manager) when done."""

    def __init__(self, table: "GrantTable", gref: int, writable: bool, frame: int,
                 page: memoryview, window: tuple[int, int] = (0, PAGE_SIZE)) -> None:
        self.gref = gref
        self.writable = writable
        self.frame = frame
        # The part of the page the guest granted: all of it, or a v2 sub-page.
        self.window = window
        self._table: GrantTable | None = table
        self._page: memoryview | None = page if writable else page.toreadonly()

    def page_view(self, start: int = 0, length: int | None = None) -> memoryview:
        lo, hi = self.window
        if self._page is None:
            raise GrantError(f"gref {self.gref}: mapping already released")
        if length is None:
            length = hi - start
        if start < lo or length < 0 or start + length > hi:
            raise GrantError(f"gref {self.gref}: range {start}+{length} outside the granted "
                             f"{'sub-page' if (lo, hi) != (0, PAGE_SIZE) else 'page'} "
                             f"{lo}..{hi}")
        return self._page[start:start + length]

    def whole_page(self, what: str) -> memoryview:
        """The whole granted page, for uses that need one (a shared ring, an rx buffer);
        a GrantError naming `what` if the guest granted only part of it (v2 sub-page)."""
        if self.window != (0, PAGE_SIZE):
            lo, hi = self.window
            raise GrantError(f"gref {self.gref}: {what} must be granted as a whole page, "
                             f"not as the sub-page {lo}..{hi}")
        return self.page_view(0, PAGE_SIZE)

    def release(self) -> None:
        if self._table is None:
            return
        table, self._table = self._table, None
        self._page = None
        table._end_use(self.gref, self.writable)

    def hand_over(self) -> None:
        """The pin outlives this object: its new holder (the compiled data plane, which
        counts in the same `_uses`) releases it by gref."""
        self._table = None
        self._page = None

    def __enter__(self) -> "GrantMapping":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class GrantTable:
    """The guest's grant table as seen by the backend domain `backend_domid`.

    v1: 8-byte entries whose flags word also carries GTF_reading/GTF_writing.
    v2: 16-byte entries (full page or sub-page; transitive grants are refused) and a
    separate array of u16 status words in the status frames, which is where the backend's
    in-use bits go. Because the guest may rewrite an entry at any moment, v2 sets the
    status bits first and then checks that the entry still says what was checked (Xen's
    _set_status_v2); if it changed, the bits are withdrawn and the map retried.
    """

    def __init__(self, memory: GuestMemory, backend_domid: int = 0) -> None:
        self.memory = memory
        self.backend_domid = backend_domid
        self.version = 0
        self.nr_frames = 0
        self._map: mmap.mmap | None = None
        self._pin: PinnedAddress | None = None
        self._status_base = 0  # v2: byte offset of the status words in _map
        # Two u32 per gref: uses, writable uses. The shared flags mirror "uses > 0" and
        # "writable uses > 0", so they are cleared only when the last such use ends. A
        # flat array, so the compiled data plane (backendd/dataplane) counts in the
        # same place; `generation` changes whenever the mapping or this array moves.
        self._uses = memoryview(bytearray(0)).cast("I")
        self.generation = 0

    @property
    def entry_size(self) -> int:
        return GRANT_ENTRY_V2_SIZE if self.version == 2 else GRANT_ENTRY_V1_SIZE

    @property
    def entries(self) -> int:
        return self.nr_frames * PAGE_SIZE // self.entry_size if self._map else 0

    @staticmethod
    def status_frames(nr_frames: int) -> int:
        """v2: status frames that follow `nr_frames` shared frames in the same fd."""
        entries = nr_frames * PAGE_SIZE // GRANT_ENTRY_V2_SIZE
        return -(-entries * GRANT_STATUS_SIZE // PAGE_SIZE)

    @classmethod
    def fd_pages(cls, nr_frames: int, version: int) -> int:
        """Pages of the fd a table of `nr_frames` maps: its frames, and for v2 the status
        frames after them."""
        return nr_frames + (cls.status_frames(nr_frames) if version == 2 else 0)

    def set_table(self, fd: int, offset: int, nr_frames: int, version: int = 1) -> None:
        if version not in (1, 2):
            raise ControlError(errno.EOPNOTSUPP, f"grant table version {version}: "
                               "only 1 and 2")
        if nr_frames <= 0 or offset < 0 or offset % PAGE_SIZE:
            raise ControlError(errno.EINVAL, f"grant table {nr_frames} frames at {offset}")
        busy = self.grefs_in_use()
        if busy and version != self.version:
            raise ControlError(errno.EBUSY, "grant table version change while grants are "
                               "in use")
        entry = GRANT_ENTRY_V2_SIZE if version == 2 else GRANT_ENTRY_V1_SIZE
        new_entries = nr_frames * PAGE_SIZE // entry
        if any(g >= new_entries for g in busy):
            raise ControlError(errno.EBUSY, "grant table shrink: grefs beyond it are in use")
        total = self.fd_pages(nr_frames, version)
        log = self.memory.log
        if log is not None and total > log.gnt_pages:
            raise ControlError(errno.EINVAL, f"grant table of {total} pages: the dirty "
                               f"log has bits for {log.gnt_pages} (SET_LOG again with a "
                               "larger log, or CLEAR_LOG, first)")
        try:
            m = mmap.mmap(fd, total * PAGE_SIZE, flags=mmap.MAP_SHARED,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        except (OSError, ValueError, OverflowError) as e:
            raise ControlError(errno.EINVAL, f"grant table: cannot map: {e}") from e
        # Growing maps the table again; in-use grefs keep their flags because the
        # entries live in the shared fd, not in our mapping.
        self._drop_map()
        self._map = m
        self._pin = PinnedAddress(m)
        self._status_base = nr_frames * PAGE_SIZE
        self.nr_frames = nr_frames
        self.version = version
        uses = memoryview(bytearray(8 * new_entries)).cast("I")
        keep = min(len(uses), len(self._uses))
        uses[:keep] = self._uses[:keep]
        self._uses = uses
        self.generation += 1

    def grefs_in_use(self) -> list[int]:
        uses = self._uses
        return [i // 2 for i in range(0, len(uses), 2) if uses[i]]

    def _drop_map(self) -> None:
        if self._pin is not None:
            self._pin.release()
            self._pin = None
        if self._map is not None:
            self._map.close()
            self._map = None

    def _header(self, gref: int) -> tuple[int, int]:
        assert self._map is not None
        return struct.unpack_from("<HH", self._map, gref * self.entry_size)

    def map(self, gref: int, writable: bool) -> GrantMapping:
        if self._map is None or self._pin is None:
            raise GrantError(f"gref {gref}: no grant table set up")
        if not isinstance(gref, int) or gref < 0 or gref >= self.entries:
            raise GrantError(f"gref {gref}: beyond the grant table ({self.entries} entries)")
        if self.version == 2:
            frame, window = self._pin_v2(gref, writable)
        else:
            frame, window = self._pin_v1(gref, writable), (0, PAGE_SIZE)
        self._uses[2 * gref] += 1
        self._uses[2 * gref + 1] += bool(writable)
        try:
            page = self.memory.page(frame)
        except GuestMemoryError as e:
            self._end_use(gref, writable)
            raise GrantError(f"gref {gref}: frame {frame:#x} is not guest memory") from e
        return GrantMapping(self, gref, writable, frame, page, window)

    def _check(self, gref: int, flags: int, domid: int, writable: bool) -> None:
        kind = flags & GTF_TYPE_MASK
        if kind == GrantType.TRANSITIVE and self.version == 2:
            raise GrantError(f"gref {gref}: transitive grants are not supported")
        if kind != GrantType.PERMIT_ACCESS:
            raise GrantError(f"gref {gref}: type {kind} is not permit_access "
                             "(revoked or never granted)")
        if domid != self.backend_domid:
            raise GrantError(f"gref {gref}: granted to domain {domid}, "
                             f"not to the backend ({self.backend_domid})")
        if writable and flags & GTF_READONLY:
            raise GrantError(f"gref {gref}: readonly grant used for writing")

    def _pin_v1(self, gref: int, writable: bool) -> int:
        assert self._pin is not None
        addr = self._pin.address + gref * GRANT_ENTRY_V1_SIZE
        want = GTF_READING | (GTF_WRITING if writable else 0)
        flags, domid = self._header(gref)
        for _ in range(MAX_TRIES):
            self._check(gref, flags, domid, writable)
            # flags and domid swap together (as Xen does for v1), so a guest cannot
            # re-target the grant to another domain between our check and our pin.
            old = flags | domid << 16
            ok, seen = cmpxchg32(addr, old, old | want)
            if ok:
                self._logged(gref * GRANT_ENTRY_V1_SIZE)
                break
            flags, domid = seen & 0xFFFF, seen >> 16
        else:
            raise GrantError(f"gref {gref}: entry unstable, changed during "
                             f"{MAX_TRIES} tries")
        # The frame is read after pinning: from here on the guest cannot legitimately
        # change the entry (end_access refuses while our flags are set).
        read_barrier()
        assert self._map is not None
        return struct.unpack_from("<I", self._map, gref * GRANT_ENTRY_V1_SIZE + 4)[0]

    def _pin_v2(self, gref: int, writable: bool) -> tuple[int, tuple[int, int]]:
        assert self._pin is not None and self._map is not None
        want = GTF_READING | (GTF_WRITING if writable else 0)
        for _ in range(MAX_TRIES):
            flags, domid = self._header(gref)
            self._check(gref, flags, domid, writable)
            added = self._status_or(gref, want)
            # The status store must be visible before the entry is re-read, or a guest
            # revoking now could miss our bits while we miss its revocation.
            full_barrier()
            if self._header(gref) == (flags, domid):
                break
            self._status_clear(gref, added)
        else:
            raise GrantError(f"gref {gref}: entry unstable, changed during "
                             f"{MAX_TRIES} tries")
        read_barrier()
        page_off, length, frame = struct.unpack_from("<HHQ", self._map,
                                                     gref * GRANT_ENTRY_V2_SIZE + 4)
        if not flags & GTF_SUB_PAGE:
            return frame, (0, PAGE_SIZE)
        if page_off + length > PAGE_SIZE:
            self._status_clear(gref, added)
            raise GrantError(f"gref {gref}: sub-page {page_off}+{length} crosses the page")
        return frame, (page_off, page_off + length)

    def _update16(self, offset: int, set_bits: int = 0, clear_bits: int = 0) -> int:
        """Set and clear bits of the shared u16 at `offset` in the table mapping, leaving
        the others as they are: the guest may change them at any moment, so loop until
        our swap lands on the value actually there. Returns the value before."""
        assert self._map is not None and self._pin is not None
        addr = self._pin.address + offset
        seen = struct.unpack_from("<H", self._map, offset)[0]
        while True:
            ok, now = cmpxchg16(addr, seen, (seen | set_bits) & ~clear_bits)
            if ok:
                self._logged(offset)
                return seen
            seen = now

    def _logged(self, offset: int) -> None:
        """The daemon wrote the table at byte `offset` of its mapping: mark that page of
        the table in the dirty log, if there is one."""
        log = self.memory.log
        if log is not None:
            log.mark_gnttab(offset // PAGE_SIZE)

    @property
    def pages(self) -> int:
        """Pages of the fd the table maps (v2: the status frames too)."""
        if self._map is None:
            return 0
        return self.fd_pages(self.nr_frames, self.version)

    def _status_offset(self, gref: int) -> int:
        return self._status_base + gref * GRANT_STATUS_SIZE

    def _status_or(self, gref: int, bits: int) -> int:
        """Set `bits` in gref's v2 status word; returns those that were not set before."""
        return bits & ~self._update16(self._status_offset(gref), set_bits=bits)

    def _status_clear(self, gref: int, bits: int) -> None:
        if bits:
            self._update16(self._status_offset(gref), clear_bits=bits)

    def in_use(self, gref: int) -> int:
        return self._uses[2 * gref] if 0 <= 2 * gref < len(self._uses) else 0

    def _end_use(self, gref: int, writable: bool) -> None:
        uses = self._uses
        uses[2 * gref] -= 1
        clear = 0
        if writable:
            uses[2 * gref + 1] -= 1
            if uses[2 * gref + 1] == 0:
                clear |= GTF_WRITING
        if uses[2 * gref] == 0:
            clear |= GTF_READING
        if not clear or self._pin is None:
            return
        if self.version == 2:
            self._status_clear(gref, clear)
        else:
            # v1 keeps the bits in the entry's own flags word.
            self._update16(gref * GRANT_ENTRY_V1_SIZE, clear_bits=clear)

    def close(self) -> None:
        self._drop_map()
        self.nr_frames = 0
        self._uses = memoryview(bytearray(0)).cast("I")
        self.generation += 1
