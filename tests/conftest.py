"""Shared fixtures: the real daemon, in-process, on the test's event loop (uvloop, as in
production), listening on a real unix socket in a temporary directory."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop

from backendd.config import Config, DaemonSection
from backendd.log import EventLog
from backendd.server import Server


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
