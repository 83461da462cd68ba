"""A blkif ring served by the compiled kernel whose disk is an NBD export.

The kernel does what it does for files (takes the batch, checks every request, pins the
grants, answers and publishes), but it cannot reach the export: every transfer, flush
and discard comes back as a job (`inline_io` 0). Each job is described once
(`bk_jobs_describe`: operation, byte range, and the host address of its pages when they
are one run) and handed to the disk's libnbd connection (backendd/devices/blk/nbd.py)
as NBD commands: a read or write whose pages are one run goes straight to and from
guest memory; one whose pages are scattered through one bounce buffer, copied in C
(`bk_job_copy`). When libnbd reports commands done, the disk tells this queue once per
wake-up (`nbd_settle`), and one `bk_complete` unpins and answers all of them.

Python is left with the libnbd calls and a little bookkeeping per request; the grants,
the ring and the responses never cost a Python call per request.
"""

from __future__ import annotations

import ctypes
import logging
from typing import TYPE_CHECKING, Any

from backendd.memory import GuestMemoryError
from rings.consts import BlkifOp

from . import kernel as K
from .blk import CompiledRingQueue

if TYPE_CHECKING:
    from backendd.devices.blk.nbd import NbdImage, _Op
    from backendd.devices.blk.request import Geometry

log = logging.getLogger(__name__)


def _pointer(buf: bytearray) -> Any:
    return (ctypes.c_char * len(buf)).from_buffer(buf)


class NbdRingQueue(CompiledRingQueue):
    image: NbdImage

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._descs = K.JobDescArray()
        self._slots = K.JobArray()  # finished jobs, and their errnos, for bk_jobs_done
        self._errs = K.ErrArray()
        self._ndone = 0
        # Each completion serves the ring again (nbd_settle): a busy guest need not kick.
        self.k.queue_set_poll(self._q, 1)

    def _disk(self, geo: Geometry) -> K.Disk:
        disk = super()._disk(geo)
        disk.inline_io = 0  # the kernel has no fd: everything is a job
        disk.external = 1   # ... handed back to us, not to the kernel's I/O threads
        return disk

    def _run_jobs(self, out: K.Out) -> None:
        n = self.k.jobs_describe(self._q, out.jobs, out.njobs, self._descs)
        if n != out.njobs:  # cannot happen: the kernel just handed these out
            log.error("blk ring %d: %d of %d jobs not in the pool", self.index,
                      out.njobs - n, out.njobs)
        native = self._pool_pin = self.memory.native()
        image, k, q = self.image, self.k, self._q
        ops: list[_Op] = []
        for d in self._descs[:n]:
            op, length, slot = d.op, d.length, d.slot
            buf: Any = None
            bounce = None
            if op != BlkifOp.DISCARD and length:
                if d.addr:  # one run of pages: libnbd reads into / writes from them
                    try:
                        buf = native.host_view(d.addr, length)
                    except GuestMemoryError:  # a run over two adjacent mappings
                        buf = None
                if buf is None:
                    buf = bytearray(length)
                    if op == BlkifOp.READ:
                        bounce = buf
                    else:
                        k.job_copy(q, slot, _pointer(buf), length, 0)
            ops.append(image.op(self, slot, op, bool(d.flush), d.offset, length, buf,
                                bounce))
        self._inpool += n
        self._idle.clear()
        image.submit_ops(ops)

    # --- the disk's side (nbd.Sink) -----------------------------------------------------

    def nbd_done(self, op: _Op) -> None:
        err = op.failed
        if not err and op.bounce is not None and \
                self.k.job_copy(self._q, op.tag, _pointer(op.bounce), len(op.bounce), 1):
            err = 5  # EIO; cannot happen: the slot and length are the kernel's
        n = self._ndone  # at most MAX_PENDING: each slot finishes once per hand-out
        self._slots[n] = op.tag
        self._errs[n] = err
        self._ndone = n + 1

    def nbd_settle(self) -> None:
        n, self._ndone = self._ndone, 0
        if self._q is None or not n:
            return
        self._inpool -= n
        self._refresh()
        env, out = ctypes.byref(self._env), ctypes.byref(self._out)
        if self.halted or self._stopping or self.suspended:
            # Answer, take nothing new.
            for bad in (0, 1):
                slots = [self._slots[i] for i in range(n) if bool(self._errs[i]) == bad]
                if slots:
                    self.k.complete(self._q, env, K.JobArray(*slots), len(slots), bad, out)
                    self._after(self._out)
        else:
            # Answer, then take what the guest queued since, in this same wake-up.
            self._blocked = False
            self.k.jobs_done(self._q, env, self._slots, self._errs, n, out)
            self._after(self._out)
        self._check_idle()
