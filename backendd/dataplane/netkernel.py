"""ctypes binding of net_kernel.c (with core.h, the primitives it shares with the blk
kernel).

build.py compiles it (`make netkernel`: gcc -Wall -Wextra -Werror against Xen's public
headers; the tests also build a sanitizer variant) and its `Loader` finds it: at
$BACKENDD_NET_KERNEL (the tests point it at a sanitizer build) or next to this file.
`load()` returns None when it is not built: net devices then use the pure-Python data
plane.
"""

from __future__ import annotations

import ctypes

from backendd.dataplane.build import Env, KernelError, Loader, Region, set_log
from backendd.grants import GrantTable
from backendd.memory import GuestMemory
from rings.ring import BackRing

BUDGET = 64
MAX_ERRORS = 64
NOTIFY, MORE, TAP_FULL, CREDIT, FATAL, MCAST = 1, 2, 4, 8, 16, 32

# Reason codes of net_kernel.c: drops (answered ERROR) and fatal verdicts.
(R_NONE, R_TOO_MANY_SLOTS, R_SLOT_SIZE, R_FIRST_SIZE, R_GRANT, R_WINDOW, R_MISSING_EXTRA,
 R_EXTRA_TYPE, R_CHAIN_PAST, R_MALICIOUS, R_SLOT_CROSSES, R_FIRST_CROSSES, R_GSO_SIZE,
 R_GSO_TYPE, R_IMPOSSIBLE) = range(15)

REASONS = {
    R_TOO_MANY_SLOTS: "tx: too many slots exceeding limit (18)",
    R_SLOT_SIZE: "tx: invalid tx request, slot size > remaining size",
    R_FIRST_SIZE: "tx: bad packet size: fewer than 14 bytes in the first slot",
    R_GRANT: "tx: gref {detail}: {grant}",
    R_WINDOW: "tx: gref {detail}: slot outside the granted sub-page",
    R_MISSING_EXTRA: "tx: missing extra info (the chain runs past the published requests)",
    R_EXTRA_TYPE: "tx: invalid extra type {detail}",
    R_CHAIN_PAST: "tx: a slot chain runs past the published requests",
    R_MALICIOUS: "tx: malicious frontend using more than 20 slots",
    R_SLOT_CROSSES: "tx: slot crosses its page",
    R_FIRST_CROSSES: "tx: first slot crosses its page",
    R_GSO_SIZE: "tx: GSO size must not be zero",
    R_GSO_TYPE: "tx: bad GSO type {detail}",
    R_IMPOSSIBLE: "tx: impossible number of requests: req_prod {detail}",
}

# Why a grant was refused (core.h's DP_G_), as backendd/grants.py says it.
GRANT_REASONS = {
    1: "no grant table set up",
    2: "beyond the grant table",
    3: "transitive grants are not supported",
    4: "not permit_access (revoked or never granted)",
    5: "granted to another domain, not to the backend",
    6: "readonly grant used for writing",
    7: "entry unstable, changed during 5 tries",
    8: "sub-page crosses the page",
    9: "frame is not guest memory",
}

OUT_COUNTERS = ("tx_packets", "tx_bytes", "tx_gso", "tx_errors", "tx_dropped_csum",
                "tx_dropped_tap", "tx_tap_full", "tx_rate_limited")


class Ring(ctypes.Structure):
    _fields_ = [("page", ctypes.c_void_p), ("size", ctypes.c_uint32),
                ("entry", ctypes.c_uint32), ("req_cons", ctypes.c_uint32),
                ("rsp_prod_pvt", ctypes.c_uint32), ("pushed", ctypes.c_uint32)]

    def attach(self, ring: BackRing) -> None:
        """Point at the shared page of `ring` (the caller keeps it exported)."""
        shared = ring.ring
        self.size, self.entry = shared.size, shared.entry_size

    def load(self, ring: BackRing) -> None:
        self.req_cons, self.rsp_prod_pvt, self.pushed = (ring.req_cons, ring.rsp_prod_pvt,
                                                         ring._pushed)

    def store(self, ring: BackRing) -> None:
        ring.req_cons, ring.rsp_prod_pvt, ring._pushed = (self.req_cons, self.rsp_prod_pvt,
                                                          self.pushed)


class TxQueue(ctypes.Structure):
    _fields_ = [("r", Ring), ("fd", ctypes.c_int32),
                ("credit_on", ctypes.c_uint32), ("credit", ctypes.c_uint64),
                ("charged_valid", ctypes.c_uint32), ("charged_cons", ctypes.c_uint32),
                ("budget", ctypes.c_uint32)]


class TxError(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint16), ("reason", ctypes.c_uint16),
                ("detail", ctypes.c_uint32), ("grant", ctypes.c_uint32)]


