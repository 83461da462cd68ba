"""The migration messages' codecs and the state blob's header and sections."""

from __future__ import annotations

import errno
import struct

import pytest

from backendd import devstate
from backendd.devstate import DEVICE, OPTIONAL, DeviceSection, Section, StateError
from backendd.protocol.messages import (
    FD_COUNTS,
    Code,
    DeviceStateReply,
    EmptyReply,
    GetDeviceState,
    ProtocolError,
    Resume,
    SetDeviceState,
    Suspend,
    decode_reply,
    decode_request,
    encode_reply_payload,
)


@pytest.mark.parametrize("msg", [Suspend(5), Suspend(0xFFFFFFFF), Resume(7),
                                 GetDeviceState(51712), SetDeviceState(3, 1 << 40)])
def test_request_round_trip(msg):
    assert decode_request(msg.code, msg.encode(), msg.fd_count()) == msg


def test_wire_layout_and_fds():
    assert Suspend(1).encode() == struct.pack("<I", 1)
    assert GetDeviceState(9).encode() == struct.pack("<II", 9, 0)
    assert SetDeviceState(9, 100).encode() == struct.pack("<IIQ", 9, 0, 100)
    assert [FD_COUNTS[c] for c in (Code.SUSPEND, Code.RESUME, Code.GET_DEVICE_STATE,
                                   Code.SET_DEVICE_STATE)] == [0, 0, 1, 1]
    assert decode_reply(Code.GET_DEVICE_STATE, encode_reply_payload(
        0, DeviceStateReply(1234).encode())) == DeviceStateReply(1234)
    assert decode_reply(Code.SUSPEND, encode_reply_payload(0)) == EmptyReply()


def test_bad_requests():
    for code, payload, fds, err in [
            (Code.GET_DEVICE_STATE, struct.pack("<II", 1, 1), 1, errno.EINVAL),
            (Code.SET_DEVICE_STATE, struct.pack("<IIQ", 1, 2, 3), 1, errno.EINVAL),
            (Code.GET_DEVICE_STATE, struct.pack("<II", 1, 0), 0, errno.EBADF),
            (Code.SUSPEND, b"\0" * 5, 0, errno.EBADMSG)]:
        with pytest.raises(ProtocolError) as info:
            decode_request(code, payload, fds)
        assert info.value.code == err


def _blob(sections):
    return devstate.encode(1, sections)


def test_blob_round_trip_and_optional_sections():
    dev = DeviceSection(4, True, {"ring-ref": "8"})
    blob = _blob([dev.encode(), Section(0x101, b"abc"), Section(OPTIONAL | 7, b"later")])
    assert blob[:8] == b"BKDSTATE" and len(blob) == struct.unpack_from("<Q", blob, 16)[0]
    got = devstate.decode(blob, 1)
    assert [s.type for s in got] == [DEVICE, 0x101, OPTIONAL | 7]
    device, rest = devstate.split(got, {0x101})
    assert device == dev and rest == [Section(0x101, b"abc")]  # optional one left out
    with pytest.raises(StateError, match="unknown section type 0x7"):
        devstate.split(devstate.decode(_blob([dev.encode(), Section(7, b"")]), 1), set())


@pytest.mark.parametrize("cut", [0, 10, 31, 40])
def test_truncated_blobs(cut):
    blob = _blob([DeviceSection(2, False, {}).encode()])
    with pytest.raises(StateError) as info:
        devstate.decode(blob[:cut], 1)
    assert info.value.code == errno.EINVAL and "truncated" in info.value.message


def test_every_flipped_byte_is_refused():
    blob = _blob([DeviceSection(4, True, {"a": "b"}).encode(), Section(0x101, b"xyz")])
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x40
        with pytest.raises(StateError):
            devstate.decode(bytes(bad), 1)
