"""python -m bench.migrate: live migration of a running simulated guest between two real
daemon processes (backendd/guest/migration.py), with a disk under verified block I/O at
QD32 and a nic carrying a TCP stream; prints the downtime (SUSPEND to RESUME) beside a
baseline measured in the same run: the control round trip and the device-state transfer
alone (GET_DEVICE_STATE + SET_DEVICE_STATE of the same devices, nothing else), and the
pre-copy rounds with the pages each copied.

The rig (two daemons, a guest on its own vCPU thread, the workload, the namespaces) is
also what tests/test_migration.py drives."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from backendd.guest.blkfront import BlkFront
from backendd.guest.machine import SimGuest
from backendd.guest.memory import sealed_memfd
from backendd.guest.migration import GuestCpu, Migration, Moving
from backendd.guest.netfront import NetFront
from backendd.guest.vmm import VmmClient
from rings.consts import XenbusState

from .report import table

MiB = 1 << 20
KiB = 1 << 10
DISK_DEVID = 51712
NIC_DEVID = 0
DISK_BYTES = 32 * MiB
BLOCK = 16 * KiB
DEPTH = 32
HOST_IP, GUEST_IP = "10.124.0.1", "10.124.0.2"
PORT = 5301
HANG = 120.0  # seconds after which a wait that should end is a hang, not slowness


class RigError(Exception):
    pass


# --- daemons ----------------------------------------------------------------------------

async def wait_ready(notify: socket.socket, proc: asyncio.subprocess.Process,
                     timeout: float | None = None) -> bool:
    """Whether READY=1 came on the non-blocking datagram socket `notify` (the daemon's
    NOTIFY_SOCKET) before `proc` exited or `timeout` passed."""
    loop = asyncio.get_running_loop()

    async def ready() -> None:
        while b"READY=1" not in await loop.sock_recv(notify, 4096):
            pass

    waiting = asyncio.ensure_future(ready())
    exited = asyncio.ensure_future(proc.wait())
    await asyncio.wait([waiting, exited], timeout=timeout,
                       return_when=asyncio.FIRST_COMPLETED)
    for fut in (waiting, exited):
        fut.cancel()
    return waiting.done() and not waiting.cancelled()


class DaemonProcess:
    """`backendd serve` as a process of its own, started and waited for (READY=1)."""

    def __init__(self, workdir: Path, name: str, config: str = "",
                 netns: str | None = None) -> None:
        self.netns = netns  # run inside this network namespace: the "host" of its taps
        self.sock = str(workdir / f"{name}.sock")
        self.log_path = workdir / f"{name}.log"
        self.config = workdir / f"{name}.toml"
        self.config.write_text(config)
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        notify_path = self.sock + ".notify"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        notify.bind(notify_path)
        try:
            with open(self.log_path, "ab") as log:
                prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
                self.proc = await asyncio.create_subprocess_exec(
                    *prefix, sys.executable, "-m", "backendd", "--config", str(self.config),
                    "--socket", self.sock, "serve",
                    stdout=log, stderr=log, env={**os.environ, "NOTIFY_SOCKET": notify_path})
            if not await wait_ready(notify, self.proc, HANG):
                raise RigError(f"daemon {self.sock} did not start: {self.log()}")
        finally:
            notify.close()
            os.unlink(notify_path)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

    async def stop(self) -> int | None:
        """SIGTERM and wait; the exit status (None if it was not running)."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), HANG)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode


# --- the guest's block workload -----------------------------------------------------------

@dataclass
class IOCounts:
    issued: int = 0
    completed: int = 0
    writes: int = 0
    reads: int = 0
    errors: list[str] = field(default_factory=list)
    mismatches: list[int] = field(default_factory=list)  # blocks read back wrong


