"""The netif control ring and receive-side steering: the Toeplitz hash against the
Microsoft RSS verification values, on both rx paths; the control requests answered with
netback's statuses, hostile ones among them; the configuration's binary layout; and
real frames through a real multi-queue tap landing on the queues the mapping table
names, with the hash in an extra-info slot."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import struct

import pytest
from test_net_harness import (
    addr,
    inject,
    make_guest,
    namespaces,
    plug,
    run,
    uniq,
    until,
)

from backendd.dataplane import netkernel as nk
from backendd.devices.net import hash as h
from backendd.devices.net.hash import HashConfig, flow_input, toeplitz
from backendd.devices.net.vif import Features
from backendd.errors import ControlError, GuestError
from backendd.evtchn import EventChannel
from backendd.guest.netfront import NetFront
from bench import netdiff_rx
from rings.consts import NetCtrlStatus, NetCtrlType, NetRxFlags, XenbusState
from rings.netif import CTRL_REQUEST, CTRL_RESPONSE, EXTRA_HASH, RX_REQUEST, RX_RESPONSE
from rings.sring import REQ_PROD

# The verification suite's key and its IPv4 and IPv6 cases: (source, source port,
# destination, destination port, hash with TCP ports, hash over the addresses only).
MS_KEY = bytes.fromhex("6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c"
                       "6a42b73bbeac01fa")
MS_V4 = [
    ("66.9.149.187", 2794, "161.142.100.80", 1766, 0x51CCC178, 0x323E8FC2),
    ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xC626B0EA, 0xD718262A),
    ("24.19.198.95", 12898, "12.22.207.184", 38024, 0x5C2B394A, 0xD2D0A5DE),
    ("38.27.205.30", 48228, "209.142.163.6", 2217, 0xAFC7327F, 0x82989176),
    ("153.39.163.191", 44251, "202.188.127.2", 1303, 0x10E828A2, 0x5D1809C5),
]
MS_V6 = [
    ("3ffe:2501:200:1fff::7", 2794, "3ffe:2501:200:3::1", 1766, 0x40207D3D, 0x2CC18CD5),
    ("3ffe:501:8::260:97ff:fe40:efab", 14230, "ff02::1", 4739, 0xDDE51BBF, 0x0F0C461C),
    ("3ffe:1900:4545:3:200:f8ff:fe21:67cf", 44251, "fe80::200:f8ff:fe21:67cf", 38024,
     0x02D1FEEF, 0x4B61E985),
]
GUEST_MAC = bytes.fromhex("00163e000001")
SRC_MAC = bytes.fromhex("020000000099")
PLANES = ["python", "compiled"]


def ip_frame(src: str, sport: int, dst: str, dport: int, proto: int = 6,
             frag: int = 0, payload: int = 64) -> bytes:
    """An Ethernet frame to the guest with IPv4 or IPv6 and TCP or UDP ports."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    l4 = struct.pack(">HH", sport, dport) + bytes(16 if proto == 6 else 4) + bytes(payload)
    if s.version == 4:
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, frag, 64, proto, 0,
                         s.packed, d.packed)
        return GUEST_MAC + SRC_MAC + b"\x08\x00" + ip + l4
    ip = struct.pack(">IHBB16s16s", 6 << 28, len(l4), proto, 64, s.packed, d.packed)
    return GUEST_MAC + SRC_MAC + b"\x86\xdd" + ip + l4


# --- the hash ------------------------------------------------------------------------


@pytest.mark.parametrize("case", MS_V4 + MS_V6)
def test_toeplitz_microsoft_verification_values(case):
    src, sport, dst, dport, with_ports, addrs_only = case
    a = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
    ports = struct.pack(">HH", sport, dport)
    assert toeplitz(MS_KEY, a + ports) == with_ports
    assert toeplitz(MS_KEY, a) == addrs_only
    config = HashConfig(h.ALG_TOEPLITZ, h.ALL_FLAGS, MS_KEY)
    assert config.hash(a + ports) == with_ports  # the table-driven form agrees
    tcp = 1 if len(a) == 8 else 3
    assert flow_input(ip_frame(src, sport, dst, dport), h.ALL_FLAGS) == (tcp, a + ports)
    # UDP, or TCP with only the address types enabled: the addresses alone.
    assert flow_input(ip_frame(src, sport, dst, dport, proto=17), h.ALL_FLAGS) == \
        (tcp - 1, a)
    only_addrs = h.FLAG_IPV4 | h.FLAG_IPV6
    assert flow_input(ip_frame(src, sport, dst, dport), only_addrs) == (tcp - 1, a)


