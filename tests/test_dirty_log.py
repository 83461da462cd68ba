"""The dirty log (SET_LOG / CLEAR_LOG, docs/protocol.md "Dirty log"): the real daemon, real
memfds, the simulated guest. While logging is on, exactly the guest pages the daemon
writes have their bits set (data pages a read filled, ring pages, grant-table pages) and
no other; control errors get clear error replies; both data planes log the same."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import AsyncIterator

import pytest

from backendd.dirtylog import gnttab_offset, log_size
from backendd.guest.dirtylog import DirtyLog
from backendd.guest.machine import SimGuest
from backendd.guest.memory import sealed_memfd
from backendd.guest.vmm import RequestFailed, VmmClient
from backendd.protocol.messages import ClearLog, Code, SetLog, decode_request
from rings.consts import PAGE_SIZE, BlkifOp

MiB = 1 << 20
RAM = 48 * MiB
RAM_PAGES = RAM // PAGE_SIZE
GNT_FRAMES = 8


def _image(tmp_path, size: int = 4 * MiB) -> str:
    path = tmp_path / "disk.img"
    data = bytes((i * 7 + i // 4096) & 0xFF for i in range(size))
    path.write_bytes(data)
    return str(path)


def _gnt_pages(guest: SimGuest) -> int:
    return guest.gnttab.size // PAGE_SIZE


def _gnt_page(guest: SimGuest, gref: int) -> int:
    """The grant-table page the daemon writes for gref's in-use bits."""
    t = guest.gnttab
    if t.version == 2:
        return (t.status_base + 2 * gref) // PAGE_SIZE
    return gref * t.entry_size // PAGE_SIZE


@contextlib.asynccontextmanager
async def _logged_guest(path: str, version: int = 1
                        ) -> AsyncIterator[tuple[VmmClient, SimGuest, DirtyLog]]:
    """A guest attached to the daemon at `path`, and a log (not yet set) that covers
    its RAM and grant table; closed after."""
    client = await VmmClient.connect(path)
    guest = SimGuest(ram_size=RAM, gnttab_frames=GNT_FRAMES, gnttab_version=version)
    log = DirtyLog(RAM_PAGES, _gnt_pages(guest))
    try:
        await guest.attach(client)
        yield client, guest, log
    finally:
        await client.close()
        guest.close()
        log.close()


class Recorder:
    """Records the (gref, gfn, readonly) of every data and indirect page a BlkFront
    grants, so a test knows which pages a request used."""

    def __init__(self, front) -> None:
        self.used: list[tuple[int, int, bool]] = []
        orig = front._grant

        def grant(q, readonly):
            gref, gfn = orig(q, readonly)
            self.used.append((gref, gfn, readonly))
            return gref, gfn
        front._grant = grant

    def take(self) -> list[tuple[int, int, bool]]:
        out, self.used = self.used, []
        return out


# --- the wire ----------------------------------------------------------------------


def test_codecs_round_trip_and_check_values():
    msg = SetLog(4096, 1 << 20, 12345)
    assert decode_request(Code.SET_LOG, msg.encode(), 1) == msg
    assert len(msg.encode()) == 24
    assert decode_request(Code.CLEAR_LOG, b"", 0) == ClearLog()
    for bad, err in ((SetLog(1, 4096, 1).encode(), errno.EINVAL),
                     (SetLog(0, 0, 1).encode(), errno.EINVAL),
                     (SetLog(0, 4096, 0).encode(), errno.EINVAL),
                     (b"\0" * 23, errno.EBADMSG)):
        with pytest.raises(Exception) as ei:
            decode_request(Code.SET_LOG, bad, 1)
        assert ei.value.code == err
    with pytest.raises(Exception) as ei:
        decode_request(Code.SET_LOG, msg.encode(), 0)
    assert ei.value.code == errno.EBADF
    with pytest.raises(Exception) as ei:
        decode_request(Code.CLEAR_LOG, b"", 1)
    assert ei.value.code == errno.EBADF


