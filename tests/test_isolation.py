"""One VMM peer must not hurt another: the daemon never blocks on a peer's fd, checks the
kind of every fd at the request, holds each connection to its bounds, and answers status
for any number of connections. Everything goes through the real daemon on a real unix
socket, with real eventfds, memfds, pipes and files."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import struct
import sys

import pytest
from procstat import fdinfo, mapping_count, open_fds

from backendd import server as server_module
from backendd.fdrules import require_sealed_memfd
from backendd.guest import GuestPort, RequestFailed, SimGuest, VmmClient, sealed_memfd
from backendd.guest.blkfront import BlkFront
from backendd.protocol.framing import Framer, Role, encode_request
from backendd.protocol.messages import (
    MAX_PAYLOAD,
    AddMemRegion,
    Code,
    Hello,
    RingDump,
    SetGrantTable,
    SetInflight,
    decode_reply,
)
from backendd.server import MAX_REPLY_BACKLOG
from backendd.session import MAX_DEVICES, MAX_MEM_REGIONS
from rings.consts import XenbusState

DEVID = 51712
PAGE = 4096
MiB = 1 << 20
SATURATED = 0xFFFFFFFFFFFFFFFE  # an eventfd counter that cannot take one more


def eventfd_count(fd: int) -> int:
    return int(fdinfo(fd, "eventfd-count"), 16)


async def until_stat(client: VmmClient, key: str, value: int, round_trips: int = 100_000) -> None:
    """Ask for the device's counters until `key` reaches `value`: every round trip lets the
    daemon's loop run, and the I/O thread finish; bounded by round trips, not time."""
    for _ in range(round_trips):
        if int((await client.stats(DEVID)).get(f"{DEVID}.{key}", "0")) >= value:
            return
    raise AssertionError(f"{key} never reached {value}")


def start_unwatched(front: BlkFront) -> None:
    """BlkFront.start() without watching the call eventfds: the test collects responses
    itself (front._on_call), and no loop touches the VMM's fd flags."""
    front._loop = asyncio.get_running_loop()
    for q in front.queues:
        q.space.set()


class Disk:
    """A guest with one blk device whose event channel uses eventfds made with the
    given flags (the VMM's choice), optionally with the call counter pre-loaded."""

    def __init__(self, tmp_path, client: VmmClient) -> None:
        self.image = tmp_path / "disk.img"
        self.image.write_bytes(bytes(MiB))
        self.client = client
        self.guest = SimGuest(ram_size=16 * MiB, gnttab_frames=4)
        self.front: BlkFront | None = None

    async def connect(self, kick_flags: int, call_flags: int, preload: int = 0) -> None:
        await self.guest.attach(self.client)
        _, keys = await self.client.add_device(DEVID, "blk", {"path": str(self.image)})
        front = BlkFront(self.guest.ram, self.guest.gnttab, DEVID, backend_keys=keys)
        q = front.queues[0]
        for fd in (*q.daemon_fds, q.call_fd):
            os.close(fd)
        q.port.close()
        kick, call = os.eventfd(0, kick_flags), os.eventfd(0, call_flags)
        if preload:
            os.eventfd_write(call, preload)
        q.port = GuestPort(q.port.port, os.dup(kick), os.dup(call))
        q.call_fd, q.daemon_fds = os.dup(call), (kick, call)
        state, _ = await self.client.hand_over_channels(
            DEVID, XenbusState.CONNECTED, front.frontend_keys(), front.channels())
        assert state == XenbusState.CONNECTED
        self.front = front

    def close(self) -> None:
        if self.front is not None:
            self.front.close()
        self.guest.close()


# --- finding: a saturated or blocking call eventfd ------------------------------------------


