"""ctypes binding of blk_kernel.c: the structures it takes and the calls it exports.

ctypes releases the GIL for the length of each call, so rings served on the kernel's
helper threads run beside each other; the blocking I/O runs on the kernel's own I/O
threads, which never enter Python.

build.py builds it (`make kernel`) and its `Loader` finds it: at $BACKENDD_BLK_KERNEL
(the tests point it at a sanitizer build) or next to this file. `load()` returns None
when it is not built: devices then use the pure-Python data plane.
"""

from __future__ import annotations

import ctypes

from backendd import inflight
from backendd.dataplane.build import Env, KernelError, Loader

MAX_PENDING = 64
MAX_SEGS = 256
MAX_RING_PAGES = 16
MAX_RING = 1024
ROUND_MAX = 1024  # rings in one bk_serve_round call
POLL_MAX = 16  # rings in one bk_serve_round_poll call
SLOT_MAX = 112

NOTIFY, MORE, BLOCKED, CORRUPT, INTERNAL = 1, 2, 4, 8, 16

_u8p = ctypes.POINTER(ctypes.c_uint8)


class Disk(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int32), ("sector_size", ctypes.c_uint32),
                ("sectors", ctypes.c_uint64), ("readonly", ctypes.c_uint32),
                ("discard", ctypes.c_uint32), ("discard_secure", ctypes.c_uint32),
                ("is_block", ctypes.c_uint32), ("max_indirect", ctypes.c_uint32),
                ("inline_io", ctypes.c_uint32), ("external", ctypes.c_uint32)]


class Config(ctypes.Structure):
    _fields_ = [("pages", ctypes.c_void_p * MAX_RING_PAGES), ("nr_pages", ctypes.c_uint32),
                ("size", ctypes.c_uint32), ("abi", ctypes.c_uint32),
                ("max_pending", ctypes.c_uint32), ("start", ctypes.c_uint32),
                ("req_cons", ctypes.c_uint32), ("inflight", ctypes.c_void_p),
                ("wake_fd", ctypes.c_int32), ("kick_fd", ctypes.c_int32), ("disk", Disk),
                ("persistent", ctypes.c_uint32), ("pg_limit", ctypes.c_uint32)]


PG_MAX = 65536  # cached pins per ring the kernel takes at most (BK_PG_MAX)
# bk_pg_stats' counters, in order: persistent.py's STAT_KEYS (a test holds them equal).
PG_STAT_NAMES = ("pgrant_hits", "pgrant_misses", "pgrant_purged", "pgrant_overflow",
                 "pgrant_upgrades")


STAT_NAMES = ("requests", "reads", "writes", "bytes_read", "bytes_written", "errors",
              "invalid", "unsupported", "flushes", "discards", "inline_io", "pooled")


class Stats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in STAT_NAMES]


class Out(ctypes.Structure):
    _fields_ = [("stats", Stats), ("flags", ctypes.c_uint32), ("njobs", ctypes.c_uint32),
                ("jobs", ctypes.c_uint16 * MAX_PENDING),
                ("job_flush", ctypes.c_uint8 * MAX_PENDING),
                ("inpool", ctypes.c_uint32), ("notified", ctypes.c_uint32),
                ("refused_id", ctypes.c_uint64), ("refused_why", ctypes.c_uint32),
                ("saturated", ctypes.c_uint32)]


# enum bk_why: why the first refused request of a call was refused.
WHY = ("", "unknown operation", "bad number of segments", "write to a read-only disk",
       "segment sectors outside a page", "not aligned to the disk's sectors",
       "sector range wraps", "sector range beyond the disk", "indirect operation",
       "bad number of indirect segments", "too many indirect pages",
       "a grant refused (revoked, another domain's, read-only, beyond the table or not "
       "guest memory)", "segment outside its sub-page grant", "discard not supported",
       "secure discard not supported")


JobArray = ctypes.c_uint16 * MAX_PENDING


class JobDesc(ctypes.Structure):
    """struct bk_job_desc: what a pool job asks for, for a caller that moves the data
    itself (a disk on an NBD export)."""

    _fields_ = [("slot", ctypes.c_uint16), ("op", ctypes.c_uint8), ("flush", ctypes.c_uint8),
                ("ring_index", ctypes.c_uint32), ("offset", ctypes.c_uint64),
                ("length", ctypes.c_uint64), ("addr", ctypes.c_uint64)]


JobDescArray = JobDesc * MAX_PENDING
ErrArray = ctypes.c_int32 * MAX_PENDING

# What bk_layout reports, in its order; checked against Xen's sizes the binding relies on.
LAYOUT_NAMES = (
    "x64.request.sizeof", "x64.request.id", "x64.request.sector_number", "x64.request.seg",
    "x64.discard.nr_sectors", "x64.indirect.nr_segments", "x64.indirect.indirect_grefs",
    "x64.indirect.sizeof", "x64.response.sizeof", "x64.response.status", "x64.entry",
    "x32.request.sizeof", "x32.request.id", "x32.request.sector_number", "x32.request.seg",
    "x32.discard.nr_sectors", "x32.indirect.nr_segments", "x32.indirect.indirect_grefs",
    "x32.indirect.sizeof", "x32.response.sizeof", "x32.response.status", "x32.entry",
    "grant_v1.sizeof", "grant_v1.frame", "grant_v2.sizeof", "grant_v2.page_off",
    "grant_v2.length", "grant_v2.frame", "sring.ring", "sring.rsp_prod", "sring.rsp_event",
    "inflight.queue_header", "inflight.entry", "inflight.entry_header", "max_pending",
    "max_segs", "sizeof.pending", "sizeof.out", "sizeof.config", "sizeof.env", "sizeof.disk",
    "sizeof.stats",
)


