"""The kinds of fd a VMM may hand over, checked at the request that carries them.

Rules (docs/protocol.md, "What a VMM must do"):
- event channels are eventfds: /proc/self/fdinfo/N has an `eventfd-count` line (a pipe,
  socket or regular file would be "readable" too, which is why readiness is no test);
- guest memory, the grant table and the SET_INFLIGHT region are memfds (shmem or
  hugetlbfs) carrying F_SEAL_SHRINK, and already long enough for what is mapped: a
  region that can shrink under a mapping turns the daemon's next access into SIGBUS.

A broken rule is a ControlError (EBADF) naming the rule, so the request gets an error
reply and changes nothing. The checks only read: no fd flag or seal is changed, since the
VMM shares each open file description with the daemon.
"""

from __future__ import annotations

import errno
import fcntl
import os

from .errors import ControlError

EVENTFD_RULE = "fd rule: event channels must be eventfds"
MEMFD_RULE = "fd rule: memory must be a memfd sealed with F_SEAL_SHRINK"


def is_eventfd(fd: int) -> bool:
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            info = f.read()
    except OSError:
        return False
    return b"\neventfd-count:" in info


def require_eventfd(fd: int, what: str) -> None:
    if not is_eventfd(fd):
        raise ControlError(errno.EBADF, f"{what}: {_describe(fd)} is not an eventfd "
                           f"({EVENTFD_RULE})")


def require_sealed_memfd(fd: int, what: str, offset: int, size: int) -> None:
    """`fd` must be a memfd with F_SEAL_SHRINK whose size covers [offset, offset+size)."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        # EINVAL: not a file that can carry seals (only memfds and hugetlbfs memfds can).
        raise ControlError(errno.EBADF, f"{what}: {_describe(fd)} is not a memfd "
                           f"({MEMFD_RULE})") from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise ControlError(errno.EBADF, f"{what}: memfd without F_SEAL_SHRINK "
                           f"({MEMFD_RULE})")
    length = os.fstat(fd).st_size
    if offset + size > length:
        raise ControlError(errno.EINVAL, f"{what}: mmap_offset {offset:#x} + size "
                           f"{size:#x} runs past the memfd's {length:#x} bytes")


def _describe(fd: int) -> str:
    try:
        return repr(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return f"fd {fd}"