async def test_a_saturated_blocking_call_eventfd_counts_as_signalled(daemon, tmp_path):
    client = await VmmClient.connect(daemon.path)
    disk = Disk(tmp_path, client)
    # Blocking (no EFD_NONBLOCK) on both sides, as a VMM may well make them.
    await disk.connect(os.EFD_CLOEXEC, os.EFD_CLOEXEC, preload=SATURATED)
    front = disk.front
    assert front is not None
    q = front.queues[0]
    start_unwatched(front)  # the guest looks only once the daemon has answered
    write = asyncio.create_task(front.write(0, b"x" * PAGE))
    await until_stat(client, "writes", 1)
    # The daemon published the response and did not block in the write to the full
    # counter: it answers, and the counter is as the VMM left it.
    assert eventfd_count(q.call_fd) == SATURATED
    status = await client.daemon_status()
    assert status["connections"] == "1"
    # The guest sees the (already pending) signal and its response.
    front._on_call(q)
    await write
    # Nothing changed the VMM's flags: the open file descriptions are shared.
    assert not fcntl.fcntl(q.call_fd, fcntl.F_GETFL) & os.O_NONBLOCK
    assert not fcntl.fcntl(q.port._kick, fcntl.F_GETFL) & os.O_NONBLOCK
    # And the blocking kick eventfd still works, read without blocking.
    read = asyncio.create_task(front.read(0, PAGE))
    await until_stat(client, "reads", 1)
    front._on_call(q)
    assert await read == b"x" * PAGE
    assert not fcntl.fcntl(q.call_fd, fcntl.F_GETFL) & os.O_NONBLOCK
    assert not fcntl.fcntl(q.port._kick, fcntl.F_GETFL) & os.O_NONBLOCK
    await client.close()
    disk.close()


async def test_a_saturated_blocking_call_eventfd_does_not_freeze_a_daemon_process(tmp_path):
    """The same through a real `backendd serve`: the daemon that blocked in the write
    stopped every guest and `status`; here a stuck daemon would be a clean failure."""
    path = str(tmp_path / "backendd.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    notify.bind(str(tmp_path / "notify"))
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    env.pop("WATCHDOG_USEC", None)
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "backendd", "--socket", path, "serve", env=env,
        stdout=log, stderr=log)
    loop = asyncio.get_running_loop()
    try:
        while b"READY=1" not in await asyncio.wait_for(loop.sock_recv(notify, 4096), 60):
            pass
        client = await VmmClient.connect(path)
        disk = Disk(tmp_path, client)
        await disk.connect(os.EFD_CLOEXEC, os.EFD_CLOEXEC, preload=SATURATED)
        front = disk.front
        assert front is not None
        start_unwatched(front)
        write = asyncio.create_task(front.write(0, b"p" * PAGE))
        await asyncio.wait_for(until_stat(client, "writes", 1), 60)
        status = await asyncio.wait_for(client.daemon_status(), 60)
        assert status["connections"] == "1"
        assert eventfd_count(front.queues[0].call_fd) == SATURATED
        front._on_call(front.queues[0])
        await write
        await client.close()
        disk.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        notify.close()
        log.close()


async def test_a_saturated_nonblocking_call_eventfd_leaves_nothing_behind(daemon, tmp_path):
    fds, maps = open_fds(), mapping_count()
    client = await VmmClient.connect(daemon.path)
    disk = Disk(tmp_path, client)
    flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
    await disk.connect(flags, flags, preload=SATURATED)
    front = disk.front
    assert front is not None
    start_unwatched(front)
    write = asyncio.create_task(front.write(0, b"y" * PAGE))
    await until_stat(client, "writes", 1)
    front._on_call(front.queues[0])  # the response was published all the same
    await write
    conn = daemon.server.connections[max(daemon.server.connections)]
    # The ring goes idle, so CLOSED is answered (a ring left busy never answers it),
    # and the connection is torn down.
    await asyncio.wait_for(client.frontend_state(DEVID, XenbusState.CLOSED, {}), 30)
    await client.close()
    await asyncio.wait_for(conn.done, 30)
    assert not daemon.server.connections
    disk.close()
    assert open_fds() == fds
    assert mapping_count() == maps
    assert "request_crashed" not in daemon.log.getvalue()
    assert "Exception in callback" not in daemon.log.getvalue()


# --- finding: fd kinds ----------------------------------------------------------------------


def not_eventfds(tmp_path) -> list[tuple[str, int, list[int]]]:
    """(name, fd to send, other fds to close) for kinds a channel must not be."""
    r, w = os.pipe()
    os.close(w)  # a pipe whose writer is gone: readable for ever
    f = os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT)
    s1, s2 = socket.socketpair()
    return [("pipe", r, []), ("file", f, []), ("socket", s1.detach(), [s2.detach()]),
            ("memfd", sealed_memfd("not-a-channel", PAGE), [])]