class Kernel:
    """The loaded library with typed entry points."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        self.path = path
        vp, u32, i32 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int32
        envp, outp = ctypes.POINTER(Env), ctypes.POINTER(Out)
        u16p = ctypes.POINTER(ctypes.c_uint16)
        self.queue_new = _fn(lib.bk_queue_new, vp, [ctypes.POINTER(Config)])
        self.queue_free = _fn(lib.bk_queue_free, None, [vp])
        self.queue_set_disk = _fn(lib.bk_queue_set_disk, None, [vp, ctypes.POINTER(Disk)])
        self.queue_state = _fn(lib.bk_queue_state, None, [vp, ctypes.POINTER(u32)])
        self.serve = _fn(lib.bk_serve, None, [vp, envp, outp])
        self.serve_poll = _fn(lib.bk_serve_poll, None, [vp, envp, outp, i32, u32, u32])
        self.replay = _fn(lib.bk_replay, None, [vp, envp, ctypes.c_char_p,
                                                ctypes.POINTER(u32), u32, outp])
        self.reap = _fn(lib.bk_reap, None, [vp, envp, outp])
        self.complete = _fn(lib.bk_complete, None, [vp, envp, u16p, u32, i32, outp])
        self.io_threads = _fn(lib.bk_io_threads, u32, [u32])
        self.push = _fn(lib.bk_push, None, [vp, envp, outp])
        self.inflight_scan = _fn(lib.bk_inflight_scan, None, [vp])
        self.jobs_describe = _fn(lib.bk_jobs_describe, u32, [vp, u16p, u32,
                                                             ctypes.POINTER(JobDesc)])
        self.jobs_done = _fn(lib.bk_jobs_done, None, [vp, envp, u16p, ctypes.POINTER(i32),
                                                      u32, outp])
        self.queue_set_poll = _fn(lib.bk_queue_set_poll, None, [vp, u32])
        self.job_copy = _fn(lib.bk_job_copy, i32, [vp, ctypes.c_uint16, ctypes.c_void_p,
                                                   ctypes.c_uint64, i32])
        self.serve_many = _fn(lib.bk_serve_many, u32, [ctypes.POINTER(vp),
                                                       ctypes.POINTER(envp),
                                                       ctypes.POINTER(outp), u32])
        u8p = ctypes.POINTER(ctypes.c_uint8)
        self.serve_round = _fn(lib.bk_serve_round, u32, [ctypes.POINTER(vp),
                                                         ctypes.POINTER(envp),
                                                         ctypes.POINTER(outp), u32, u8p, u8p])
        u64p = ctypes.POINTER(ctypes.c_uint64)
        self.pg_stats = _fn(lib.bk_pg_stats, None, [vp, u64p])
        self.pg_saved = _fn(lib.bk_pg_saved, u32, [vp, ctypes.POINTER(u32), u8p, u32])
        self.pg_restore = _fn(lib.bk_pg_restore, i32, [vp, envp, u32, u32])
        self.pg_close = _fn(lib.bk_pg_close, None, [vp, envp])
        self.serve_round_poll = _fn(lib.bk_serve_round_poll, None, [
            ctypes.POINTER(vp), ctypes.POINTER(envp), ctypes.POINTER(outp), u32, u8p, u8p,
            ctypes.POINTER(u32), ctypes.POINTER(i32), u32, u32])
        # The transfers of O_DIRECT images and block devices go through each queue's
        # io_uring (set_uring(0): through the I/O threads, for queues set up after).
        # None: a library built without it.
        self.set_uring = (_fn(lib.bk_set_uring, i32, [i32])
                          if hasattr(lib, "bk_set_uring") else None)
        self.queue_uring = (_fn(lib.bk_queue_uring, None, [vp, u64p])
                            if hasattr(lib, "bk_queue_uring") else None)
        self._layout = _fn(lib.bk_layout, u32, [ctypes.POINTER(u32), u32])
        self._check()

    def layout(self) -> dict[str, int]:
        buf = (ctypes.c_uint32 * 128)()
        n = self._layout(buf, 128)
        return dict(zip(LAYOUT_NAMES, buf[:n], strict=True))

    def _check(self) -> None:
        lay = self.layout()
        want = {
            "inflight.queue_header": inflight.QUEUE_HEADER_SIZE,
            "inflight.entry": inflight.ENTRY_SIZE,
            "inflight.entry_header": inflight.ENTRY_HEADER_SIZE,
            "max_pending": MAX_PENDING, "max_segs": MAX_SEGS,
            "sizeof.out": ctypes.sizeof(Out), "sizeof.config": ctypes.sizeof(Config),
            "sizeof.env": ctypes.sizeof(Env), "sizeof.disk": ctypes.sizeof(Disk),
            "sizeof.stats": ctypes.sizeof(Stats),
        }
        bad = {k: (lay[k], v) for k, v in want.items() if lay[k] != v}
        if bad:
            raise KernelError(f"{self.path}: built for other layouts: {bad}")


def _fn(f, restype, argtypes):
    f.restype = restype
    f.argtypes = argtypes
    return f


LOADER = Loader("blk", Kernel)
library_path = LOADER.library_path
load = LOADER.load