def test_layout_offsets():
    assert gnttab_offset(1) == 8
    assert gnttab_offset(64) == 8
    assert gnttab_offset(65) == 16
    assert gnttab_offset(RAM_PAGES) == RAM_PAGES // 8
    assert log_size(64, 1) == 16
    assert log_size(64, 64) == 16
    assert log_size(64, 65) == 24


# --- control errors ----------------------------------------------------------------


async def test_set_log_refuses_bad_fds_and_sizes(vm):
    client, guest = vm
    log = DirtyLog(RAM_PAGES, _gnt_pages(guest))
    try:
        # Not a memfd: EBADF naming the rule.
        r, w = os.pipe()
        with pytest.raises(RequestFailed) as ei:
            await client.set_log(r, log.size, RAM_PAGES)
        os.close(r)
        os.close(w)
        assert ei.value.code == errno.EBADF and "memfd" in ei.value.message
        # Wrong fd count.
        with pytest.raises(RequestFailed) as ei:
            await client.request(SetLog(0, log.size, RAM_PAGES), [log.fd, log.fd])
        assert ei.value.code == errno.EBADF
        # ram_pages below the guest's RAM.
        with pytest.raises(RequestFailed) as ei:
            await client.set_log(log.fd, log.size, RAM_PAGES - 1)
        assert ei.value.code == errno.EINVAL and "does not cover region" in ei.value.message
        # Too small for the RAM bits.
        with pytest.raises(RequestFailed) as ei:
            await client.set_log(log.fd, gnttab_offset(RAM_PAGES) - 8, RAM_PAGES)
        assert ei.value.code == errno.EINVAL and "RAM pages" in ei.value.message
        # Room for the RAM bits but not for the grant table's pages.
        small = DirtyLog(RAM_PAGES, 0)
        try:
            with pytest.raises(RequestFailed) as ei:
                await client.set_log(small.fd, small.size, RAM_PAGES)
            assert ei.value.code == errno.EINVAL and "grant-table pages" in ei.value.message
        finally:
            small.close()
        # Longer than the memfd.
        with pytest.raises(RequestFailed) as ei:
            await client.set_log(log.fd, log.size + PAGE_SIZE, RAM_PAGES)
        assert ei.value.code == errno.EINVAL
        # The good one, then a region beyond ram_pages is refused while logging.
        await client.set_log(log.fd, log.size, RAM_PAGES)
        extra = sealed_memfd("extra", PAGE_SIZE)
        try:
            with pytest.raises(RequestFailed) as ei:
                await client.add_mem_region(RAM, PAGE_SIZE, extra)
            assert ei.value.code == errno.EINVAL and "dirty log" in ei.value.message
            # A grant table larger than the log covers (8 bytes: 64 pages): refused too.
            os.ftruncate(guest.gnttab.fd, 100 * PAGE_SIZE)
            with pytest.raises(RequestFailed) as ei:
                await client.set_grant_table(guest.gnttab.fd, 100)
            assert ei.value.code == errno.EINVAL and "dirty log" in ei.value.message
            # After CLEAR_LOG both are fine again.
            await client.clear_log()
            await client.add_mem_region(RAM, PAGE_SIZE, extra)
            await client.remove_mem_region(RAM, PAGE_SIZE)
        finally:
            os.close(extra)
    finally:
        log.close()


async def test_clear_log_without_a_log_is_fine_and_set_log_replaces(vm):
    client, guest = vm
    await client.clear_log()
    a, b = DirtyLog(RAM_PAGES, _gnt_pages(guest)), DirtyLog(RAM_PAGES, _gnt_pages(guest))
    try:
        await client.set_log(a.fd, a.size, RAM_PAGES)
        await client.set_log(b.fd, b.size, RAM_PAGES)
        await client.clear_log()
    finally:
        a.close()
        b.close()


# --- what gets marked ---------------------------------------------------------------


