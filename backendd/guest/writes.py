"""Write tracking for the simulated guest's memfds during live migration: the pages the
guest itself wrote while the VMM copies (backendd/guest/migration.py)."""

import threading


class WriteTracker:
    """The pages written through the owner's own write paths while tracking is on, as
    page numbers in the owner's memfd (guest frames for RAM, table pages for the grant
    table). The owner calls `_wrote` after each write."""

    def __init__(self) -> None:
        self._dirty_lock = threading.Lock()
        self._dirty: set[int] | None = None

    def track_writes(self, on: bool) -> None:
        """Start (with an empty set) or stop collecting the pages written."""
        with self._dirty_lock:
            self._dirty = set() if on else None

    def take_dirty(self) -> set[int]:
        """The pages written since the last call (tracking must be on), and clear."""
        with self._dirty_lock:
            if self._dirty is None:
                raise RuntimeError("write tracking is off")
            taken, self._dirty = self._dirty, set()
        return taken

    def _wrote(self, first: int, last: int) -> None:
        """Mark pages first..last (inclusive). Called after the write, so that a VMM
        that takes the mark copies the new bytes."""
        if self._dirty is not None:
            with self._dirty_lock:
                if self._dirty is not None:
                    self._dirty.update(range(first, last + 1))