class TxOut(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_uint64) for name in OUT_COUNTERS]
                + [("charged", ctypes.c_uint64), ("flags", ctypes.c_uint32),
                   ("fatal_reason", ctypes.c_uint32), ("fatal_detail", ctypes.c_uint32),
                   ("nerrors", ctypes.c_uint32), ("errors", TxError * MAX_ERRORS)])


RX_MAX_POSTED = 256
MCAST_MAX = 64
RX_STALL, RX_MORE = 64, 128
RX_COUNTERS = ("rx_packets", "rx_bytes", "rx_gso", "rx_dropped", "rx_mcast_filtered",
               "rx_bad_grant", "rx_stalls", "rx_steered")
MAX_QUEUES = 8
HASH_KEY, HASH_MAPPING = 40, 128
INBOX_FRAMES = 128
INBOX_BYTES = 512 * 1024


class Steered(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint32), ("hash", ctypes.c_uint32),
                ("vnet", ctypes.c_uint8 * 10), ("has_hash", ctypes.c_uint8),
                ("htype", ctypes.c_uint8), ("_pad", ctypes.c_uint32), ("pos", ctypes.c_uint64)]


class Inbox(ctypes.Structure):
    _fields_ = [("lock", ctypes.c_uint32), ("count", ctypes.c_uint32),
                ("head", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("bytes", ctypes.c_uint64), ("wpos", ctypes.c_uint64),
                ("data", ctypes.c_void_p), ("rec", Steered * INBOX_FRAMES)]


class Steer(ctypes.Structure):
    """One vif's steering configuration and inboxes (struct nk_steer)."""
    _fields_ = [("on", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("nq", ctypes.c_uint32),
                ("msize", ctypes.c_uint32), ("key", ctypes.c_uint8 * HASH_KEY),
                ("mapping", ctypes.c_uint32 * HASH_MAPPING), ("inbox", Inbox * MAX_QUEUES)]


class Posted(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint16), ("ok", ctypes.c_uint16), ("gref", ctypes.c_uint32),
                ("page", ctypes.c_void_p)]


class RxQueue(ctypes.Structure):
    _fields_ = [("r", Ring), ("fd", ctypes.c_int32), ("need", ctypes.c_uint32),
                ("index", ctypes.c_uint32), ("reserve", ctypes.c_uint32),
                ("steer", ctypes.c_void_p), ("gso_offload", ctypes.c_uint32),
                ("gso_tcpv4", ctypes.c_uint32),
                ("gso_tcpv6", ctypes.c_uint32), ("mcast_control", ctypes.c_uint32),
                ("nmcast", ctypes.c_uint32), ("mcast", (ctypes.c_uint8 * 6) * MCAST_MAX),
                ("head", ctypes.c_uint32), ("count", ctypes.c_uint32),
                ("posted", Posted * RX_MAX_POSTED), ("hdr", ctypes.c_uint8 * 10),
                ("scratch", ctypes.c_uint8 * 4096)]


class RxBad(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint16), ("_pad", ctypes.c_uint16), ("gref", ctypes.c_uint32),
                ("grant", ctypes.c_uint32), ("lo", ctypes.c_uint16), ("hi", ctypes.c_uint16)]


class RxOut(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_uint64) for name in RX_COUNTERS]
                + [("woke", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                   ("fatal_prod", ctypes.c_uint32),
                   ("nbad", ctypes.c_uint32), ("bad", RxBad * RX_MAX_POSTED)])


WORK_TX, WORK_RX = 0, 1


