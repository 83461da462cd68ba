"""Control message codecs: round trips, the documented example, and every refusal."""

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples

from backendd.errors import ControlError
from backendd.protocol.messages import (
    ALL_DEVICES,
    FD_COUNTS,
    HEADER_SIZE,
    KV_MAX_KEY,
    KV_MAX_VALUE,
    MAX_CHANNELS,
    MAX_PAYLOAD,
    NOTICES,
    REPLIES,
    REQUESTS,
    AddDevice,
    AddMemRegion,
    Code,
    DeviceFailed,
    DeviceType,
    EmptyReply,
    ErrorReply,
    FrontendMisbehaved,
    FrontendState,
    GetBackendState,
    GetStats,
    Header,
    Hello,
    HelloReply,
    KeysChanged,
    ProtocolError,
    RemoveDevice,
    RemoveMemRegion,
    SetGrantTable,
    StateReply,
    StatsReply,
    decode_kv,
    decode_notice,
    decode_reply,
    decode_request,
    encode_kv,
    encode_reply_payload,
)
from rings.consts import XenbusState

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"))
keys = text.filter(lambda s: 0 < len(s.encode()) <= KV_MAX_KEY)
values = text.filter(lambda s: len(s.encode()) <= KV_MAX_VALUE)
kvs = st.dictionaries(keys, values, max_size=5)
states = st.sampled_from(list(XenbusState))


def ranges():
    return st.tuples(u64, st.integers(1, 2**64)).filter(lambda t: t[0] + t[1] <= 2**64)


requests = st.one_of(
    st.builds(Hello, u32, u64),
    ranges().flatmap(lambda r: st.builds(AddMemRegion, st.just(r[0]), st.just(r[1]), u64)),
    ranges().map(lambda r: RemoveMemRegion(*r)),
    st.builds(SetGrantTable, st.sampled_from([1, 2]), st.integers(1, 2**32 - 1), u64, u16),
    st.builds(AddDevice, u32, st.sampled_from(list(DeviceType)), kvs),
    st.builds(RemoveDevice, u32),
    st.builds(FrontendState, u32, states, kvs, st.lists(u32, max_size=MAX_CHANNELS).map(tuple)),
    st.builds(GetBackendState, u32),
    st.builds(GetStats, u32),
)


@settings(max_examples=examples(300), deadline=None)
@given(requests)
def test_request_round_trip(msg):
    payload = msg.encode()
    assert len(payload) <= MAX_PAYLOAD
    assert decode_request(msg.code, payload, msg.fd_count()) == msg


notices = st.one_of(
    st.builds(DeviceFailed, u32, st.integers(1, 2**31), values),
    st.builds(FrontendMisbehaved, u32, values),
    st.builds(KeysChanged, u32, states, kvs),
)


@settings(max_examples=examples(200), deadline=None)
@given(notices)
def test_notice_round_trip(msg):
    assert decode_notice(msg.code, msg.encode()) == msg


replies = st.one_of(
    st.tuples(st.just(Code.HELLO), st.builds(HelloReply, u32, u64)),
    st.tuples(
        st.sampled_from([Code.ADD_DEVICE, Code.FRONTEND_STATE, Code.GET_BACKEND_STATE]),
        st.builds(StateReply, states, kvs),
    ),
    st.tuples(st.just(Code.GET_STATS), st.builds(StatsReply, kvs)),
    st.tuples(
        st.sampled_from([Code.ADD_MEM_REGION, Code.REMOVE_MEM_REGION, Code.REMOVE_DEVICE]),
        st.just(EmptyReply()),
    ),
)


@settings(max_examples=examples(200), deadline=None)
@given(replies)
def test_reply_round_trip(pair):
    code, body = pair
    assert decode_reply(code, encode_reply_payload(0, body.encode())) == body


@given(st.integers(1, 200), text)
def test_error_reply_round_trip(err, message):
    payload = encode_reply_payload(-err, message=message)
    assert decode_reply(Code.ADD_DEVICE, payload) == ErrorReply(err, message)


def test_error_reply_message_is_cut_to_fit():
    payload = encode_reply_payload(-errno.EINVAL, message="é" * MAX_PAYLOAD)
    assert len(payload) <= MAX_PAYLOAD
    reply = decode_reply(Code.HELLO, payload)
    assert isinstance(reply, ErrorReply) and set(reply.message) == {"é"}


def test_every_code_has_a_class():
    assert set(REQUESTS) | set(NOTICES) == set(Code)
    assert set(REPLIES) == set(REQUESTS) == set(FD_COUNTS)
    assert FD_COUNTS[Code.ADD_MEM_REGION] == FD_COUNTS[Code.SET_GRANT_TABLE] == 1
    assert FD_COUNTS[Code.FRONTEND_STATE] is None
    assert FD_COUNTS[Code.HELLO] == FD_COUNTS[Code.ADD_DEVICE] == 0