def test_flow_fields_per_netback():
    f = ip_frame("10.0.0.1", 1, "10.0.0.2", 2)
    assert flow_input(f, h.FLAG_IPV6 | h.FLAG_IPV6_TCP) is None  # no IPv4 type enabled
    assert flow_input(f, h.FLAG_IPV4_TCP)[0] == h.TYPE_IPV4_TCP
    # A fragment has no TCP header to hash: addresses, or nothing.
    frag = ip_frame("10.0.0.1", 1, "10.0.0.2", 2, frag=0x2000)
    assert flow_input(frag, h.ALL_FLAGS)[0] == h.TYPE_IPV4
    assert flow_input(frag, h.FLAG_IPV4_TCP) is None
    assert flow_input(f[:14 + 19], h.ALL_FLAGS) is None  # truncated IP header
    assert flow_input(f[:14 + 22], h.ALL_FLAGS)[0] == h.TYPE_IPV4  # no room for ports
    arp = GUEST_MAC + SRC_MAC + b"\x08\x06" + bytes(28)
    assert flow_input(arp, h.ALL_FLAGS) is None


@pytest.mark.parametrize("plane", PLANES)
def test_both_rx_paths_put_the_hash_in_an_extra_info_slot(kernel, plane):
    """A frame to a one-queue vif with steering set: data slot, hash extra, the value
    being the verification suite's."""
    config = HashConfig(h.ALG_TOEPLITZ, h.ALL_FLAGS, MS_KEY)
    case = netdiff_rx.RxCase(1, Features(sg=True), 1500, False, config.to_bytes(), 1)
    w = netdiff_rx.build(kernel if plane == "compiled" else None, case)
    try:
        assert w.path.need == 2  # one page for the frame, one kept for the hash
        for k in range(4):
            w.shared.write_slot(k, RX_REQUEST.pack(k, w.gt.grant_access(4 + k)))
        w.shared.idx[REQ_PROD] = 4
        src, sport, dst, dport, with_ports, _ = MS_V4[0]
        frame = ip_frame(src, sport, dst, dport)
        w.peer.send(bytes(10) + frame)
        netdiff_rx.drive(w)
        rid, _, flags, status = RX_RESPONSE.unpack(w.shared.read_slot(0))
        assert (rid, flags, status) == (0, NetRxFlags.EXTRA_INFO, len(frame))
        etype, eflags, htype, alg, value = EXTRA_HASH.unpack(w.shared.read_slot(1))
        assert (etype, eflags, htype, alg) == (4, 0, h.TYPE_IPV4_TCP, h.ALG_TOEPLITZ)
        assert int.from_bytes(value, "little") == with_ports
        assert w.ram.read(4 * 4096, len(frame)) == frame
        # A frame with no hash (not IP) needs no extra slot: the next buffer takes it.
        arp = GUEST_MAC + SRC_MAC + b"\x08\x06" + bytes(46)
        w.peer.send(bytes(10) + arp)
        netdiff_rx.drive(w)
        assert RX_RESPONSE.unpack(w.shared.read_slot(2)) == (2, 0, 0, len(arp))
    finally:
        w.close()


@pytest.fixture(scope="module")
def kernel():
    k = nk.load()
    if k is None:
        pytest.fail("the net kernel is not built (make netkernel)")
    return k


# --- the control requests ------------------------------------------------------------


class Grants:
    """Stand-in for the ring's grant copy: gref -> bytes, or refused."""

    def __init__(self, pages: dict[int, bytes]) -> None:
        self.pages = pages
        self.reads: list[tuple[int, int]] = []

    def __call__(self, gref: int, n: int) -> bytes | None:
        self.reads.append((gref, n))
        page = self.pages.get(gref)
        return None if page is None or n > len(page) else page[:n]