async def test_channels_that_are_not_eventfds_are_refused(daemon, tmp_path):
    client = await VmmClient.connect(daemon.path)
    disk = Disk(tmp_path, client)
    await disk.guest.attach(client)
    _, keys = await client.add_device(DEVID, "blk", {"path": str(disk.image)})
    front = BlkFront(disk.guest.ram, disk.guest.gnttab, DEVID, backend_keys=keys)
    (port, kick, call), = front.channels()
    for name, bad, extra in not_eventfds(tmp_path):
        for fds in ((bad, call), (kick, bad)):
            with pytest.raises(RequestFailed) as exc:
                await client.frontend_state(DEVID, XenbusState.CONNECTED,
                                            front.frontend_keys(), [(port, *fds)])
            assert exc.value.code == errno.EBADF, name
            assert "event channels must be eventfds" in exc.value.message, name
        for fd in (bad, *extra):
            os.close(fd)
    # Nothing changed: the same request with eventfds connects, and I/O works.
    state, _ = await client.hand_over_channels(DEVID, XenbusState.CONNECTED,
                                               front.frontend_keys(), front.channels())
    assert state == XenbusState.CONNECTED
    front.start()
    await front.write(8, b"z" * PAGE)
    assert await front.read(8, PAGE) == b"z" * PAGE
    assert "request_crashed" not in daemon.log.getvalue()
    await client.close()
    front.close()
    disk.close()


def unsealed_memfd(size: int) -> int:
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def shm_file(tmp_path, size: int) -> int:
    fd = os.open(tmp_path / "ram", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, size)
    return fd


async def test_memory_fds_must_be_memfds_sealed_against_shrinking(daemon, tmp_path):
    client = await VmmClient.connect(daemon.path)
    ev = os.eventfd(0)
    cases = [("unsealed memfd", unsealed_memfd(MiB), "F_SEAL_SHRINK"),
             ("file", shm_file(tmp_path, MiB), "is not a memfd"),
             ("eventfd", ev, "is not a memfd")]
    for name, fd, words in cases:
        for msg in (AddMemRegion(0, MiB, 0), SetGrantTable(1, 1, 0, 0)):
            with pytest.raises(RequestFailed) as exc:
                await client.request(msg, [fd])
            assert exc.value.code == errno.EBADF, name
            assert words in exc.value.message and "fd rule" in exc.value.message, name
        os.close(fd)
    # A sealed memfd too short for the region: refused before any mapping is made.
    short = sealed_memfd("short", MiB)
    with pytest.raises(RequestFailed) as exc:
        await client.request(AddMemRegion(0, 2 * MiB, 0), [short])
    assert exc.value.code == errno.EINVAL and "runs past" in exc.value.message
    with pytest.raises(RequestFailed) as exc:
        await client.request(AddMemRegion(0, MiB, PAGE), [short])
    assert exc.value.code == errno.EINVAL
    # SET_INFLIGHT: the same rule.
    from backendd.inflight import region_size

    guest = SimGuest(ram_size=4 * MiB, gnttab_frames=1)
    await guest.attach(client)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    await client.add_device(DEVID, "blk", {"path": str(image)})
    bad = unsealed_memfd(region_size(1))
    with pytest.raises(RequestFailed) as exc:
        await client.request(SetInflight(DEVID, 0, region_size(1)), [bad])
    assert exc.value.code == errno.EBADF and "F_SEAL_SHRINK" in exc.value.message
    good = sealed_memfd("inflight", region_size(1))
    await client.set_inflight(DEVID, good, region_size(1))
    for fd in (short, bad, good):
        os.close(fd)
    assert "request_crashed" not in daemon.log.getvalue()
    await client.close()
    guest.close()


@pytest.fixture
def a_huge_page(root):
    """At least one 2 MiB huge page reserved for the test (the pool is given back after):
    a machine without any fails the test rather than skipping it."""
    pool = "/proc/sys/vm/nr_hugepages"
    with open(pool) as f:
        before = int(f.read())
    if before < 1:
        with open(pool, "w") as f:
            f.write("1")
    try:
        with open(pool) as f:
            assert int(f.read()) >= 1, "could not reserve a huge page (vm.nr_hugepages)"
        yield
    finally:
        if before < 1:
            with open(pool, "w") as f:
                f.write(str(before))


