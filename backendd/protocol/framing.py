"""An incremental framer for the control stream: bytes and fds in, whole messages out.

Pure: the socket adapter calls `feed()` with what one recvmsg() returned (data and the
fds from its SCM_RIGHTS), and gets back every message completed so far.

Which message owns received fds. A sender passes fds only on the sendmsg() whose data
begins with that message's header and holds no bytes of a later message. Linux stops a
stream recvmsg() right after the segment that carried fds, so the fds of one recvmsg()
belong to the last header that begins in its data. fds that arrive with no header
beginning in the data cannot be attributed: that is fatal.

A header the framer cannot trust (wrong version, unknown flag bits, a flag not allowed in
this direction, a size over MAX_PAYLOAD) is fatal too: the size field is the only way to
find the next message, so the stream cannot be resynchronised and the connection must be
closed. Everything inside a well-framed payload is the decoder's business and gets an
error reply instead.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum

from backendd.protocol.messages import (
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    Flags,
    Header,
    Message,
    encode_reply_payload,
)


class FatalFramingError(Exception):
    """The stream can no longer be framed; close the connection. Not a ControlError on
    purpose: it must never be turned into an error reply."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Role(Enum):
    DAEMON = "daemon"  # receives requests
    VMM = "vmm"  # receives replies and notices


@dataclass(frozen=True)
class Frame:
    header: Header
    payload: bytes
    fds: tuple[int, ...] = ()


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Framer:
    def __init__(self, role: Role = Role.DAEMON) -> None:
        self.role = role
        self._buf = bytearray()
        self._header: Header | None = None
        self._fds: tuple[int, ...] = ()
        self._dead: FatalFramingError | None = None

    @property
    def pending_bytes(self) -> int:
        return len(self._buf) + (HEADER_SIZE if self._header else 0)

    def close(self) -> None:
        """The connection is gone: close the fds of the message still being received."""
        _close_all(self._fds)
        self._fds = ()

    def _check(self, header: Header) -> None:
        if header.version != PROTOCOL_VERSION:
            raise FatalFramingError(_errno.EPROTO, f"header version {header.version}, not 1")
        if header.flags & ~KNOWN_FLAGS:
            raise FatalFramingError(_errno.EPROTO, f"unknown header flags {header.flags:#x}")
        kind = header.flags & (Flags.REPLY | Flags.NOTICE)
        if self.role is Role.DAEMON and kind:
            raise FatalFramingError(_errno.EPROTO, "REPLY or NOTICE flag on a request")
        if self.role is Role.VMM and kind not in (Flags.REPLY, Flags.NOTICE):
            raise FatalFramingError(_errno.EPROTO, "message is neither a reply nor a notice")
        if header.size > MAX_PAYLOAD:
            raise FatalFramingError(
                _errno.EMSGSIZE, f"payload of {header.size} bytes, limit {MAX_PAYLOAD}"
            )

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Frame]:
        """Take one recvmsg()'s data and fds. On FatalFramingError every fd the framer
        still holds, including those of messages completed in this call, is closed."""
        frames: list[Frame] = []
        try:
            if self._dead is not None:
                raise self._dead
            self._feed(bytes(data), tuple(fds), frames)
        except FatalFramingError as exc:
            self._dead = exc
            _close_all(list(fds) + list(self._fds) + [fd for f in frames for fd in f.fds])
            self._fds = ()
            raise
        return frames

    def _feed(self, data: bytes, fds: tuple[int, ...], frames: list[Frame]) -> None:
        # True while the next byte of _buf is the first byte of a header and came in this
        # chunk: the buffer only ever holds an incomplete message, so once one completes
        # here, the rest is from this chunk.
        at_boundary = self._header is None and not self._buf
        self._buf += data
        owner: int | None = None  # index (into frames, or len(frames) = pending) owning fds
        while True:
            if self._header is None:
                if at_boundary and self._buf:
                    owner = len(frames)
                if len(self._buf) < HEADER_SIZE:
                    break
                header = Header.unpack(bytes(self._buf[:HEADER_SIZE]))
                self._check(header)
                self._header = header
                del self._buf[:HEADER_SIZE]
            size = self._header.size
            if len(self._buf) < size:
                break
            frames.append(Frame(self._header, bytes(self._buf[:size]), self._fds))
            del self._buf[:size]
            self._header = None
            self._fds = ()
            at_boundary = True
        if not fds:
            return
        if owner is None:
            raise FatalFramingError(_errno.EBADF, "fds arrived with no message header")
        if owner < len(frames):
            frames[owner] = replace(frames[owner], fds=fds)
        else:
            self._fds = fds


def encode_message(code: int, flags: int, seq: int, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes, limit {MAX_PAYLOAD}")
    return Header(code, PROTOCOL_VERSION | flags, len(payload), seq).pack() + payload


def encode_request(seq: int, msg: Message) -> bytes:
    return encode_message(msg.code, 0, seq, msg.encode())


def encode_notice(msg: Message) -> bytes:
    # Notices answer nothing, so seq is 0.
    return encode_message(msg.code, Flags.NOTICE, 0, msg.encode())


def encode_reply(seq: int, code: int, result: int = 0, body: bytes | Message = b"") -> bytes:
    """A reply to request `seq`: result 0 with the body, or -errno (prefer encode_error)."""
    raw = body.encode() if isinstance(body, Message) else body
    return encode_message(code, Flags.REPLY, seq, encode_reply_payload(result, raw))


def encode_error(seq: int, code: int, errno: int, message: str) -> bytes:
    """An error reply; `errno` is positive and goes on the wire as -errno."""
    if errno <= 0:
        raise ValueError("errno must be positive")
    return encode_message(code, Flags.REPLY, seq, encode_reply_payload(-errno, b"", message))