# The example of docs/protocol.md, byte for byte.
DOC_EXAMPLE = bytes.fromhex(
    "05000000 01000000 18000000 03000000"
    " 00ca0000 01000000 01000000 0400 0400 70617468 2f696d67".replace(" ", "")
)


def test_doc_example_decodes_as_documented():
    header = Header.unpack(DOC_EXAMPLE[:HEADER_SIZE])
    assert header == Header(code=Code.ADD_DEVICE, flags=1, size=24, seq=3)
    assert header.version == 1 and not header.is_reply and not header.is_notice
    payload = DOC_EXAMPLE[HEADER_SIZE:]
    assert len(payload) == header.size
    msg = decode_request(header.code, payload, 0)
    assert msg == AddDevice(devid=0xCA00, type=DeviceType.BLK, config={"path": "/img"})
    assert msg.encode() == payload


def _err(code, exc_info):
    assert isinstance(exc_info.value, ControlError)
    assert exc_info.value.code == code


@pytest.mark.parametrize("msg", [Hello(1, 0), SetGrantTable(1, 4, 0, 0), RemoveDevice(7)])
def test_short_and_long_payloads_are_ebadmsg(msg):
    payload = msg.encode()
    for bad in (payload[:-1], payload + b"\0", b""):
        with pytest.raises(ProtocolError) as ei:
            decode_request(msg.code, bad, msg.fd_count())
        _err(errno.EBADMSG, ei)


@pytest.mark.parametrize(
    "msg",
    [
        AddDevice(1, DeviceType.NET, {"mac": "00:16:3e:00:00:01"}),
        FrontendState(1, XenbusState.CONNECTED, {"ring-ref": "8"}, (3, 4)),
    ],
)
def test_every_truncation_is_ebadmsg(msg):
    payload = msg.encode()
    for n in range(len(payload)):
        with pytest.raises(ProtocolError) as ei:
            decode_request(msg.code, payload[:n], msg.fd_count())
        _err(errno.EBADMSG, ei)
    with pytest.raises(ProtocolError) as ei:
        decode_request(msg.code, payload + b"x", msg.fd_count())
    _err(errno.EBADMSG, ei)


@pytest.mark.parametrize(
    "code,payload",
    [
        (Code.ADD_DEVICE, struct.pack("<III", 1, 3, 0)),  # device type 3
        (Code.SET_GRANT_TABLE, struct.pack("<IIQHH", 3, 1, 0, 0, 0)),  # version 3
        (Code.SET_GRANT_TABLE, struct.pack("<IIQHH", 1, 0, 0, 0, 0)),  # no frames
        (Code.SET_GRANT_TABLE, struct.pack("<IIQHH", 1, 1, 0, 0, 1)),  # padding
        (Code.ADD_MEM_REGION, struct.pack("<QQQ", 0, 0, 0)),  # empty region
        (Code.ADD_MEM_REGION, struct.pack("<QQQ", 2**64 - 4096, 8192, 0)),  # wraps
        (Code.REMOVE_MEM_REGION, struct.pack("<QQ", 4096, 0)),
        (Code.FRONTEND_STATE, struct.pack("<IIII", 1, 9, 0, 0)),  # state 9
        (Code.FRONTEND_STATE, struct.pack("<IIII", 1, 4, 0, MAX_CHANNELS + 1)),
    ],
)
def test_bad_values_are_einval(code, payload):
    with pytest.raises(ProtocolError) as ei:
        decode_request(code, payload, FD_COUNTS[code] or 0)
    _err(errno.EINVAL, ei)


def test_unknown_code_and_notice_as_request():
    with pytest.raises(ProtocolError) as ei:
        decode_request(99, b"", 0)
    _err(errno.EOPNOTSUPP, ei)
    with pytest.raises(ProtocolError) as ei:
        decode_request(Code.KEYS_CHANGED, KeysChanged(1, XenbusState.CLOSED).encode(), 0)
    _err(errno.EPROTO, ei)
    with pytest.raises(ProtocolError) as ei:
        decode_notice(Code.HELLO, Hello(1, 0).encode())
    _err(errno.EPROTO, ei)


@pytest.mark.parametrize(
    "msg,wrong",
    [
        (Hello(1, 0), 1),
        (AddMemRegion(0, 4096, 0), 0),
        (AddMemRegion(0, 4096, 0), 2),
        (SetGrantTable(1, 1, 0, 0), 0),
        (FrontendState(1, XenbusState.CONNECTED, {}, (5,)), 1),
        (FrontendState(1, XenbusState.CONNECTED, {}, (5,)), 3),
        (FrontendState(1, XenbusState.CLOSING, {}, ()), 2),
    ],
)
def test_wrong_fd_count_is_ebadf(msg, wrong):
    assert decode_request(msg.code, msg.encode(), msg.fd_count()) == msg
    with pytest.raises(ProtocolError) as ei:
        decode_request(msg.code, msg.encode(), wrong)
    _err(errno.EBADF, ei)


def test_frontend_state_wants_two_fds_per_channel():
    assert FrontendState(1, XenbusState.CONNECTED, {}, (1, 2, 3)).fd_count() == 6


