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

Half of the cases set a receive-side steering configuration (hash.HashConfig: a random
key, hash types and mapping table) and carry IPv4/IPv6 TCP/UDP headers (fragments,
extension headers, truncated ones among them): frames then get a hash extra-info slot,
and with two queues (each its own ring and tap) a frame read on one queue may belong to
the other and cross through its inbox. The queue whose tap has frames is served first
and the other after it, and the compiled world serves its wake-ups one call each
(`OneAtATime`), so both worlds see the same order.

Used by tests/test_net_dataplane.py and `python -m bench.fuzz --targets net-rx-diff`
(inputs are frames offered plus buffers posted).
"""

from __future__ import annotations

import asyncio
import mmap
import os
import random
import select
import socket
import struct
from dataclasses import dataclass, field

from backendd.dataplane import netkernel as nk
from backendd.dataplane.net import CompiledRxPath, NetRound, net_round
from backendd.dataplane.rounds import loop_round
from backendd.devices.net import hash
from backendd.devices.net.hash import HashConfig
from backendd.devices.net.rx import RxPath
from backendd.devices.net.vif import Features, VifState
from backendd.dirtylog import RingLog
from backendd.evtchn import EventChannel
from rings.consts import GrantType
from rings.netif import RX_ENTRY_SIZE, RX_REQUEST
from rings.ring import BackRing, SharedRing
from rings.sring import REQ_PROD

from .netdiff import FRAMES, PAGE, RING_FRAME, Difference, World, dirty_log, guest


@dataclass
class Side:
    """A further queue of a world: its ring, its path and its tap."""

    ring_map: memoryview
    shared: object
    path: RxPath
    peer: socket.socket
    tap: socket.socket
    notifies: list[int] = field(default_factory=lambda: [0])


@dataclass
class RxWorld(World[RxPath]):
    more: list[Side] = field(default_factory=list)  # queues 1..

    def sides(self) -> list[tuple[RxPath, object, socket.socket, memoryview, list[int]]]:
        """(path, shared ring, peer, ring page, notifies) per queue, queue 0 first."""
        return [(self.path, self.shared, self.peer, self.ring_map, self.notifies),
                *((s.path, s.shared, s.peer, s.ring_map, s.notifies) for s in self.more)]

    def close(self) -> None:
        for s in self.more:
            s.path.stop()
            s.shared.release()  # type: ignore[attr-defined]
            s.ring_map.release()
            s.peer.close()
            s.tap.close()
        super().close()


@dataclass(frozen=True)
class RxCase:
    version: int
    features: Features
    mtu: int
    gso_offload: bool
    hash: bytes | None = None  # a HashConfig.to_bytes(), or no steering set
    queues: int = 1

    @classmethod
    def draw(cls, rng: random.Random) -> RxCase:
        sg = rng.random() < 0.8
        gso = sg and rng.random() < 0.7
        v4, v6 = gso and rng.random() < 0.9, gso and rng.random() < 0.8
        version = rng.choice((1, 2))
        features = Features(sg=sg, gso_tcpv4=v4, gso_tcpv6=v6, ipv6_csum=True,
                            multicast_control=rng.random() < 0.5, rx_notify=True)
        mtu = rng.choice((1500, 1500, 9000))
        config, queues = None, 1
        if rng.random() < 0.5:
            queues = rng.choice((1, 2, 2))
            size = rng.choice((0, 1, 8, 128, rng.randrange(0, 129)))
            config = HashConfig(
                alg=rng.choice((hash.ALG_TOEPLITZ,) * 9 + (hash.ALG_NONE,)),
                flags=rng.choice((hash.ALL_FLAGS, hash.ALL_FLAGS, 0, rng.randrange(16))),
                key=rng.randbytes(rng.randrange(0, 41)).ljust(hash.MAX_KEY, b"\0"),
                mapping=[rng.randrange(queues) for _ in range(size)]).to_bytes()
        # The tap hands GSO frames only when offered TSO, which the device does for
        # the GSO types the frontend takes (gso_offload).
        return cls(version, features, mtu, v4 or v6, config, queues)


class OneAtATime(NetRound):
    """The compiled world's round, serving its due wake-ups one kernel call each, in
    order: two queues of one vif served at once interleave their inbox traffic as the
    threads happen to run, which the Python world cannot mirror. Parallel serving has
    its own test (`concurrent`)."""

    def serve(self, due: list) -> None:  # type: ignore[type-arg]
        for path in due:
            super().serve([path])


def _side(kernel: nk.NetKernel | None, case: RxCase, vif: VifState, table: object,
          shared: object, loop: asyncio.AbstractEventLoop, index: int,
          log: RingLog | None = None) -> tuple[RxPath, socket.socket, socket.socket]:
    tap, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    tap.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    tap.setblocking(False)
    ring = BackRing.attach(shared)  # type: ignore[arg-type]
    ring.log = log  # queue 0's ring is in guest memory (netdiff.RING_FRAME), logged
    name = f"net0/queue-{index}"
    if kernel is None:
        path: RxPath = RxPath(ring, table, tap.fileno(), vif, loop,  # type: ignore[arg-type]
                              name, case.gso_offload, index)
    else:
        path = CompiledRxPath(kernel, ring, table, tap.fileno(), vif,  # type: ignore[arg-type]
                              loop, name, case.gso_offload, index)
        if case.queues > 1:
            path.round = loop_round(OneAtATime, kernel, loop)
    return path, tap, peer


def build(kernel: nk.NetKernel | None, case: RxCase) -> RxWorld:
    ram, gt, mem, table, ring_map, shared = guest(case.version, RX_ENTRY_SIZE)
    loop = asyncio.new_event_loop()
    fatal: list[str] = []
    vif = VifState(0, case.features, case.mtu if case.features.sg else 1500, fatal.append,
                   num_queues=case.queues)
    if case.hash is not None:
        vif.hash = HashConfig.from_bytes(case.hash, case.queues)
        vif.hash_generation += 1
    path, tap, peer = _side(kernel, case, vif, table, shared, loop, 0,
                            RingLog(mem, [RING_FRAME]))
    w = RxWorld(ram, gt, mem, table, ring_map, shared, path, vif, peer, tap, loop,
                fatal=fatal)
    path.notify = lambda: w.notifies.__setitem__(0, w.notifies[0] + 1)
    for index in range(1, case.queues):
        more_map = memoryview(mmap.mmap(-1, PAGE))
        more_shared = SharedRing(more_map, RX_ENTRY_SIZE)
        more_shared.init()
        p, t, pr = _side(kernel, case, vif, table, more_shared, loop, index)
        side = Side(more_map, more_shared, p, pr, t)
        p.notify = lambda side=side: side.notifies.__setitem__(0, side.notifies[0] + 1)
        w.more.append(side)
    paths = [s[0] for s in w.sides()]
    vif.rx_wake = [p.wake for p in paths]

    def on_fatal(message: str) -> None:
        fatal.append(message)
        for p in paths:
            p.stop()
    vif.on_fatal = on_fatal
    return w


def grants(rng: random.Random, w: RxWorld, frames: list[int] = FRAMES,
           n: int = 200) -> list[int]:
    """Rx buffer grants of `frames`, most good, some hostile: read-only, foreign,
    revoked, beyond memory, transitive, and (v2) sub-pages, which an rx buffer must not
    be."""
    out = []
    for _ in range(n):
        f = rng.choice(frames)
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
    body = (dst + rng.randbytes(6)) if n >= 14 else rng.randbytes(n)
    if n >= 14:
        body += l3(rng) if case.hash is not None and rng.random() < 0.8 else rng.randbytes(2)
    body = (body + rng.randbytes(max(0, n - len(body))))[:n]
    return struct.pack("<BBHHHH", flags, gso_type, 54, gso_size, 34, 16) + body


ADDRS4 = [bytes([10, 0, 0, k]) for k in range(4)]
ADDRS6 = [bytes(15) + bytes([k]) for k in range(4)]


def l3(rng: random.Random) -> bytes:
    """An ethertype and IPv4/IPv6 headers with ports from a few flows: TCP, UDP or
    another protocol, fragments, IPv4 options, IPv6 extension headers, bad versions."""
    proto = rng.choice((6, 6, 17, 1))
    ports = struct.pack(">HH", rng.choice((80, 443, 1234)), rng.choice((5201, 22)))
    if rng.random() < 0.5:
        ihl = rng.choice((5, 5, 5, 6, 4))
        frag = rng.choice((0, 0, 0, 0x2000, 0x0010, 0x4000))
        version = 4 if rng.random() < 0.95 else 6
        hdr = struct.pack(">BBHHHBBH4s4s", version << 4 | ihl, 0, 40, 1, frag, 64, proto, 0,
                          rng.choice(ADDRS4), rng.choice(ADDRS4))
        return b"\x08\x00" + hdr + bytes(4 * max(0, ihl - 5)) + ports
    nxt = proto
    ext = b""
    if rng.random() < 0.3:
        kind = rng.choice((0, 43, 60, 44))
        ext = struct.pack(">BB", proto, rng.choice((0, 1))) + bytes(6)
        ext += bytes(8 * ext[1])
        nxt = kind
    version = 6 if rng.random() < 0.95 else 4
    hdr = struct.pack(">IHBB16s16s", version << 28, 20, nxt, 64, rng.choice(ADDRS6),
                      rng.choice(ADDRS6))
    return b"\x86\xdd" + hdr + ext + ports


def post(w: RxWorld, rng: random.Random, grefs: list[int], n: int, ident: list[int],
         queue: int = 0) -> int:
    """Post up to n rx requests on a queue (as far as its ring has room); how many."""
    path, shared, _, _, _ = w.sides()[queue]
    assert isinstance(shared, SharedRing)
    prod = shared.idx[REQ_PROD]
    room = shared.size - ((prod - path.ring.rsp_prod_pvt) & 0xFFFFFFFF)
    n = max(0, min(n, room))
    for k in range(n):
        # 1 in 200 a gref past any table here (it has at most 512 entries)
        gref = rng.choice(grefs) if rng.random() < 0.995 else rng.getrandbits(16) | 0x1000
        shared.write_slot(prod + k, RX_REQUEST.pack(ident[0] & 0xFFFF, gref))
        ident[0] += 1
    if rng.random() < 0.005:  # a req_prod more than a ring ahead: fatal
        n += shared.size + rng.randrange(1, 100)
    shared.idx[REQ_PROD] = (prod + n) & 0xFFFFFFFF
    return n


def drive(w: RxWorld, first: int = 0) -> None:
    """Kick queue `first` and let it settle, then the others, one at a time."""
    sides = w.sides()
    for k in [first, *(k for k in range(len(sides)) if k != first)]:
        sides[k][0].kick()
        _settle(w)


def _settle(w: RxWorld) -> None:
    for _ in range(2000):
        busy = bool(w.loop._ready)  # type: ignore[attr-defined]
        for path, _, _, _, _ in w.sides():
            if not busy and path._reading and not path.stopped:
                busy = bool(select.select([path.fd], [], [], 0)[0])
        if not busy:
            return
        w.loop.run_until_complete(asyncio.sleep(0))
    raise Difference("an rx path never settles")


def state(w: RxWorld) -> dict[str, object]:
    uses = w.table._uses
    out: dict[str, object] = {
        "ram": b"".join(w.ram.read(f * PAGE, PAGE) for f in FRAMES),
        "gnttab": os.pread(w.gt.fd, w.gt.size, 0),
        "uses": [i for i in range(len(uses)) if uses[i]],
        # `parallel` (wake-ups served on a helper thread) is the compiled path's alone.
        "counters": {k: v for k, v in w.vif.counters.items() if v and k != "parallel"},
        "halted": (w.vif.halted, len(w.fatal)),
        "dirty_log": dirty_log(w.mem),
    }
    for k, (path, _, _, ring_map, notifies) in enumerate(w.sides()):
        posted = path.posted_count if isinstance(path, CompiledRxPath) else len(path.posted)
        if isinstance(path, CompiledRxPath):
            box = path.steer.steer.inbox[k]
            inbox = (box.count, box.bytes)
        else:
            pbox = w.vif.inboxes[k] if k < len(w.vif.inboxes) else None
            inbox = (len(pbox.frames), pbox.bytes) if pbox is not None else (0, 0)
        out |= {f"ring{k}": bytes(ring_map), f"posted{k}": posted,
                f"notified{k}": notifies[0] > 0, f"inbox{k}": inbox,
                f"cons{k}": (path.ring.req_cons, path.ring.rsp_prod_pvt)}
    return out


def run_case(kernel: nk.NetKernel, seed: int, rounds: int) -> int:
    case = RxCase.draw(random.Random(seed))
    worlds = [build(None, case), build(kernel, case)]
    inputs = 0
    try:
        rngs = [random.Random(seed + 1), random.Random(seed + 1)]
        # With two queues each posts pages of its own: two queues of one world may be
        # served at once (nk_serve_many), and a page posted on both would then be
        # written in an order the threads pick.
        split = [FRAMES] if case.queues == 1 else [FRAMES[::2], FRAMES[1::2]]
        pools = [[grants(r, w, frames, 200 // len(split)) for frames in split]
                 for r, w in zip(rngs, worlds, strict=True)]
        idents = [[[0] for _ in range(case.queues)] for _ in worlds]
        mcast = [bytes([1, 0, 0x5E, 0, 0, k]) for k in range(seed % 4)]
        for w in worlds:
            w.vif.mcast.update(mcast)
        for rnd in range(rounds):
            states = []
            for r, w, g, ident in zip(rngs, worlds, pools, idents, strict=True):
                src = r.randrange(case.queues)
                nframes = r.randrange(0, 24)
                peer = w.sides()[src][2]
                for _ in range(nframes):
                    peer.send(frame(r, case, mcast))
                posted = 0
                for q in range(case.queues):
                    posted += post(w, r, g[q], r.choice((0, 1, 8, 20, 40, 100)), ident[q],
                                   q)
                if w is worlds[0]:
                    inputs += nframes + posted
                drive(w, src)
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


def concurrent(kernel: nk.NetKernel, rounds: int, seed: int,
               polled: bool = False) -> dict[str, int]:
    """Two compiled queues of one steered vif served at once: frames on both taps and
    buffers on both rings each round, both queues kicked together, so each kernel call
    (nk_serve_many) serves them on two threads while frames cross between their
    inboxes. Nothing is compared with the Python path (the interleaving is the
    threads'); every frame must be accounted for, and the caller runs it under the
    sanitizers. Returns the counters, with `frames` offered, `apart` (calls that served
    the two queues on two threads) and `inboxed` (frames still waiting). `polled`: the
    queues have event channels (eventfd pairs), as the daemon's do, so each round is an
    nk_serve_poll call that watches them after each batch."""
    rng = random.Random(seed)
    config = HashConfig(hash.ALG_TOEPLITZ, hash.ALL_FLAGS, rng.randbytes(40),
                        [rng.randrange(2) for _ in range(64)])
    case = RxCase(1, Features(sg=True, gso_tcpv4=True, gso_tcpv6=True, ipv6_csum=True),
                  1500, True, config.to_bytes(), 2)
    w = build(kernel, case)
    for path, _, _, _, _ in w.sides():
        assert isinstance(path, CompiledRxPath)
        path.round = net_round(kernel, w.loop)  # the daemon's round: all due at once
    channels: list[EventChannel] = []
    if polled:
        for path, _, _, _, _ in w.sides():
            assert isinstance(path, CompiledRxPath)
            ch = EventChannel(len(channels), os.eventfd(0, os.EFD_CLOEXEC),
                              os.eventfd(0, os.EFD_CLOEXEC))
            path.channel = ch
            channels.append(ch)
    try:
        pool = [w.gt.grant_access(f) for f in FRAMES for _ in range(8)]
        ids = [[0], [0]]
        offered = 0
        for _ in range(rounds):
            for _, _, peer, _, _ in w.sides():
                for _ in range(rng.randrange(0, 40)):
                    try:  # a queue that had no buffers for a while leaves its tap full
                        peer.send(frame(rng, case, []), socket.MSG_DONTWAIT)
                        offered += 1
                    except BlockingIOError:
                        break
            for q in range(2):
                post(w, rng, pool, rng.choice((20, 60, 200)), ids[q], q)
            for path, _, _, _, _ in w.sides():
                path.kick()
            _settle(w)
        left = 0
        for path, _, _, _, _ in w.sides():
            while select.select([path.fd], [], [], 0)[0]:
                os.read(path.fd, 1 << 17)
                left += 1
        out = dict(w.vif.counters)
        assert isinstance(w.path, CompiledRxPath)
        boxes = w.path.steer.steer.inbox
        out |= {"frames": offered, "left_in_tap": left,
                "inboxed": boxes[0].count + boxes[1].count,
                "apart": w.path.round.apart, "polled": w.path.round.polled}
        return out
    finally:
        w.close()
        for ch in channels:
            ch.close()


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