def initial_block(blk: int, block: int = BLOCK) -> bytes:
    """A block's content before the guest writes it: its number, over and over. Never
    zero and different per block, so every read brings new bytes into a guest page (a
    read of zeros into a zero page would write nothing a missed copy could show)."""
    return (blk + 1).to_bytes(8, "little") * (block // 8)


def fill_image(image: Path, size: int = DISK_BYTES, block: int = BLOCK) -> None:
    with open(image, "wb") as f:
        for blk in range(size // block):
            f.write(initial_block(blk, block))


class VerifiedIO:
    """`depth` workers on the guest, each owning its own blocks of the disk: random
    writes of random data, and reads checked against what was last written there. Runs
    on the guest's loop until stop()."""

    def __init__(self, front: BlkFront, disk_bytes: int = DISK_BYTES, depth: int = DEPTH,
                 block: int = BLOCK, seed: int = 1) -> None:
        self.front = front
        self.block = block
        self.blocks = disk_bytes // block
        self.depth = depth
        self.seed = seed
        self.model: dict[int, bytes] = {}
        self.counts = IOCounts()
        self._stop = False
        self._running = 0
        self._progress = asyncio.Event()  # set at each completion and when a worker ends

    def expected(self, blk: int) -> bytes:
        data = self.model.get(blk)
        return data if data is not None else initial_block(blk, self.block)

    def stop(self) -> None:
        self._stop = True

    async def run(self) -> None:
        self._running = self.depth
        await asyncio.gather(*(self._worker(k) for k in range(self.depth)))

    async def until(self, completed: int) -> None:
        """On the guest: return once `completed` requests have completed in all; raise
        if the workers stopped before."""
        while self.counts.completed < completed:
            if self._running == 0:
                raise RigError(f"the guest's I/O stopped: {self.counts}")
            self._progress.clear()
            await self._progress.wait()

    async def _worker(self, k: int) -> None:
        try:
            await self._work(k)
        finally:
            self._running -= 1
            self._progress.set()

    async def _work(self, k: int) -> None:
        rng = random.Random(self.seed * 1000 + k)
        mine = list(range(k, self.blocks, self.depth))
        c = self.counts
        while not self._stop:
            blk = rng.choice(mine)
            sector = blk * self.block // 512
            c.issued += 1
            try:
                if rng.random() < 0.5:
                    data = rng.randbytes(self.block)
                    await self.front.write(sector, data)
                    self.model[blk] = data
                    c.writes += 1
                else:
                    got = await self.front.read(sector, self.block)
                    c.reads += 1
                    if got != self.expected(blk):
                        c.mismatches.append(blk)
            except Exception as exc:
                c.errors.append(f"block {blk}: {exc!r}")
                return
            c.completed += 1
            self._progress.set()

    async def read_back(self) -> list[int]:
        """Every block read again: those that differ from the model."""
        bad = []
        for blk in range(self.blocks):
            got = await self.front.read(blk * self.block // 512, self.block)
            if got != self.expected(blk):
                bad.append(blk)
        return bad

    def image_mismatches(self, image: Path) -> list[int]:
        data = image.read_bytes()
        return [blk for blk in range(self.blocks)
                if data[blk * self.block:(blk + 1) * self.block]
                != self.expected(blk)]


# --- the TCP stream ---------------------------------------------------------------------

SERVER = f"""
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('{HOST_IP}', {PORT})); s.listen(1); print('ready', flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while (b := c.recv(1 << 20)):
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""

# Sends until told to stop on stdin, reporting every 2 MiB sent.
CLIENT = f"""
import hashlib, random, select, socket, sys
rng = random.Random(7); h = hashlib.sha256(); n = 0; step = 2 << 20
c = socket.create_connection(('{HOST_IP}', {PORT}), timeout=60)
while not select.select([sys.stdin], [], [], 0)[0]:
    chunk = rng.randbytes(64 << 10)
    c.sendall(chunk); h.update(chunk); n += len(chunk)
    if n % step == 0:
        print('sent', n, flush=True)
c.close()
print('done', n, h.hexdigest(), flush=True)
"""


async def sh(*argv: str, ns: str | None = None) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RigError(f"{' '.join(cmd)}: {out.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


class TcpStream:
    """Guest namespace -> host namespace, sha256 on both ends, until stop()."""

    def __init__(self, host_ns: str, guest_ns: str) -> None:
        self.host_ns, self.guest_ns = host_ns, guest_ns
        self.server: asyncio.subprocess.Process | None = None
        self.client: asyncio.subprocess.Process | None = None
        self.sent = 0

    async def start(self) -> None:
        self.server = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.host_ns, sys.executable, "-c", SERVER,
            stdout=asyncio.subprocess.PIPE)
        assert self.server.stdout is not None
        await asyncio.wait_for(self.server.stdout.readline(), HANG)
        self.client = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.guest_ns, sys.executable, "-c", CLIENT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)

    async def progress(self, lines: int = 1) -> int:
        """Wait for `lines` more progress reports from the sender; bytes sent so far."""
        assert self.client is not None and self.client.stdout is not None
        for _ in range(lines):
            line = (await asyncio.wait_for(self.client.stdout.readline(), HANG)).split()
            if not line or line[0] != b"sent":
                raise RigError(f"TCP sender: {line!r}")
            self.sent = int(line[1])
        return self.sent

    async def stop(self) -> tuple[list[str], list[str]]:
        """Stop sending; (sender's [count, sha256], receiver's [count, sha256])."""
        assert self.client is not None and self.server is not None
        assert self.client.stdin is not None and self.client.stdout is not None
        assert self.server.stdout is not None
        self.client.stdin.write(b"stop\n")
        await self.client.stdin.drain()
        while True:
            line = (await asyncio.wait_for(self.client.stdout.readline(), HANG)).split()
            if not line or line[0] == b"done":
                break
        sent = [x.decode() for x in line[1:]]
        received = (await asyncio.wait_for(self.server.stdout.readline(), HANG)).decode()
        return sent, received.split()

    async def close(self) -> None:
        for proc in (self.client, self.server):
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


# --- the rig ----------------------------------------------------------------------------

class Rig:
    """Two daemons (source A, destination B), and a guest with a disk (and a nic) on A,
    the guest's frontends running on its own vCPU thread."""

    def __init__(self, workdir: Path, nic: bool = True, tag: str | None = None,
                 persistent: bool = True, dataplane: str = "auto") -> None:
        self.workdir = workdir
        self.nic = nic
        # Whether the disk's frontend uses persistent grants, and which data plane serves
        # it (the device's `dataplane` key: auto is the compiled kernel when built).
        self.persistent = persistent
        self.dataplane = dataplane
        tag = tag or str(os.getpid() % 100000)
        self.host_ns, self.guest_ns = f"mgh{tag}", f"mgg{tag}"
        self.tap, self.gtap = f"mgv{tag}", f"mge{tag}"
        # With a nic, both daemons run in the host namespace, as two daemons on one
        # host: their taps live there, and the destination adopts the source's tap.
        netns = self.host_ns if nic else None
        self.a = DaemonProcess(workdir, "a", netns=netns)
        self.b = DaemonProcess(workdir, "b", netns=netns)
        self.image = workdir / "disk.img"
        self.guest = SimGuest(ram_size=64 * MiB, gnttab_frames=16)
        self.cpu = GuestCpu()
        self.client: VmmClient | None = None
        self.disk: BlkFront | None = None
        self.netfront: NetFront | None = None
        self.devices: list[Moving] = []
        self.io: VerifiedIO | None = None
        self.io_done: asyncio.Future[None] | None = None
        self.stream: TcpStream | None = None
        self._namespaces: list[str] = []

    async def start(self) -> None:
        fill_image(self.image)
        if self.nic:
            await self._namespaces_up()
        await self.a.start()
        await self.b.start()
        self.client = await VmmClient.connect(self.a.sock, name="migrant")
        await self.guest.attach(self.client)
        disk_config = {"path": str(self.image), "dataplane": self.dataplane}
        _, keys = await self.client.add_device(DISK_DEVID, "blk", disk_config)

        async def make_disk() -> BlkFront:
            front = BlkFront(self.guest.ram, self.guest.gnttab, DISK_DEVID,
                             backend_keys=keys, queues=2, ring_order=1, first_port=1,
                             persistent=self.persistent)
            return front

        self.disk = await self.cpu.run(make_disk())
        _, keys = await self.client.hand_over_channels(
            DISK_DEVID, XenbusState.CONNECTED, self.disk.frontend_keys(),
            self.disk.channels())
        self.disk.update_backend_keys(keys)
        await self.cpu.run(_start(self.disk))
        self.devices.append(Moving(DISK_DEVID, "blk", disk_config, self.disk))
        if self.nic:
            await self._start_nic()

    async def _namespaces_up(self) -> None:
        for ns in (self.host_ns, self.guest_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            await sh("ip", "netns", "add", ns)
            self._namespaces.append(ns)
            await sh("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", ns=ns)
            await sh("ip", "link", "set", "lo", "up", ns=ns)

    async def _start_nic(self) -> None:
        assert self.client is not None
        mac = "00:16:3e:24:00:01"
        config = {"tap": self.tap, "mac": mac}
        await self.client.add_device(NIC_DEVID, "net", config)

        async def make_nic() -> NetFront:
            return NetFront(self.guest.ram, self.guest.gnttab, NIC_DEVID, first_port=20)

        self.netfront = await self.cpu.run(make_nic())
        await self.client.hand_over_channels(NIC_DEVID, XenbusState.CONNECTED,
                                             self.netfront.frontend_keys(),
                                             self.netfront.channels())
        nf = self.netfront

        async def start_nic() -> None:
            nf.start()
            await nf.attach_tap(self.gtap, netns=self.guest_ns, mac=mac)

        await self.cpu.run(start_nic())
        await sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", self.tap, ns=self.host_ns)
        await sh("ip", "addr", "add", f"{GUEST_IP}/24", "dev", self.gtap, ns=self.guest_ns)
        await sh("ping", "-c", "2", "-i", "0.2", "-W", "5", HOST_IP, ns=self.guest_ns)
        # Same host: the destination adopts the tap, once the source is suspended.
        self.devices.append(Moving(NIC_DEVID, "net", config | {"adopt-tap": "1"}, nf,
                                   add_after_suspend=True))

    async def start_load(self) -> None:
        """Verified block I/O at QD32 on the guest, and the TCP stream."""
        assert self.disk is not None
        self.io = VerifiedIO(self.disk)
        self.io_done = asyncio.wrap_future(self.cpu.submit(self.io.run()))
        await self.io_progress(4 * DEPTH)  # some I/O completes before anything else
        if self.nic:
            self.stream = TcpStream(self.host_ns, self.guest_ns)
            await self.stream.start()
            await self.stream.progress()

    async def io_progress(self, more: int) -> None:
        """Wait until `more` further requests of the guest's I/O completed."""
        assert self.io is not None
        await self.cpu.run(self.io.until(self.io.counts.completed + more))

    def migration(self, **kw: object) -> Migration:
        assert self.client is not None
        return Migration(self.guest, self.cpu, self.client, self.b.sock, self.devices,
                         name="migrant", **kw)  # type: ignore[arg-type]

    async def stop_load(self) -> None:
        assert self.io is not None and self.io_done is not None
        self.cpu.loop.call_soon_threadsafe(self.io.stop)
        await asyncio.wait_for(self.io_done, HANG)

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.close()

        async def on_guest() -> None:
            for front in (self.netfront, self.disk):
                if front is not None:
                    front.close()

        with contextlib.suppress(Exception):
            await self.cpu.run(on_guest())
        self.cpu.close()
        if self.client is not None:
            await self.client.close()
        for d in (self.a, self.b):
            await d.stop()
        self.guest.close()
        for ns in self._namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


async def _start(front: BlkFront | NetFront) -> None:
    front.start()


# --- the benchmark ----------------------------------------------------------------------

def _ms(seconds: float) -> float:
    return seconds * 1000


async def _state_alone(client: VmmClient, devices: list[Moving]) -> float:
    """Seconds for SUSPEND, GET_DEVICE_STATE of every device, RESUME: the state transfer
    on its own, on the serving daemon, with the same devices."""
    t = time.perf_counter()
    await client.suspend()
    for dev in devices:
        fd = sealed_memfd("bench-state", 0)
        try:
            await client.get_device_state(dev.devid, fd)
        finally:
            os.close(fd)
    await client.resume()
    return time.perf_counter() - t


async def _measure(workdir: Path, runs: int, nic: bool
                   ) -> tuple[list[list[object]], list[list[object]]]:
    rows: list[list[object]] = []
    steps_seen: dict[str, list[float]] = {}
    downtimes: list[float] = []
    for n in range(runs):
        run_dir = workdir / f"run{n}"
        run_dir.mkdir()
        rig = Rig(run_dir, nic=nic, tag=f"{os.getpid() % 10000}{n}")
        try:
            await rig.start()
            await rig.start_load()
            assert rig.client is not None
            # Baselines, under the same load, on the source: one control round trip
            # (GET_STATS), and the state transfer alone.
            t = time.perf_counter()
            for _ in range(20):
                await rig.client.stats(DISK_DEVID)
            rtt = (time.perf_counter() - t) / 20
            state_alone = statistics.median([await _state_alone(rig.client, rig.devices)
                                             for _ in range(5)])
            migration = rig.migration()
            rig.client = await migration.run()
            if rig.stream is not None:
                await rig.stream.progress(2)
                sent, received = await rig.stream.stop()
                if sent != received:
                    raise RigError(f"TCP stream: sent {sent}, received {received}")
            await rig.stop_load()
            assert rig.io is not None
            if rig.io.counts.errors or rig.io.counts.mismatches:
                raise RigError(f"guest I/O: {rig.io.counts}")
            report = migration.report
            downtimes.append(report.downtime)
            rows.append([f"run {n + 1}", _ms(report.downtime), _ms(rtt), _ms(state_alone),
                         " ".join(map(str, report.precopy_pages)), report.final_pages,
                         sum(report.state_bytes.values())])
            for k, v in report.steps.items():
                steps_seen.setdefault(k, []).append(_ms(v))
        finally:
            await rig.close()
    rows.append(["median", _ms(statistics.median(downtimes)), float("nan"), float("nan"),
                 "", "", ""])
    step_rows: list[list[object]] = [[k, statistics.median(v), min(v), max(v)]
                                     for k, v in steps_seen.items()]
    return rows, step_rows


def main(argv: list[str] | None = None) -> None:
    """python -m bench.migrate [RUNS] [--no-nic]"""
    args = sys.argv[1:] if argv is None else argv
    nic = "--no-nic" not in args
    args = [a for a in args if a != "--no-nic"]
    runs = int(args[0]) if args else 3
    if os.geteuid() != 0:
        raise SystemExit("bench.migrate: needs root (taps, namespaces)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-migrate-"))
    try:
        rows, step_rows = asyncio.run(_measure(workdir, runs, nic))
    except RigError as exc:
        raise SystemExit(f"bench.migrate: {exc}") from exc
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    what = "a disk (verified I/O, QD32)" + (" and a nic (TCP stream)" if nic else "")
    print(table(
        f"live migration, guest with {what}",
        ["", "downtime ms", "control rtt ms", "suspend+get state+resume ms",
         "pages per pre-copy round", "final pages", "state bytes"], rows))
    print("downtime: SUSPEND sent to RESUME answered (target <= 50 ms); the baselines "
          "were measured in the same run")
    print()
    print(table("where the downtime goes (ms per step, over the runs)",
                ["step", "median", "min", "max"], step_rows))


if __name__ == "__main__":
    main()