def test_hugetlb_memfds_pass_the_rule_when_sealed(a_huge_page):
    fd = os.memfd_create("huge", os.MFD_CLOEXEC | os.MFD_HUGETLB | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 2 * MiB)
        with pytest.raises(Exception, match="F_SEAL_SHRINK"):
            require_sealed_memfd(fd, "test", 0, 2 * MiB)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        require_sealed_memfd(fd, "test", 0, 2 * MiB)
    finally:
        os.close(fd)


async def test_a_vmm_cannot_shrink_guest_ram_under_the_daemon(daemon, tmp_path):
    """The ftruncate(ram_fd, 0)-then-kick SIGBUS: the required seal makes the shrink fail,
    so the daemon's next access through the mapping is still backed."""
    client = await VmmClient.connect(daemon.path)
    disk = Disk(tmp_path, client)
    flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
    await disk.connect(flags, flags)
    front = disk.front
    assert front is not None
    front.start()
    for fd in (disk.guest.ram.fd, disk.guest.gnttab.fd):
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
    await front.write(16, b"k" * PAGE)
    assert await front.read(16, PAGE) == b"k" * PAGE
    await client.close()
    disk.close()


# --- finding: unread replies ----------------------------------------------------------------


async def test_unread_replies_stop_the_daemon_reading_that_connection(daemon, tmp_path):
    client = await VmmClient.connect(daemon.path)
    guest = SimGuest(ram_size=16 * MiB, gnttab_frames=4)
    await guest.attach(client)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    _, keys = await client.add_device(DEVID, "blk", {"path": str(image)})
    front = BlkFront(guest.ram, guest.gnttab, DEVID, backend_keys=keys, ring_order=4)
    await client.hand_over_channels(DEVID, XenbusState.CONNECTED, front.frontend_keys(),
                                    front.channels())
    front.start()
    conn_id = max(daemon.server.connections)

    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    # Requests in flight are charged to the sender's buffer: keep it well under the
    # 350 KB of requests, whatever the machine's default.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    await loop.sock_connect(sock, daemon.path)
    await loop.sock_sendall(sock, encode_request(1, Hello(1, 0)))
    framer = Framer(Role.VMM)
    frames: list = []

    async def replies(n: int) -> None:
        while len(frames) < n:
            frames.extend(framer.feed(await loop.sock_recv(sock, 1 << 20)))

    await replies(1)
    dumper = daemon.server.connections[max(daemon.server.connections)]
    n = 12_500
    blob = b"".join(encode_request(2 + i, RingDump(conn_id, DEVID, 0)) for i in range(n))
    sending = asyncio.create_task(loop.sock_sendall(sock, blob))
    stalled = asyncio.create_task(dumper.backlogged.wait())
    await asyncio.wait([sending, stalled], return_when=asyncio.FIRST_COMPLETED)
    # The daemon stopped reading and handling: what waits for the peer is bounded, and
    # the rest of the requests are still in the peer's socket.
    assert len(dumper._out) <= MAX_REPLY_BACKLOG + MAX_PAYLOAD + 16
    assert not dumper._reading
    assert not sending.done()
    assert stalled.done()
    # Other connections are served meanwhile.
    assert (await client.stats(DEVID))[f"{DEVID}.requests"] == "0"
    # Reading the replies lets it carry on, to the last one.
    await replies(1 + n)
    await sending
    for frame in frames[1:]:
        reply = decode_reply(Code.RING_DUMP, frame.payload)
        assert reply.info["name"] == "queue-0", reply
    assert [f.header.seq for f in frames] == list(range(1, 2 + n))
    sock.close()
    await dumper.done
    assert not dumper._out
    await client.close()
    front.close()
    guest.close()


# --- finding: per-connection bounds ---------------------------------------------------------


