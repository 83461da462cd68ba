"""The per-connection process model, through real processes: a supervisor, its zygote and a
worker per VMM connection (backendd/supervisor.py, backendd/worker.py).

Faults stay with their guest: a worker killed with SIGKILL or stopped with SIGSTOP while
two guests do verified I/O leaves the other guest's I/O and `backendd status` working; the
killed guest's VMM reconnects and its requests in flight are answered exactly once. The
timeouts here only turn a hang into a failure; nothing asserts a duration."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import mmap
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from backendd.guest.blkfront import BlkFront
from backendd.guest.machine import SimGuest
from backendd.guest.memory import sealed_memfd
from backendd.guest.vmm import ConnectionLost, RequestFailed, VmmClient
from backendd.inflight import QUEUE_HEADER, REGION_HEADER_SIZE, region_size
from rings.consts import XenbusState

MiB = 1 << 20
DEVID = 51712
IMAGE = 4 * MiB
GUARD = 30.0  # seconds: only a hang fails on it
KILLS = 2  # workers of guest a killed in turn, each with writes in flight


class Daemon:
    def __init__(self, tmp: Path, extra: str = "", prefix: tuple[str, ...] = ()) -> None:
        self.prefix = prefix
        self.sock = str(tmp / "backendd.sock")
        self.config = tmp / "backendd.toml"
        self.config.write_text(f'[daemon]\nprocess_model = "per-connection"\n{extra}')
        self.log_path = tmp / "daemon.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.prefix, sys.executable, "-m", "backendd", "--config", str(self.config),
                "--socket", self.sock, "serve", stdout=log, stderr=log)
        try:
            for _ in range(3000):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    if probe.connect_ex(self.sock) == 0:
                        break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("daemon did not come up")
            # The probe was connection 1, served by a worker: counts start once it is gone.
            await self.wait_log("event=worker_exited conn=1 ")
        except BaseException:
            await self.stop()
            raise

    def log(self) -> str:
        return self.log_path.read_text()

    async def wait_log(self, text: str) -> str:
        for _ in range(int(GUARD * 100)):
            for line in self.log().splitlines():
                if text in line:
                    return line
            await asyncio.sleep(0.01)
        raise AssertionError(f"no log line with {text!r}:\n{self.log()}")

    async def status(self) -> dict[str, str]:
        client = await VmmClient.connect(self.sock)
        try:
            return await asyncio.wait_for(client.daemon_status(), GUARD)
        finally:
            await client.close()

    async def worker_pid(self, conn: int) -> int:
        status = await self.status()
        assert f"conn.{conn}.worker_pid" in status, status
        return int(status[f"conn.{conn}.worker_pid"])

    async def newest_guest(self) -> int:
        """The id of the newest connection with a device (the asking one has none)."""
        status = await self.status()
        return max(int(k.split(".")[1]) for k, v in status.items()
                   if k.endswith(".devices") and v != "0")

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()
        return await asyncio.wait_for(self.proc.wait(), 2 * GUARD)


class Progress:
    def __init__(self) -> None:
        self.count = 0
        self._event = asyncio.Event()

    def tick(self) -> None:
        self.count += 1
        self._event.set()

    async def beyond(self, n: int) -> None:
        async def wait() -> None:
            while self.count <= n:
                self._event.clear()
                await self._event.wait()
        await asyncio.wait_for(wait(), GUARD)


class Guest:
    """A simulated guest with one disk, and the VMM that hands it to the daemon."""

    def __init__(self, tmp: Path, name: str, image_dir: Path | None = None) -> None:
        self.image = (image_dir or tmp) / f"{name}.img"
        self.image.write_bytes(bytes(IMAGE))
        self.sim = SimGuest(ram_size=32 * MiB, gnttab_frames=8)
        self.inflight = sealed_memfd("inflight", region_size(1))
        self.client: VmmClient | None = None
        self.front: BlkFront | None = None
        self.model = bytearray(IMAGE)
        self.progress = Progress()
        self.replayed = 0
        self.conn = 0

    async def connect(self, sock: str) -> None:
        client = await VmmClient.connect(sock)
        await self.sim.attach(client)
        _, keys = await client.add_device(DEVID, "blk", {"path": str(self.image)})
        await client.set_inflight(DEVID, self.inflight, region_size(1))
        if self.front is None:
            self.front = BlkFront(self.sim.ram, self.sim.gnttab, DEVID, queues=1,
                                  backend_keys=keys)
            channels = self.front.channels()
        else:
            channels = self.front.new_channels()
        _, keys = await client.hand_over_channels(DEVID, XenbusState.CONNECTED,
                                                  self.front.frontend_keys(), channels)
        self.front.update_backend_keys(keys)
        if not self.front.started:
            self.front.start()
        self.replayed += int((await client.stats(DEVID))[f"{DEVID}.replayed"])
        self.client = client

    def taken_unanswered(self) -> int:
        """Requests the daemon took and has not answered: the in-flight table's req_cons
        less the rsp_prod the guest sees in its ring."""
        assert self.front is not None
        header = os.pread(self.inflight, QUEUE_HEADER.size, REGION_HEADER_SIZE)
        live, _, req_cons, _, _, _ = QUEUE_HEADER.unpack(header)
        rsp_prod = self.front.queues[0].shared.idx[2]
        return (req_cons - rsp_prod) & 0xFFFFFFFF if live == 1 else 0

    async def verified_io(self, worker: int, stop: asyncio.Event, verify: bool) -> None:
        """Writes to this worker's own slice; with `verify`, each read back and compared."""
        front = self.front
        assert front is not None
        rng = random.Random(worker)
        span = IMAGE // 4
        base = worker * span
        while not stop.is_set():
            n = rng.choice([4096, 16384, 65536])
            off = base + rng.randrange(0, span - n + 1, 4096)
            data = rng.randbytes(n)
            await front.write(off // 512, data)
            self.model[off:off + n] = data
            if verify:
                assert await front.read(off // 512, n) == data
            self.progress.tick()

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(ConnectionLost, RequestFailed):
                await self.client.close()
        if self.front is not None:
            self.front.close()
        self.sim.close()
        os.close(self.inflight)


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


@contextlib.asynccontextmanager
async def two_guests(tmp_path: Path, extra: str = "", a_dir: Path | None = None):
    daemon = Daemon(tmp_path, extra)
    await daemon.start()
    a, b = Guest(tmp_path, "a", a_dir), Guest(tmp_path, "b")
    try:
        await a.connect(daemon.sock)
        a.conn = await daemon.newest_guest()
        await b.connect(daemon.sock)
        b.conn = await daemon.newest_guest()
        yield daemon, a, b
    finally:
        await a.close()
        await b.close()
        await daemon.stop()


async def test_kill_9_of_one_worker_leaves_the_other_guest_running(tmp_path, freezable_dir):
    mnt = freezable_dir
    async with two_guests(tmp_path, a_dir=mnt) as (daemon, a, b):
        stop = asyncio.Event()
        tasks = [asyncio.create_task(a.verified_io(w, stop, verify=False)) for w in range(4)]
        tasks += [asyncio.create_task(b.verified_io(w, stop, verify=True)) for w in range(2)]
        try:
            await a.progress.beyond(10)
            await b.progress.beyond(10)
            for _ in range(KILLS):
                # Guest a's disk is frozen, so the writes its worker takes stay in flight:
                # the kill is sure to catch some, which the next worker must replay.
                subprocess.run(["fsfreeze", "-f", str(mnt)], check=True)
                try:
                    for _ in range(int(GUARD * 100)):
                        if a.taken_unanswered():
                            break
                        await asyncio.sleep(0.01)
                    assert a.taken_unanswered(), "no write of a's stuck in the worker"
                    victim = await daemon.worker_pid(a.conn)
                    os.kill(victim, signal.SIGKILL)
                finally:
                    # The worker finishes dying once its I/O thread leaves the write.
                    subprocess.run(["fsfreeze", "-u", str(mnt)], check=True)
                line = await daemon.wait_log(f"event=worker_crashed conn={a.conn} ")
                assert f"worker_pid={victim}" in line and "signal=SIGKILL" in line
                assert f"pid={os.getpid()}" in line
                # The other guest's verified I/O carries on while a has no backend.
                await b.progress.beyond(b.progress.count + 20)
                status = await daemon.status()
                assert f"conn.{a.conn}.peer" not in status
                assert status[f"conn.{b.conn}.worker"] == "ok"
                # a's VMM reconnects; its requests in flight are replayed, and it runs on.
                assert a.client is not None
                await a.client.close()
                before = a.progress.count
                await a.connect(daemon.sock)
                a.conn = await daemon.newest_guest()
                await a.progress.beyond(before + 10)
        finally:
            stop.set()
            done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True),
                                          GUARD)
        assert not [d for d in done if isinstance(d, BaseException)], done
        for guest in (a, b):
            assert guest.front is not None
            await guest.front.flush()
            # Every request answered exactly once, and the disk holds what was acked.
            assert guest.front.stray_responses == []
            assert all(not q.waiters for q in guest.front.queues)
            assert guest.image.read_bytes() == bytes(guest.model)
        assert a.replayed >= KILLS and b.replayed == 0