def test_get_stats_all():
    assert decode_request(Code.GET_STATS, struct.pack("<I", ALL_DEVICES), 0) == GetStats(
        ALL_DEVICES
    )


def test_device_failed_needs_negative_errno():
    payload = struct.pack("<Ii", 1, 0) + encode_kv({})
    with pytest.raises(ProtocolError) as ei:
        decode_notice(Code.DEVICE_FAILED, payload)
    _err(errno.EINVAL, ei)
    raw = DeviceFailed(1, errno.EIO, "disk gone").encode()
    assert struct.unpack_from("<Ii", raw) == (1, -errno.EIO)


# --- key/value maps -----------------------------------------------------------------


def _pair(k: bytes, v: bytes) -> bytes:
    return struct.pack("<HH", len(k), len(v)) + k + v


def _map(*pairs: bytes) -> bytes:
    return struct.pack("<I", len(pairs)) + b"".join(pairs)


def test_kv_layout():
    assert encode_kv({"a": "bc"}) == b"\x01\0\0\0\x01\0\x02\0abc"
    assert encode_kv({}) == b"\0\0\0\0"
    assert decode_kv(b"xx" + encode_kv({"k": ""}), 2) == ({"k": ""}, 2 + 9)


def test_kv_limits_accepted_at_the_edge():
    kv = {"k" * KV_MAX_KEY: "v" * KV_MAX_VALUE}
    assert decode_kv(encode_kv(kv)) == (kv, len(encode_kv(kv)))


@pytest.mark.parametrize(
    "raw",
    [
        _map(_pair(b"a\0b", b"1")),
        _map(_pair(b"a", b"1\0")),
        _map(_pair(b"\xff", b"1")),
        _map(_pair(b"a", b"\xc3")),
        _map(_pair(b"", b"1")),
        _map(_pair(b"k" * (KV_MAX_KEY + 1), b"1")),
        _map(_pair(b"k", b"v" * (KV_MAX_VALUE + 1))),
        _map(_pair(b"k", b"1"), _pair(b"k", b"2")),
    ],
)
def test_kv_bad_content_is_einval(raw):
    with pytest.raises(ProtocolError) as ei:
        decode_kv(raw)
    _err(errno.EINVAL, ei)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x01\0\0",
        _map(_pair(b"key", b"value"))[:-1],
        struct.pack("<I", 2) + _pair(b"a", b"b"),
        struct.pack("<I", 2**32 - 1),
    ],
)
def test_kv_truncated_is_ebadmsg(raw):
    with pytest.raises(ProtocolError) as ei:
        decode_kv(raw)
    _err(errno.EBADMSG, ei)


@pytest.mark.parametrize(
    "kv",
    [{"a\0": "1"}, {"": "1"}, {"k" * (KV_MAX_KEY + 1): ""}, {"k": "v" * (KV_MAX_VALUE + 1)}],
)
def test_kv_encode_refuses_what_decode_refuses(kv):
    with pytest.raises(ProtocolError):
        encode_kv(kv)


@given(st.binary(max_size=64))
def test_kv_garbage_gives_a_map_or_a_protocol_error(raw):
    try:
        kv, end = decode_kv(raw)
    except ProtocolError as exc:
        assert exc.code in (errno.EBADMSG, errno.EINVAL)
    else:
        assert end <= len(raw) and encode_kv(kv) == raw[:end]


@given(st.sampled_from(sorted(REQUESTS)), st.binary(max_size=80), st.integers(0, 3))
def test_request_garbage_gives_a_message_or_a_protocol_error(code, raw, nfds):
    try:
        decode_request(code, raw, nfds)
    except ProtocolError as exc:
        assert exc.code in (errno.EBADMSG, errno.EINVAL, errno.EBADF)


def test_bad_replies():
    with pytest.raises(ProtocolError) as ei:
        decode_reply(Code.HELLO, struct.pack("<i", 1))
    _err(errno.EBADMSG, ei)
    with pytest.raises(ProtocolError) as ei:
        decode_reply(Code.HELLO, struct.pack("<iI", -5, 10) + b"short")
    _err(errno.EBADMSG, ei)
    with pytest.raises(ProtocolError) as ei:
        decode_reply(Code.REMOVE_DEVICE, struct.pack("<i", 0) + b"x")
    _err(errno.EBADMSG, ei)
    with pytest.raises(ValueError):
        encode_reply_payload(1)


def test_hello_with_and_without_the_optional_map():
    # The original 12-byte HELLO stays valid; the map follows it only when given.
    assert Hello(1, 0).encode() == struct.pack("<IQ", 1, 0)
    named = Hello(1, 0, {"name": "vm1"})
    assert named.encode() == struct.pack("<IQ", 1, 0) + encode_kv({"name": "vm1"})
    assert decode_request(Code.HELLO, named.encode(), 0) == named
    # The reply never carries a map: a VMM written for 12 bytes still decodes it.
    assert HelloReply(1, 0).encode() == struct.pack("<IQ", 1, 0)