@pytest.mark.parametrize("dataplane", ["python", "compiled"])
@pytest.mark.parametrize("version", [1, 2])
async def test_block_reads_mark_data_ring_and_grant_pages(daemon, tmp_path, dataplane,
                                                          version):
    image = _image(tmp_path)
    async with _logged_guest(daemon.path, version) as (client, guest, log):
        front = await guest.add_disk(client, 51712, {"path": image, "dataplane": dataplane},
                                     inflight=False)
        rec = Recorder(front)
        ring_gfns = set(front.queues[0].pages)
        await client.set_log(log.fd, log.size, RAM_PAGES)
        assert log.take_ram() == set() and log.take_gnttab() == set()

        # Reads: the pages they fill, the ring page and the grant-table pages.
        for sector, n in ((0, 4096), (24, 3 * 4096), (1000, 11 * 4096), (8, 512)):
            data = await front.read(sector, n)
            with open(image, "rb") as f:
                f.seek(sector * 512)
                assert data == f.read(n)
            used = rec.take()
            ram, gnt = log.take_ram(), log.take_gnttab()
            data_pages = {gfn for _, gfn, ro in used if not ro}
            assert data_pages  # a read's pages are granted writable
            assert ram == data_pages | ring_gfns, (sector, n)
            assert gnt == {_gnt_page(guest, gref) for gref, _, _ in used}

        # A write: the daemon only reads its data pages: the ring and the table only.
        await front.write(64, b"\x5a" * 8192)
        used = rec.take()
        assert log.take_ram() == ring_gfns
        assert log.take_gnttab() == {_gnt_page(guest, gref) for gref, _, _ in used}

        # Indirect reads: the indirect pages are read, not written.
        if front.max_indirect_segments:
            raw_read = await front._data_request(BlkifOp.READ, 0, 40 * 4096, None, 0, True)
            assert len(raw_read) == 40 * 4096
            used = rec.take()
            ram = log.take_ram()
            assert ram == {gfn for _, gfn, ro in used if not ro} | ring_gfns
            assert not ram & {gfn for _, gfn, ro in used if ro}
            log.take_gnttab()

        # Logging off: nothing more is set.
        await client.clear_log()
        await front.read(0, 8192)
        assert log.take_ram() == set() and log.take_gnttab() == set()


async def test_persistent_grant_reads_mark_their_pages_every_time(daemon, tmp_path):
    image = _image(tmp_path)
    async with _logged_guest(daemon.path) as (client, guest, log):
        front = await guest.add_disk(client, 51712, {"path": image, "dataplane": "python"},
                                     inflight=False, persistent=True)
        assert front.use_persistent
        rec = Recorder(front)
        ring_gfns = set(front.queues[0].pages)
        await client.set_log(log.fd, log.size, RAM_PAGES)
        for _ in range(3):  # the same pooled pages, pinned once, written every time
            await front.read(0, 4 * 4096)
            used = rec.take()
            assert log.take_ram() == {gfn for _, gfn, ro in used if not ro} | ring_gfns
            assert log.take_gnttab() <= {_gnt_page(guest, gref) for gref, _, _ in used}