async def test_a_stopped_worker_stalls_neither_the_other_guest_nor_status(tmp_path):
    async with two_guests(tmp_path) as (daemon, a, b):
        stop = asyncio.Event()
        tasks = [asyncio.create_task(b.verified_io(w, stop, verify=True)) for w in range(2)]
        victim = await daemon.worker_pid(a.conn)
        os.kill(victim, signal.SIGSTOP)
        try:
            await b.progress.beyond(b.progress.count + 20)
            # `backendd status`, the command, answers and marks the stopped worker.
            out = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "backendd", "--socket", daemon.sock,
                                 "status"], capture_output=True, text=True, timeout=GUARD)
            assert out.returncode == 0, out.stderr
            lines = {line.split(":")[0]: line for line in out.stdout.splitlines()}
            assert "worker=unresponsive" in lines[f"conn {a.conn}"]
            assert "worker=" not in lines[f"conn {b.conn}"]
            assert "device 51712: type=blk state=CONNECTED" in out.stdout
        finally:
            os.kill(victim, signal.SIGCONT)
            stop.set()
            done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True),
                                          GUARD)
        assert not [d for d in done if isinstance(d, BaseException)], done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def http_get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    body = await asyncio.wait_for(reader.read(), GUARD)
    writer.close()
    return body.decode()


