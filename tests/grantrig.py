"""A simulated guest's RAM and real shared grant table, and the daemon's view of them (its
GuestMemory and GrantTable), for tests that exercise grants without a daemon."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from backendd.grants import GrantTable
from backendd.guest import GuestGrantTable, GuestRAM
from backendd.memory import GuestMemory

PAGE = 4096


@contextlib.contextmanager
def guest_ram_and_table(pages: int, version: int = 1
                        ) -> Iterator[tuple[GuestRAM, GuestGrantTable]]:
    """`pages` pages of guest RAM and a one-frame grant table of `version`."""
    ram = GuestRAM(pages * PAGE)
    gt = GuestGrantTable(nr_frames=1, version=version)
    try:
        yield ram, gt
    finally:
        gt.close()
        ram.close()


@contextlib.contextmanager
def backend_grant_table(ram: GuestRAM, gt: GuestGrantTable) -> Iterator[GrantTable]:
    """The daemon's GrantTable over the guest's RAM regions and its grant table."""
    mem = GuestMemory()
    for gpa, size, fd, offset in ram.regions:
        mem.add_region(gpa, size, fd, offset)
    table = GrantTable(mem, backend_domid=0)
    table.set_table(gt.fd, 0, gt.nr_frames, version=gt.version)
    try:
        yield table
    finally:
        table.close()
        mem.close()
