"""The two netif rx data planes side by side: the same posted rx buffers (good and
hostile grants, v1 and v2) and the same frames from the tap (random virtio-net headers,
sizes, multicast destinations) go through the pure-Python path
(backendd/devices/net/rx.py, the reference) and the compiled kernel
(backendd/dataplane/net.py over net_kernel.c); everything the guest can see must come
out identical.

A SOCK_SEQPACKET socketpair stands in for the tap (one message per frame, the
virtio-net header in front). Compared after each round: the whole rx ring page, guest
RAM, the grant table with its in-use bits and the backend's use counts, the counters,
the buffers still posted, whether the vif was halted and whether it notified.

Used by tests/test_net_dataplane.py and `python -m bench.fuzz --targets net-rx-diff`
(inputs are frames offered plus buffers posted).
"""

from __future__ import annotations

import asyncio
import os
import random
import select
import socket
import struct
from dataclasses import dataclass

from backendd.dataplane import netkernel as nk
from backendd.dataplane.net import CompiledRxPath
from backendd.devices.net.rx import RxPath
from backendd.devices.net.vif import Features, VifState
from backendd.dirtylog import RingLog
from rings.consts import GrantType
from rings.netif import RX_ENTRY_SIZE, RX_REQUEST
from rings.ring import BackRing
from rings.sring import REQ_PROD

from .netdiff import FRAMES, PAGE, RING_FRAME, Difference, World, dirty_log, guest

RxWorld = World[RxPath]


@dataclass(frozen=True)
class RxCase:
    version: int
    features: Features
    mtu: int
    gso_offload: bool

    @classmethod
    def draw(cls, rng: random.Random) -> RxCase:
        sg = rng.random() < 0.8
        gso = sg and rng.random() < 0.7
        v4, v6 = gso and rng.random() < 0.9, gso and rng.random() < 0.8
        # The tap hands GSO frames only when offered TSO, which the device does for
        # the GSO types the frontend takes (gso_offload).
        return cls(rng.choice((1, 2)),
                   Features(sg=sg, gso_tcpv4=v4, gso_tcpv6=v6, ipv6_csum=True,
                            multicast_control=rng.random() < 0.5, rx_notify=True),
                   rng.choice((1500, 1500, 9000)), v4 or v6)


def build(kernel: nk.NetKernel | None, case: RxCase) -> RxWorld:
    ram, gt, mem, table, ring_map, shared = guest(case.version, RX_ENTRY_SIZE)
    tap, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    tap.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    tap.setblocking(False)
    loop = asyncio.new_event_loop()
    fatal: list[str] = []
    vif = VifState(0, case.features, case.mtu if case.features.sg else 1500, fatal.append)
    ring = BackRing.attach(shared)
    ring.log = RingLog(mem, [RING_FRAME])
    if kernel is None:
        path: RxPath = RxPath(ring, table, tap.fileno(), vif, loop, "net0/queue-0",
                              case.gso_offload)
    else:
        path = CompiledRxPath(kernel, ring, table, tap.fileno(), vif, loop, "net0/queue-0",
                              case.gso_offload)
    w: RxWorld = World(ram, gt, mem, table, ring_map, shared, path, vif, peer, tap, loop,
                       fatal=fatal)
    path.notify = lambda: w.notifies.__setitem__(0, w.notifies[0] + 1)
    vif.on_fatal = lambda message: (fatal.append(message), path.stop())
    return w


def grants(rng: random.Random, w: RxWorld) -> list[int]:
    """Rx buffer grants, most good, some hostile: read-only, foreign, revoked, beyond
    memory, transitive, and (v2) sub-pages, which an rx buffer must not be."""
    out = []
    for _ in range(200):
        f = rng.choice(FRAMES)
        r = rng.random()
        if w.gt.version == 2 and r < 0.03:
            off = rng.randrange(0, PAGE, 2)
            gref = w.gt.grant_access(f, sub_page=(off, rng.randrange(0, PAGE - off + 1)))
        elif r < 0.05:
            gref = w.gt.grant_access(f, readonly=True)
        elif r < 0.06:
            gref = w.gt.grant_access(f, domid=3)
        elif r < 0.07:
            gref = w.gt.grant_access(rng.choice((20, 1 << 20)))
        elif r < 0.075:
            gref = w.gt.grant_access(f)
            flags, domid, frame = w.gt.entry(gref)
            w.gt.set_entry(gref, GrantType.TRANSITIVE | (flags & ~3), domid, frame)
        else:
            gref = w.gt.grant_access(f)
        out.append(gref)
    return out