async def test_status_stats_metrics_and_ring_dump_gather_every_worker(tmp_path):
    port = free_port()
    async with two_guests(tmp_path, f'[metrics]\nlisten = "127.0.0.1:{port}"\n') as (
            daemon, a, b):
        assert a.front is not None and b.front is not None
        await a.front.write(0, b"a" * 4096)
        await b.front.write(0, b"b" * 4096)
        status = await daemon.status()
        # Both guests and the asking connection, each in a worker of its own.
        assert status["connections"] == "3"
        conns = {int(k.split(".")[1]) for k in status if k.endswith(".worker_pid")}
        assert {a.conn, b.conn} < conns and len(conns) == 3
        assert len({status[f"conn.{c}.worker_pid"] for c in conns}) == 3
        for c in (a.conn, b.conn):
            assert status[f"conn.{c}.dev.{DEVID}.stat.writes"] == "1"
        run = [sys.executable, "-m", "backendd", "--socket", daemon.sock]
        stats = await asyncio.to_thread(subprocess.run, [*run, "stats", "--prometheus"],
                                        capture_output=True, text=True, timeout=GUARD)
        assert stats.returncode == 0, stats.stderr
        for c in (a.conn, b.conn):
            assert (f'backendd_blk_writes_total{{guest="conn-{c}",devid="{DEVID}",'
                    f'type="blk"}} 1') in stats.stdout
        dump = await asyncio.to_thread(subprocess.run,
                                       [*run, "ring-dump", str(b.conn), str(DEVID)],
                                       capture_output=True, text=True, timeout=GUARD)
        assert dump.returncode == 0, dump.stderr
        assert f"of device {DEVID} (connection {b.conn})" in dump.stdout
        scrape = await http_get(port, "/metrics")
        assert scrape.startswith("HTTP/1.0 200")
        for c in (a.conn, b.conn):
            assert (f'backendd_blk_writes_total{{guest="conn-{c}",devid="{DEVID}",'
                    f'type="blk"}} 1') in scrape
        missing = await asyncio.to_thread(subprocess.run, [*run, "ring-dump", "99", "1"],
                                          capture_output=True, text=True, timeout=GUARD)
        assert missing.returncode == 1 and "no such connection" in missing.stderr


