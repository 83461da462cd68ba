"""Persistent grants (`feature-persistent`): a bounded per-ring cache of pinned grants.

When both ends say feature-persistent=1, the frontend keeps a pool of pages granted once
and copies its data through them, so the same grefs come back request after request.
Instead of pinning and releasing each one per request (a compare-and-swap on the shared
entry each way), the ring keeps them pinned in this cache. The rules, which the compiled
data plane follows too, are in docs/blk.md ("Persistent grants"):

- acquire(gref, writable): a hit returns the cached pin; a miss pins the grant and caches
  it, if the cache has room or an idle entry can be purged (least recently released
  first); otherwise the pin is not cached and is released with its use ("overflow").
- A cached read-only pin that a request needs writable is upgraded when idle (the
  writable pin is taken first, then the read-only one let go); while in use, the request
  gets an uncached writable pin.
- close(): every pin is released (its GTF_reading/GTF_writing cleared) once its last use
  ends; nothing is cached afterwards.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backendd.grants import GrantMapping, GrantTable

DEFAULT_LIMIT = 1056  # per ring, as Linux blkback's max_persistent_grants
# The keys of PersistentGrants.stats(), in order.
STAT_KEYS = ("pgrant_hits", "pgrant_misses", "pgrant_purged", "pgrant_overflow",
             "pgrant_upgrades")


class _Entry:
    __slots__ = ("mapping", "users")

    def __init__(self, mapping: GrantMapping) -> None:
        self.mapping = mapping
        self.users = 0


class Use:
    """One request's use of a cached pin: page_view() and release(), as a GrantMapping."""

    __slots__ = ("_cache", "_entry", "gref")

    def __init__(self, cache: PersistentGrants, entry: _Entry, gref: int) -> None:
        self._cache: PersistentGrants | None = cache
        self._entry = entry
        self.gref = gref

    @property
    def writable(self) -> bool:
        return self._entry.mapping.writable

    @property
    def frame(self) -> int:
        return self._entry.mapping.frame

    def page_view(self, start: int = 0, length: int | None = None) -> memoryview:
        return self._entry.mapping.page_view(start, length)

    def release(self) -> None:
        if self._cache is not None:
            cache, self._cache = self._cache, None
            cache._put(self.gref, self._entry)

    def __enter__(self) -> Use:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class PersistentGrants:
    """The cache of one ring. Counters: hits, misses (pinned and cached), purged (idle
    entries let go to make room), overflow (pins not cached), upgrades."""

    def __init__(self, grants: GrantTable, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 0:
            raise ValueError(f"limit {limit}")
        self.grants = grants
        self.limit = limit
        self._entries: dict[int, _Entry] = {}
        # Entries no request uses, least recently released first: the purge order.
        self._idle: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self._closed = False
        self.hits = self.misses = self.purged = self.overflow = self.upgrades = 0

    def __len__(self) -> int:
        return len(self._entries)

    def cached(self, gref: int) -> bool:
        return gref in self._entries

    def acquire(self, gref: int, writable: bool) -> Use | GrantMapping:
        """A pin of `gref` (writable if asked) for one request; release() it when the
        request is done. Raises GrantError like GrantTable.map."""
        entry = self._entries.get(gref)
        if entry is not None:
            if writable and not entry.mapping.writable:
                if entry.users:
                    self.overflow += 1
                    return self.grants.map(gref, True)
                # Writable first, then let the read-only pin go: the grant never looks
                # unused to the frontend in between. A read-only grant fails here and
                # stays cached read-only.
                new = self.grants.map(gref, True)
                entry.mapping.release()
                entry.mapping = new
                self.upgrades += 1
            else:
                self.hits += 1
            return self._use(gref, entry)
        mapping = self.grants.map(gref, writable)
        if self._closed or (len(self._entries) >= self.limit and not self._purge_one()):
            self.overflow += 1
            return mapping
        self.misses += 1
        entry = _Entry(mapping)
        self._entries[gref] = entry
        return self._use(gref, entry)

    def _use(self, gref: int, entry: _Entry) -> Use:
        if entry.users == 0:
            self._idle.pop(gref, None)
        entry.users += 1
        return Use(self, entry, gref)

    def _purge_one(self) -> bool:
        if not self._idle:
            return False
        gref, entry = self._idle.popitem(last=False)
        del self._entries[gref]
        entry.mapping.release()
        self.purged += 1
        return True

    def _put(self, gref: int, entry: _Entry) -> None:
        entry.users -= 1
        if entry.users:
            return
        if self._closed:
            if self._entries.get(gref) is entry:
                del self._entries[gref]
            entry.mapping.release()
        else:
            self._idle[gref] = entry  # most recently released: purged last

    def saved(self) -> list[tuple[int, bool]]:
        """(gref, writable) of every cached pin, the purge order first (idle ones, least
        recently released first, then those in use): what a migrated cache re-pins."""
        busy = [g for g in self._entries if g not in self._idle]
        return [(g, self._entries[g].mapping.writable) for g in [*self._idle, *busy]]

    def restore(self, gref: int, writable: bool) -> None:
        """Pin and cache `gref`, idle, as the migrated cache had it (appended to the
        purge order; no counter moves). Raises GrantError like GrantTable.map."""
        if self._closed or gref in self._entries or len(self._entries) >= self.limit:
            return
        entry = _Entry(self.grants.map(gref, writable))
        self._entries[gref] = entry
        self._idle[gref] = entry

    def close(self) -> None:
        """Release every pin (those in use, when their use ends); cache nothing more."""
        self._closed = True
        for gref, entry in list(self._idle.items()):
            del self._entries[gref]
            entry.mapping.release()
        self._idle.clear()

    def stats(self) -> dict[str, int]:
        return dict(zip(STAT_KEYS, (self.hits, self.misses, self.purged, self.overflow,
                                    self.upgrades), strict=True))
