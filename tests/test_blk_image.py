"""Opening the backing store: only files and block devices, and never a blocking open."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from backendd.devices.blk.config import parse_config
from backendd.devices.blk.image import Image
from backendd.errors import ConfigError


@pytest.mark.parametrize("mode", ["r", "w"])
def test_a_fifo_is_refused_without_blocking(tmp_path: Path, mode: str) -> None:
    """A FIFO with no writer blocks a plain read-only open forever; the daemon's event loop
    opens images, so the open must return and the path be refused."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def open_it() -> None:
        try:
            Image(parse_config({"path": str(fifo), "mode": mode})).close()
        except BaseException as e:  # handed to the test thread
            outcome.append(e)

    opener = threading.Thread(target=open_it, daemon=True)
    opener.start()
    opener.join(timeout=30)
    if opener.is_alive():
        # Unblock the stuck open so the thread ends, then fail.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("opening a FIFO as a disk image blocked")
    assert len(outcome) == 1 and isinstance(outcome[0], ConfigError)
    assert "neither a file nor a block device" in str(outcome[0])


def test_an_image_is_served_with_blocking_io(tmp_path: Path) -> None:
    """The non-blocking open is for the open alone: the fd used for I/O is blocking."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    image = Image(parse_config({"path": str(path)}))
    try:
        assert not fcntl.fcntl(image.fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert image.sectors == (1 << 20) // 512
    finally:
        image.close()