async def test_sigterm_reaches_every_worker(tmp_path):
    daemon = Daemon(tmp_path)
    await daemon.start()
    a, b = Guest(tmp_path, "a"), Guest(tmp_path, "b")
    try:
        await a.connect(daemon.sock)
        a.conn = await daemon.newest_guest()
        await b.connect(daemon.sock)
        b.conn = await daemon.newest_guest()
        pids = [await daemon.worker_pid(c) for c in (a.conn, b.conn)]
        assert await daemon.stop() == 0
        log = daemon.log()
        for conn, pid in zip((a.conn, b.conn), pids, strict=True):
            assert f"event=worker_exited conn={conn} worker_pid={pid}" in log
            assert not Path(f"/proc/{pid}").exists()
        assert "worker_crashed" not in log and "worker_failed" not in log
    finally:
        await a.close()
        await b.close()
        await daemon.stop()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to have capabilities to drop")
@pytest.mark.parametrize("user", ["", "nobody"])
async def test_workers_hold_no_capabilities(tmp_path, user):
    daemon = Daemon(tmp_path, f'worker_user = "{user}"\n')
    await daemon.start()
    try:
        client = await VmmClient.connect(daemon.sock)
        try:
            status = await client.daemon_status()
            # Read while the worker serves this very connection (the newest).
            newest = max(int(k.split(".")[1]) for k in status if k.endswith(".worker_pid"))
            worker = proc_status(int(status[f"conn.{newest}.worker_pid"]))
        finally:
            await client.close()
        assert daemon.proc is not None
        supervisor = proc_status(daemon.proc.pid)
        # The supervisor is root with capabilities; what its worker holds is its own doing.
        assert int(supervisor["CapEff"], 16) != 0
        for key in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
            assert int(worker[key], 16) == 0, (key, worker[key])
        assert worker["NoNewPrivs"] == "1"
        if os.uname().machine == "x86_64":
            assert worker["Seccomp"] == "2"  # a filter
        if user:
            uid = str(__import__("pwd").getpwnam(user).pw_uid)
            assert worker["Uid"].split() == [uid] * 4
    finally:
        await daemon.stop()


@pytest.mark.usefixtures("root")
async def test_a_worker_without_capabilities_serves_a_nic_under_the_units_capabilities(
        tmp_path):
    """Started as systemd starts the unit (its bounding set, which has no CAP_SETPCAP, and
    no new privileges), a worker still starts and holds no capability, and still serves a
    nic moved into a namespace: the supervisor made the tap and handed over its fds."""
    from test_net_harness import connect_and_ping, namespaces, uniq
    from test_net_unit_caps import unit_caps

    from backendd.guest.netfront import NetFront

    bounding = unit_caps("CapabilityBoundingSet")
    caps = ",".join(["-all", *("+" + n.removeprefix("CAP_").lower() for n in bounding)])
    daemon = Daemon(tmp_path, "", ("setpriv", "--bounding-set", caps, "--inh-caps", caps,
                                   "--ambient-caps", caps, "--no-new-privs", "--"))
    host, gns = uniq("wkh"), uniq("wkg")
    tap, gtap = uniq("wk") + "t", uniq("wk") + "g"
    with namespaces(host, gns):
        await daemon.start()
        guest = SimGuest(ram_size=48 * MiB, gnttab_frames=16)
        client = front = None
        try:
            client = await VmmClient.connect(daemon.sock)
            await guest.attach(client)
            _, keys = await client.add_device(0, "net", {"tap": tap, "netns": host,
                                                         "queues": "1"})
            worker = proc_status(await daemon.worker_pid(await daemon.newest_guest()))
            for key in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
                assert int(worker[key], 16) == 0, (key, worker[key])
            assert worker["NoNewPrivs"] == "1"
            front = NetFront(guest.ram, guest.gnttab, 0)
            await connect_and_ping(client, front, keys["mac"], host, tap, gns, gtap,
                                   "10.77.31")
            assert "event=tap_created" in daemon.log()
            await client.remove_device(0)
        finally:
            if front is not None:
                front.close()
            if client is not None:
                await client.close()
            guest.close()
            await daemon.stop()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to switch workers to nobody")