def test_control_requests_answered_as_netback_does():
    c = HashConfig()
    read = Grants({7: MS_KEY + bytes(100), 8: struct.pack("<4I", 1, 0, 1, 1)})
    S, T = NetCtrlStatus, NetCtrlType
    # Nothing works before an algorithm is set.
    assert c.handle(T.GET_HASH_FLAGS, (0, 0, 0), 2, read) == (S.NOT_SUPPORTED, 0)
    assert c.handle(T.SET_HASH_FLAGS, (1, 0, 0), 2, read) == (S.INVALID_PARAMETER, 0)
    assert c.handle(T.SET_HASH_ALGORITHM, (2, 0, 0), 2, read) == (S.INVALID_PARAMETER, 0)
    assert c.handle(T.SET_HASH_ALGORITHM, (1, 0, 0), 2, read) == (S.SUCCESS, 0)
    assert c.handle(T.GET_HASH_FLAGS, (0, 0, 0), 2, read) == (S.SUCCESS, 0xF)
    assert c.handle(T.SET_HASH_FLAGS, (0x10, 0, 0), 2, read) == (S.INVALID_PARAMETER, 0)
    assert c.handle(T.SET_HASH_FLAGS, (0xF, 0, 0), 2, read) == (S.SUCCESS, 0)
    # Key: at most 40 octets, read through the grant; a shorter key is zero-filled.
    assert c.handle(T.SET_HASH_KEY, (7, 41, 0), 2, read) == (S.INVALID_PARAMETER, 0)
    assert (7, 41) not in read.reads  # refused before the grant is touched
    assert c.handle(T.SET_HASH_KEY, (99, 40, 0), 2, read) == (S.INVALID_PARAMETER, 0)
    assert c.handle(T.SET_HASH_KEY, (7, 40, 0), 2, read) == (S.SUCCESS, 0)
    assert c.key == MS_KEY
    # Mapping: size bounded by 128, entries must name connected queues.
    assert c.handle(T.GET_HASH_MAPPING_SIZE, (0, 0, 0), 2, read) == (S.SUCCESS, 128)
    assert c.handle(T.SET_HASH_MAPPING_SIZE, (129, 0, 0), 2, read) == \
        (S.INVALID_PARAMETER, 0)
    assert c.handle(T.SET_HASH_MAPPING_SIZE, (4, 0, 0), 2, read) == (S.SUCCESS, 0)
    assert c.mapping == [0, 0, 0, 0]
    assert c.handle(T.SET_HASH_MAPPING, (8, 4, 1), 2, read) == (S.INVALID_PARAMETER, 0)
    assert c.handle(T.SET_HASH_MAPPING, (8, 2, 0xFFFFFFFF), 2, read) == \
        (S.INVALID_PARAMETER, 0)
    assert c.handle(T.SET_HASH_MAPPING, (8, 4, 0), 2, read) == (S.SUCCESS, 0)
    assert c.mapping == [1, 0, 1, 1]
    # An entry naming queue 1 of a one-queue vif: refused, and the table is unchanged.
    assert c.handle(T.SET_HASH_MAPPING, (8, 4, 0), 1, read) == (S.INVALID_PARAMETER, 0)
    assert c.mapping == [1, 0, 1, 1]
    assert c.handle(T.SET_HASH_MAPPING, (99, 2, 0), 2, read) == (S.INVALID_PARAMETER, 0)
    # Zero-length key and mapping touch no grant.
    read.reads.clear()
    assert c.handle(T.SET_HASH_MAPPING, (99, 0, 4), 2, read) == (S.SUCCESS, 0)
    assert c.handle(T.SET_HASH_KEY, (99, 0, 0), 2, read) == (S.SUCCESS, 0)
    assert not read.reads and c.key == bytes(40)
    # What netback does not implement.
    for t in (T.INVALID, T.GET_GREF_MAPPING_SIZE, T.ADD_GREF_MAPPING,
              T.DEL_GREF_MAPPING, 11, 0xFFFF):
        assert c.handle(t, (1, 2, 3), 2, read) == (S.NOT_SUPPORTED, 0)