async def test_memory_regions_are_bounded_per_connection(daemon):
    fds, maps = open_fds(), mapping_count()
    hog = await VmmClient.connect(daemon.path)
    ram = sealed_memfd("hog", (MAX_MEM_REGIONS + 8) * PAGE)
    for i in range(MAX_MEM_REGIONS):
        await hog.add_mem_region(i * PAGE, PAGE, ram, i * PAGE)
    for i in range(MAX_MEM_REGIONS, MAX_MEM_REGIONS + 8):
        with pytest.raises(RequestFailed) as exc:
            await hog.add_mem_region(i * PAGE, PAGE, ram, i * PAGE)
        assert exc.value.code == errno.ENOSPC and str(MAX_MEM_REGIONS) in exc.value.message
    # One fd and one mapping per region, not two.
    assert len(open_fds() - fds) <= MAX_MEM_REGIONS + 3  # + both socket ends, + ram
    assert mapping_count() - maps == MAX_MEM_REGIONS
    # Another guest still attaches and is served.
    other = await VmmClient.connect(daemon.path)
    guest = SimGuest(ram_size=4 * MiB, gnttab_frames=1)
    await guest.attach(other)
    assert (await other.daemon_status())["connections"] == "2"
    await other.close()
    await hog.close()
    guest.close()
    os.close(ram)
    while daemon.server.connections:
        await next(iter(daemon.server.connections.values())).done
    assert open_fds() == fds
    assert mapping_count() == maps


async def test_devices_are_bounded_per_connection(daemon, tmp_path):
    client = await VmmClient.connect(daemon.path)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    for devid in range(MAX_DEVICES):
        await client.add_device(devid, "blk", {"path": str(image), "mode": "r"})
    with pytest.raises(RequestFailed) as exc:
        await client.add_device(MAX_DEVICES, "blk", {"path": str(image), "mode": "r"})
    assert exc.value.code == errno.ENOSPC
    # Every reply still fits: all the devices' counters, and status.
    assert len(await client.stats()) >= MAX_DEVICES
    status = await client.daemon_status()
    assert sum(k.endswith(".type") for k in status) == MAX_DEVICES
    await client.remove_device(0)
    await client.add_device(MAX_DEVICES, "blk", {"path": str(image), "mode": "r"})
    await client.close()


async def test_failed_requests_log_a_bounded_number_of_lines(daemon):
    client = await VmmClient.connect(daemon.path)
    for _ in range(200):
        with pytest.raises(RequestFailed):
            await client.remove_device(DEVID)
    lines = [line for line in daemon.log_lines() if "event=request_failed" in line]
    burst = daemon.server.config.daemon.guest_log_burst
    assert len(lines) == burst
    await client.close()


# --- finding: status at scale ---------------------------------------------------------------


async def test_status_answers_with_a_thousand_connections(daemon):
    clients = [await VmmClient.connect(daemon.path) for _ in range(1000)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "backendd", "--socket", daemon.path, "status",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    # The asking connection is not listed.
    assert lines[0].endswith("connections: 1000 (not counting this one)")
    shown = [line for line in lines if line.startswith("conn ")]
    assert len(shown) == 1000
    for client in clients:
        await client.close()


async def test_status_pages_split_within_a_connection(daemon, tmp_path, monkeypatch):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    clients = []
    for _ in range(3):
        client = await VmmClient.connect(daemon.path)
        for devid in (5, 51712, 51728, 51744):
            await client.add_device(devid, "blk", {"path": str(image), "mode": "r"})
        clients.append(client)
    whole = daemon.server.status()
    assert "next.conn" not in whole
    monkeypatch.setattr(server_module, "STATUS_PAGE_BYTES", 1200)
    asked: list[tuple[str, str]] = []
    original = daemon.server.status

    def spy(conn=0, devid=0xFFFFFFFF):
        page = original(conn, devid)
        size = 4 + sum(4 + len(k) + len(v) for k, v in page.items())
        assert size <= 1200
        asked.append((page.get("next.conn", ""), page.get("next.devid", "")))
        return page

    monkeypatch.setattr(daemon.server, "status", spy)
    paged = await clients[0].daemon_status()
    assert len(asked) > 3  # some pages end inside a connection
    assert any(devid not in ("", str(0xFFFFFFFF)) for _, devid in asked)
    for key in ("conn.1.requests", "uptime_seconds", "self"):
        whole.pop(key, None)
        paged.pop(key, None)
    assert paged == whole
    for client in clients:
        await client.close()


def test_daemon_status_request_is_empty_or_a_cursor():
    from backendd.protocol.messages import DaemonStatus, ProtocolError, decode_request

    assert DaemonStatus().encode() == b""
    assert decode_request(Code.DAEMON_STATUS, b"", 0) == DaemonStatus()
    raw = struct.pack("<II", 3, 51712)
    assert decode_request(Code.DAEMON_STATUS, raw, 0) == DaemonStatus(3, 51712)
    with pytest.raises(ProtocolError):
        decode_request(Code.DAEMON_STATUS, b"\0" * 4, 0)
