"""Random, mutated and truncated control messages against the real daemon over a real
unix socket, with real memfds, eventfds and pipes riding along in wrong numbers and the
bytes split at random boundaries.

Each message with a sound header gets exactly one reply, in order, with its code and seq
(an error reply for anything wrong), and the connection keeps working: a following
GET_STATS succeeds. A message whose header cannot be trusted (flags other than version 1,
a size over the limit) closes the connection cleanly instead. Throughout, a second,
well-behaved connection with a guest attached keeps being served; nothing the daemon is
handed stays open or mapped once the connections are gone; and no request ever reaches
the daemon's local-bug path."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
import struct
from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from procstat import mapping_count, open_fds
from profiles import examples

from backendd.guest import SimGuest, VmmClient, sealed_memfd
from backendd.protocol.framing import Framer, Role
from backendd.protocol.messages import (
    HEADER,
    MAX_PAYLOAD,
    ErrorReply,
    StatsReply,
    decode_reply,
)

U32, U64 = (1 << 32) - 1, (1 << 64) - 1
FOLLOW_UP_SEQ = 0xFEEDF00D
HELLO = HEADER.pack(1, 1, 12, 1) + struct.pack("<IQ", 1, 0)
REQUEST_CODES = list(range(1, 13))
NOTICE_CODES = [0x100, 0x101, 0x102]
FDS_FOR = {2: 1, 4: 1, 12: 1}  # fixed fd counts; FRONTEND_STATE: 2 per channel


@dataclass
class Msg:
    code: int
    flags: int
    seq: int
    payload: bytes
    size: int  # the header's size field
    fds: list[str]  # kinds of fd to attach: memfd, eventfd, pipe
    cuts: list[int]  # split points inside the message's bytes

    @property
    def fatal(self) -> bool:
        return self.flags != 1 or self.size > MAX_PAYLOAD

    def __repr__(self) -> str:  # payloads reach 64 KiB: keep failure reports readable
        head = self.payload[:32].hex()
        return (f"Msg(code={self.code:#x}, flags={self.flags:#x}, seq={self.seq}, "
                f"size={self.size}, payload[{len(self.payload)}]={head}..., "
                f"fds={self.fds}, cuts={self.cuts})")

    def wire(self) -> bytes:
        return HEADER.pack(self.code, self.flags, self.size, self.seq) + self.payload


# --- generating messages ---------------------------------------------------------------

addresses = st.one_of(st.sampled_from([0, 4096, 1 << 20, 1 << 30, U64 - 4095, 1 << 63, U64]),
                      st.integers(0, U64), st.integers(0, 1 << 24))
u32s = st.one_of(st.sampled_from([0, 1, 2, 51712, 0xFFFFFFFF]), st.integers(0, U32))
text = st.one_of(st.binary(max_size=12), st.sampled_from(
    [b"path", b"mode", b"tap", b"mac", b"ring-ref", b"event-channel", b"", b"a\0b",
     b"\xff\xfe", b"k" * 257]))


@st.composite
def kv_maps(draw) -> bytes:
    pairs = draw(st.lists(st.tuples(text, st.one_of(text, st.just(b"v" * 4097))), max_size=4))
    count = draw(st.one_of(st.just(len(pairs)), u32s))
    body = b"".join(struct.pack("<HH", len(k), len(v)) + k + v for k, v in pairs)
    return struct.pack("<I", count) + body


@st.composite
def payloads(draw, code: int) -> bytes:
    """A payload laid out as `code` expects, with random (often out-of-range) fields."""
    if code == 1:
        return struct.pack("<IQ", draw(u32s), draw(st.integers(0, U64)))
    if code == 2:
        return struct.pack("<QQQ", draw(addresses), draw(addresses), draw(addresses))
    if code == 3:
        return struct.pack("<QQ", draw(addresses), draw(addresses))
    if code == 4:
        return struct.pack("<IIQHH", draw(st.integers(0, 3) | u32s),
                           draw(st.integers(0, 40) | u32s), draw(addresses),
                           draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 1)))
    if code == 5:
        return struct.pack("<II", draw(u32s), draw(st.integers(0, 3) | u32s)) + draw(kv_maps())
    if code in (6, 8, 9):
        return struct.pack("<I", draw(u32s))
    if code == 7:
        ports = draw(st.lists(u32s, max_size=4))
        nr = draw(st.one_of(st.just(len(ports)), st.integers(0, 40), u32s))
        return (struct.pack("<II", draw(u32s), draw(st.integers(0, 9) | u32s))
                + draw(kv_maps()) + struct.pack(f"<I{len(ports)}I", nr, *ports))
    if code == 11:
        return struct.pack("<III", draw(u32s), draw(u32s), draw(u32s))
    if code == 12:
        return struct.pack("<IIQQ", draw(u32s), draw(st.integers(0, 1)), draw(addresses),
                           draw(addresses))
    return b""


@st.composite
def mutated(draw, payload: bytes) -> bytes:
    how = draw(st.sampled_from(["as-is", "truncate", "extend", "flip"]))
    if how == "truncate" and payload:
        return payload[:draw(st.integers(0, len(payload) - 1))]
    if how == "extend":
        return payload + draw(st.binary(min_size=1, max_size=16))
    if how == "flip" and payload:
        i = draw(st.integers(0, len(payload) - 1))
        return payload[:i] + bytes([payload[i] ^ draw(st.integers(1, 255))]) + payload[i + 1:]
    return payload


@st.composite
def valid_messages(draw) -> Msg:
    """Requests that succeed (given HELLO), so the fuzzed ones land in a busy session:
    memory regions, grant tables (the daemon maps them), stats, status."""
    page = draw(st.integers(0, 1 << 20)) * 4096
    code, payload, fds = draw(st.sampled_from([
        (2, struct.pack("<QQQ", page, 1 << 20, 0), ["memfd"]),
        (3, struct.pack("<QQ", page, 1 << 20), []),
        (4, struct.pack("<IIQHH", 1, 4, 0, 0, 0), ["memfd"]),
        (4, struct.pack("<IIQHH", 2, 8, 0, 0, 0), ["memfd"]),
        (9, struct.pack("<I", U32), []),
        (10, b"", []),
    ]))
    return Msg(code, 1, draw(u32s.filter(lambda s: s != FOLLOW_UP_SEQ)), payload,
               len(payload), fds, [])


@st.composite
def messages(draw) -> Msg:
    if not draw(st.integers(0, 3)):
        return draw(valid_messages())
    code = draw(st.one_of(st.sampled_from(REQUEST_CODES + NOTICE_CODES), st.just(0), u32s))
    if draw(st.booleans()):
        payload = draw(payloads(code).flatmap(mutated))
    else:
        payload = draw(st.binary(max_size=64))
    # Mostly sound headers: a fatal one ends the connection and with it the example.
    flags = 1 if draw(st.integers(0, 9)) else draw(u32s)
    size = len(payload)
    shape = draw(st.sampled_from(["exact"] * 8 + ["full", "huge"]))
    if shape == "full":  # the largest payload allowed, mostly padding
        payload = (payload + bytes(MAX_PAYLOAD))[:MAX_PAYLOAD]
        size = MAX_PAYLOAD
    elif shape == "huge":
        size = draw(st.integers(MAX_PAYLOAD + 1, U32))
    expected = FDS_FOR.get(code, 0)
    if code == 7 and len(payload) >= 12:
        expected = 2 * min(len(payload), 8)  # a guess; wrong counts are the point too
    nfds = draw(st.one_of(st.just(expected), st.integers(0, 4)))
    fds = draw(st.lists(st.sampled_from(["memfd", "eventfd", "pipe"]), min_size=nfds,
                        max_size=nfds))
    seq = draw(u32s.filter(lambda s: s != FOLLOW_UP_SEQ))
    n = 16 + len(payload)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=3))))
    return Msg(code, flags, seq, payload, size, fds, [c for c in cuts if c < n])


# --- talking to the daemon ---------------------------------------------------------------


def make_fd(kind: str) -> list[int]:
    """One fd to send (plus, for a pipe, its other end to close afterwards)."""
    if kind == "memfd":
        return [sealed_memfd("fuzz", 1 << 20)]
    if kind == "eventfd":
        return [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)]
    r, w = os.pipe()
    return [r, w]


async def send_message(s: socket.socket, msg: Msg) -> None:
    """The header's first byte goes with the fds in one sendmsg that holds nothing of the
    next message; the rest follows in pieces, each given to the daemon separately."""
    loop = asyncio.get_running_loop()
    data = msg.wire()
    bounds = [0, *msg.cuts, len(data)]
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    owned = [make_fd(kind) for kind in msg.fds]
    try:
        sent = [fds[0] for fds in owned]
        if sent:
            first = pieces.pop(0)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(sent)}i", *sent))]
            n = s.sendmsg([first], anc)
            if n < len(first):
                pieces.insert(0, first[n:])
    finally:
        for fds in owned:
            for fd in fds:
                os.close(fd)
    for piece in pieces:
        await loop.sock_sendall(s, piece)
        await asyncio.sleep(0)


async def send_all(s: socket.socket, msgs: list[Msg]) -> list[Msg]:
    """Send up to and including the first fatal message; returns what was sent. The
    daemon may close the socket under a fatal message still being written."""
    sent: list[Msg] = []
    for msg in msgs:
        sent.append(msg)
        try:
            await send_message(s, msg)
        except (BrokenPipeError, ConnectionResetError):
            assert msg.fatal or any(m.fatal for m in sent), "closed on a sound message"
            break
        if msg.fatal:
            break
    return sent


async def read_until(s: socket.socket, framer: Framer, want_seq: int | None) -> tuple[list, bool]:
    """Frames from the daemon until the reply with `want_seq` (or any EOF); returns them
    and whether the daemon closed the connection."""
    loop = asyncio.get_running_loop()
    frames = []
    while True:
        try:
            data = await asyncio.wait_for(loop.sock_recv(s, 1 << 17), 10)
        except ConnectionResetError:  # closed with our unread bytes still queued
            return frames, True
        if not data:
            return frames, True
        for frame in framer.feed(data):
            if frame.header.flags & 0x8:  # a notice: not a reply to anything of ours
                continue
            frames.append(frame)
            if want_seq is not None and frame.header.seq == want_seq:
                return frames, False


def check_reply(frame, msg_code: int, msg_seq: int, log: str) -> None:
    assert (frame.header.code, frame.header.seq) == (msg_code, msg_seq)
    (result,) = struct.unpack_from("<i", frame.payload)
    event(f"code {msg_code:#x}: " + (errno.errorcode.get(-result, str(result))
                                     if result < 0 else "ok"))
    if result < 0:
        assert -result in errno.errorcode, f"reply result {result}"
        assert -result != errno.EIO or "request_crashed" not in log
    if msg_code in REQUEST_CODES:
        reply = decode_reply(msg_code, frame.payload)
        assert isinstance(reply, ErrorReply) == (result < 0)


async def settle(daemon) -> None:
    for _ in range(400):
        if not daemon.server.connections:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("connections not torn down")


async def fuzz_one(daemon, hello_first: bool, msgs: list[Msg]) -> None:
    fds_before, maps_before = open_fds(), mapping_count()
    loop = asyncio.get_running_loop()
    good = await VmmClient.connect(daemon.path)
    guest = SimGuest(ram_size=1 << 20, gnttab_frames=1)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await guest.attach(good)
        s.setblocking(False)
        await loop.sock_connect(s, daemon.path)
        framer = Framer(Role.VMM)
        if hello_first:
            await loop.sock_sendall(s, HELLO)
            frames, closed = await read_until(s, framer, 1)
            assert not closed and frames[-1].header.seq == 1
        sent = await send_all(s, msgs)
        if sent[-1].fatal:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)
            frames, closed = await read_until(s, framer, None)
            assert closed
            assert len(frames) < len(sent)  # nothing for the fatal message
            event("fatal header: closed")
        else:
            await loop.sock_sendall(s, HEADER.pack(9, 1, 4, FOLLOW_UP_SEQ) + struct.pack(
                "<I", U32))
            frames, closed = await read_until(s, framer, FOLLOW_UP_SEQ)
            assert not closed, "a sound header must never cost the connection"
            assert len(frames) == len(sent) + 1
            log = daemon.log.getvalue()
            for frame, msg in zip(frames, sent, strict=False):
                check_reply(frame, msg.code, msg.seq, log)
            follow = decode_reply(9, frames[-1].payload)
            said_hello = hello_first or any(
                m.code == 1 and not isinstance(decode_reply(1, f.payload), ErrorReply)
                for f, m in zip(frames, sent, strict=False))
            assert isinstance(follow, StatsReply) if said_hello else (
                isinstance(follow, ErrorReply) and follow.errno == errno.EPROTO)
        # The other connection never noticed.
        assert isinstance(await good.stats(), dict)
    finally:
        s.close()
        await good.close()
        guest.close()
    await settle(daemon)
    log = daemon.log.getvalue()
    assert "request_crashed" not in log and "connection_worker_crashed" not in log
    assert open_fds() <= fds_before
    assert mapping_count() == maps_before


FUZZ = settings(max_examples=examples(70), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(hello_first=st.booleans(), msgs=st.lists(messages(), min_size=1, max_size=3))
async def test_random_messages(daemon, hello_first, msgs):
    await fuzz_one(daemon, hello_first, msgs)


@FUZZ
@given(code=st.sampled_from(REQUEST_CODES), data=st.data())
async def test_each_code_with_mutated_payloads(daemon, code, data):
    payload = data.draw(payloads(code).flatmap(mutated))
    n = 16 + len(payload)
    nfds = data.draw(st.one_of(st.just(FDS_FOR.get(code, 0)), st.integers(0, 3)))
    fds = data.draw(st.lists(st.sampled_from(["memfd", "eventfd", "pipe"]), min_size=nfds,
                             max_size=nfds))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=4))))
    await fuzz_one(daemon, True, [Msg(code, 1, 7, payload, len(payload), fds, cuts)])


@FUZZ
@given(blob=st.binary(min_size=1, max_size=300), cuts=st.lists(st.integers(1, 299),
                                                              max_size=4))
async def test_raw_bytes_get_replies_or_a_clean_close(daemon, blob, cuts):
    """Bytes with no framing promise at all: whatever the daemon makes of them, it
    answers or closes, and once we stop sending it closes; nothing leaks."""
    fds_before, maps_before = open_fds(), mapping_count()
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        await loop.sock_connect(s, daemon.path)
        bounds = [0, *sorted(c for c in set(cuts) if c < len(blob)), len(blob)]
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for a, b in itertools.pairwise(bounds):
                await loop.sock_sendall(s, blob[a:b])
                await asyncio.sleep(0)
            s.shutdown(socket.SHUT_WR)
        framer = Framer(Role.VMM)
        frames, closed = await read_until(s, framer, None)
        assert closed
        for frame in frames:
            assert frame.header.flags & 0x4
    finally:
        s.close()
    await settle(daemon)
    assert "request_crashed" not in daemon.log.getvalue()
    assert open_fds() <= fds_before
    assert mapping_count() == maps_before
    client = await VmmClient.connect(daemon.path)
    assert await client.stats() == {}
    await client.close()


def test_generated_messages_reach_success_and_each_failure():
    """Guards the fuzzing above against exercising only one outcome."""
    seen = set()

    @settings(max_examples=examples(300), deadline=None, database=None)
    @given(msgs=st.lists(messages(), min_size=1, max_size=3))
    def collect(msgs):
        for m in msgs:
            seen.add("fatal" if m.fatal else "sound")
            seen.add("fds" if m.fds else "nofds")
            seen.add("split" if m.cuts else "whole")

    collect()
    assert seen == {"fatal", "sound", "fds", "nofds", "split", "whole"}

