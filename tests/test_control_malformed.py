"""Malformed control traffic against the real daemon: each case gets an error reply or a
clean close, never a crash, a leaked fd, or harm to other connections."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import struct
import subprocess
import sys
import termios

import pytest
from procstat import open_fds

from backendd.guest import RequestFailed, VmmClient, sealed_memfd
from backendd.protocol.framing import encode_message, encode_request
from backendd.protocol.messages import (
    HEADER,
    Code,
    Flags,
    GetStats,
    Hello,
    decode_reply,
)


async def raw_connection(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, path)
    return s


async def recv_exactly(s: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(s, n - len(data)), 30)
        if not chunk:
            break
        data += chunk
    return data


async def reply_to(s: socket.socket) -> tuple[int, object]:
    header = HEADER.unpack(await recv_exactly(s, 16))
    code, flags, size, seq = header
    assert flags & Flags.REPLY
    return seq, decode_reply(code, await recv_exactly(s, size))


async def assert_closed(s: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    data = await asyncio.wait_for(loop.sock_recv(s, 4096), 30)
    assert data == b""
    s.close()


async def hello(s: socket.socket) -> None:
    await asyncio.get_running_loop().sock_sendall(s, encode_request(1, Hello(1, 0)))
    seq, reply = await reply_to(s)
    assert seq == 1 and reply.version == 1


def unread_bytes(sock: socket.socket) -> int:
    """Bytes waiting in a socket's receive queue (SIOCINQ)."""
    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)), "little")


def memfd() -> int:
    return sealed_memfd("stray", 4096)


async def test_short_header_then_close_is_a_clean_close(daemon):
    s = await raw_connection(daemon.path)
    await asyncio.get_running_loop().sock_sendall(s, b"\x01\x00\x00")
    s.shutdown(socket.SHUT_WR)
    await assert_closed(s)
    await still_serving(daemon)


async def test_wrong_payload_size_gets_ebadmsg(daemon):
    s = await raw_connection(daemon.path)
    await hello(s)
    # GET_STATS with 3 payload bytes instead of 4, then a valid one: both answered.
    bad = encode_message(Code.GET_STATS, 0, 2, b"\xff\xff\xff")
    await asyncio.get_running_loop().sock_sendall(s, bad + encode_request(3, GetStats(0xFFFFFFFF)))
    seq, reply = await reply_to(s)
    assert seq == 2 and reply.errno == errno.EBADMSG
    seq, reply = await reply_to(s)
    assert seq == 3 and reply.counters == {}
    s.close()


async def test_unknown_code_gets_eopnotsupp_and_notice_code_eproto(daemon):
    s = await raw_connection(daemon.path)
    await hello(s)
    loop = asyncio.get_running_loop()
    for seq, code, expected in ((5, 77, errno.EOPNOTSUPP), (6, Code.DEVICE_FAILED, errno.EPROTO)):
        await loop.sock_sendall(s, encode_message(code, 0, seq, b"abc"))
        header = HEADER.unpack(await recv_exactly(s, 16))
        payload = await recv_exactly(s, header[2])
        assert header[0] == code and header[3] == seq
        assert struct.unpack_from("<i", payload)[0] == -expected
    s.close()


async def test_unexpected_fds_get_ebadf_and_are_closed(daemon):
    before = open_fds()
    client = await VmmClient.connect(daemon.path)
    fd = memfd()
    with pytest.raises(RequestFailed) as exc:
        await client.request(GetStats(0xFFFFFFFF), [fd, fd])
    assert exc.value.code == errno.EBADF
    # ADD_MEM_REGION without its fd.
    from backendd.protocol.messages import AddMemRegion
    with pytest.raises(RequestFailed) as exc:
        await client.request(AddMemRegion(0, 4096, 0))
    assert exc.value.code == errno.EBADF
    os.close(fd)
    await client.close()
    await settle(daemon)
    assert open_fds() <= before


@pytest.mark.parametrize("header", [
    HEADER.pack(Code.HELLO, 2, 12, 1),                    # version 2
    HEADER.pack(Code.HELLO, 1 | 0x100, 12, 1),            # unknown flag bit
    HEADER.pack(Code.HELLO, 1 | Flags.REPLY, 12, 1),      # a reply sent to the daemon
    HEADER.pack(Code.HELLO, 1, 0xFFFFFFFF, 1),            # huge size
])
async def test_fatal_headers_close_the_connection(daemon, header):
    before = open_fds()
    s = await raw_connection(daemon.path)
    fd = memfd()
    s.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
    os.close(fd)
    await assert_closed(s)
    await settle(daemon)
    assert open_fds() <= before
    await still_serving(daemon)


