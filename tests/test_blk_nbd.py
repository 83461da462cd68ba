"""Disks on NBD exports, through the real daemon, against real NBD servers: qemu-nbd
serving qcow2 and raw images, and nbdkit's memory plugin. Faults are real too: a server
killed and started again under load, one that stays away, one stopped (SIGSTOP) that
holds its socket open and never answers."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_blk_integration import connect_front

from backendd.config import BlockSection, Config, ConfigFileError, DaemonSection, parse_config
from backendd.devices.blk.nbd import NbdTarget, nbd_allowed, parse_nbd_uri
from backendd.errors import ConfigError
from backendd.guest.blkfront import BlkFront, BlkIOError
from backendd.guest.machine import SimGuest
from backendd.guest.vmm import RequestFailed, VmmClient
from backendd.log import EventLog
from backendd.metrics import render_status
from backendd.server import Server
from bench.nbd import wait_exit
from rings.consts import BlkifOp, BlkifStatus, VDiskInfo, XenbusState

MiB = 1 << 20


# --- servers ---------------------------------------------------------------------------

def server_env() -> dict[str, str]:
    """The servers' environment: ours without a preloaded sanitizer runtime (the tests
    run again in a sanitized process; the servers are not what they check)."""
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


@dataclass
class NbdServer:
    """A server we started (it daemonised once listening); stopped by its pid."""

    argv: list[str]
    pidfile: Path
    socket: Path
    pid: int = 0

    def start(self) -> NbdServer:
        self.pidfile.unlink(missing_ok=True)
        # Both servers fork into the background only once they listen: when this
        # returns, the socket accepts connections.
        subprocess.run(self.argv, check=True, timeout=60, env=server_env())
        self.pid = int(self.pidfile.read_text())
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if not self.pid:
            return
        pid, self.pid = self.pid, 0
        try:
            if sig != signal.SIGKILL:  # a stopped process takes SIGKILL as it is
                os.kill(pid, signal.SIGCONT)
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        wait_exit(pid)  # not our child (it daemonised)

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        wait_stopped([self.pid])

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if int(_stat(int(entry))[2]) == pgid:
                    members.append(int(entry))
    return members


def wait_stopped(pids: list[int]) -> None:
    """SIGSTOP is delivered asynchronously: a server may still answer what reaches it a
    moment after kill() returned. Wait until every thread of each process has stopped
    (the kernel has no event to wait on for a process that is not our child)."""
    for pid in pids:
        for _ in range(10000):
            states = []
            with contextlib.suppress(OSError):
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(OSError), \
                            open(f"/proc/{pid}/task/{tid}/stat") as f:
                        states.append(f.read().rsplit(")", 1)[1].split()[0])
            if all(state in ("T", "t", "Z", "X") for state in states):
                break
            time.sleep(0.001)
        else:
            raise AssertionError(f"process {pid} did not stop")


async def in_flight_reaches(client: VmmClient, devid: int, n: int) -> None:
    """Each look is a round trip to the daemon, which sends meanwhile."""
    for _ in range(10000):
        if stats_of(await client.stats(devid), devid)["nbd_in_flight"] >= n:
            return
    raise AssertionError(f"never {n} requests in flight")


async def connections_reach(client: VmmClient, devid: int, n: int) -> None:
    """The extra connections of multi-conn finish their handshakes in the background."""
    for _ in range(10000):
        if stats_of(await client.stats(devid), devid)["nbd_connections"] == n:
            return
    raise AssertionError(f"never {n} connections")


def qemu_nbd(tmp: Path, image: Path, fmt: str, *, export: str = "disk",
             readonly: bool = False, name: str = "qemu") -> NbdServer:
    sock, pidfile = tmp / f"{name}.sock", tmp / f"{name}.pid"
    argv = ["qemu-nbd", "--fork", "--persistent", "--shared=8", f"--pid-file={pidfile}",
            f"--socket={sock}", f"--export-name={export}", f"--format={fmt}",
            "--discard=unmap", "--cache=writeback", str(image)]
    if readonly:
        argv.insert(1, "--read-only")
    return NbdServer(argv, pidfile, sock)


class Nbdkit(NbdServer):
    """nbdkit with a --run command, our child, in a process group of its own (nbdkit,
    its server process, the command): the command says "ready" once the server
    listens, and exits, and nbdkit with it, when we close its stdin. Faults are
    signals to the whole group."""

    proc: subprocess.Popen | None = None

    def start(self) -> NbdServer:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, start_new_session=True,
                                     env=server_env())
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"ready\n"
        self.pid = self.proc.pid
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        self.pid = 0
        if sig != signal.SIGKILL:  # a stopped process takes SIGKILL as it is
            os.killpg(proc.pid, signal.SIGCONT)
        if sig != signal.SIGTERM:
            os.killpg(proc.pid, sig)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()  # the --run command ends, then nbdkit
        proc.wait(30)
        proc.stdout.close()

    def pause(self) -> None:
        os.killpg(self.pid, signal.SIGSTOP)
        wait_stopped(group_members(self.pid))

    def resume(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)


def nbdkit_memory(tmp: Path, size: str, *, readonly: bool = False,
                  name: str = "nbdkit", tls_psk: Path | None = None,
                  tls_certificates: Path | None = None, tcp_port: int = 0,
                  multi_conn: bool = True, filters: tuple[str, ...] | list[str] = (),
                  params: tuple[str, ...] | list[str] = ()) -> NbdServer:
    sock = tmp / f"{name}.sock"
    where = ["-i", "127.0.0.1", "-p", str(tcp_port)] if tcp_port else ["-U", str(sock)]
    argv = ["nbdkit", *where, "--run", "echo ready; read _", "memory", size]
    if readonly:
        argv.insert(1, "--readonly")
    if tls_psk is not None:
        argv[1:1] = ["--tls=require", f"--tls-psk={tls_psk}"]
    argv[1:1] = [f"--filter={f}" for f in filters]
    argv += params
    if not multi_conn:  # nbdkit's memory plugin can multi-conn; the filter says not
        argv[1:1] = ["--filter=multi-conn"]
        argv.append("multi-conn-mode=disable")
    if tls_certificates is not None:  # and the client must show one of the same CA
        argv[1:1] = ["--tls=require", f"--tls-certificates={tls_certificates}",
                     "--tls-verify-peer"]
    return Nbdkit(argv, tmp / f"{name}.pid", sock)


@pytest.fixture
def servers() -> Iterator[list[NbdServer]]:
    started: list[NbdServer] = []
    yield started
    for s in started:
        s.stop()


def uri(server: NbdServer, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={server.socket}"


# --- the daemon ------------------------------------------------------------------------

@dataclass
class Vm:
    client: VmmClient
    guest: SimGuest
    server: Server
    log: io.StringIO


async def start_vm(tmp_path: Path, name: str = "backendd",
                   **block) -> tuple[Server, VmmClient, SimGuest, io.StringIO]:
    block.setdefault("allowed_nbd", [str(tmp_path)])
    config = Config(daemon=DaemonSection(socket=str(tmp_path / f"{name}.sock"),
                                         log_level="debug"),
                    block=BlockSection(**block))
    log = io.StringIO()
    server = Server(config, EventLog("debug", log))
    await server.start()
    client = await VmmClient.connect(config.daemon.socket)
    guest = SimGuest(ram_size=48 * MiB, gnttab_frames=8)
    await guest.attach(client)
    return server, client, guest, log


@pytest.fixture
def vm_factory(tmp_path: Path):
    made: list[Vm] = []

    async def make(**block) -> Vm:
        server, client, guest, log = await start_vm(tmp_path, f"backendd-{len(made)}",
                                                    **block)
        vm = Vm(client, guest, server, log)
        made.append(vm)
        return vm

    yield make
    for vm in made:
        vm.guest.close()


@pytest.fixture
async def vm(vm_factory) -> AsyncIterator[Vm]:
    vm = await vm_factory()
    yield vm
    await vm.client.close()
    await vm.server.close()


async def closing(vm: Vm) -> None:
    await vm.client.close()
    await vm.server.close()


async def attach(vm: Vm, devid: int, path: str, *, queues: int = 1, persistent: bool = False,
                 **config: str) -> tuple[BlkFront, dict[str, str]]:
    _, keys = await vm.client.add_device(devid, "blk", {"path": path, **config})
    front = BlkFront(vm.guest.ram, vm.guest.gnttab, devid, queues=queues, ring_order=1,
                     backend_keys=keys, first_port=devid * 10, persistent=persistent)
    state, keys = await connect_front(vm.client, front, devid)
    assert state == XenbusState.CONNECTED
    return front, keys


async def detach(vm: Vm, devid: int, front: BlkFront) -> None:
    await vm.client.frontend_state(devid, XenbusState.CLOSING, {})
    await vm.client.frontend_state(devid, XenbusState.CLOSED, {})
    front.close()
    assert front.refused_revokes == [] and front.stray_responses == []
    await vm.client.remove_device(devid)


class Progress:
    """Requests done so far, and a way to wait for a count."""

    def __init__(self) -> None:
        self.done = 0
        self._waiters: list[tuple[int, asyncio.Future]] = []

    def tick(self) -> None:
        self.done += 1
        for n, fut in self._waiters:
            if self.done >= n and not fut.done():
                fut.set_result(None)

    async def reach(self, n: int) -> None:
        if self.done < n:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append((n, fut))
            await fut


async def workload(front: BlkFront, model: bytearray, *, workers: int = 8, rounds: int = 30,
                   seed: int = 0, progress: Progress | None = None) -> int:
    """Random reads and writes, each worker in its own slice; every read checked against
    the model. Returns the number of requests, all answered OKAY."""
    progress = progress or Progress()
    span = len(model) // workers

    async def worker(w: int) -> None:
        rng = random.Random(seed * 100 + w)
        base = w * span
        for _ in range(rounds):
            n = rng.choice([512, 4096, 8192, 65536, 256 * 1024])
            off = base + rng.randrange(0, span - n + 1, 512)
            if rng.random() < 0.5:
                data = rng.randbytes(n)
                await front.write(off // 512, data)
                model[off:off + n] = data
            else:
                assert await front.read(off // 512, n) == model[off:off + n]
            progress.tick()

    await asyncio.gather(*(worker(w) for w in range(workers)))
    return progress.done


def stats_of(stats: dict[str, str], devid: int) -> dict[str, int]:
    prefix = f"{devid}."
    return {k[len(prefix):]: int(v) for k, v in stats.items() if k.startswith(prefix)}


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60)


# --- URIs and policy -------------------------------------------------------------------

def test_uri_forms():
    assert parse_nbd_uri("nbd://10.0.0.1/vol") == NbdTarget(
        "nbd://10.0.0.1/vol", "vol", False, host="10.0.0.1", port=10809)
    t = parse_nbd_uri("nbds://[fd00::1]:10900/a%20b")
    assert (t.host, t.port, t.export, t.tls, t.server) == \
        ("fd00::1", 10900, "a b", True, "[fd00::1]:10900")
    t = parse_nbd_uri("nbd+unix:///exp?socket=/run/nbd/../nbd/s.sock")
    assert (t.socket, t.export, t.tls, t.server) == \
        ("/run/nbd/s.sock", "exp", False, "unix:/run/nbd/s.sock")
    assert parse_nbd_uri("nbds+unix://?socket=/s").tls
    assert parse_nbd_uri("nbd://host").export == ""
    for bad in ("nbd+unix:///x", "nbd+unix:///x?socket=rel.sock",
                "nbd+unix://host/x?socket=/s", "nbd:///x", "nbd://h/x?socket=/s",
                "nbd://h/x?tls-psk-file=/etc/shadow", "nbd://h/x?tls-certificates=/",
                "nbd+vsock://1/x", "nbd://u:p@h/x", "nbd://h:99999/x", "nbd://h/x#f",
                "nbd+unix:///x?socket=/a&socket=/b"):
        with pytest.raises(ConfigError):
            parse_nbd_uri(bad)


def test_policy(tmp_path):
    (tmp_path / "nbd").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "nbd" / "escape").symlink_to(tmp_path / "other")
    allowed = [str(tmp_path / "nbd"), "10.0.0.1:10809", "[fd00::1]:10900", "Store:10809"]
    ok = [f"nbd+unix:///x?socket={tmp_path}/nbd/s.sock", "nbd://10.0.0.1/x",
          "nbds://10.0.0.1:10809/y", "nbd://[fd00::1]:10900/", "nbd://store/x"]
    refused = [f"nbd+unix:///x?socket={tmp_path}/other/s.sock",
               f"nbd+unix:///x?socket={tmp_path}/nbd/../other/s.sock",
               f"nbd+unix:///x?socket={tmp_path}/nbd/escape/s.sock",
               "nbd://10.0.0.1:10810/x", "nbd://10.0.0.2/x", "nbd://[fd00::1]/x"]
    for u in ok:
        assert nbd_allowed(parse_nbd_uri(u), allowed), u
    for u in refused:
        assert not nbd_allowed(parse_nbd_uri(u), allowed), u
    assert not nbd_allowed(parse_nbd_uri(ok[0]), [])  # empty: no NBD disks


def test_config_keys():
    config = parse_config('[block]\nallowed_nbd = ["/run/nbd", "10.0.0.1:10809"]\n'
                          "nbd_reconnect_timeout_ms = 5000\nnbd_io_timeout_ms = 2000\n")
    assert config.block.allowed_nbd == ["/run/nbd", "10.0.0.1:10809"]
    assert config.block.nbd_reconnect_timeout_ms == 5000
    assert config.block.nbd_io_timeout_ms == 2000
    with pytest.raises(ConfigFileError, match="nbd_io_timeout_ms"):
        parse_config("[block]\nnbd_io_timeout_ms = 0\n")
    with pytest.raises(ConfigFileError, match="nbd_tls_psk_file"):
        parse_config('[block]\nnbd_tls_psk_file = "keys.psk"\n')


async def test_servers_outside_the_policy_are_refused(vm_factory, tmp_path, servers):
    other = tmp_path / "elsewhere"
    other.mkdir()
    srv = nbdkit_memory(other, "1M")
    servers.append(srv.start())
    vm = await vm_factory(allowed_nbd=[str(tmp_path / "nbd-only")])
    try:
        with pytest.raises(RequestFailed, match="allowed_nbd"):
            await vm.client.add_device(1, "blk", {"path": uri(srv)})
        with pytest.raises(RequestFailed, match="query parameter"):
            await vm.client.add_device(1, "blk", {
                "path": f"nbd://127.0.0.1/x?tls-psk-file={tmp_path}/k"})
        # allowed_dirs does not reach NBD disks, nor allowed_nbd files.
        vm2 = await vm_factory(allowed_dirs=[str(tmp_path / "imgs")],
                               allowed_nbd=[str(other)])
        front, _ = await attach(vm2, 2, uri(srv))
        await front.write(0, b"a" * 4096)
        assert await front.read(0, 4096) == b"a" * 4096
        await detach(vm2, 2, front)
        await closing(vm2)
    finally:
        await closing(vm)


async def test_an_absent_server_is_a_config_error(vm, tmp_path):
    with pytest.raises(RequestFailed, match="cannot connect"):
        await vm.client.add_device(1, "blk", {"path": f"nbd+unix:///?socket={tmp_path}/no"})
    # The daemon and the connection go on.
    assert (await vm.client.stats()) == {}


# --- verified I/O against real servers ---------------------------------------------------

async def test_qcow2_through_qemu_nbd(vm, tmp_path, servers):
    image = tmp_path / "disk.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(image), "16M").returncode == 0
    srv = qemu_nbd(tmp_path, image, "qcow2")
    servers.append(srv.start())
    front, keys = await attach(vm, 1, uri(srv, "disk"), queues=2)
    assert keys["sectors"] == str(16 * MiB // 512)
    assert keys["feature-flush-cache"] == "1" and keys["feature-barrier"] == "1"
    assert keys["feature-discard"] == "1"
    assert int(keys["info"]) & VDiskInfo.READONLY == 0

    model = bytearray(16 * MiB)
    await workload(front, model, workers=8, rounds=30)
    await front.flush()
    # Discard of whole qcow2 clusters: they are deallocated and read back as zeros
    # (NBD's trim promises no contents; qcow2 with discard=unmap gives zeros).
    await front.discard(65536 // 512, 2 * MiB // 512)
    model[65536:65536 + 2 * MiB] = bytes(2 * MiB)
    for off in range(0, 3 * MiB, MiB):
        assert await front.read(off // 512, MiB) == model[off:off + MiB]
    # A flush that carries data (a FUA write in the guest's block layer): FUA on the
    # write when the server has it.
    for op in (BlkifOp.FLUSH_DISKCACHE, BlkifOp.WRITE_BARRIER):
        rid = front.new_id()
        gfn = front.ram.alloc_page()
        front.ram.write(gfn * 4096, bytes([op]) * 4096)
        gref = front.gnttab.grant_access(gfn, readonly=True)
        raw = front.codecs.request.pack(op, 1, 1, rid, 64 + 8 * op, gref, 0, 7, *[0] * 30)
        assert await front.send_raw(raw, rid) == (op, BlkifStatus.OKAY)
        assert front.gnttab.end_access(gref)
        model[(64 + 8 * op) * 512:(72 + 8 * op) * 512] = bytes([op]) * 4096
    assert await front.read(64, 8192 + 4096) == model[64 * 512:88 * 512]
    stats = stats_of(await vm.client.stats(1), 1)
    assert stats["errors"] == 0 and stats["flushes"] == 3 and stats["discards"] == 1
    assert stats["nbd_degraded"] == 0 and stats["nbd_connection_losses"] == 0
    await detach(vm, 1, front)

    srv.stop()
    check = qemu_img("check", "-f", "qcow2", str(image))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No errors were found" in check.stdout
    raw = tmp_path / "guest-view.raw"
    raw.write_bytes(model)
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(image), str(raw))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


@pytest.mark.parametrize("dataplane, persistent", [("auto", True), ("python", False),
                                                   ("python", True)],
                         ids=["compiled", "python", "python-persistent-grants"])
async def test_nbdkit_memory(vm, tmp_path, servers, dataplane, persistent):
    srv = nbdkit_memory(tmp_path, "8M")
    servers.append(srv.start())
    front, keys = await attach(vm, 1, uri(srv), queues=4, persistent=persistent,
                               dataplane=dataplane)
    # The compiled kernel serves NBD disks, and offers no persistent grants; the Python
    # data plane does, when asked for it.
    compiled = dataplane == "auto"
    assert keys["feature-persistent"] == ("0" if compiled else "1")
    assert front.use_persistent == (persistent and not compiled)
    assert stats_of(await vm.client.stats(1), 1)["compiled"] == int(compiled)
    assert keys["sectors"] == str(8 * MiB // 512)
    model = bytearray(8 * MiB)
    await workload(front, model, workers=8, rounds=40, seed=1)
    # Indirect requests of 1 MiB, many segments: one NBD command each way.
    data = random.Random(5).randbytes(MiB)
    await front.write(2 * MiB // 512, data, indirect=True)
    model[2 * MiB:3 * MiB] = data
    assert await front.read(0, 8 * MiB // 8) == model[:MiB]
    assert await front.read(2 * MiB // 512, MiB, indirect=True) == data
    await front.flush()
    await front.discard(0, 8 * MiB // 512)
    assert await front.read(0, MiB) == bytes(MiB)
    stats = stats_of(await vm.client.stats(1), 1)
    assert stats["errors"] == 0 and stats["discards"] == 1
    await detach(vm, 1, front)


async def test_a_read_from_c_that_the_server_fails_is_an_error_for_it_alone(vm, tmp_path,
                                                                          servers):
    """A plain read issued from C (nbd_kernel.c) that the server answers with an error:
    that request gets ERROR, the connection stays, the next read is served."""
    trigger = tmp_path / "fail-reads"
    srv = nbdkit_memory(tmp_path, "8M", filters=["error"],
                        params=["error-pread=EIO", "error-pread-rate=100%",
                                f"error-pread-file={trigger}"])
    servers.append(srv.start())
    front, _ = await attach(vm, 1, uri(srv))
    data = random.Random(21).randbytes(512)
    await front.write(64, data)
    assert await front.read(64, 512) == data
    before = stats_of(await vm.client.stats(1), 1)["nbd_issued_in_c"]
    trigger.touch()
    with pytest.raises(BlkIOError) as info:
        await front.read(64, 512)
    assert info.value.status == BlkifStatus.ERROR
    assert stats_of(await vm.client.stats(1), 1)["nbd_issued_in_c"] == before + 1
    trigger.unlink()
    assert await front.read(64, 512) == data
    stats = stats_of(await vm.client.stats(1), 1)
    assert stats["errors"] == 1 and stats["nbd_connection_losses"] == 0
    assert stats["nbd_in_flight"] == 0
    await detach(vm, 1, front)


def fionread(fd: int) -> int:
    import fcntl
    import termios
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


async def test_one_wake_up_reads_every_reply_the_socket_holds(vm, tmp_path, servers):
    """While only C has commands out, a readable socket is one C call (nf_wake): eight
    reads whose replies all wait in the socket are read, answered and signalled to the
    guest in one wake-up, not one per reply."""
    image = tmp_path / "disk.raw"
    content = random.Random(12).randbytes(2 * MiB)
    image.write_bytes(content)
    srv = qemu_nbd(tmp_path, image, "raw")
    servers.append(srv.start())
    front, _ = await attach(vm, 1, uri(srv, "disk"))
    assert await front.read(0, 4096) == content[:4096]
    (conn,) = vm.server.connections.values()  # the daemon runs on this loop
    device = conn.session.devices[1].device
    disk, channel = device.image, device.queues[0].channel
    before = stats_of(await vm.client.stats(1), 1)
    signalled = channel.notifies + channel.notifies_saturated
    srv.pause()  # the server answers nothing until all eight are sent
    # One sector each: pages in one run, issued from C (nbd_kernel.c).
    reads = [asyncio.ensure_future(front.read(64 * k, 512)) for k in range(8)]
    await in_flight_reaches(vm.client, 1, 8)
    srv.resume()
    # The event loop (the daemon's too) is held here, without an await, until the eight
    # replies (structured: a 20-byte header, the offset, the data) are in the socket.
    fd, want = disk._conns[0].fd, 8 * (20 + 8 + 512)
    deadline = time.monotonic() + 60
    while fionread(fd) < want:
        assert time.monotonic() < deadline, f"{fionread(fd)} of {want} bytes arrived"
        time.sleep(0.001)
    assert await asyncio.gather(*reads) == [content[32768 * k:32768 * k + 512]
                                            for k in range(8)]
    after = stats_of(await vm.client.stats(1), 1)
    assert after["nbd_wakes_in_c"] - before["nbd_wakes_in_c"] == 1
    assert after["nbd_replies_in_c"] - before["nbd_replies_in_c"] == 8
    assert after["reads"] - before["reads"] == 8 and after["errors"] == 0
    assert channel.notifies + channel.notifies_saturated == signalled + 1  # once
    await detach(vm, 1, front)


async def taken_by_the_wake_up(vm: Vm, front: BlkFront, srv: NbdServer, sector: int,
                               second: Callable[[], Awaitable[Any]]) -> tuple[bytes, Any, int]:
    """With the server paused, read one sector at `sector` from ring 0 (issued from C),
    then post `second()` on ring 0 without a kick (as a guest whose backend left
    req_event behind, being busy, need not kick): the daemon sees it only when it serves
    the ring again, after the read's reply, in the same C call (nf_wake). Returns the
    read's data, the second request's result (or exception), and the flags nf_wake left
    for Python on ring 0."""
    (conn,) = vm.server.connections.values()  # the daemon runs on this loop
    q = conn.session.devices[1].device.queues[0]
    seen: list[int] = []
    woke = q.nbd_woke

    def spy() -> int:  # what nf_wake left to Python, then the real thing
        seen.append(q._ring.flags)
        return woke()

    q.nbd_woke = spy
    ring = front.queues[0]
    try:
        srv.pause()
        first = asyncio.ensure_future(front.read(sector, 512, queue=0))
        await in_flight_reaches(vm.client, 1, 1)
        prod = ring.front.req_prod_pvt
        ring.port.send = lambda: None
        task = asyncio.ensure_future(second())
        while ring.front.req_prod_pvt == prod:  # posted
            await asyncio.sleep(0)
        del ring.port.send
        srv.resume()
        data = await first
        (result,) = await asyncio.gather(task, return_exceptions=True)
    finally:
        del q.nbd_woke
    return data, result, seen[0]


@pytest.mark.parametrize("what", ["scattered", "flush", "refused"])
async def test_a_request_the_wake_up_takes_that_c_cannot_issue(vm, tmp_path, servers, what):
    """A request taken by the wake-up in C that C cannot issue itself is left to Python:
    a read into scattered pages and a flush are issued the Python way (NF_R_REST), a
    request refused is logged and counted by Python (NF_R_OUT)."""
    from backendd.dataplane.blknbd import NF_R_OUT, NF_R_REST

    image = tmp_path / "disk.raw"
    content = random.Random(13).randbytes(2 * MiB)
    image.write_bytes(content)
    srv = qemu_nbd(tmp_path, image, "raw")
    servers.append(srv.start())
    front, _ = await attach(vm, 1, uri(srv, "disk"))
    second = {"scattered": lambda: front.read(64, 3 * 4096, queue=0),
              "flush": lambda: front.flush(queue=0),
              "refused": lambda: front.read(4 * MiB // 512, 4096, queue=0)}[what]
    data, result, flags = await taken_by_the_wake_up(vm, front, srv, 8, second)
    assert data == content[4096:4608]
    if what == "refused":  # beyond the export: the kernel refuses it
        assert isinstance(result, BlkIOError)
    elif what == "scattered":
        assert result == content[64 * 512:64 * 512 + 3 * 4096]
    else:
        assert result is None
    assert flags == (NF_R_OUT if what == "refused" else NF_R_REST)
    stats = stats_of(await vm.client.stats(1), 1)
    assert stats["invalid"] == (what == "refused") and stats["errors"] == 0
    assert stats["nbd_in_flight"] == 0 and stats["nbd_wakes_in_c"] > 0
    assert await front.read(8, 512) == content[4096:4608]
    await detach(vm, 1, front)


async def compiled_nbd_scenario(tmp_path: Path) -> None:
    """Verified I/O of every kind through the compiled kernel on an NBD disk: direct and
    indirect, guest pages in one run and scattered (the bounce buffer), flush, discard,
    refused requests; also run with the kernel under AddressSanitizer (below)."""
    srv = nbdkit_memory(tmp_path, "8M", name="asan").start()
    server, client, guest, _ = await start_vm(tmp_path)
    vm = Vm(client, guest, server, io.StringIO())
    try:
        front, _ = await attach(vm, 1, uri(srv), queues=2)
        assert stats_of(await client.stats(1), 1)["compiled"] == 1
        model = bytearray(8 * MiB)
        await workload(front, model, workers=8, rounds=25, seed=15)
        data = random.Random(16).randbytes(MiB)
        await front.write(MiB // 512, data, indirect=True)
        model[MiB:2 * MiB] = data
        assert await front.read(MiB // 512, MiB, indirect=True) == data
        await front.flush()
        await front.discard(4 * MiB // 512, MiB // 512)
        model[4 * MiB:5 * MiB] = bytes(MiB)
        assert await front.read(4 * MiB // 512, MiB) == model[4 * MiB:5 * MiB]
        with pytest.raises(BlkIOError):  # beyond the export: the kernel refuses it
            await front.read(8 * MiB // 512, 4096)
        # One-sector requests only, on both rings: all of them issued from C, so their
        # replies are read and answered by nf_wake.
        reads = [front.read(k * 4096 // 512 + 1, 512) for k in range(32)]
        assert await asyncio.gather(*reads) == [model[k * 4096 + 512:k * 4096 + 1024]
                                                for k in range(32)]
        # Taken by nf_wake behind a read from C: a read into scattered pages (issued by
        # Python) and a request it refuses (answered by Python).
        from backendd.dataplane.blknbd import NF_R_OUT, NF_R_REST
        data, result, flags = await taken_by_the_wake_up(
            vm, front, srv, 1, lambda: front.read(64, 3 * 4096, queue=0))
        assert data == model[512:1024] and flags == NF_R_REST
        assert result == model[64 * 512:64 * 512 + 3 * 4096]
        data, result, flags = await taken_by_the_wake_up(
            vm, front, srv, 1, lambda: front.read(8 * MiB // 512, 4096, queue=0))
        assert data == model[512:1024] and flags == NF_R_OUT
        assert isinstance(result, BlkIOError)
        stats = stats_of(await client.stats(1), 1)
        assert stats["errors"] == 0 and stats["invalid"] == 2
        assert stats["nbd_issued_in_c"] > 0  # plain reads and writes: nbd_kernel.c
        # ... whose replies were read, answered and followed in C (nf_wake), both rings
        assert stats["nbd_wakes_in_c"] > 0 and stats["nbd_replies_in_c"] > 0
        await detach(vm, 1, front)
    finally:
        await closing(vm)
        guest.close()
        srv.stop()


async def test_compiled_kernel_on_an_nbd_disk(tmp_path):
    await compiled_nbd_scenario(tmp_path)


def test_compiled_kernel_on_an_nbd_disk_under_sanitizers(tmp_path):
    from test_dataplane import _run_sanitized

    from backendd.dataplane.build import build
    lib = build("blk", tmp_path / "asan.so", sanitize=True)
    nbd_lib = build("nbd", tmp_path / "asan-nbd.so", sanitize=True)
    result = _run_sanitized(lib, (
        "import asyncio, os, pathlib, sys\n"
        f"os.environ['BACKENDD_NBD_KERNEL'] = {str(nbd_lib)!r}\n"
        "from backendd.dataplane import kernel as K\n"
        "from backendd.dataplane import blknbd\n"
        f"assert K.load().path == {str(lib)!r}\n"
        "assert blknbd.LOADER.load() is not None\n"
        "import test_blk_nbd as t\n"
        "asyncio.run(t.compiled_nbd_scenario(pathlib.Path(sys.argv[1])))\n"
        "print('nbd ok')\n"), str(tmp_path))
    report = result.stderr
    assert "AddressSanitizer" not in report and "runtime error" not in report, report
    assert result.returncode == 0 and "nbd ok" in result.stdout, result.stdout + report


def test_the_nbd_wake_up_under_sanitizers(tmp_path):
    """nbd_kernel.c's slow-path exits under the sanitizers too: a read the server fails,
    a connection lost with reads and writes from C in flight, requests left to Python,
    several replies in one wake-up (these tests, run again in a sanitized process)."""
    from test_dataplane import _run_sanitized

    from backendd.dataplane.build import build
    lib = build("blk", tmp_path / "asan.so", sanitize=True)
    nbd_lib = build("nbd", tmp_path / "asan-nbd.so", sanitize=True)
    tests = ["test_a_read_from_c_that_the_server_fails_is_an_error_for_it_alone",
             "test_a_request_in_flight_when_the_server_dies_is_sent_again",
             "test_a_request_the_wake_up_takes_that_c_cannot_issue",
             "test_one_wake_up_reads_every_reply_the_socket_holds"]
    import tempfile
    with tempfile.TemporaryDirectory(prefix="nbd-asan-") as short:  # unix socket paths
        result = _run_sanitized(lib, (
            "import os, sys, pytest\n"
            f"os.environ['BACKENDD_NBD_KERNEL'] = {str(nbd_lib)!r}\n"
            "from backendd.dataplane import blknbd\n"
            f"assert blknbd.LOADER.library_path() == {str(nbd_lib)!r}\n"
            "sys.exit(pytest.main(['-q', '-s', '-p', 'no:cacheprovider', '--basetemp',\n"
            "                      sys.argv[1], 'tests/test_blk_nbd.py', '-k', sys.argv[2]]))\n"),
            f"{short}/t", " or ".join(tests))
        # A process the sanitizers stopped leaves its daemonised servers behind.
        for pidfile in Path(short).rglob("*.pid"):
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
    report = result.stderr + result.stdout
    assert "AddressSanitizer" not in report and "runtime error" not in report, report
    assert result.returncode == 0 and "7 passed" in result.stdout, report


@pytest.mark.parametrize("dataplane, persistent", [("auto", False), ("python", False),
                                                   ("python", True)],
                         ids=["compiled", "python", "python-persistent-grants"])
async def test_nbd_reads_are_in_the_dirty_log(vm, tmp_path, servers, dataplane, persistent):
    """Reads served from an NBD export mark the pages they fill, like any other read:
    libnbd writing straight into guest pages (compiled) or through a bounce buffer."""
    from test_dirty_log import Recorder

    from backendd.guest.dirtylog import DirtyLog

    srv = nbdkit_memory(tmp_path, "8M")
    servers.append(srv.start())
    front, _ = await attach(vm, 1, uri(srv), persistent=persistent, dataplane=dataplane)
    assert stats_of(await vm.client.stats(1), 1)["compiled"] == (dataplane == "auto")
    rec = Recorder(front)
    ram_pages = vm.guest.ram.size // 4096
    log = DirtyLog(ram_pages, vm.guest.gnttab.size // 4096)
    try:
        await vm.client.set_log(log.fd, log.size, ram_pages)
        await front.write(64, random.Random(7).randbytes(3 * 4096))
        rec.take()
        log.take_ram()
        # Three pages (scattered in the guest: a bounce buffer on the compiled path) and
        # one sector (issued from C and completed by nf_wake on the compiled path).
        for length in (3 * 4096, 512) * 3:
            await front.read(64, length)
            filled = {gfn for _, gfn, ro in rec.take() if not ro}
            assert filled and log.take_ram() == filled | {front.queues[0].pages[0]}
        if dataplane == "auto":  # the one-sector reads' replies, and only theirs
            assert stats_of(await vm.client.stats(1), 1)["nbd_replies_in_c"] == 3
        await vm.client.clear_log()
    finally:
        log.close()
    await detach(vm, 1, front)


async def test_read_only_export(vm, tmp_path, servers):
    image = tmp_path / "base.raw"
    content = random.Random(3).randbytes(4 * MiB)
    image.write_bytes(content)
    srv = qemu_nbd(tmp_path, image, "raw", readonly=True)
    servers.append(srv.start())
    # The disk was configured writable; the export decides.
    front, keys = await attach(vm, 1, uri(srv, "disk"))
    assert int(keys["info"]) & VDiskInfo.READONLY
    assert keys["feature-discard"] == "0"
    assert await front.read(0, MiB) == content[:MiB]
    with pytest.raises(BlkIOError) as info:
        await front.write(0, b"x" * 4096)
    assert info.value.status == BlkifStatus.ERROR
    with pytest.raises(BlkIOError) as info:
        await front.discard(0, 8)
    assert info.value.status == BlkifStatus.EOPNOTSUPP
    assert await front.read(4 * MiB // 512 - 8, 4096) == content[-4096:]
    await detach(vm, 1, front)
    assert image.read_bytes() == content


# --- faults ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, sig", [("qcow2", signal.SIGTERM), ("raw", signal.SIGKILL)],
                         ids=["qcow2-restart", "raw-crash"])
async def test_server_restart_under_load(vm_factory, tmp_path, servers, fmt, sig):
    """A restart, and a crash of a server whose writes reach the host's page cache:
    commands in flight are lost with the connection and sent again. (A crash of a
    qcow2 server loses its unflushed metadata, as a disk loses its cache: only what a
    flush covered survives that.)"""
    vm = await vm_factory(nbd_reconnect_timeout_ms=60000, nbd_io_timeout_ms=10000)
    image = tmp_path / f"disk.{fmt}"
    assert qemu_img("create", "-q", "-f", fmt, str(image), "8M").returncode == 0
    srv = qemu_nbd(tmp_path, image, fmt)
    servers.append(srv.start())
    try:
        front, _ = await attach(vm, 1, uri(srv, "disk"), queues=2)
        model = bytearray(8 * MiB)
        progress = Progress()
        load = asyncio.ensure_future(workload(front, model, workers=8, rounds=60, seed=2,
                                              progress=progress))
        target = 100
        for _ in range(2):  # twice: the second time the disk has been through it once
            await progress.reach(target)
            # Off the event loop: the daemon on it goes on serving (and qemu-nbd's
            # orderly exit waits for its clients' sockets to drain).
            await asyncio.to_thread(srv.stop, sig)  # in-flight commands die with it
            await asyncio.to_thread(srv.start)
            # The old server is gone: whatever completes from now on came through a
            # new connection.
            target = progress.done + 20
        assert await load == 8 * 60  # every request answered OKAY, every read verified
        await front.flush()
        stats = stats_of(await vm.client.stats(1), 1)
        assert stats["errors"] == 0
        assert stats["nbd_connection_losses"] == 2 and stats["nbd_reconnects"] == 2
        assert stats["nbd_degraded"] == 0
        assert stats["nbd_issued_in_c"] > 0  # the compiled data plane's C path
        await detach(vm, 1, front)
        srv.stop()
        if fmt == "qcow2":
            assert qemu_img("check", "-q", "-f", "qcow2", str(image)).returncode == 0
        raw = tmp_path / "guest-view.raw"
        raw.write_bytes(model)
        cmp = qemu_img("compare", "-f", fmt, "-F", "raw", str(image), str(raw))
        assert cmp.returncode == 0, cmp.stdout
    finally:
        await closing(vm)


async def test_multi_conn(vm_factory, tmp_path, servers):
    """With [block] nbd_connections, a disk opens that many connections to a server that
    can multi-conn (its connections see one another's writes and flushes) and spreads its
    commands over them; to one that cannot, one. A crash under load loses them all,
    and all come back."""
    vm = await vm_factory(nbd_connections=3, nbd_reconnect_timeout_ms=60000,
                          nbd_io_timeout_ms=10000)
    image = tmp_path / "disk.raw"
    assert qemu_img("create", "-q", "-f", "raw", str(image), "8M").returncode == 0
    srv = qemu_nbd(tmp_path, image, "raw")
    servers.append(srv.start())
    single = nbdkit_memory(tmp_path, "4M", name="single", multi_conn=False)
    servers.append(single.start())
    try:
        front, _ = await attach(vm, 1, uri(srv, "disk"), queues=2)
        await connections_reach(vm.client, 1, 3)
        model = bytearray(8 * MiB)
        progress = Progress()
        load = asyncio.ensure_future(workload(front, model, workers=8, rounds=40, seed=13,
                                              progress=progress))
        await progress.reach(100)
        await asyncio.to_thread(srv.stop, signal.SIGKILL)
        await asyncio.to_thread(srv.start)
        assert await load == 8 * 40
        await front.flush()
        stats = stats_of(await vm.client.stats(1), 1)
        assert stats["errors"] == 0 and stats["nbd_reconnects"] == 1
        assert stats["compiled"] == 1
        await connections_reach(vm.client, 1, 3)
        await detach(vm, 1, front)
        srv.stop()
        raw = tmp_path / "guest-view.raw"
        raw.write_bytes(model)
        cmp = qemu_img("compare", "-f", "raw", "-F", "raw", str(image), str(raw))
        assert cmp.returncode == 0, cmp.stdout

        front, _ = await attach(vm, 2, uri(single))
        assert stats_of(await vm.client.stats(2), 2)["nbd_connections"] == 1
        await workload(front, bytearray(4 * MiB), workers=4, rounds=10, seed=14)
        await detach(vm, 2, front)
    finally:
        await closing(vm)


async def test_a_server_gone_for_good_fails_its_disk_only(vm_factory, tmp_path, servers):
    vm = await vm_factory(nbd_reconnect_timeout_ms=300, nbd_io_timeout_ms=5000)
    gone = nbdkit_memory(tmp_path, "4M", name="gone")
    stays = nbdkit_memory(tmp_path, "4M", name="stays")
    servers.append(gone.start())
    servers.append(stays.start())
    file_image = tmp_path / "local.img"
    file_image.write_bytes(bytes(MiB))
    try:
        front1, _ = await attach(vm, 1, uri(gone))
        front2, _ = await attach(vm, 2, uri(stays))
        front3, _ = await attach(vm, 3, str(file_image))
        await front1.write(0, b"1" * 4096)
        gone.stop(signal.SIGKILL)
        # Requests wait for the server, then fail, each of them, after the timeout.
        results = await asyncio.gather(*(front1.read(8 * i, 4096) for i in range(8)),
                                       return_exceptions=True)
        assert all(isinstance(r, BlkIOError) and r.status == BlkifStatus.ERROR
                   for r in results), results
        with pytest.raises(BlkIOError):  # and so do new ones while it is away
            await front1.write(0, b"x" * 512)
        # The other disks never noticed.
        for front in (front2, front3):
            await front.write(8, b"2" * 4096)
            assert await front.read(8, 4096) == b"2" * 4096
        status = await vm.client.daemon_status()
        devs = {k.split(".dev.")[1]: v for k, v in status.items() if ".dev." in k}
        assert devs["1.stat.nbd_degraded"] == "1" and devs["1.stat.nbd_failing"] == "1"
        assert devs["2.stat.nbd_degraded"] == "0"
        metrics = render_status(vm.server.full_status()).splitlines()  # as /metrics
        assert "# TYPE backendd_blk_nbd_degraded gauge" in metrics
        degraded = {line.rsplit(" ", 1)[1] for line in metrics
                    if line.startswith("backendd_blk_nbd_degraded{") and 'devid="1"' in line}
        assert degraded == {"1"}
        await detach(vm, 2, front2)
        await detach(vm, 3, front3)
        await detach(vm, 1, front1)
    finally:
        await closing(vm)


async def test_a_silent_server_stalls_only_its_disk(vm_factory, tmp_path, servers):
    vm = await vm_factory(nbd_reconnect_timeout_ms=400, nbd_io_timeout_ms=300)
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4 * MiB))
    silent = qemu_nbd(tmp_path, image, "raw", name="silent")
    other = nbdkit_memory(tmp_path, "4M", name="other")
    servers.append(silent.start())
    servers.append(other.start())
    try:
        front1, _ = await attach(vm, 1, uri(silent, "disk"))
        front2, _ = await attach(vm, 2, uri(other))
        await front1.write(0, b"s" * 4096)
        silent.pause()  # holds its socket, answers nothing
        stalled = asyncio.ensure_future(front1.read(0, 4096))
        # While disk 1 waits, disk 2 serves.
        model = bytearray(4 * MiB)
        await workload(front2, model, workers=4, rounds=20, seed=4)
        with pytest.raises(BlkIOError):
            await stalled  # after the I/O timeout and the reconnect timeout
        stats = stats_of(await vm.client.stats(1), 1)
        assert stats["nbd_timeouts"] >= 1 and stats["nbd_degraded"] == 1
        # The server wakes up: the disk comes back by itself.
        silent.resume()
        for _ in range(200):
            try:
                assert await front1.read(0, 4096) == b"s" * 4096
                break
            except BlkIOError:
                await asyncio.sleep(0.05)  # the reconnect's backoff has no event to await
        else:
            raise AssertionError("the disk did not come back")
        assert stats_of(await vm.client.stats(1), 1)["nbd_degraded"] == 0
        await detach(vm, 1, front1)
        await detach(vm, 2, front2)
    finally:
        await closing(vm)


@pytest.mark.parametrize("when", ["lost-before", "lost-in-flight"])
async def test_closing_a_disk_does_not_wait_for_its_lost_server(vm_factory, tmp_path, servers,
                                                                when):
    vm = await vm_factory(nbd_reconnect_timeout_ms=600000, nbd_io_timeout_ms=600000)
    srv = nbdkit_memory(tmp_path, "1M")
    servers.append(srv.start())
    try:
        front, _ = await attach(vm, 1, uri(srv))
        await front.write(0, b"w" * 4096)
        if when == "lost-before":
            srv.stop(signal.SIGKILL)
            waiting = asyncio.ensure_future(front.read(0, 4096))
        else:  # the read is with the server when it dies
            srv.pause()
            waiting = asyncio.ensure_future(front.read(0, 4096))
            await in_flight_reaches(vm.client, 1, 1)
        # The read would wait ten minutes for the server; the frontend closes.
        closing_state = asyncio.ensure_future(
            vm.client.frontend_state(1, XenbusState.CLOSING, {}))
        if when == "lost-in-flight":
            await asyncio.to_thread(srv.stop, signal.SIGKILL)
        await asyncio.wait_for(closing_state, 30)
        with pytest.raises(BlkIOError):
            await waiting
        await vm.client.frontend_state(1, XenbusState.CLOSED, {})
        front.close()
        assert front.refused_revokes == [] and front.stray_responses == []
        await vm.client.remove_device(1)
    finally:
        await closing(vm)


async def test_tls_with_a_pre_shared_key(vm_factory, tmp_path, servers):
    psk = tmp_path / "keys.psk"
    psk.write_text(f"guest1:{random.Random(9).randbytes(32).hex()}\n")
    psk.chmod(0o600)
    srv = nbdkit_memory(tmp_path, "2M", tls_psk=psk, name="tls")
    servers.append(srv.start())
    plain = nbdkit_memory(tmp_path, "2M", name="plain")
    servers.append(plain.start())
    vm = await vm_factory(nbd_tls_psk_file=str(psk), nbd_tls_username="guest1")
    try:
        front, keys = await attach(vm, 1, f"nbds+unix:///?socket={srv.socket}")
        assert keys["sectors"] == str(2 * MiB // 512)
        data = random.Random(10).randbytes(256 * 1024)
        await front.write(64, data)
        assert await front.read(64, len(data)) == data
        await front.flush()
        await detach(vm, 1, front)
        # The server requires TLS: a plain URI is refused by it.
        with pytest.raises(RequestFailed, match="cannot connect"):
            await vm.client.add_device(2, "blk", {"path": uri(srv)})
        # nbds:// requires TLS: a server without it is refused by us.
        with pytest.raises(RequestFailed, match="cannot connect"):
            await vm.client.add_device(3, "blk",
                                       {"path": f"nbds+unix:///?socket={plain.socket}"})
    finally:
        await closing(vm)


def make_pki(where: Path) -> tuple[Path, Path]:
    """A CA of our own, a server certificate and a client certificate for localhost,
    made with openssl; returns the two directories as nbdkit (ca-cert.pem,
    server-cert.pem, server-key.pem) and libnbd (ca-cert.pem, client-cert.pem,
    client-key.pem) read them."""
    where.mkdir()
    server, client = where / "server", where / "client"
    server.mkdir()
    client.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True,
                       timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
            "-days", "2", "-subj", "/CN=backendd test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for who, usage, into in (("server", "serverAuth", server),
                             ("client", "clientAuth", client)):
        openssl("req", *ec, "-keyout", f"{who}-key.pem", "-out", f"{who}.csr",
                "-subj", "/CN=localhost")
        (where / f"{who}.ext").write_text(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
            f"extendedKeyUsage={usage}\nkeyUsage=critical,digitalSignature\n"
            "basicConstraints=CA:FALSE\n")
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey",
                "ca-key.pem", "-set_serial", str(random.getrandbits(63)), "-days", "2",
                "-out", f"{who}-cert.pem", "-extfile", f"{who}.ext")
        for name in ("ca-cert.pem", f"{who}-cert.pem", f"{who}-key.pem"):
            (into / name).write_bytes((where / name).read_bytes())
        (into / f"{who}-key.pem").chmod(0o600)
    return server, client


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_tls_with_x509_certificates(vm_factory, tmp_path, servers, transport):
    """nbds:// with certificates from a CA of the test's own: the daemon checks the
    server's certificate (and its name, localhost, over TCP), the server the daemon's;
    certificates from another CA are refused."""
    server_pki, client_pki = make_pki(tmp_path / "pki")
    _, stranger_pki = make_pki(tmp_path / "other-pki")
    port = free_port() if transport == "tcp" else 0
    srv = nbdkit_memory(tmp_path, "2M", tls_certificates=server_pki, name="x509",
                        tcp_port=port)
    servers.append(srv.start())
    if port:
        path, allowed = f"nbds://localhost:{port}/", [f"localhost:{port}"]
    else:
        path, allowed = f"nbds+unix:///?socket={srv.socket}", [str(tmp_path)]
    vm = await vm_factory(nbd_tls_certificates=str(client_pki), allowed_nbd=allowed)
    stranger = await vm_factory(nbd_tls_certificates=str(stranger_pki),
                                allowed_nbd=allowed)
    try:
        front, keys = await attach(vm, 1, path)
        assert keys["sectors"] == str(2 * MiB // 512)
        model = bytearray(2 * MiB)
        await workload(front, model, workers=4, rounds=10, seed=12)
        await front.flush()
        stats = stats_of(await vm.client.stats(1), 1)
        assert stats["errors"] == 0 and stats["compiled"] == 1
        await detach(vm, 1, front)
        # Another CA's certificates: the server is not trusted, nor is the client.
        with pytest.raises(RequestFailed, match="cannot connect") as refused:
            await stranger.client.add_device(2, "blk", {"path": path})
        assert "certificate" in str(refused.value).lower() or \
            "tls" in str(refused.value).lower(), refused.value
        # The TLS server refuses a plain connection.
        plain = path.replace("nbds", "nbd", 1)
        with pytest.raises(RequestFailed, match="cannot connect"):
            await vm.client.add_device(3, "blk", {"path": plain})
    finally:
        await closing(vm)
        await closing(stranger)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_tcp_on_loopback(vm_factory, tmp_path, servers):
    port = free_port()
    srv = nbdkit_memory(tmp_path, "4M", tcp_port=port)
    servers.append(srv.start())
    vm = await vm_factory(allowed_nbd=[f"127.0.0.1:{port}"])
    try:
        front, keys = await attach(vm, 1, f"nbd://127.0.0.1:{port}/")
        assert keys["sectors"] == str(4 * MiB // 512)
        model = bytearray(4 * MiB)
        await workload(front, model, workers=4, rounds=20, seed=6)
        await detach(vm, 1, front)
        with pytest.raises(RequestFailed, match="allowed_nbd"):  # another port
            await vm.client.add_device(2, "blk", {"path": f"nbd://127.0.0.1:{port + 1}/"})
    finally:
        await closing(vm)


@pytest.mark.parametrize("read_len, write_sector, write_len, issued_in_c", [
    (512, 64, 512, 2),          # plain one-page requests: issued from C (nbd_kernel.c)
    (64 * 1024, 1024, 8192, 0),  # multi-page ones: issued from Python
], ids=["from-c", "from-python"])
async def test_a_request_in_flight_when_the_server_dies_is_sent_again(
        vm_factory, tmp_path, servers, read_len, write_sector, write_len, issued_in_c):
    """When the connection is lost with a read and a write in flight, both are taken back
    (from C or from Python, whichever issued them) and sent again after the reconnect."""
    vm = await vm_factory(nbd_reconnect_timeout_ms=60000, nbd_io_timeout_ms=60000)
    image = tmp_path / "disk.raw"
    content = random.Random(11).randbytes(2 * MiB)
    image.write_bytes(content)
    srv = qemu_nbd(tmp_path, image, "raw")
    servers.append(srv.start())
    try:
        front, _ = await attach(vm, 1, uri(srv, "disk"))
        srv.pause()  # what the daemon sends now stays unanswered
        data = bytes([0x43 + issued_in_c]) * write_len
        read = asyncio.ensure_future(front.read(8, read_len))
        write = asyncio.ensure_future(front.write(write_sector, data))
        await in_flight_reaches(vm.client, 1, 2)
        assert stats_of(await vm.client.stats(1), 1)["nbd_issued_in_c"] == issued_in_c
        await asyncio.to_thread(srv.stop, signal.SIGKILL)  # it dies with both unanswered
        await asyncio.to_thread(srv.start)
        assert await read == content[4096:4096 + read_len]
        await write
        assert await front.read(write_sector, write_len) == data
        stats = stats_of(await vm.client.stats(1), 1)
        assert stats["nbd_resent"] == 2 and stats["errors"] == 0
        assert stats["nbd_reconnects"] == 1 and stats["nbd_in_flight"] == 0
        assert stats["nbd_degraded"] == 0
        await detach(vm, 1, front)
    finally:
        await closing(vm)
