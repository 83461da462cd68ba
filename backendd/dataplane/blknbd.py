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

The plain reads and writes (no flush, pages one run in one mapping) do not even go
through Python one by one: one call to nbd_kernel.c (`nf_issue_descs`) issues them to
libnbd on the connection's handle, and its completion callback, in C, puts each finished
slot into the arrays `bk_jobs_done` takes. Python sees them only on the slow paths: a
command the server failed (answered with its errno), or a lost connection (what C had
in flight is taken back and sent again the Python way, in order).

While only C has commands out on the disk's one connection, the whole wake-up of its
socket is one call (`NbdWaker`, nbd_kernel.c's nf_wake, with the GIL released): every
reply the socket holds is read, each ring is answered and served again, what it hands
out is issued, its guest signalled at most once; Python gets counts and flags, and acts
only when a flag asks (a failed command, a lost connection, a request refused, a flush
or a scattered request to issue the Python way). The ring's counters are kept in C
until they are read (`fold_stats`).
"""

from __future__ import annotations

import ctypes
import logging
from typing import TYPE_CHECKING, Any

from backendd.memory import GuestMemoryError
from rings.consts import BlkifOp

from . import kernel as K
from .blk import CompiledRingQueue
from .build import Loader

if TYPE_CHECKING:
    from backendd.devices.blk.nbd import NbdImage, _Op
    from backendd.devices.blk.request import Geometry

log = logging.getLogger(__name__)


def _pointer(buf: bytearray) -> Any:
    return (ctypes.c_char * len(buf)).from_buffer(buf)


# nbd_kernel.c: plain reads and writes issued to libnbd, and completed, in C.
NF_FREE, NF_IN_FLIGHT, NF_FAILED = 0, 1, 2


class NfCmd(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("addr", ctypes.c_uint64),
                ("seq", ctypes.c_uint64), ("ctx", ctypes.c_void_p),
                ("length", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("err", ctypes.c_int32), ("slot", ctypes.c_uint16),
                ("write", ctypes.c_uint8), ("state", ctypes.c_uint8)]


NfTable = NfCmd * K.MAX_PENDING


assert ctypes.sizeof(K.JobDesc) == 32  # nbd_kernel.c's struct nf_desc


class NfCtx(ctypes.Structure):
    _fields_ = [("table", ctypes.c_void_p), ("table_len", ctypes.c_uint32),
                ("n", ctypes.c_uint32), ("slots", ctypes.c_void_p), ("errs", ctypes.c_void_p),
                ("inflight", ctypes.c_uint32), ("failed", ctypes.c_uint32)]


NF_W_DEAD, NF_W_FAILED, NF_W_ERROR, NF_W_SLOW, NF_W_ANSWERED = 1, 2, 4, 8, 16
NF_R_OUT, NF_R_REST = 1, 2


class NfRing(ctypes.Structure):
    """struct nf_ring: one ring served by nf_wake."""

    _fields_ = [("ctx", ctypes.c_void_p), ("q", ctypes.c_void_p), ("env", ctypes.c_void_p),
                ("out", ctypes.c_void_p), ("descs", ctypes.c_void_p), ("rest", ctypes.c_void_p),
                ("nrest", ctypes.c_uint32), ("call_fd", ctypes.c_int32),
                ("flags", ctypes.c_uint32), ("inpool", ctypes.c_uint32),
                ("answered", ctypes.c_uint32), ("issued", ctypes.c_uint32),
                ("notifies", ctypes.c_uint64), ("notifies_saturated", ctypes.c_uint64),
                ("stats", K.Stats)]


class NfWake(ctypes.Structure):
    """struct nf_wake: one connection's wake-up."""

    _fields_ = [("h", ctypes.c_void_p), ("jobs_done", ctypes.c_void_p),
                ("describe", ctypes.c_void_p), ("rings", ctypes.c_void_p),
                ("nrings", ctypes.c_uint32), ("fd", ctypes.c_int32), ("seq", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("replies", ctypes.c_uint32),
                ("direction", ctypes.c_uint32), ("err", ctypes.c_int32),
                ("calls", ctypes.c_uint64), ("replies_total", ctypes.c_uint64)]


class NbdKernel:
    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        u32, p = ctypes.c_uint32, ctypes.c_void_p
        sizes = (u32 * 8)()
        lib.nf_sizes.restype = u32
        lib.nf_sizes.argtypes = [p, u32]
        n = lib.nf_sizes(sizes, 8)
        want = [ctypes.sizeof(t) for t in (NfCmd, NfCtx, NfRing, NfWake, K.Out)]
        if list(sizes[:n]) != want:
            raise AttributeError(f"{path}: structure sizes {list(sizes[:n])}, the binding "
                                 f"has {want}")
        self.wake = lib.nf_wake
        self.wake.restype = u32
        self.wake.argtypes = [p]
        self.last_error = lib.nf_last_error
        self.last_error.restype = ctypes.c_char_p
        self.last_error.argtypes = []
        self.issue_descs = lib.nf_issue_descs
        self.issue_descs.restype = u32
        self.issue_descs.argtypes = [p, p, p, u32, p, u32, ctypes.c_uint64, p, p, p]
        self.take_failed = lib.nf_take_failed
        self.take_failed.restype = u32
        self.take_failed.argtypes = [p]
        self.take_back = lib.nf_take_back
        self.take_back.restype = u32
        self.take_back.argtypes = [p, p]


LOADER = Loader("nbd", NbdKernel)


class NbdRingQueue(CompiledRingQueue):
    image: NbdImage

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._descs = K.JobDescArray()
        self._slots = K.JobArray()  # finished jobs, and their errnos, for bk_jobs_done
        self._errs = K.ErrArray()
        # What is done, by Python (nbd_done) and by nbd_kernel.c, goes to _slots/_errs;
        # _fast.n counts both.
        self._fast = NfCtx(table_len=K.MAX_PENDING, slots=ctypes.addressof(self._slots),
                           errs=ctypes.addressof(self._errs))
        self._table = NfTable()
        self._fast.table = ctypes.addressof(self._table)
        self._rest = (ctypes.c_uint32 * K.MAX_PENDING)()  # what C left to Python
        self._nrest = ctypes.c_uint32()
        self._nerr = ctypes.c_int32()
        self._ring = NfRing(ctx=ctypes.addressof(self._fast), q=self._q,
                            env=ctypes.addressof(self._env), out=ctypes.addressof(self._out),
                            descs=ctypes.addressof(self._descs),
                            rest=ctypes.addressof(self._rest),
                            call_fd=self.channel.call_fd)
        try:
            self.nf = LOADER.load()
        except (OSError, AttributeError) as e:  # libnbd missing, a stale build
            log.warning("nbd_kernel.c's library cannot be used: %s", e)
            self.nf = None
        if self.nf is not None:
            self.image.add_fast_sink(self)
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
        image = self.image
        self._inpool += n
        self._idle.clear()
        handle = image.fast_handle() if self.nf is not None else None
        descs = self._issue_fast(handle, native, n) if handle is not None else \
            self._descs[:n]
        self._run_descs(descs, native)

    def _run_descs(self, descs: list, native: Any) -> None:
        """Issue jobs the Python way (flushes, trims, scattered pages, no fast handle)."""
        image, k, q = self.image, self.k, self._q
        ops: list[_Op] = []
        for d in descs:
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
        image.submit_ops(ops)

    def _issue_fast(self, handle: int, native: Any, n: int) -> list:
        """Issue the plain reads and writes whose pages are one run in one mapping from
        C (nbd_kernel.c); return the descriptions left for the Python path."""
        seq = self.image.take_seq(n)
        self._nerr.value = 0
        done = self.nf.issue_descs(ctypes.byref(self._fast), handle, self._descs, n,
                                   native.array, native.count, seq, self._rest,
                                   ctypes.byref(self._nrest), ctypes.byref(self._nerr))
        self.image.fast_issued(done)
        left = self._nrest.value
        if self._nerr.value:
            # Refused by libnbd (a dead connection, a shrunken export): the Python
            # path finds out why and does what it does.
            log.debug("blk ring %d: libnbd refused a command from C (errno %d)",
                      self.index, self._nerr.value)
        descs = self._descs
        return [descs[i] for i in self._rest[:left]]

    # --- what nbd_kernel.c holds, for the disk's slow paths -----------------------------

    def nbd_fast_pending(self) -> int:
        """Answers recorded since the last nbd_settle; FAILED commands (the connection
        lives) become answers with their errno here."""
        if self._fast.failed:
            self.nf.take_failed(ctypes.byref(self._fast))
        return self._fast.n

    def nbd_fast_in_flight(self) -> int:
        return self._fast.inflight

    def nbd_take_back(self) -> list[_Op]:
        """The connection is closed: what C had in flight, as ops to send again."""
        from backendd.devices.blk.nbd import _Op
        if not self._fast.inflight:
            return []
        out = NfTable()
        n = self.nf.take_back(ctypes.byref(self._fast), out)
        ops = []
        for c in out[:n]:
            # Sent again the slow way, through a bounce buffer the kernel copies to or
            # from the request's pages (the slot still holds them; guest memory may
            # have been remapped since).
            buf = bytearray(c.length)
            if c.write:
                self.k.job_copy(self._q, c.slot, _pointer(buf), c.length, 0)
            kind = "pwrite" if c.write else "pread"
            ops.append(_Op(self, c.slot, c.seq, [[(kind, c.offset, buf, c.flags)]],
                           not c.write, None if c.write else buf))
        return ops

    def release(self) -> None:
        if self.nf is not None:
            self.image.remove_fast_sink(self)
        self.fold_stats()
        super().release()

    # --- nf_wake's side (NbdWaker) ------------------------------------------------------

    def fold_stats(self) -> None:
        """Add what nf_wake counted since the last fold to the device's counters and the
        event channel's."""
        r = self._ring
        st, c = r.stats, self.counters
        for name in K.STAT_NAMES:
            value = getattr(st, name)
            if value:
                setattr(c, name, getattr(c, name) + value)
                setattr(st, name, 0)
        if r.notifies or r.notifies_saturated:
            self.channel.count_notifies(r.notifies, r.notifies_saturated)
            r.notifies = r.notifies_saturated = 0

    def nbd_woke(self) -> int:
        """After nf_wake answered and served this ring: the Python side of what it did,
        and what it left (NF_R_*). Returns the commands it issued."""
        r = self._ring
        inpool = self._inpool = r.inpool
        if inpool:
            self._pool_pin = self.memory.native()  # guest pages are out with libnbd
            self._idle.clear()
        else:
            self._check_idle()
        flags = r.flags
        if flags:
            if flags & NF_R_OUT:  # refused requests, a halt, more to take: as bk_serve's
                self._after(self._out)
            if flags & NF_R_REST:  # flushes, trims, scattered pages
                descs = self._descs
                self._run_descs([descs[i] for i in self._rest[:r.nrest]],
                                self.memory.native())
        return r.issued

    # --- the disk's side (nbd.Sink) -----------------------------------------------------

    def nbd_done(self, op: _Op) -> None:
        err = op.failed
        if not err and op.bounce is not None and \
                self.k.job_copy(self._q, op.tag, _pointer(op.bounce), len(op.bounce), 1):
            err = 5  # EIO; cannot happen: the slot and length are the kernel's
        fast = self._fast
        n = fast.n  # at most MAX_PENDING: each slot finishes once per hand-out
        self._slots[n] = op.tag
        self._errs[n] = err
        fast.n = n + 1

    def nbd_waker(self, sinks: list[Any]) -> NbdWaker | None:
        if self.nf is None or any(not isinstance(q, NbdRingQueue) or q.nf is None
                                  for q in sinks):
            return None
        return NbdWaker(sinks)

    def nbd_may_wake(self) -> bool:
        """Whether nf_wake may answer this ring and take from it."""
        return self._q is not None and not (self.halted or self._stopping or self.suspended)

    def nbd_settle(self) -> None:
        fast = self._fast
        n, fast.n = fast.n, 0
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


class NbdWaker:
    """One connection's wake-up in one C call (nf_wake) for the rings `sinks` whose
    commands go on it; built by the disk (NbdImage) when its rings change."""

    def __init__(self, sinks: list[NbdRingQueue]) -> None:
        first = sinks[0]
        nf, k = first.nf, first.k
        assert nf is not None
        self.sinks = list(sinks)
        self._call = nf.wake
        self._last_error = nf.last_error
        self._rings = (ctypes.c_void_p * len(sinks))(
            *(ctypes.addressof(q._ring) for q in sinks))
        self.w = NfWake(jobs_done=ctypes.cast(k.jobs_done, ctypes.c_void_p).value,
                        describe=ctypes.cast(k.jobs_describe, ctypes.c_void_p).value,
                        rings=ctypes.addressof(self._rings), nrings=len(sinks))
        self._wp = ctypes.addressof(self.w)

    def ready(self) -> bool:
        return all(q.nbd_may_wake() for q in self.sinks)

    def run(self, image: NbdImage, handle: int, fd: int, watch: int) -> bool:
        """The socket is readable: the wake-up, then what Python must do of it. True
        when the caller's slow path must take over: the connection is gone, a command
        failed, libnbd failed, or the socket is to be watched for other directions than
        `watch`."""
        w = self.w
        w.h = handle
        w.fd = fd
        w.seq = image._seq
        for q in self.sinks:
            q._refresh()
        flags = self._call(self._wp)
        image._seq = w.seq
        if w.replies:
            image._last_progress = image.loop.time()
        if flags & NF_W_ANSWERED:
            issued = 0
            for q in self.sinks:
                if q._ring.answered:
                    issued += q.nbd_woke()
            if issued:
                image.issued_in_c += issued
        if w.err:
            log.debug("nbd: libnbd refused a command from C (errno %d)", w.err)
        if flags & NF_W_ERROR:
            image._connect_error = (self._last_error() or b"").decode(errors="replace")
        return bool(flags & (NF_W_DEAD | NF_W_FAILED | NF_W_ERROR)) or w.direction != watch

    def stats(self) -> tuple[int, int]:
        """(wake-ups, replies read in them)."""
        return self.w.calls, self.w.replies_total