async def test_a_worker_as_nobody_serves_an_image_only_root_can_open(tmp_path):
    """The supervisor opens images for its workers: a worker running as nobody serves a
    disk whose file (in a directory only root may enter) it could not open itself."""
    images = tmp_path / "images"
    images.mkdir(mode=0o700)
    daemon = Daemon(tmp_path, f'worker_user = "nobody"\n[block]\nallowed_dirs = '
                              f'["{images}"]\n')
    await daemon.start()
    guest = Guest(images, "root-only")
    guest.image.chmod(0o600)
    try:
        await guest.connect(daemon.sock)
        assert guest.front is not None
        await guest.front.write(8, b"x" * 4096)
        assert await guest.front.read(8, 4096) == b"x" * 4096
        assert guest.image.read_bytes()[4096:8192] == b"x" * 4096
        line = await daemon.wait_log("event=image_opened")
        assert str(guest.image) in line
        pid = await daemon.worker_pid(await daemon.newest_guest())
        worker = proc_status(pid)
        assert worker["Uid"].split()[0] == str(__import__("pwd").getpwnam("nobody").pw_uid)
        # Not dumpable: its /proc files stay root's, out of reach of nobody's other
        # processes; and no core file may hold its guest's memory.
        assert os.stat(f"/proc/{pid}/mem").st_uid == 0
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert [line.split()[4:6] for line in limits.splitlines()
                if line.startswith("Max core file size")] == [["0", "0"]]
    finally:
        await guest.close()
        await daemon.stop()


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the filter lists x86_64 calls")
def test_the_workers_system_call_filter_denies_exec_and_allows_the_data_path():
    """In a forked child, as in a worker: privileges dropped, filter installed, then what
    the data path does works and running a program fails with EPERM."""
    from backendd.worker import drop_privileges, install_seccomp

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports one letter per check and never returns
        code = 1
        try:
            os.close(r)
            drop_privileges()
            assert install_seccomp()
            efd = os.eventfd(0)
            os.eventfd_write(efd, 1)
            with mmap.mmap(-1, 4096) as m:
                m[:1] = b"x"
            a, b = socket.socketpair()
            a.send(b"y")
            out = [b.recv(1)]
            t = threading.Thread(target=out.append, args=[b"t"])
            t.start()
            t.join()
            try:
                os.execv("/bin/true", ["true"])
            except PermissionError:
                out.append(b"e")
            os.write(w, b"".join(out))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        report = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert report == b"yte"


async def test_the_supervisor_refuses_to_open_a_fifo_for_a_worker(tmp_path):
    """A FIFO named as an image is opened by the supervisor without blocking and refused;
    the worker answers ADD_DEVICE with the error and goes on serving."""
    fifo = tmp_path / "not-an-image"
    os.mkfifo(fifo)
    daemon = Daemon(tmp_path)
    await daemon.start()
    try:
        client = await VmmClient.connect(daemon.sock)
        try:
            with pytest.raises(RequestFailed, match="neither a file nor a block device"):
                await asyncio.wait_for(client.add_device(DEVID, "blk", {"path": str(fifo)}),
                                       GUARD)
            assert (await client.daemon_status())["connections"] == "1"
        finally:
            await client.close()
        assert "event=broker_refused" in daemon.log()
    finally:
        await daemon.stop()


async def test_a_guest_name_is_held_by_one_worker_and_freed_by_its_crash(tmp_path):
    """HELLO's guest name is unique across workers (the supervisor claims it), and a
    worker killed with SIGKILL frees it for its VMM's reconnection."""
    daemon = Daemon(tmp_path)
    await daemon.start()
    try:
        first = await VmmClient.connect(daemon.sock, name="vm-1")
        try:
            status = await daemon.status()
            conn = next(int(k.split(".")[1]) for k, v in status.items()
                        if k.endswith(".guest") and v == "vm-1")
            with pytest.raises(RequestFailed) as exc:
                await VmmClient.connect(daemon.sock, name="vm-1")
            assert exc.value.code == errno.EEXIST
            os.kill(int(status[f"conn.{conn}.worker_pid"]), signal.SIGKILL)
            # Reconnecting at once, before or after the supervisor hears of the exit.
            again = await VmmClient.connect(daemon.sock, name="vm-1")
            await again.close()
        finally:
            with contextlib.suppress(ConnectionLost, RequestFailed):
                await first.close()
    finally:
        await daemon.stop()


