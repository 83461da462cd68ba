"""Ring state across driver reloads and daemon restarts, through a real daemon process.

- A driver reload (Connected -> Closed -> Initialising -> a fresh ring) keeps the same
  in-flight memory, as protocol.md says a VMM does: the fresh ring starts a new generation
  of the table, and that generation is resumed by a daemon restarted with kill -9.
- A daemon restarted without an in-flight table resumes each ring at its published
  rsp_prod: what was in flight runs again, nothing answered is run twice.

The test plays systemd (it restarts the daemon), the VMM (it replays its state on a new
connection) and, through the simulated guest, the frontend."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import random
import signal
import socket
import sys
from pathlib import Path

import pytest

from backendd.guest.blkfront import BlkFront
from backendd.guest.machine import SimGuest
from backendd.guest.memory import sealed_memfd
from backendd.guest.vmm import ConnectionLost, RequestFailed, VmmClient
from backendd.inflight import InflightRegion, region_size
from rings.consts import XenbusState
from rings.ring import FrontRing
from rings.sring import REQ_PROD, RSP_PROD

MiB = 1 << 20
DEVID = 51712
IMAGE = 4 * MiB
GUARD = 60  # seconds: a hang fails the test instead of blocking the run


class RecordingFront(FrontRing):
    """The guest's ring, remembering what it put in each slot."""

    __slots__ = ("sent",)

    def put_request(self, data: bytes) -> int:
        index = super().put_request(data)
        self.sent[index] = data
        return index