def frame(rng: random.Random, case: RxCase, mcast: list[bytes]) -> bytes:
    """One tap message: a virtio-net header and a frame."""
    r = rng.random()
    gso_type, gso_size = 0, 0
    if r < 0.3 and case.gso_offload:
        gso_type = rng.choice((1, 4, 1, 4, 3, 0x81))
        gso_size = rng.choice((1448, 1448, 0))
    flags = rng.choice((0, 1, 2, 3))
    if gso_type:
        n = rng.randrange(60, 65536 + 18)
    elif rng.random() < 0.1:
        n = rng.randrange(0, 20)
    else:
        n = rng.randrange(14, (case.mtu if rng.random() < 0.9 else 9000) + 19)
    dst = rng.choice((b"\x00\x16\x3e\x00\x00\x01", b"\xff" * 6, *(mcast or [b"\x01" * 6]),
                      b"\x01\x00\x5e\x00\x00\x09", b"\x33\x33\x00\x00\x00\x01"))
    body = (dst + rng.randbytes(8)) if n >= 14 else rng.randbytes(n)
    body = (body + rng.randbytes(max(0, n - len(body))))[:n]
    return struct.pack("<BBHHHH", flags, gso_type, 54, gso_size, 34, 16) + body


def post(w: RxWorld, rng: random.Random, grefs: list[int], n: int, ident: list[int]) -> int:
    """Post up to n rx requests (as far as the ring has room); returns how many."""
    shared = w.shared
    prod = shared.idx[REQ_PROD]
    room = shared.size - ((prod - w.path.ring.rsp_prod_pvt) & 0xFFFFFFFF)
    n = max(0, min(n, room))
    for k in range(n):
        gref = rng.choice(grefs) if rng.random() < 0.995 else rng.getrandbits(16)
        shared.write_slot(prod + k, RX_REQUEST.pack(ident[0] & 0xFFFF, gref))
        ident[0] += 1
    if rng.random() < 0.005:  # a req_prod more than a ring ahead: fatal
        n += shared.size + rng.randrange(1, 100)
    shared.idx[REQ_PROD] = (prod + n) & 0xFFFFFFFF
    return n


def drive(w: RxWorld) -> None:
    w.path.kick()
    for _ in range(2000):
        busy = bool(w.loop._ready)  # type: ignore[attr-defined]
        if not busy and w.path._reading and not w.path.stopped:
            busy = bool(select.select([w.tap], [], [], 0)[0])
        if not busy:
            return
        w.loop.run_until_complete(asyncio.sleep(0))
    raise Difference("an rx path never settles")


def state(w: RxWorld) -> dict[str, object]:
    uses = w.table._uses
    path = w.path
    posted = path.posted_count if isinstance(path, CompiledRxPath) else len(path.posted)
    return {
        "ring": bytes(w.ring_map),
        "ram": b"".join(w.ram.read(f * PAGE, PAGE) for f in FRAMES),
        "gnttab": os.pread(w.gt.fd, w.gt.size, 0),
        "uses": [i for i in range(len(uses)) if uses[i]],
        "counters": {k: v for k, v in w.vif.counters.items() if v},
        "posted": posted,
        "halted": (w.vif.halted, len(w.fatal)),
        "notified": w.notifies[0] > 0,
        "cons": (path.ring.req_cons, path.ring.rsp_prod_pvt),
        "dirty_log": dirty_log(w.mem),
    }


def run_case(kernel: nk.NetKernel, seed: int, rounds: int) -> int:
    case = RxCase.draw(random.Random(seed))
    worlds = [build(None, case), build(kernel, case)]
    inputs = 0
    try:
        rngs = [random.Random(seed + 1), random.Random(seed + 1)]
        pools = [grants(r, w) for r, w in zip(rngs, worlds, strict=True)]
        idents = [[0], [0]]
        mcast = [bytes([1, 0, 0x5E, 0, 0, k]) for k in range(seed % 4)]
        for w in worlds:
            w.vif.mcast.update(mcast)
        for rnd in range(rounds):
            states = []
            for r, w, g, ident in zip(rngs, worlds, pools, idents, strict=True):
                nframes = r.randrange(0, 24)
                for _ in range(nframes):
                    w.peer.send(frame(r, case, mcast))
                posted = post(w, r, g, r.choice((0, 1, 8, 20, 40, 100)), ident)
                if w is worlds[0]:
                    inputs += nframes + posted
                drive(w)
                states.append(state(w))
            a, b = states
            for key in a:
                if a[key] != b[key]:
                    raise Difference(f"rx seed {seed} round {rnd}: {key}",
                                     f"python {_short(a[key])} compiled {_short(b[key])}")
            if worlds[0].vif.halted:
                break
    finally:
        for w in worlds:
            w.close()
    return inputs


def _short(v: object) -> str:
    if isinstance(v, bytes):
        return f"<{len(v)} bytes {v[:64].hex()}>"
    return repr(v)[:600]


def run(kernel: nk.NetKernel, n: int, seed: int) -> tuple[int, list[str]]:
    rng = random.Random(seed)
    done = 0
    bad: list[str] = []
    while done < n:
        s = rng.getrandbits(48)
        try:
            done += run_case(kernel, s, rounds=rng.randrange(1, 20))
        except Difference as e:
            bad.append(str(e))
            done += 1
            if len(bad) >= 5:
                break
    return done, bad
