"""Executing validated requests against the backing store, in the I/O thread pool.

An `IoItem` carries a request and the guest memory it moves data to or from: views of
granted pages, mapped on the event loop before the item is queued. The functions here
only do the system calls (preadv/pwritev straight into or out of those views, so there
is no bounce buffer and no copy; fdatasync; hole punching) and record a status. They
never map or release grants and never touch the ring: the event loop does both when the
batch comes back.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rings.consts import SECTOR_SIZE, BlkifOp, BlkifStatus

from .request import Request

if TYPE_CHECKING:
    from backendd.grants import GrantMapping

    from .image import Image


@dataclass(slots=True)
class IoItem:
    req: Request
    mappings: list[GrantMapping] = field(default_factory=list)
    views: list[memoryview] = field(default_factory=list)
    status: int = BlkifStatus.OKAY
    error: int = 0  # errno of a failed system call, for the stats and the log
    ring_index: int = 0  # where the request sat in the ring (the in-flight table's key)

    @property
    def is_flush(self) -> bool:
        return self.req.op in (BlkifOp.FLUSH_DISKCACHE, BlkifOp.WRITE_BARRIER)

    def release(self) -> None:
        """Drop every view and grant mapping; after this the guest may reuse its pages."""
        for view in self.views:
            view.release()
        self.views.clear()
        for m in self.mappings:
            m.release()
        self.mappings.clear()


def transfer(fd: int, write: bool, offset: int, views: list[memoryview]) -> None:
    """Move all of `views` to or from `offset`. A short transfer is continued from where
    it stopped; zero bytes means the backing store ended under us (truncated file)."""
    call = os.pwritev if write else os.preadv
    pending = views
    while pending:
        done = call(fd, pending, offset)
        if done == 0:
            raise OSError(errno.EIO, "backing store ended before the request did")
        offset += done
        while pending and done >= len(pending[0]):
            done -= len(pending[0])
            pending = pending[1:]
        if done:
            pending = [pending[0][done:], *pending[1:]]


def execute(image: Image, item: IoItem) -> None:
    req = item.req
    try:
        if item.is_flush:
            # Earlier writes have completed (the queue drains before a flush), so this
            # makes them durable; data carried by the flush is written after it.
            os.fdatasync(image.fd)
        if req.op == BlkifOp.DISCARD:
            if req.nr_sectors:
                image.discard_range(req.sector * SECTOR_SIZE, req.nr_sectors * SECTOR_SIZE)
        elif item.views:
            transfer(image.fd, req.writes, req.sector * SECTOR_SIZE, item.views)
    except OSError as e:
        item.status = BlkifStatus.ERROR
        item.error = e.errno or errno.EIO


def execute_batch(image: Image, items: list[IoItem]) -> list[IoItem]:
    """One pool job: several requests, to amortise the hand-off between threads."""
    for item in items:
        execute(image, item)
    return items