class Vmm:
    def __init__(self, tmp: Path, *, inflight: bool, persistent: bool = False) -> None:
        self.persistent = persistent  # the frontend offers persistent grants
        self.sock = str(tmp / "backendd.sock")
        # As systemd's socket unit: one listener for every daemon incarnation, so the VMM
        # can connect while the daemon restarts (its connection waits in the backlog).
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.sock)
        self.listener.listen(16)
        self.image = tmp / "disk.img"
        self.image.write_bytes(bytes(IMAGE))
        self.log_path = tmp / "daemon.log"
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.guest = SimGuest(ram_size=64 * MiB, gnttab_frames=8)
        self.inflight: int | None = None
        if inflight:
            self.inflight = sealed_memfd("inflight", region_size(1))
        self.proc: asyncio.subprocess.Process | None = None
        self.client: VmmClient | None = None
        self.front: BlkFront | None = None
        self.model = bytearray(IMAGE)

    async def start_daemon(self) -> None:
        fd = self.listener.fileno()
        # What systemd does between fork and exec: the listener becomes fd 3 and
        # LISTEN_PID names the process that execs the daemon.
        launcher = (
            "import os, sys\n"
            f"os.dup2({fd}, 3)\n"
            f"os.close({fd})\n"
            "os.environ['LISTEN_PID'] = str(os.getpid())\n"
            "os.execv(sys.executable, [sys.executable, '-m', 'backendd', 'serve'])\n")
        env = {**os.environ, "LISTEN_FDS": "1"}
        env.pop("NOTIFY_SOCKET", None)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", launcher, env=env, pass_fds=(fd,),
            stdout=self.log, stderr=self.log)

    async def _connect_front(self) -> None:
        assert self.client is not None and self.front is not None
        started = self.front.started
        channels = self.front.new_channels() if started else self.front.channels()
        _, keys = await self.client.hand_over_channels(
            DEVID, XenbusState.CONNECTED, self.front.frontend_keys(), channels)
        self.front.update_backend_keys(keys)
        if not self.front.started:
            self.front.start()

    async def connect(self) -> None:
        """Everything a VMM sends, first time and after each restart."""
        client = await VmmClient.connect(self.sock)
        await self.guest.attach(client)
        _, keys = await client.add_device(DEVID, "blk", {"path": str(self.image)})
        if self.inflight is not None:
            await client.set_inflight(DEVID, self.inflight, region_size(1))
        self.client = client
        if self.front is None:
            self.front = BlkFront(self.guest.ram, self.guest.gnttab, DEVID,
                                  backend_keys=keys, persistent=self.persistent)
            q = self.front.queues[0]
            q.front = RecordingFront(q.shared)
            q.front.sent = {}
        await self._connect_front()

    async def reload(self) -> None:
        """The guest unloads and loads its driver: a fresh ring, same in-flight fd."""
        assert self.client is not None and self.front is not None
        state, _ = await self.client.frontend_state(DEVID, XenbusState.CLOSED, {})
        assert state == XenbusState.CLOSED
        keys = dict(self.front.backend_keys)
        self.front.close()
        state, _ = await self.client.frontend_state(DEVID, XenbusState.INITIALISING, {})
        assert state == XenbusState.INIT_WAIT
        self.front = BlkFront(self.guest.ram, self.guest.gnttab, DEVID, backend_keys=keys,
                              persistent=self.persistent)
        await self._connect_front()

    def table_plan(self):
        """What a restarted daemon would do with the table now (read only)."""
        from backendd.inflight import ring_id
        assert self.inflight is not None and self.front is not None
        m = mmap.mmap(self.inflight, region_size(1))
        try:
            q = self.front.queues[0]
            table = InflightRegion(memoryview(m), 1).queue(0, q.shared.size)
            rec = table.plan(q.shared.idx[REQ_PROD], q.shared.idx[RSP_PROD],
                             ring_id(q.grefs, q.port.port))
            del table
            return rec
        finally:
            with contextlib.suppress(BufferError):
                m.close()

    def slots_hold_requests(self) -> bool:
        """Every slot from the published rsp_prod to req_prod still holds the request the
        guest put there: the daemon is not between writing a response and publishing it
        (the window docs/protocol.md names, where only an in-flight table is exact)."""
        assert self.front is not None
        q = self.front.queues[0]
        assert isinstance(q.front, RecordingFront)
        rsp, req = q.shared.idx[RSP_PROD], q.shared.idx[REQ_PROD]
        i = rsp
        while i != req:
            if q.shared.read_slot(i)[:16] != q.front.sent[i][:16]:
                return False
            i = (i + 1) & 0xFFFFFFFF
        return True

    async def kill(self) -> None:
        assert self.proc is not None and self.client is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        await self.client.close()

    async def restart(self) -> None:
        await self.kill()
        await self.start_daemon()
        await self.connect()

    async def stats(self) -> dict[str, int]:
        assert self.client is not None
        return {k.split(".", 1)[1]: int(v)
                for k, v in (await self.client.stats(DEVID)).items()}

    async def write(self, sector: int, data: bytes) -> None:
        assert self.front is not None
        await self.front.write(sector, data)
        self.model[sector * 512:sector * 512 + len(data)] = data

    async def check_disk(self) -> None:
        """Every acknowledged write is on the disk, through the guest and in the file."""
        assert self.front is not None
        await self.front.flush()
        for off in range(0, IMAGE, 512 * 1024):
            assert await self.front.read(off // 512, 512 * 1024) == \
                bytes(self.model[off:off + 512 * 1024])
        assert self.image.read_bytes() == bytes(self.model)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        if self.front is not None:
            self.front.close()
        self.guest.close()
        if self.inflight is not None:
            os.close(self.inflight)
        self.listener.close()
        self.log.close()


async def workload(vmm: Vmm, stop: asyncio.Event, acked: list[int], workers: int = 6) -> None:
    """Writers, each to its own slice, one write at a time (so the model is exact)."""

    async def writer(w: int) -> None:
        rng = random.Random(w)
        span = IMAGE // workers // 4096 * 4096
        while not stop.is_set():
            n = rng.choice([4096, 8192, 65536, 262144])
            off = w * span + rng.randrange(0, span - n + 1, 4096)
            await vmm.write(off // 512, rng.randbytes(n))
            acked[0] += 1

    await asyncio.gather(*(writer(w) for w in range(workers)))


async def stop_when(vmm: Vmm, ready, rng: random.Random) -> None:
    """SIGSTOP the daemon at a moment where `ready()` holds (trying random moments)."""
    assert vmm.proc is not None
    for _ in range(500):
        await asyncio.sleep(rng.uniform(0.001, 0.03))
        vmm.proc.send_signal(signal.SIGSTOP)
        if ready():
            return
        vmm.proc.send_signal(signal.SIGCONT)
    raise AssertionError("never caught the daemon in the wanted state")


def assert_clean(vmm: Vmm) -> None:
    assert vmm.front is not None
    assert vmm.front.stray_responses == []
    assert all(not q.waiters for q in vmm.front.queues)


async def stop_and_check(vmm: Vmm, stop: asyncio.Event, workload_task: asyncio.Task) -> None:
    """Stop the workload's writers; then the image holds what was acknowledged, no ring
    halted, and every response matched a request."""
    stop.set()
    await asyncio.wait_for(workload_task, GUARD)
    await asyncio.wait_for(vmm.check_disk(), GUARD)
    assert (await vmm.stats())["rings_halted"] == 0
    assert_clean(vmm)


@pytest.mark.parametrize("persistent", [False, True])
async def test_driver_reload_with_the_same_inflight_memory(tmp_path, persistent):
    vmm = Vmm(tmp_path, inflight=True, persistent=persistent)
    try:
        await vmm.start_daemon()
        await vmm.connect()
        rng = random.Random(7)
        sector = 0
        # 27 requests (a table left past a fresh ring's indices), then 40 (more than the
        # ring holds), then 5, each followed by a reload.
        for n in (27, 40, 5):
            for _ in range(n):
                await asyncio.wait_for(vmm.write(sector, rng.randbytes(4096)), GUARD)
                sector = (sector + 8) % (IMAGE // 512)
            await vmm.reload()
        for _ in range(40):
            await asyncio.wait_for(vmm.write(sector, rng.randbytes(4096)), GUARD)
            sector = (sector + 8) % (IMAGE // 512)
        await asyncio.wait_for(vmm.check_disk(), GUARD)
        stats = await vmm.stats()
        assert stats["rings_halted"] == 0
        assert stats["replayed"] == 0
        assert stats["persistent"] == int(persistent)
        assert_clean(vmm)

        # The new ring's generation is resumed by a restarted daemon: kill -9 while the
        # table holds requests taken and not answered, and those are replayed.
        stop, acked = asyncio.Event(), [0]
        task = asyncio.create_task(workload(vmm, stop, acked))
        await stop_when(vmm, lambda: bool((r := vmm.table_plan()).replay) and not r.fresh,
                        rng)
        before = acked[0]
        await vmm.restart()
        stats = await vmm.stats()
        assert stats["replayed"] > 0
        for _ in range(1000):
            if acked[0] > before + 10:
                break
            await asyncio.sleep(0.01)
        await stop_and_check(vmm, stop, task)
    finally:
        with contextlib.suppress(ConnectionLost, RequestFailed):
            await vmm.stop()


@pytest.mark.parametrize("persistent", [False, True])
async def test_restart_without_inflight_resumes_at_the_published_rsp_prod(tmp_path,
                                                                           persistent):
    vmm = Vmm(tmp_path, inflight=False, persistent=persistent)
    try:
        await vmm.start_daemon()
        await vmm.connect()
        assert vmm.front is not None
        rng = random.Random(11)
        # 10 answered (fewer than the ring holds), then 40 (more): after each, requests
        # sit in the ring while the daemon is stopped and killed, and run after restart.
        sector = 0
        for done in (10, 40):
            for _ in range(done):
                await asyncio.wait_for(vmm.write(sector, rng.randbytes(4096)), GUARD)
                sector = (sector + 8) % (IMAGE // 512)
            assert vmm.proc is not None
            vmm.proc.send_signal(signal.SIGSTOP)
            pending = []
            for _ in range(5):
                pending.append(asyncio.create_task(vmm.write(sector, rng.randbytes(4096))))
                sector = (sector + 8) % (IMAGE // 512)
            await asyncio.sleep(0)  # the requests are in the ring, the kick sent
            await vmm.restart()
            await asyncio.wait_for(asyncio.gather(*pending), GUARD)
            assert_clean(vmm)
        stats = await vmm.stats()
        assert stats["rings_halted"] == 0

        # Responses are published in ring order: a request refused at once waits for the
        # write taken before it (else rsp_prod would pass an unanswered request, and a
        # restarted daemon would run the refused one again).
        q = vmm.front.queues[0]
        first = q.shared.idx[RSP_PROD]
        vmm.proc.send_signal(signal.SIGSTOP)
        slow = asyncio.create_task(vmm.write(0, rng.randbytes(1 << 20)))
        await asyncio.sleep(0)
        bad_id = vmm.front.new_id()
        bad = vmm.front.codecs.request.pack(99, 0, DEVID & 0xFFFF, bad_id, 0, *[0] * 33)
        refused = asyncio.create_task(vmm.front.send_raw(bad, bad_id))
        await asyncio.sleep(0)
        vmm.proc.send_signal(signal.SIGCONT)
        await asyncio.wait_for(asyncio.gather(slow, refused), GUARD)
        ids = [vmm.front.codecs.response.unpack_from(q.shared.read_slot(i))[0]
               for i in (first, first + 1)]
        assert ids[1] == bad_id and ids[0] != bad_id

        # kill -9 at random moments of a busy workload (requests taken, some completed
        # out of order): everything in flight runs again, nothing is answered twice.
        stop, acked = asyncio.Event(), [0]
        task = asyncio.create_task(workload(vmm, stop, acked))
        for _ in range(10):
            await stop_when(vmm, vmm.slots_hold_requests, rng)
            before = acked[0]
            await vmm.restart()
            # A guard against a hang, not a speed check: a loaded machine may take a while.
            deadline = asyncio.get_running_loop().time() + 120
            while acked[0] <= before + 5 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            assert acked[0] > before + 5, "no progress after a restart"
        await stop_and_check(vmm, stop, task)
    finally:
        with contextlib.suppress(ConnectionLost, RequestFailed):
            await vmm.stop()