def test_configuration_layout_round_trips_and_refuses_corruption():
    c = HashConfig(h.ALG_TOEPLITZ, 0xB, MS_KEY, [1, 0, 3, 2])
    blob = c.to_bytes()
    assert len(blob) == 8 + 40 + 16
    assert blob[:8] == bytes([1, 1, 0xB, 0]) + struct.pack("<I", 4)
    back = HashConfig.from_bytes(blob)
    assert (back.alg, back.flags, back.key, back.mapping) == (1, 0xB, MS_KEY, [1, 0, 3, 2])
    assert HashConfig.from_bytes(HashConfig().to_bytes()) == HashConfig()
    bad = [blob[:-1], blob + b"\0", bytes([2]) + blob[1:], blob[:1] + b"\x02" + blob[2:],
           blob[:2] + b"\x10" + blob[3:], blob[:3] + b"\x01" + blob[4:],
           blob[:4] + struct.pack("<I", 129) + blob[8:], b""]
    for b in bad:
        with pytest.raises(ValueError):
            HashConfig.from_bytes(b)
    with pytest.raises(ValueError, match="queue"):
        HashConfig.from_bytes(blob, num_queues=3)


# --- through the device, real taps --------------------------------------------------

pytestmark_root = pytest.mark.usefixtures("root")


def expected_queue(config: HashConfig, frame: bytes, nq: int) -> tuple[int, int | None]:
    """The queue and hash the mapping says, computed with the plain bitwise Toeplitz."""
    found = flow_input(frame, config.flags)
    value = toeplitz(config.key, found[1]) if found else 0
    queue = config.mapping[value % len(config.mapping)] if config.mapping else value % nq
    return queue, (value if found else None)