def test_process_model_and_worker_user_are_checked():
    from backendd.config import ConfigFileError, parse_config

    config = parse_config('[daemon]\nprocess_model = "per-connection"\nworker_user = "nobody"\n')
    assert config.daemon.process_model == "per-connection"
    assert parse_config("").daemon.process_model == "single"
    with pytest.raises(ConfigFileError, match="process_model"):
        parse_config('[daemon]\nprocess_model = "per-guest"\n')
    with pytest.raises(ConfigFileError, match="worker_user: no user"):
        parse_config('[daemon]\nworker_user = "no-such-user-here"\n')
    config = parse_config("[daemon]\nworker_max_open_files = 1024\n"
                          "worker_max_memory_mib = 512\n")
    assert (config.daemon.worker_max_open_files, config.daemon.worker_max_memory_mib) == (
        1024, 512)
    assert parse_config("").daemon.worker_max_memory_mib == 0
    for bad, match in [("worker_max_open_files = 8", "outside 32"),
                       ("worker_max_open_files = \"many\"", "expected an integer"),
                       ("worker_max_memory_mib = -1", "outside 0"),
                       ("worker_max_memory_mib = 1.5", "expected an integer"),
                       ("worker_max_fds = 10", "unknown key")]:
        with pytest.raises(ConfigFileError, match=match):
            parse_config(f"[daemon]\n{bad}\n")


def test_socket_activation_per_connection(tmp_path):
    """Handed the listening socket by systemd (LISTEN_FDS), the supervisor serves it
    through workers; neither the zygote nor a worker holds the listening socket."""
    from test_daemon_process import cli, start_activated

    daemon = start_activated(tmp_path, '[daemon]\nprocess_model = "per-connection"\n')
    try:
        daemon.datagrams(until=b"READY=1")
        status = cli("status", path=daemon.path)
        assert status.returncode == 0, status.stderr
        sup = daemon.proc.pid
        listener = os.readlink(f"/proc/{sup}/fd/3")
        assert listener.startswith("socket:")
        children = Path(f"/proc/{sup}/task/{sup}/children").read_text().split()
        assert len(children) == 1  # the zygote; the status worker is its child, and gone
        zygote = int(children[0])
        held = {os.readlink(f"/proc/{zygote}/fd/{fd}")
                for fd in os.listdir(f"/proc/{zygote}/fd")}
        assert listener not in held
        daemon.proc.terminate()
        assert daemon.proc.wait(timeout=GUARD) == 0
        daemon.datagrams(until=b"STOPPING=1")
    finally:
        daemon.close()


def proc_limits(pid: int) -> dict[str, tuple[str, str]]:
    """/proc/PID/limits: name -> (soft, hard)."""
    out = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        name, soft, hard = line[:26].strip(), line[26:47].strip(), line[47:68].strip()
        out[name] = (soft, hard)
    return out


async def test_each_worker_runs_under_the_configured_limits(tmp_path):
    extra = "worker_max_open_files = 300\nworker_max_memory_mib = 2048\n"
    async with two_guests(tmp_path, extra) as (daemon, a, b):
        for guest in (a, b):
            limits = proc_limits(await daemon.worker_pid(guest.conn))
            assert limits["Max open files"] == ("300", "300")
            assert limits["Max data size"] == (str(2048 * MiB), str(2048 * MiB))
            assert limits["Max core file size"] == ("0", "0")
            # Guest RAM is mapped into the worker: its address space stays unlimited.
            assert limits["Max address space"] == ("unlimited", "unlimited")
        # Both workers still do I/O under them.
        for guest in (a, b):
            assert guest.front is not None
            await guest.front.write(8, b"x" * 4096)
            assert await guest.front.read(8, 4096) == b"x" * 4096
        # The supervisor itself keeps its own limits.
        assert daemon.proc is not None
        assert proc_limits(daemon.proc.pid)["Max open files"] != ("300", "300")