@pytest.mark.usefixtures("root")
@pytest.mark.parametrize("dataplane", ["python", "compiled"])
async def test_net_rx_marks_the_buffers_it_fills_and_the_rx_ring(daemon, dataplane):
    from test_net_harness import daemon_guest, inject, namespaces, uniq

    host, tap = uniq("dlh"), uniq("dl") + dataplane[0]
    with namespaces(host):
        async with daemon_guest(daemon.path) as dg:
            client, guest, _ = dg
            # Split channels: rx traffic does not kick the tx ring, so the tx ring page
            # is not written either.
            front = await dg.add_nic({"tap": tap, "netns": host, "dataplane": dataplane},
                                     split=True)
            ram_pages = guest.ram.size // PAGE_SIZE
            log = DirtyLog(ram_pages, guest.gnttab.size // PAGE_SIZE)
            try:
                await client.set_log(log.fd, log.size, ram_pages)
                frames = [b"\xff" * 6 + b"\x02\0\0\0\0\x01" + b"\x88\xb5" +
                          bytes([i]) * (200 + 50 * i) for i in range(12)]
                await inject(host, tap, frames)
                got = await front.wait_rx(len(frames))
                assert [data for _, data, _ in got] == frames
                q = front.queues[0]
                filled = {gfn for gfn, _ in q.rx_bufs.values()
                          if any(bytes(guest.ram.page(gfn)[:len(f)]) == f for f in frames)}
                assert len(filled) == len(frames)
                ram = log.take_ram()
                assert ram == filled | {q.rx_page}
                # Posted buffers the daemon holds but did not fill are not in it, nor
                # the tx ring or the tx buffers (the daemon never wrote them).
                assert q.tx_page not in ram
                assert not ram & {gfn for gfn, _ in q.tx_pages}
                rx_grefs = {gref for _, gref in q.rx_bufs.values()}
                assert log.take_gnttab() == {_gnt_page(guest, g) for g in rx_grefs}
                # Plain tx traffic: the daemon reads the guest's buffers and writes only
                # the tx ring (responses, indices) and the grant table.
                for f in frames[:3]:
                    await front.send_frame(f)
                await front.wait_tx_done()
                assert log.take_ram() == {q.tx_page}
                tx_grefs = {gref for _, gref in q.tx_pages}
                gnt = log.take_gnttab()
                assert gnt and gnt <= {_gnt_page(guest, g) for g in tx_grefs}
            finally:
                await client.clear_log()
                log.close()


async def test_per_connection_workers_log_too(tmp_path):
    """With process_model = "per-connection" the worker serving the guest logs."""
    from test_workers import Daemon

    image = _image(tmp_path)
    daemon = Daemon(tmp_path)
    await daemon.start()
    try:
        async with _logged_guest(daemon.sock) as (client, guest, log):
            front = await guest.add_disk(client, 51712, {"path": image}, inflight=False)
            rec = Recorder(front)
            await client.set_log(log.fd, log.size, RAM_PAGES)
            await front.read(16, 5 * 4096)
            used = rec.take()
            ring = set(front.queues[0].pages)
            assert log.take_ram() == {gfn for _, gfn, ro in used if not ro} | ring
            assert log.take_gnttab() == {_gnt_page(guest, gref) for gref, _, _ in used}
            await client.clear_log()
            # What the worker wrote before the clear may be in it (the ring's req_event,
            # set when it stops watching the ring): taken away; after it, nothing.
            log.take_ram()
            await front.read(16, 4096)
            assert log.take_ram() == set()
    finally:
        await daemon.stop()


def test_dirty_log_helper_takes_and_clears_each_part():
    log = DirtyLog(100, 20)  # G = 16: RAM bits in bytes 0..12, table bits from 16
    try:
        assert (log.gnt_offset, log.size) == (16, 24)
        m = log._map
        m[0] = 0x01          # frame 0
        m[12] = 0x08         # frame 99
        m[16] = 0x02         # table page 1
        m[18] = 0x08         # table page 19
        assert log.take_ram() == {0, 99}
        assert log.take_gnttab() == {1, 19}
        assert log.peek() == bytes(24)
        assert log.take_ram() == set() and log.take_gnttab() == set()
    finally:
        log.close()


@pytest.mark.parametrize("dataplane", ["python", "compiled"])
async def test_a_two_page_ring_marks_the_page_each_response_lands_in(daemon, tmp_path,
                                                                      dataplane):
    # 64 slots of 112 bytes after the 64-byte header: slots 0..35 lie in the first page,
    # 36.. in the second. The indexes (rsp_prod) are in the first page.
    image = _image(tmp_path)
    async with _logged_guest(daemon.path) as (client, guest, log):
        front = await guest.add_disk(client, 51712, {"path": image, "dataplane": dataplane},
                                     inflight=False, ring_order=1)
        rec = Recorder(front)
        first, second = front.queues[0].pages
        await client.set_log(log.fd, log.size, RAM_PAGES)
        for _ in range(36):  # responses 0..35
            await front.read(0, 4096)
        data = {gfn for _, gfn, ro in rec.take() if not ro}
        assert log.take_ram() == data | {first}
        await front.read(0, 4096)  # response 36, in the second page
        data = {gfn for _, gfn, ro in rec.take() if not ro}
        assert log.take_ram() == data | {first, second}