@pytestmark_root
@pytest.mark.parametrize("plane", PLANES)
async def test_flows_land_on_the_queues_the_mapping_names(plane):
    host = uniq("hsh")
    tap = uniq("hs") + plane[0]
    with namespaces(host):
        guest = make_guest()
        try:
            dev, front = await plug(guest, 3, {"tap": tap, "netns": host, "queues": "2",
                                               "dataplane": plane},
                                    queues=2, ctrl_ring=True)
            mapping = [(k * 7 + k // 3) % 2 for k in range(128)]
            await front.set_toeplitz(MS_KEY, h.ALL_FLAGS, mapping)
            config = HashConfig(h.ALG_TOEPLITZ, h.ALL_FLAGS, MS_KEY, mapping)
            frames = []
            for k in range(48):  # IPv4/IPv6, TCP/UDP flows, and frames with no hash
                src, sport, dst, dport, _, _ = (MS_V4 + MS_V6)[k % 8]
                proto = 17 if k % 3 == 1 else 6
                frame = ip_frame(src, sport + k, dst, dport, proto=proto)
                if k % 16 == 15:
                    frame = GUEST_MAC + SRC_MAC + b"\x88\xb5" + bytes([k]) * 46
                frames.append(frame[:-1] + bytes([k]))
            await inject(host, tap, frames)
            got = await front.wait_rx(len(frames), timeout=20)
            hashes = list(front.rx_hashes)[-len(frames):]
            seen = {}
            for (_, data, _), (queue, hashed, _) in zip(got, hashes, strict=True):
                seen[data[-1]] = (queue, hashed, data)
            assert sorted(seen) == list(range(len(frames)))
            queues_used = set()
            for k, frame in enumerate(frames):
                queue, hashed, data = seen[k]
                want_queue, want_hash = expected_queue(config, frame, 2)
                assert data == frame
                assert queue == want_queue, k
                queues_used.add(queue)
                if want_hash is None:
                    assert hashed is None
                else:
                    assert hashed is not None and hashed[1:] == (h.ALG_TOEPLITZ, want_hash)
                    assert hashed[0] == flow_input(frame, h.ALL_FLAGS)[0]
            assert queues_used == {0, 1}
            stats = dev.stats()
            assert stats["rx_packets"] == len(frames) and stats["rx_dropped"] == 0
            assert stats["ctrl_requests"] == 5 and stats["ctrl_errors"] == 0
            assert stats["rx_steered"] > 0  # frames read on one queue for the other
            assert dev.hash_state() == config.to_bytes()
            assert dev.ring_names()[-1] == "ctrl"
            snap = dev.ring_snapshots()[-1]
            assert (snap.name, snap.layout) == ("ctrl", "netifctrl")
            # Everything to queue 1 now: one table entry.
            status = await front.ctrl_request(NetCtrlType.SET_HASH_MAPPING_SIZE, 1)
            assert status == (0, 0)
            assert await front.ctrl_with_page(NetCtrlType.SET_HASH_MAPPING,
                                              struct.pack("<I", 1), 1) == (0, 0)
            front.rx_hashes.clear()
            await inject(host, tap, frames[:8])
            await front.wait_rx(8, timeout=20)
            assert {q for q, _, _ in front.rx_hashes} == {1}
            assert not front.busy_after_response
        finally:
            await guest.close()


TCP_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(32)
print("ready", flush=True)
total = 0
for _ in range(16):
    c, _ = s.accept()
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        total += len(b)
    c.close()
print(total, flush=True)
"""

TCP_CLIENTS = """
import socket, sys
for _ in range(16):
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
    c.sendall(b"y" * 20000)
    c.close()
"""

UDP_FLOWS = """
import socket, sys
for port in range(int(sys.argv[2]), int(sys.argv[2]) + 16):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    for _ in range(4):
        s.sendto(b"x" * 100, (sys.argv[1], 9))
    s.close()
"""


@pytestmark_root
@pytest.mark.parametrize("plane", PLANES)
async def test_kernel_traffic_follows_the_mapping(plane):
    """The kernel's own UDP and TCP flows, host namespace -> daemon's two-queue tap ->
    rings -> the guest's tap in its namespace: every frame of a flow lands on the queue
    the frontend's mapping table names, with that flow's hash."""
    host, gns = uniq("hth"), uniq("htg")
    tap, gtap = uniq("ht") + plane[0], uniq("hg") + plane[0]
    with namespaces(host, gns):
        guest = make_guest()
        try:
            dev, front = await plug(guest, 2, {"tap": tap, "netns": host, "queues": "2",
                                               "dataplane": plane},
                                    queues=2, ctrl_ring=True)
            mapping = [k % 2 for k in range(16)]
            key = bytes(range(1, 41))
            await front.set_toeplitz(key, h.ALL_FLAGS, mapping)
            await front.attach_tap(gtap, netns=gns, mac="00:16:3e:00:00:21")
            await addr(host, tap, "10.79.0.1/24")
            await addr(gns, gtap, "10.79.0.2/24")
            await run("ping", "-c", "2", "-i", "0.2", "-W", "2", "10.79.0.2", ns=host)
            await run("python3", "-c", UDP_FLOWS, "10.79.0.2", "40000", ns=host)
            server = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", gns, "python3", "-c", TCP_SERVER, "5222",
                stdout=asyncio.subprocess.PIPE)
            try:
                assert server.stdout is not None
                assert (await asyncio.wait_for(server.stdout.readline(), 30)).strip() == \
                    b"ready"
                await run("python3", "-c", TCP_CLIENTS, "10.79.0.2", "5222", ns=host)
                total = await asyncio.wait_for(server.stdout.readline(), 30)
                assert total.strip() == str(16 * 20000).encode()
            finally:
                if server.returncode is None:
                    server.kill()
                await server.wait()
            await until(lambda: sum(1 for _, _, head in front.rx_hashes
                                    if head[23:24] == b"\x11") >= 64)
            config = HashConfig(h.ALG_TOEPLITZ, h.ALL_FLAGS, key, mapping)
            flows_key_addrs = bytes([10, 79, 0, 1, 10, 79, 0, 2])
            flows: dict[bytes, set[int]] = {}
            for queue, hashed, head in front.rx_hashes:
                want_queue, want_hash = expected_queue(config, head, 2)
                assert queue == want_queue
                assert (hashed is None) == (want_hash is None)
                if hashed is not None:
                    assert hashed[2] == want_hash
                    tcp = hashed[0] == h.TYPE_IPV4_TCP  # a TCP flow is its ports too
                    flows.setdefault(head[26:38] if tcp else head[26:34], set()).add(queue)
            assert all(len(qs) == 1 for qs in flows.values())  # a flow keeps its queue
            assert {q for qs in flows.values() for q in qs} == {0, 1}
            assert len({k for k in flows if k[:8] == flows_key_addrs}) >= 17
            assert dev.stats()["rx_steered"] + dev.stats()["rx_packets"] > 0
        finally:
            await guest.close()


@pytestmark_root
async def test_hostile_control_requests_get_errors_and_a_bad_ring_halts_only_itself():
    host = uniq("hsx")
    tap = uniq("hx") + "a"
    with namespaces(host):
        guest = make_guest()
        try:
            dev, front = await plug(guest, 4, {"tap": tap, "netns": host, "queues": "2"},
                                    queues=2, ctrl_ring=True)
            T, S = NetCtrlType, NetCtrlStatus
            assert await front.ctrl_request(T.SET_HASH_ALGORITHM, 1) == (S.SUCCESS, 0)
            # A key granted to another domain, a gref past the table, a read-only key
            # (fine: the backend only reads it), a mapping entry naming queue 2 of 2.
            gfn = guest.ram.alloc_page()
            foreign = guest.gnttab.grant_access(gfn, domid=5)
            assert await front.ctrl_request(T.SET_HASH_KEY, foreign, 40) == \
                (S.INVALID_PARAMETER, 0)
            assert await front.ctrl_request(T.SET_HASH_KEY, 1 << 30, 40) == \
                (S.INVALID_PARAMETER, 0)
            assert await front.ctrl_with_page(T.SET_HASH_KEY, MS_KEY, 40) == (S.SUCCESS, 0)
            assert await front.ctrl_request(T.SET_HASH_MAPPING_SIZE, 8) == (S.SUCCESS, 0)
            assert await front.ctrl_with_page(T.SET_HASH_MAPPING,
                                              struct.pack("<2I", 1, 2), 2) == \
                (S.INVALID_PARAMETER, 0)
            assert await front.ctrl_request(T.ADD_GREF_MAPPING, 1, 1) == \
                (S.NOT_SUPPORTED, 0)
            assert not guest.gnttab.entry(foreign)[0] & 0x18  # never pinned
            # Responses echo id and type, with zeroed padding.
            c = front.ctrl
            raw = c.shared.read_slot(c.ring.rsp_cons - 1)
            assert CTRL_RESPONSE.unpack(raw[:12])[:2] == ((c.next_id - 1) & 0xFFFF,
                                                           T.ADD_GREF_MAPPING)
            assert raw[12:] == bytes(4)
            stats = dev.stats()
            assert stats["ctrl_errors"] == 4 and stats["ctrl_halted"] == 0
            # A req_prod far ahead: the control ring stops, the data rings go on.
            c.shared.idx[REQ_PROD] = c.ring.req_prod_pvt + 1000
            c.port.send()
            await until(lambda: dev.stats()["ctrl_halted"] == 1)
            assert not dev.vif.halted
            frame = ip_frame("10.1.0.1", 1, "10.1.0.2", 2)
            await inject(host, tap, [frame])
            ((_, data, _),) = await front.wait_rx(1)
            assert data == frame
        finally:
            await guest.close()


@pytestmark_root
async def test_control_ring_keys_are_checked():
    guest = make_guest()
    try:
        for bad in ("ref", "port", "shared-port"):
            front = NetFront(guest.ram, guest.gnttab, 5, first_port=60, queues=1,
                             ctrl_ring=True)
            guest.fronts.append(front)
            from backendd.devices.net import NetDevice
            dev = NetDevice(5, {"tap": uniq("hk") + bad[0]}, guest.ctx)
            guest.devices.append(dev)
            keys = front.frontend_keys()
            if bad == "ref":
                keys["ctrl-ring-ref"] = str(1 << 30)
            elif bad == "port":
                keys["event-channel-ctrl"] = "999"
            else:
                keys["event-channel-ctrl"] = keys["event-channel"]
            chans = {p: EventChannel(p, k, c) for p, k, c in front.channels()}
            with pytest.raises((ControlError, GuestError)) as e:
                await dev.connect(keys, chans)
            assert isinstance(e.value, GuestError) or e.value.code == errno.EINVAL
            assert dev.ctrl is None and not dev.queues
    finally:
        await guest.close()


def test_ctrl_layout_sizes():
    assert CTRL_REQUEST.size == 16 and CTRL_RESPONSE.size == 12


@pytestmark_root
async def test_a_suspended_control_ring_answers_nothing_until_resumed():
    guest = make_guest()
    try:
        dev, front = await plug(guest, 6, {"tap": uniq("hq") + "s", "queues": "1"},
                                queues=1, ctrl_ring=True)
        assert await front.ctrl_request(NetCtrlType.SET_HASH_ALGORITHM, 1) == (0, 0)
        dev.ctrl.ring.suspend()
        c = front.ctrl
        rsp_prod = c.shared.idx[2]
        rid = front.ctrl_post(NetCtrlType.GET_HASH_FLAGS)
        for _ in range(50):
            await asyncio.sleep(0)
        assert c.shared.idx[2] == rsp_prod and rid not in c.answers  # nothing written
        dev.ctrl.ring.resume()
        await until(lambda: rid in c.answers)
        assert c.answers[rid] == (NetCtrlType.GET_HASH_FLAGS, 0, 0xF)
    finally:
        await guest.close()


@pytest.mark.parametrize("version", [1, 2])
def test_key_and_mapping_reads_follow_the_grant_rules(version):
    """CtrlRing.read_grant on a real grant table: what a grant copy from offset 0 may
    read; the grant is not left in use."""
    from backendd.devices.net.ctrl import CtrlRing
    from backendd.devices.net.vif import VifState
    from bench import netdiff
    from rings.consts import GrantType

    ram, gt, mem, table, ring_map, shared = netdiff.guest(version, 16)
    shared.release()
    try:
        ram.write(3 * 4096, MS_KEY)
        ctrl = CtrlRing(None, table, VifState(0, Features(), 1500, print),  # type: ignore
                        None, "net0/ctrl")  # type: ignore[arg-type]
        good = gt.grant_access(3, readonly=True)
        assert ctrl.read_grant(good, 40) == MS_KEY
        assert ctrl.read_grant(gt.grant_access(3, domid=4), 40) is None
        assert ctrl.read_grant(1 << 20, 40) is None
        revoked = gt.grant_access(3)
        gt.end_access(revoked)
        assert ctrl.read_grant(revoked, 4) is None
        if version == 2:
            assert ctrl.read_grant(gt.grant_access(3, sub_page=(0, 40)), 40) == MS_KEY
            assert ctrl.read_grant(gt.grant_access(3, sub_page=(0, 39)), 40) is None
            assert ctrl.read_grant(gt.grant_access(3, sub_page=(8, 100)), 8) is None
            trans = gt.grant_access(3)
            flags, domid, frame = gt.entry(trans)
            gt.set_entry(trans, GrantType.TRANSITIVE | (flags & ~3), domid, frame)
            assert ctrl.read_grant(trans, 4) is None
        assert table.grefs_in_use() == []
        assert not gt.entry(good)[0] & 0x18 if version == 1 else not gt.status(good) & 0x18
    finally:
        table.close()
        mem.close()
        ring_map.release()
        gt.close()
        ram.close()


def _fresh_channels(front: NetFront) -> dict[int, EventChannel]:
    """New eventfds for the frontend's ports (a second device's ends)."""
    import os
    flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
    return {p: EventChannel(p, os.eventfd(0, flags), os.eventfd(0, flags))
            for p, _, _ in front.channels()}


@pytestmark_root
async def test_device_state_carries_the_control_ring_and_its_configuration():
    """SUSPEND, the state sections, a second device loading them: it connects with the
    same steering and the control ring at the same indices; mismatches are EINVAL."""
    from backendd import devstate
    from backendd.devices.net import NetDevice

    guest = make_guest()
    try:
        a, front = await plug(guest, 8, {"tap": uniq("hm") + "a", "queues": "2"},
                              queues=2, ctrl_ring=True)
        config = HashConfig(h.ALG_TOEPLITZ, h.FLAG_IPV4_TCP, MS_KEY, [1, 0, 0, 1])
        await front.set_toeplitz(config.key, config.flags, config.mapping)
        await a.suspend()
        sections = a.save_state(XenbusState.CONNECTED)
        kinds = {sec.type for sec in sections}
        assert {devstate.NET_HASH, devstate.NET_CTRL} <= kinds
        b = NetDevice(8, {"tap": uniq("hm") + "b", "queues": "2"}, guest.ctx)
        guest.devices.append(b)
        b.load_state(sections)
        await b.connect(front.frontend_keys(), _fresh_channels(front))
        assert b.hash_state() == config.to_bytes()
        assert b.ctrl is not None and b.ctrl.ring.suspended
        ca, cb = a.ctrl.ring.ring, b.ctrl.ring.ring
        assert (cb.req_cons, cb.rsp_prod_pvt) == (ca.req_cons, ca.rsp_prod_pvt) != (0, 0)
        await b.resume()
        assert not b.ctrl.ring.suspended
        # The frontend's control keys must match the state's; a state whose mapping
        # names a queue the connect does not have is refused too.
        c = NetDevice(8, {"tap": uniq("hm") + "c", "queues": "2"}, guest.ctx)
        guest.devices.append(c)
        c.load_state(sections)
        keys = front.frontend_keys()
        keys["event-channel-ctrl"] = "63"
        chans = _fresh_channels(front)
        chans[63] = chans.pop(front.ctrl.port.port)
        with pytest.raises(ControlError) as e:
            await c.connect(keys, chans)
        assert e.value.code == errno.EINVAL and c.ctrl is None
        bad = [sec if sec.type != devstate.NET_HASH else devstate.Section(
            devstate.NET_HASH, HashConfig(1, 0, bytes(40), [2]).to_bytes())
            for sec in sections]
        d = NetDevice(8, {"tap": uniq("hm") + "d", "queues": "2"}, guest.ctx)
        guest.devices.append(d)
        d.load_state(bad)
        with pytest.raises(ControlError) as e:
            await d.connect(front.frontend_keys(), _fresh_channels(front))
        assert e.value.code == errno.EINVAL and "queue" in str(e.value)
        with pytest.raises(devstate.StateError):
            d.load_state([sec for sec in sections if sec.type != devstate.NET_HASH])
    finally:
        await guest.close()


@pytestmark_root
@pytest.mark.parametrize("plane", PLANES)
async def test_steered_frames_and_control_answers_are_in_the_dirty_log(daemon, plane):
    """With the dirty log set: every buffer a frame steered to queue 1 is copied into,
    queue 1's rx ring and the control ring's page are marked as written."""
    from test_net_harness import daemon_guest

    from backendd.guest.dirtylog import DirtyLog
    from rings.consts import PAGE_SIZE

    host, tap = uniq("hdl"), uniq("hd") + plane[0]
    with namespaces(host):
        async with daemon_guest(daemon.path) as dg:
            client, guest, _ = dg
            front = await dg.add_nic({"tap": tap, "netns": host, "queues": "2",
                                      "dataplane": plane},
                                     queues=2, split=True, ctrl_ring=True)
            await front.set_toeplitz(MS_KEY, h.ALL_FLAGS, [1])  # every frame to queue 1
            ram_pages = guest.ram.size // PAGE_SIZE
            log = DirtyLog(ram_pages, guest.gnttab.size // PAGE_SIZE)
            try:
                await client.set_log(log.fd, log.size, ram_pages)
                frames = [ip_frame(s, sp + i, d, dp, payload=100 + 90 * i)
                          for i, (s, sp, d, dp, _, _) in enumerate(MS_V4 * 3)]
                await inject(host, tap, frames)
                got = await front.wait_rx(len(frames))
                assert sorted(data for _, data, _ in got) == sorted(frames)
                assert {q for q, _, _ in front.rx_hashes} == {1}
                q1 = front.queues[1]
                filled = {gfn for gfn, _ in q1.rx_bufs.values()
                          if any(bytes(guest.ram.page(gfn)[:len(f)]) == f for f in frames)}
                assert len(filled) == len(frames)
                ram = log.take_ram()
                assert filled | {q1.rx_page} <= ram
                assert front.ctrl.page not in ram  # no control request since SET_LOG
                assert await front.ctrl_request(NetCtrlType.GET_HASH_FLAGS) == (0, 0xF)
                assert front.ctrl.page in log.take_ram()
            finally:
                await client.clear_log()
                log.close()