async def test_a_worker_at_its_open_file_limit_fails_only_its_own_guests_request(tmp_path):
    """A worker needs about 30 fds for itself and one more per disk: with a limit of 48,
    guest a's 32 disks cannot all be opened. The disk that does not fit gets an error reply
    that names the limit; a's first disk and the other guest's worker carry on."""
    async with two_guests(tmp_path, "worker_max_open_files = 48\n") as (daemon, a, b):
        assert a.client is not None and a.front is not None
        stop = asyncio.Event()
        tasks = [asyncio.create_task(b.verified_io(w, stop, verify=True)) for w in range(2)]
        try:
            await b.progress.beyond(5)
            added = 0
            with pytest.raises(RequestFailed) as failed:
                for i in range(1, 32):
                    await a.client.add_device(DEVID + 16 * i, "blk", {"path": str(a.image)})
                    added += 1
            # An error reply for that request (ADD_DEVICE's bad-path errno), saying why.
            assert failed.value.code == errno.EINVAL, failed.value
            assert "open-file limit is reached" in failed.value.message
            assert 0 < added < 31
            # a's worker is still there and its first disk still serves a.
            await a.front.write(16, b"a" * 4096)
            assert await a.front.read(16, 4096) == b"a" * 4096
            status = await daemon.status()
            assert status[f"conn.{a.conn}.worker"] == "ok"
            assert status[f"conn.{a.conn}.devices"] == str(1 + added)
            # b's verified I/O ran on throughout.
            await b.progress.beyond(b.progress.count + 10)
        finally:
            stop.set()
            done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True),
                                          GUARD)
        assert not [d for d in done if isinstance(d, BaseException)], done
        log = daemon.log()
        assert "worker_crashed" not in log and "worker_failed" not in log


async def wait_taken(guest: Guest, count: int) -> None:
    assert guest.client is not None
    for _ in range(int(GUARD * 100)):
        if int((await guest.client.stats(DEVID))[f"{DEVID}.requests"]) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the daemon never took {count} requests")


async def test_sigterm_drains_every_workers_requests_in_flight(tmp_path, freezable_dir):
    """Two guests' writes are taken by their workers and held in flight by a frozen
    filesystem when the supervisor gets SIGTERM. Each worker drains its guest as the single
    process does (protocol.md, "Stopping: SIGTERM and SIGINT"): once the filesystem thaws
    every taken write is answered, by a worker that then exits, and the daemon exits 0.
    Nothing answers after the daemon is gone, so a write still unanswered then was lost."""
    mnt = freezable_dir
    writes = 6
    daemon = Daemon(tmp_path)
    await daemon.start()
    a, b = Guest(mnt, "a"), Guest(mnt, "b")
    tasks: list[asyncio.Task[None]] = []
    try:
        for guest in (a, b):
            await guest.connect(daemon.sock)
            guest.conn = await daemon.newest_guest()
        pids = [await daemon.worker_pid(g.conn) for g in (a, b)]
        subprocess.run(["fsfreeze", "-f", str(mnt)], check=True)
        data = {g.conn: [bytes([g.conn, i + 1]) * 2048 for i in range(writes)]
                for g in (a, b)}
        for g in (a, b):
            assert g.front is not None
            tasks += [asyncio.create_task(g.front.write(i * 64, data[g.conn][i]))
                      for i in range(writes)]
        for g in (a, b):
            await wait_taken(g, writes)  # all taken, their I/O stuck
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        for g in (a, b):
            await daemon.wait_log(f"event=worker_stopping conn={g.conn} ")
        assert not any(t.done() for t in tasks)  # still in flight while draining
        subprocess.run(["fsfreeze", "-u", str(mnt)], check=True)
        assert await asyncio.wait_for(daemon.proc.wait(), 2 * GUARD) == 0
        # The daemon is gone: every write was answered before its worker exited.
        await asyncio.wait_for(asyncio.gather(*tasks), GUARD)
        for g in (a, b):
            assert g.front is not None
            assert g.front.stray_responses == []
            assert all(not q.waiters for q in g.front.queues)
            image = g.image.read_bytes()
            for i in range(writes):
                assert image[i * 64 * 512:i * 64 * 512 + 4096] == data[g.conn][i]
        log = daemon.log()
        for g, pid in zip((a, b), pids, strict=True):
            assert f"event=worker_exited conn={g.conn} worker_pid={pid}" in log
        for bad in ("worker_crashed", "worker_failed", "worker_stop_timeout"):
            assert bad not in log
    finally:
        subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True)
        for t in tasks:
            t.cancel()
        await a.close()
        await b.close()
        await daemon.stop()
