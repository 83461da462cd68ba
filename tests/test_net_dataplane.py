"""The compiled netif data plane (backendd/dataplane/net_kernel.c) against the
pure-Python reference: it builds warning-free, plain and with the sanitizers; random and
hostile tx chains and rx buffers/frames come out identical through both (also under the
sanitizers); the bad input rules hold on it; and the device's `dataplane` key picks the
path."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_net_harness import make_guest, namespaces, plug, uniq

from backendd.dataplane import netkernel as nk
from backendd.dataplane.build import build
from backendd.dataplane.net import CompiledRxPath, CompiledTxPath
from backendd.devices.net.device import NetDevice
from backendd.devices.net.rx import RxPath
from backendd.devices.net.txpath import TxPath
from backendd.devices.net.vif import Features
from backendd.errors import ConfigError, ControlError
from bench import netdiff, netdiff_rx
from rings.consts import GTF_READING, GTF_WRITING
from rings.netif import RX_REQUEST, TX_REQUEST
from rings.sring import REQ_PROD, RSP_PROD

ROOT = Path(__file__).resolve().parent.parent
MORE, EXTRA, CSUM = 4, 8, 1


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> nk.NetKernel:
    return nk.NetKernel(str(build("net", tmp_path_factory.mktemp("nk") / "net.so")))


def test_builds_with_warnings_as_errors_plain_and_sanitized(tmp_path):
    assert build("net", tmp_path / "plain.so").exists()
    assert build("net", tmp_path / "asan.so", sanitize=True).exists()


def test_differential_random_and_hostile_chains(kernel):
    inputs, differences = netdiff.run(kernel, 3000, seed=11)
    assert differences == []
    assert inputs >= 3000


def test_rx_differential_posted_buffers_and_frames(kernel):
    inputs, differences = netdiff_rx.run(kernel, 4000, seed=12)
    assert differences == []
    assert inputs >= 4000


def _sanitized_env(tmp_path) -> dict[str, str]:
    """The environment of a Python that loads the net kernel built with the sanitizers."""
    lib = build("net", tmp_path / "asan.so", sanitize=True)
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                             text=True, check=True).stdout.strip()
    return os.environ | {"LD_PRELOAD": libasan, "BACKENDD_NET_KERNEL": str(lib),
                         "ASAN_OPTIONS": "detect_leaks=0:exitcode=97",
                         "UBSAN_OPTIONS": "halt_on_error=1:exitcode=98",
                         "PYTHONPATH": str(ROOT)}


def test_differential_under_address_and_ub_sanitizers(tmp_path):
    env = _sanitized_env(tmp_path)
    code = ("from backendd.dataplane import netkernel as nk\n"
            "from bench import netdiff, netdiff_rx\n"
            "assert 'libasan' in open('/proc/self/maps').read()\n"
            "k = nk.load()\n"
            "assert k is not None and k.path.endswith('asan.so')\n"
            "n, bad = netdiff.run(k, 1500, seed=5)\n"
            "assert not bad, bad\n"
            "m, bad = netdiff_rx.run(k, 2000, seed=6)\n"
            "assert not bad, bad\n"
            "print('inputs', n)\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "inputs" in result.stdout


def test_parallel_serving_under_address_and_ub_sanitizers(tmp_path):
    """nk_serve_groups with two queues of one steered vif on two threads at once, frames
    crossing between their inboxes, in the sanitizer build: no report, every frame
    accounted for, the calls did serve both queues apart, and GET_STATS's `parallel`
    counts the wake-ups served on a helper thread. Then the same with event channels,
    so that each round is an nk_serve_poll call watching both queues."""
    env = _sanitized_env(tmp_path)
    code = ("import json\n"
            "from backendd.dataplane import netkernel as nk\n"
            "from bench import netdiff_rx\n"
            "assert 'libasan' in open('/proc/self/maps').read()\n"
            "k = nk.load()\n"
            "assert k is not None and k.path.endswith('asan.so')\n"
            "print(json.dumps(netdiff_rx.concurrent(k, 40, 3)))\n"
            "print(json.dumps(netdiff_rx.concurrent(k, 40, 4, polled=True)))\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    grouped, polled = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    for c in (grouped, polled):
        assert c["frames"] == (c.get("rx_packets", 0) + c.get("rx_dropped", 0)
                               + c.get("rx_mcast_filtered", 0) + c["left_in_tap"]
                               + c["inboxed"])
        assert c["apart"] > 0 and c["parallel"] > 0 and c["rx_steered"] > 0
        assert c["rx_packets"] > 0
    assert grouped["polled"] == 0 and polled["polled"] > 0  # nk_serve_poll ran


def test_polled_calls_under_address_and_ub_sanitizers(tmp_path):
    """nk_serve_poll's own tests (tests/test_net_poll.py: a guest thread publishing tx
    packets or posting rx buffers while the call waits, an idle queue, a guest that
    never stops) against the sanitizer build: no report, all pass."""
    env = _sanitized_env(tmp_path)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_net_poll.py"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


# --- the bad input rules, on both paths --------------------------------------------


def _world(kernel: nk.NetKernel, plane: str, version: int = 1,
           rate: tuple[int, int] | None = None) -> netdiff.World:
    return netdiff._world(kernel if plane == "compiled" else None, version, rate, 4 << 20,
                          mcast_control=True)


def _post(w: netdiff.World, slots: list[bytes]) -> None:
    prod = w.shared.idx[REQ_PROD]
    for k, s in enumerate(slots):
        w.shared.write_slot(prod + k, s)
    w.shared.idx[REQ_PROD] = prod + len(slots)


def _responses(w: netdiff.World, start: int, n: int) -> list[tuple[int, int]]:
    return [struct.unpack_from("<Hh", w.shared.read_slot(start + k)) for k in range(n)]


def _udp_frame(n: int) -> bytes:
    eth = bytes.fromhex("00163e000002") + bytes.fromhex("00163e000001") + b"\x08\x00"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, n - 14, 0, 0, 64, 17, 0, bytes(4), bytes(4))
    udp = struct.pack("!HHHH", 1, 2, n - 34, 0)
    return (eth + ip + udp).ljust(n, b"x")


PLANES = ["python", "compiled"]


@pytest.mark.parametrize("plane", PLANES)
def test_v2_sub_page_slot_is_an_error_and_the_ring_goes_on(kernel, plane):
    w = _world(kernel, plane, version=2)
    try:
        frame = _udp_frame(60)
        w.ram.write(3 * 4096 + 200, frame)
        w.ram.write(4 * 4096, frame)
        sub = w.gt.grant_access(3, sub_page=(0, 100))  # the slot lies outside it
        good = w.gt.grant_access(4)
        _post(w, [TX_REQUEST.pack(sub, 200, 0, 7, 60), TX_REQUEST.pack(good, 0, 0, 8, 60)])
        netdiff._drive(w)
        assert _responses(w, 0, 2) == [(7, -1), (8, 0)]
        assert w.shared.idx[RSP_PROD] == 2
        assert w.vif.counters["tx_errors"] == 1 and w.vif.counters["tx_packets"] == 1
        assert not w.vif.halted
        assert [f[10:] for f in netdiff._frames(w)] == [frame]
        for gref in (sub, good):  # every pin released
            assert not w.gt.status(gref) & (GTF_READING | GTF_WRITING)
            assert w.table.in_use(gref) == 0
    finally:
        w.close()


@pytest.mark.parametrize("plane", PLANES)
def test_v2_grant_of_the_last_frame_below_2_pow_64_is_guest_memory(kernel, plane):
    # A region may end exactly at 2**64 (the VMM's rule); its last page, frame 2**52 - 1,
    # is guest memory on both planes.
    w = _world(kernel, plane, version=2)
    try:
        top = (1 << 52) - 1
        w.mem.set_log(None)  # no dirty log reaches up there: a region is refused with one
        w.mem.add_region(top << 12, 4096, w.ram.fd, 4 * 4096)  # RAM page 4, seen up there
        frame = _udp_frame(60)
        w.ram.write(4 * 4096, frame)
        gref = w.gt.grant_access(top)
        _post(w, [TX_REQUEST.pack(gref, 0, 0, 9, 60)])
        netdiff._drive(w)
        assert _responses(w, 0, 1) == [(9, 0)]
        assert [f[10:] for f in netdiff._frames(w)] == [frame]
        assert w.table.in_use(gref) == 0
    finally:
        w.close()


@pytest.mark.parametrize("plane", PLANES)
def test_first_slot_crossing_its_page_halts_the_vif(kernel, plane):
    w = _world(kernel, plane)
    try:
        gref = w.gt.grant_access(2)
        _post(w, [TX_REQUEST.pack(gref, 4090, 0, 1, 60)])
        netdiff._drive(w)
        assert w.vif.halted and w.vif.counters["tx_fatal"] == 1
        assert w.shared.idx[RSP_PROD] == 0  # nothing answered, nothing sent
        assert netdiff._frames(w) == []
        assert "crosses its page" in w.fatal[0]
    finally:
        w.close()


@pytest.mark.parametrize("plane", PLANES)
def test_multicast_add_then_frames_in_one_wakeup(kernel, plane):
    w = _world(kernel, plane)
    try:
        frame = _udp_frame(100)
        w.ram.write(5 * 4096, frame)
        gref = w.gt.grant_access(5)
        group = bytes.fromhex("01005e000001")
        _post(w, [TX_REQUEST.pack(gref, 0, 0, 1, 100),
                  TX_REQUEST.pack(gref, 0, EXTRA, 2, 0), bytes([2, 0]) + group + bytes(4),
                  TX_REQUEST.pack(gref, 0, 0, 3, 100)])
        netdiff._drive(w)
        assert _responses(w, 0, 4) == [(1, 0), (2, 0), (0, 1), (3, 0)]
        assert w.vif.mcast == {group}
        assert len(netdiff._frames(w)) == 2
        assert w.notifies[0] == 1  # one notify for the whole wake-up
    finally:
        w.close()


@pytest.mark.parametrize("plane", PLANES)
def test_credit_stops_the_batch_before_the_packet_that_does_not_fit(kernel, plane):
    w = _world(kernel, plane, rate=(1000, 3_600_000_000))
    try:
        w.ram.write(6 * 4096, _udp_frame(600))
        gref = w.gt.grant_access(6)
        _post(w, [TX_REQUEST.pack(gref, 0, 0, k, 600) for k in range(3)])
        netdiff._drive(w)
        assert w.shared.idx[RSP_PROD] == 1
        assert w.vif.counters["tx_packets"] == 1 and w.vif.counters["tx_rate_limited"] == 1
        assert w.path.credit.remaining == 400 and w.path.credit.waiting
    finally:
        w.close()


@pytest.mark.parametrize("plane", PLANES)
def test_gso_frame_gathered_behind_one_vnet_header(kernel, plane):
    w = _world(kernel, plane)
    try:
        n = 3 * 4096 + 500
        eth = bytes.fromhex("00163e000002") + bytes.fromhex("00163e000001") + b"\x08\x00"
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, n - 14, 0, 0x4000, 64, 6, 0,
                         bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
        tcp = struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 0x50, 0x18, 100, 0, 0)
        frame = (eth + ip + tcp + os.urandom(n - 54))
        pages = [frame[:500], frame[500:4596], frame[4596:8692], frame[8692:]]
        grefs = []
        for k, chunk in enumerate(pages):
            w.ram.write((8 + k) * 4096, chunk)
            grefs.append(w.gt.grant_access(8 + k))
        gso = bytes([1, 0]) + struct.pack("<HBBH", 1448, 1, 0, 0) + bytes(4)
        _post(w, [TX_REQUEST.pack(grefs[0], 0, CSUM | MORE | EXTRA, 1, n), gso,
                  TX_REQUEST.pack(grefs[1], 0, MORE, 2, 4096),
                  TX_REQUEST.pack(grefs[2], 0, MORE, 3, 4096),
                  TX_REQUEST.pack(grefs[3], 0, 0, 4, len(pages[3]))])
        netdiff._drive(w)
        (got,) = netdiff._frames(w)
        flags, gtype, hdr_len, gso_size, cstart, coff = struct.unpack_from("<BBHHHH", got)
        assert (flags, gtype, hdr_len, gso_size, cstart, coff) == (1, 1, 54, 1448, 34, 16)
        # The pseudo-header sum went into the private copy of the TCP header.
        total = 0x0a00 + 0x0001 + 0x0a00 + 0x0002 + 6 + (n - 34)
        total = (total & 0xFFFF) + (total >> 16)
        assert got[10 + 50:10 + 52] == struct.pack("!H", total)
        assert got[10:10 + 50] == frame[:50] and got[10 + 52:] == frame[52:]
        assert w.vif.counters["tx_gso"] == 1
    finally:
        w.close()


@pytest.mark.parametrize("plane", PLANES)
def test_v2_sub_page_rx_buffer_is_a_guest_error_and_the_next_buffer_takes_the_frame(
        kernel, plane):
    case = netdiff_rx.RxCase(2, Features(sg=False), 1500, False)
    w = netdiff_rx.build(kernel if plane == "compiled" else None, case)
    try:
        sub = w.gt.grant_access(3, sub_page=(0, 2048))
        good = w.gt.grant_access(4)
        prod = w.shared.idx[REQ_PROD]
        w.shared.write_slot(prod, RX_REQUEST.pack(10, sub))
        w.shared.write_slot(prod + 1, RX_REQUEST.pack(11, good))
        w.shared.idx[REQ_PROD] = prod + 2
        frame = _udp_frame(300)
        w.peer.send(bytes(10) + frame)
        netdiff_rx.drive(w)
        assert [struct.unpack_from("<HHHh", w.shared.read_slot(k)) for k in range(2)] == [
            (10, 0, 0, -1), (11, 0, 0, 300)]
        assert w.ram.read(4 * 4096, 300) == frame
        assert w.vif.counters["rx_bad_grant"] == 1 and w.vif.counters["rx_packets"] == 1
        assert not w.vif.halted
        for gref in (sub, good):
            assert not w.gt.status(gref) & (GTF_READING | GTF_WRITING)
            assert w.table.in_use(gref) == 0
    finally:
        w.close()


@pytest.mark.parametrize("plane", PLANES)
def test_guest_ram_with_posted_rx_buffers_cannot_be_removed(kernel, plane):
    case = netdiff_rx.RxCase(1, Features(sg=True), 1500, False)
    w = netdiff_rx.build(kernel if plane == "compiled" else None, case)
    try:
        w.shared.write_slot(0, RX_REQUEST.pack(1, w.gt.grant_access(33)))
        w.shared.idx[REQ_PROD] = 1
        netdiff_rx.drive(w)  # posted, not yet used: no frame
        assert netdiff_rx.state(w)["posted0"] == 1
        gpa, size = netdiff.LAYOUT[1]
        with pytest.raises(ControlError) as e:
            w.mem.remove_region(gpa, size)
        assert e.value.code == errno.EBUSY
        w.path.stop()  # the buffer goes: the region may go too
        w.mem.remove_region(gpa, size)
    finally:
        w.close()


# --- the device key ------------------------------------------------------------------


def test_dataplane_key_is_checked():
    with pytest.raises(ConfigError, match="dataplane"):
        NetDevice._dataplane("fast")


pytestmark_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytestmark_root
@pytest.mark.parametrize("plane", PLANES)
async def test_dataplane_key_selects_the_tx_path(plane, monkeypatch, tmp_path):
    monkeypatch.setenv("BACKENDD_NET_KERNEL", str(build("net", tmp_path / "net.so")))
    monkeypatch.setattr(nk.LOADER, "_tried", False)
    monkeypatch.setattr(nk.LOADER, "_loaded", None)
    host = uniq("nbh")
    with namespaces(host):
        guest = make_guest()
        try:
            tap = uniq("bv") + "k"
            dev, front = await plug(guest, 3, {"tap": tap, "netns": host, "queues": "1",
                                               "dataplane": plane})
            compiled = plane == "compiled"
            assert type(dev.queues[0].tx) is (CompiledTxPath if compiled else TxPath)
            assert type(dev.queues[0].rx) is (CompiledRxPath if compiled else RxPath)
            for k in range(20):
                await front.send_frame(_udp_frame(200 + k))
            await front.wait_tx_done()
            stats = dev.stats()
            assert stats["tx_packets"] == 20 and stats["tx_errors"] == 0
        finally:
            await guest.close()
