"""Shared fixtures: the real daemon, in-process, on the test's event loop (uvloop, as in
production), listening on a real unix socket in a temporary directory."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop
from profiles import register

from backendd.config import Config, DaemonSection
from backendd.guest.machine import SimGuest
from backendd.guest.vmm import VmmClient
from backendd.log import EventLog
from backendd.server import Server

register()  # Hypothesis profiles: see tests/profiles.py


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}


@dataclass
class DaemonHandle:
    server: Server
    path: str
    log: io.StringIO

    def log_lines(self) -> list[str]:
        return self.log.getvalue().splitlines()


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[DaemonHandle]:
    path = str(tmp_path / "backendd.sock")
    log = io.StringIO()
    config = Config(daemon=DaemonSection(socket=path, log_level="debug"))
    server = Server(config, EventLog("debug", log))
    await server.start()
    try:
        yield DaemonHandle(server, path, log)
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def _attached_guest(daemon: DaemonHandle, gnttab_version: int
                          ) -> AsyncIterator[tuple[VmmClient, SimGuest]]:
    client = await VmmClient.connect(daemon.path)
    guest = SimGuest(ram_size=48 << 20, gnttab_frames=8, gnttab_version=gnttab_version)
    try:
        await guest.attach(client)
        yield client, guest
    finally:
        await client.close()
        guest.close()


@pytest.fixture
async def vm(daemon: DaemonHandle) -> AsyncIterator[tuple[VmmClient, SimGuest]]:
    """A VMM connection to the daemon and a 48 MiB guest attached to it, with an
    8-frame v1 grant table."""
    async with _attached_guest(daemon, 1) as pair:
        yield pair


@pytest.fixture
async def v2_vm(daemon: DaemonHandle) -> AsyncIterator[tuple[VmmClient, SimGuest]]:
    """The same with a v2 grant table."""
    async with _attached_guest(daemon, 2) as pair:
        yield pair


@pytest.fixture
def freezable_dir(root, tmp_path):
    """A small ext4 filesystem on a loop device, which the test can freeze: writes to it
    block (in the daemon's I/O threads) until it is thawed."""
    for tool in ("mkfs.ext4", "mount", "fsfreeze", "umount"):
        assert shutil.which(tool), f"{tool} is missing (e2fsprogs, util-linux)"
    fs, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(fs, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", str(fs)], check=True)
    subprocess.run(["mount", "-o", "loop", str(fs), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True)
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def root() -> None:
    """One rule for tests that need privileges (taps, namespaces, loop devices, mounts):
    without them they fail with this message, they are never skipped."""
    assert os.geteuid() == 0, "this test needs root (taps, namespaces, mounts): run it as root"
