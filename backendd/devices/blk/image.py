"""The backing store: an image file or a block device, opened once per device.

Discard is advertised only when it can be honoured: hole punching on a file
(fallocate PUNCH_HOLE|KEEP_SIZE, probed once beyond the end of the file, where it changes
nothing) or BLKDISCARD on a block device whose queue accepts discards. Secure discard
(data unrecoverable) is never promised: neither a punched hole nor a plain discard
guarantees it, so it is not advertised and such requests get EOPNOTSUPP.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct

from backendd.errors import ConfigError

from .config import BlkConfig

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLKGETSIZE64 = 0x80081272
BLKPBSZGET = 0x127B
BLKDISCARD = 0x1277

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a byte range of a file; it reads back as zeros, the size is kept."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Image:
    """An open backing store and what the guest may be told about it."""

    def __init__(self, cfg: BlkConfig) -> None:
        self.cfg = cfg
        # O_NONBLOCK for the open alone: opening a FIFO (or a tty, a socket's path...) must
        # not stall the event loop; _probe refuses anything but a file or a block device,
        # and the flag is dropped again before any I/O.
        flags = ((os.O_RDONLY if cfg.readonly else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY
                 | os.O_NONBLOCK)
        if cfg.direct_io:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(cfg.path, flags)
        except OSError as e:
            what = " with direct-io" if cfg.direct_io and e.errno == errno.EINVAL else ""
            raise ConfigError(f"path: cannot open {cfg.path!r}{what}: {e.strerror}") from e
        try:
            self._probe()
            os.set_blocking(self.fd, True)
        except BaseException:
            os.close(self.fd)
            raise

    def _probe(self) -> None:
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if not (self.is_block or stat.S_ISREG(st.st_mode)):
            raise ConfigError(f"path: {self.cfg.path!r} is neither a file nor a block device")
        ssize = self.cfg.sector_size
        if self.is_block:
            size = struct.unpack("Q", fcntl.ioctl(self.fd, BLKGETSIZE64, bytes(8)))[0]
            physical = struct.unpack("I", fcntl.ioctl(self.fd, BLKPBSZGET, bytes(4)))[0]
        else:
            size = st.st_size
            physical = ssize
        # The guest sees whole logical blocks only; a ragged tail is not addressable.
        self.size = size - size % ssize
        if self.size == 0:
            raise ConfigError(f"path: {self.cfg.path!r} is smaller than one sector")
        self.sectors = self.size // 512
        self.physical_sector_size = max(physical, ssize)
        self.discard_granularity = max(os.fstatvfs(self.fd).f_frsize, ssize)
        self.discard = (self.cfg.discard and not self.cfg.readonly and not self.cfg.cdrom
                        and self._can_discard(st))
        self.discard_secure = False

    def _can_discard(self, st: os.stat_result) -> bool:
        if self.is_block:
            dev = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            for attr in ("queue/discard_max_bytes", "../queue/discard_max_bytes"):
                try:
                    with open(f"{dev}/{attr}") as f:
                        return int(f.read()) > 0
                except OSError:
                    continue
            return False
        try:
            # Beyond EOF with KEEP_SIZE: accepted only if the filesystem punches holes,
            # and there is no data there to lose.
            punch_hole(self.fd, max(st.st_size, self.size) + (1 << 20), 4096)
        except OSError:
            return False
        return True

    def current_size(self) -> int:
        """The addressable size now (whole logical blocks): a grown or shrunk image."""
        if self.is_block:
            size = struct.unpack("Q", fcntl.ioctl(self.fd, BLKGETSIZE64, bytes(8)))[0]
        else:
            size = os.fstat(self.fd).st_size
        return size - size % self.cfg.sector_size

    def resized(self) -> bool:
        """Take a new size if the backing store changed; True if it did."""
        size = self.current_size()
        if size == self.size or size == 0:
            return False
        self.size = size
        self.sectors = size // 512
        return True

    def discard_range(self, offset: int, length: int) -> None:
        """Blocking: run it in the I/O pool."""
        if self.is_block:
            fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
        else:
            punch_hole(self.fd, offset, length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