async def test_fds_without_a_header_close_the_connection(daemon):
    s = await raw_connection(daemon.path)
    await hello(s)
    msg = encode_request(2, GetStats(0xFFFFFFFF))
    # Half a message, then the fd with the second half: no header begins there. The
    # daemon has read the first half once its end of the socket holds nothing unread.
    await asyncio.get_running_loop().sock_sendall(s, msg[:10])
    (conn,) = daemon.server.connections.values()
    while unread_bytes(conn.sock):
        await asyncio.sleep(0)
    fd = memfd()
    s.sendmsg([msg[10:]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
    os.close(fd)
    await assert_closed(s)
    await still_serving(daemon)


async def test_random_garbage_never_crashes_the_daemon(daemon):
    import random

    rng = random.Random(7)
    for _ in range(200):
        s = await raw_connection(daemon.path)
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200)))
        if rng.random() < 0.5:
            # A valid header with a random code and payload: must be answered.
            blob = encode_message(rng.randrange(0, 12), 0, 1, blob)
        await asyncio.get_running_loop().sock_sendall(s, blob)
        s.shutdown(socket.SHUT_WR)
        loop = asyncio.get_running_loop()
        while await asyncio.wait_for(loop.sock_recv(s, 65536), 30):
            pass
        s.close()
    await still_serving(daemon)


@pytest.mark.parametrize(("uid", "gid", "accepted"), [
    (65534, 65534, False),
    (65534, 4242, False),  # only the gid is listed: the uid decides
    (65534, 0, False),  # root's gid does not make root
    (4242, 65534, True),  # the listed uid with any gid
])
async def test_peer_is_checked_by_uid_not_gid(uid, gid, accepted):
    import io
    import tempfile

    from backendd.config import Config, DaemonSection
    from backendd.log import EventLog
    from backendd.server import Server

    # SO_PEERCRED is taken at connect(), so the peer must connect as the other user: the
    # socket lives in a directory that user can reach (pytest's tmp dirs are private).
    where = tempfile.mkdtemp(prefix="backendd-peer-")
    os.chmod(where, 0o755)
    path = os.path.join(where, "s.sock")
    log = io.StringIO()
    server = Server(Config(daemon=DaemonSection(socket=path, allowed_uids=[4242])),
                    EventLog("info", log))
    await server.start()
    os.chmod(path, 0o666)
    script = (
        "import os, socket, sys\n"
        f"os.setgroups([]); os.setgid({gid}); os.setuid({uid})\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.connect({path!r})\n"
        "try:\n"
        "    s.sendall(b'\\x01\\x00\\x00\\x00\\x01\\x00\\x00\\x00\\x0c\\x00\\x00\\x00"
        "\\x01\\x00\\x00\\x00' + bytes(12))\n"
        "    print(len(s.recv(100)))\n"
        "except (ConnectionResetError, BrokenPipeError):\n"
        "    print(0)\n"
    )
    try:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script,
                                                    stdout=subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0
        if accepted:
            assert int(out) > 0  # HELLO answered
            assert f"event=connection_accepted conn=1 pid={proc.pid} uid={uid}" \
                in log.getvalue()
            assert "peer_refused" not in log.getvalue()
        else:
            assert out.strip() == b"0"  # closed without a reply
            assert f"event=peer_refused pid={proc.pid} uid={uid}" in log.getvalue()
            assert "connection_accepted" not in log.getvalue()
        # Root (the daemon's own uid) is still let in.
        client = await VmmClient.connect(path)
        assert await client.stats() == {}
        await client.close()
    finally:
        await server.close()
        os.rmdir(where)


async def settle(daemon) -> None:
    """Until every connection the daemon still has is torn down (they are all closing)."""
    while daemon.server.connections:
        await asyncio.wait_for(asyncio.gather(
            *(c.done for c in list(daemon.server.connections.values()))), 60)


async def still_serving(daemon) -> None:
    client = await VmmClient.connect(daemon.path)
    assert await client.stats() == {}
    await client.close()
