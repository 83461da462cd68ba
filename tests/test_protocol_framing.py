"""The stream framer: split anywhere, fds to the right message, fatal headers."""

import errno
import os
import struct

import pytest

from backendd.protocol.framing import (
    FatalFramingError,
    Framer,
    Role,
    encode_error,
    encode_message,
    encode_notice,
    encode_reply,
    encode_request,
)
from backendd.protocol.messages import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    AddDevice,
    AddMemRegion,
    Code,
    DeviceType,
    ErrorReply,
    Flags,
    FrontendMisbehaved,
    Hello,
    HelloReply,
    decode_reply,
    decode_request,
)

STREAM = [
    encode_request(1, Hello(1, 0)),
    encode_request(2, AddMemRegion(0, 1 << 20, 0)),
    encode_request(3, AddDevice(7, DeviceType.BLK, {"path": "/img"})),
]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def pipe_fd():
    r, w = os.pipe()
    yield r
    for fd in (r, w):
        if _is_open(fd):
            os.close(fd)


def test_split_at_every_byte_boundary():
    data = b"".join(STREAM)
    for cut in range(len(data) + 1):
        framer = Framer()
        frames = framer.feed(data[:cut]) + framer.feed(data[cut:])
        assert [f.header.seq for f in frames] == [1, 2, 3]
        assert [HEADER_SIZE + len(f.payload) for f in frames] == [len(m) for m in STREAM]
        assert framer.pending_bytes == 0


def test_byte_at_a_time():
    framer = Framer()
    frames = [f for b in b"".join(STREAM) for f in framer.feed(bytes([b]))]
    msgs = [decode_request(f.header.code, f.payload, 1 if f.header.seq == 2 else 0) for f in frames]
    assert msgs[2] == AddDevice(7, DeviceType.BLK, {"path": "/img"})


def test_fds_go_to_the_message_whose_header_they_came_with(pipe_fd):
    framer = Framer()
    # First chunk ends inside message 1; the fd comes with the chunk holding header 2.
    a, b = STREAM[0], STREAM[1]
    assert framer.feed(a[:5]) == []
    frames = framer.feed(a[5:] + b[:3], [pipe_fd])
    assert [f.fds for f in frames] == [()]
    frames = framer.feed(b[3:])
    assert frames[0].header.seq == 2 and frames[0].fds == (pipe_fd,)


def test_fds_go_to_the_last_header_in_the_chunk(pipe_fd):
    framer = Framer()
    frames = framer.feed(STREAM[0] + STREAM[1], [pipe_fd])
    assert [f.fds for f in frames] == [(), (pipe_fd,)]


def test_fds_without_a_header_are_fatal_and_closed(pipe_fd):
    framer = Framer()
    framer.feed(STREAM[2][: HEADER_SIZE + 2])
    with pytest.raises(FatalFramingError) as ei:
        framer.feed(STREAM[2][HEADER_SIZE + 2 :], [pipe_fd])
    assert ei.value.code == errno.EBADF
    assert not _is_open(pipe_fd)
    with pytest.raises(FatalFramingError):
        framer.feed(STREAM[0])  # the framer stays dead


def _raw(code=1, flags=1, size=0, seq=0):
    return struct.pack("<IIII", code, flags, size, seq)


@pytest.mark.parametrize(
    "header",
    [
        _raw(flags=0),  # version 0
        _raw(flags=2),  # version 2
        _raw(flags=1 | Flags.REPLY),  # a reply sent to the daemon
        _raw(flags=1 | Flags.NOTICE),
        _raw(flags=1 | 0x10),  # unknown flag bit
        _raw(size=MAX_PAYLOAD + 1),
        _raw(size=0xFFFFFFFF),
    ],
)
def test_bad_headers_are_fatal(header):
    with pytest.raises(FatalFramingError):
        Framer().feed(header)


def test_max_payload_is_allowed():
    framer = Framer()
    frames = framer.feed(_raw(size=MAX_PAYLOAD, seq=9) + bytes(MAX_PAYLOAD))
    assert frames[0].header.size == MAX_PAYLOAD


def test_fatal_closes_fds_of_messages_completed_in_the_same_chunk(pipe_fd):
    framer = Framer()
    # The fd goes to the last header, the bad one; everything held is closed.
    with pytest.raises(FatalFramingError) as ei:
        framer.feed(STREAM[0] + _raw(size=MAX_PAYLOAD + 1), [pipe_fd])
    assert ei.value.code == errno.EMSGSIZE
    assert not _is_open(pipe_fd)


def test_close_releases_a_partial_message_fds(pipe_fd):
    framer = Framer()
    framer.feed(STREAM[1][:4], [pipe_fd])
    framer.close()
    assert not _is_open(pipe_fd)


def test_vmm_side_accepts_replies_and_notices_only():
    framer = Framer(Role.VMM)
    data = (
        encode_reply(1, Code.HELLO, 0, HelloReply(1, 0))
        + encode_error(2, Code.ADD_DEVICE, errno.ENOENT, "no such file")
        + encode_notice(FrontendMisbehaved(7, "bad ring"))
    )
    frames = framer.feed(data)
    assert [f.header.is_reply for f in frames] == [True, True, False]
    assert frames[2].header.is_notice and frames[2].header.seq == 0
    assert decode_reply(Code.HELLO, frames[0].payload) == HelloReply(1, 0)
    assert decode_reply(Code.ADD_DEVICE, frames[1].payload) == ErrorReply(
        errno.ENOENT, "no such file"
    )
    with pytest.raises(FatalFramingError):
        Framer(Role.VMM).feed(STREAM[0])  # a request is not for the VMM


def test_reply_echoes_seq_and_code():
    raw = encode_error(0xDEADBEEF, Code.GET_STATS, errno.EINVAL, "x")
    code, flags, size, seq = struct.unpack_from("<IIII", raw)
    assert (code, flags, size, seq) == (Code.GET_STATS, 1 | Flags.REPLY, 9, 0xDEADBEEF)
    assert struct.unpack_from("<iI", raw, HEADER_SIZE) == (-errno.EINVAL, 1)
    with pytest.raises(ValueError):
        encode_error(1, Code.HELLO, 0, "no errno")
    with pytest.raises(ValueError):
        encode_message(1, 0, 1, bytes(MAX_PAYLOAD + 1))