class Work(ctypes.Structure):
    """One tx or rx wake-up of one queue in an nk_serve_many call; `thread` is the
    thread id (gettid) that served it."""
    _fields_ = [("kind", ctypes.c_uint32), ("budget", ctypes.c_uint32),
                ("q", ctypes.c_void_p), ("env", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("thread", ctypes.c_uint64)]


class Poll(ctypes.Structure):
    """One queue in an nk_serve_poll call (struct nk_poll): its tx and rx wake-ups (q
    None: not watched in this call; `due`: served at once, else once ready), the
    guest's eventfds, and what the call did on Python's behalf."""
    _fields_ = [("tx", Work), ("rx", Work),
                ("tx_call", ctypes.c_int32), ("rx_call", ctypes.c_int32),
                ("tx_kick", ctypes.c_int32), ("rx_kick", ctypes.c_int32),
                ("tx_due", ctypes.c_uint32), ("rx_due", ctypes.c_uint32),
                ("tx_notified", ctypes.c_uint32), ("tx_saturated", ctypes.c_uint32),
                ("rx_notified", ctypes.c_uint32), ("rx_saturated", ctypes.c_uint32),
                ("tx_kicks", ctypes.c_uint32), ("rx_kicks", ctypes.c_uint32),
                ("tx_batches", ctypes.c_uint32), ("rx_batches", ctypes.c_uint32),
                ("batches", ctypes.c_uint32), ("woken", ctypes.c_uint32),
                ("ended", ctypes.c_uint32), ("rx_stalled", ctypes.c_uint32),
                ("rx_wake", ctypes.c_int32)]


# Why an nk_serve_poll call stopped watching a queue: idle, its budget, the queue needs
# Python (a fatal ring, a multicast packet, a full tap, the credit spent), the loop (or
# another queue of the call) needs Python.
END_IDLE, END_BUDGET, END_CALLER, END_LOOP = 0, 1, 2, 3


class NetKernel:
    """The loaded library with typed entry points."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        self.path = path
        lib.nk_tx.restype = None
        lib.nk_tx.argtypes = [ctypes.POINTER(TxQueue), ctypes.POINTER(Env),
                              ctypes.POINTER(TxOut)]
        self.tx = lib.nk_tx
        lib.nk_rx.restype = None
        lib.nk_rx.argtypes = [ctypes.POINTER(RxQueue), ctypes.POINTER(Env), ctypes.c_uint32,
                              ctypes.POINTER(RxOut)]
        self.rx = lib.nk_rx
        lib.nk_rx_release.restype = None
        lib.nk_rx_release.argtypes = [ctypes.POINTER(RxQueue), ctypes.POINTER(Env)]
        self.rx_release = lib.nk_rx_release
        lib.nk_serve_many.restype = ctypes.c_uint32
        lib.nk_serve_many.argtypes = [ctypes.POINTER(Work), ctypes.c_uint32]
        self.serve_many = lib.nk_serve_many
        lib.nk_serve_groups.restype = ctypes.c_uint32
        lib.nk_serve_groups.argtypes = [ctypes.POINTER(Work), ctypes.POINTER(ctypes.c_uint32),
                                        ctypes.c_uint32]
        self.serve_groups = lib.nk_serve_groups
        lib.nk_serve_poll.restype = ctypes.c_uint32
        lib.nk_serve_poll.argtypes = [ctypes.POINTER(Poll), ctypes.c_uint32, ctypes.c_uint32,
                                      ctypes.c_uint32, ctypes.c_int32, ctypes.c_int32]
        self.serve_poll = lib.nk_serve_poll
        lib.nk_layout.restype = ctypes.c_uint32
        lib.nk_layout.argtypes = [ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32]
        buf = (ctypes.c_uint32 * 16)()
        n = lib.nk_layout(buf, 16)
        want = [ctypes.sizeof(TxQueue), ctypes.sizeof(TxOut), ctypes.sizeof(Env),
                ctypes.sizeof(RxQueue), ctypes.sizeof(RxOut), ctypes.sizeof(Region), BUDGET,
                MAX_ERRORS]
        if (list(buf[:len(want)]) != want or n < 13
                or buf[10] != ctypes.sizeof(Work) or buf[11] != ctypes.sizeof(Steer)
                or buf[12] != ctypes.sizeof(Poll)):
            raise KernelError(f"{path}: built for other layouts: {list(buf[:n])} != {want}")


class NativeEnv:
    """Guest memory and the grant table as net_kernel.c sees them (struct dp_env).

    The region table is taken afresh for each call (`refresh`) and let go after it, so
    a region the VMM removes between calls is never held; the grant table's part is
    kept until the table is set up again (its `generation` changes)."""

    def __init__(self, memory: GuestMemory, grants: GrantTable) -> None:
        self.memory = memory
        self.grants = grants
        self.env = Env()
        self._generation = -1
        self._anchors: list[object] = []
        self._regions: ctypes.Array[Region] | None = None
        self._uses_anchor: object = None

    def refresh(self) -> None:
        regions = self.memory._regions
        anchors = [(ctypes.c_char * r.size).from_buffer(r.map) for r in regions]
        array = (Region * max(1, len(regions)))()
        for k, (r, a) in enumerate(zip(regions, anchors, strict=True)):
            array[k] = Region(r.gpa, r.size, ctypes.addressof(a))
        self._anchors, self._regions = anchors, array
        self.env.regions = array
        self.env.nr_regions = len(regions)
        g = self.grants
        if g.generation != self._generation:
            self._generation = g.generation
            pin = g._pin
            if g._map is None or pin is None or not len(g._uses):
                self.env.gnt_version = 0
                self.env.gnt_entries = 0
                self._uses_anchor = None
            else:
                uses = (ctypes.c_uint32 * len(g._uses)).from_buffer(g._uses)
                self._uses_anchor = uses
                self.env.gnt_version = g.version
                self.env.gnt_entries = g.entries
                self.env.gnt_shared = pin.address
                self.env.gnt_status = pin.address + g._status_base
                self.env.gnt_uses = ctypes.addressof(uses)
        self.env.backend_domid = g.backend_domid
        set_log(self.env, self.memory.log)

    def release(self) -> None:
        """Let go of the regions (after the call), so the VMM may remove them."""
        self.env.regions = None
        self.env.nr_regions = 0
        self._regions = None
        self._anchors = []


LOADER = Loader("net", NetKernel)
library_path = LOADER.library_path
load = LOADER.load
