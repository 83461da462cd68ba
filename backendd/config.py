"""Daemon configuration: a TOML file (stdlib tomllib) whose every key has a default, so
the daemon runs with no file at all. Unknown keys and wrong types are errors that name the
key, since a silently ignored typo in a security setting is worse than a refusal."""

from __future__ import annotations

import os
import pwd
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = Path("/etc/backendd/backendd.toml")
DEFAULT_SOCKET = Path("/run/backendd/backendd.sock")


class ConfigFileError(Exception):
    """The configuration file is unreadable or has a bad key; the message names it."""


@dataclass(frozen=True)
class DaemonSection:
    socket: str = str(DEFAULT_SOCKET)
    # Peers allowed on the control socket, checked with SO_PEERCRED. Empty: only root and
    # the daemon's own uid.
    allowed_uids: list[int] = field(default_factory=list)
    log_level: str = "info"
    io_threads: int = 4
    # The compiled data planes watch their rings this long after each batch, serving
    # what the guest publishes meanwhile without a wake-up of the event loop (blk:
    # spinning; net: every queue of a loop with at most four, asleep in ppoll); 0: off.
    poll_us: int = 30
    # Per guest-caused message kind, at most this many log lines per minute.
    guest_log_burst: int = 10
    # "single": one process serves every connection. "per-connection": a supervisor
    # accepts and hands each VMM connection to a worker process of its own.
    process_model: str = "single"
    # per-connection: the user workers switch to (empty: they keep the daemon's uid).
    worker_user: str = ""
    # per-connection: limits set on each worker right after it is forked (setrlimit, soft
    # and hard). Open files: a worker needs a few dozen for itself, plus per device its
    # image or tap queues and an eventfd pair per ring. Memory: the worker's own private
    # memory (RLIMIT_DATA) in MiB, 0 for no limit; guest RAM is a shared mapping of the
    # VMM's memfds and does not count against it.
    worker_max_open_files: int = 4096
    worker_max_memory_mib: int = 0


@dataclass(frozen=True)
class BlockSection:
    # Image files and block devices must resolve below one of these. Empty: any path.
    allowed_dirs: list[str] = field(default_factory=list)
    # NBD servers a disk's path may name (nbd://, nbds://, nbd+unix://): "HOST:PORT" for
    # TCP, an absolute directory for unix sockets below it. Empty: no NBD disks at all.
    allowed_nbd: list[str] = field(default_factory=list)
    # An NBD server that went away: requests wait this long for it to come back, then
    # fail. A server with requests outstanding that says nothing this long is gone.
    nbd_reconnect_timeout_ms: int = 30000
    nbd_io_timeout_ms: int = 30000
    # TLS for nbds:// disks. Empty: libnbd's defaults (X.509 from $HOME/.pki/libnbd or
    # /etc/pki/libnbd, the login name as user name).
    nbd_tls_certificates: str = ""  # a directory of X.509 files
    nbd_tls_psk_file: str = ""      # a PSK file ("username:hexkey" lines): PSK, not X.509
    nbd_tls_username: str = ""
    # Connections per NBD disk when the server allows several (multi-conn).
    nbd_connections: int = 1


@dataclass(frozen=True)
class NetworkSection:
    # Bridges a vif may be attached to. Empty: any bridge.
    allowed_bridges: list[str] = field(default_factory=list)
    # A nic's `tap` may name a tap that exists already (made by the operator, e.g.
    # persistent) instead of one the daemon creates; never one that anyone holds open.
    attach_existing_taps: bool = False


@dataclass(frozen=True)
class MetricsSection:
    # "127.0.0.1:9466" serves Prometheus text on loopback; empty: no HTTP endpoint.
    listen: str = ""


@dataclass(frozen=True)
class Config:
    daemon: DaemonSection = field(default_factory=DaemonSection)
    block: BlockSection = field(default_factory=BlockSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)

    def peer_allowed(self, uid: int) -> bool:
        if uid in (0, os.getuid()):
            return True
        return uid in self.daemon.allowed_uids

    def image_allowed(self, path: str) -> bool:
        if not self.block.allowed_dirs:
            return True
        real = os.path.realpath(path)
        return any(os.path.commonpath([real, os.path.realpath(d)]) == os.path.realpath(d)
                   for d in self.block.allowed_dirs)

    def bridge_allowed(self, bridge: str) -> bool:
        return not self.network.allowed_bridges or bridge in self.network.allowed_bridges


_LOG_LEVELS = ("debug", "info", "warning", "error")
_PROCESS_MODELS = ("single", "per-connection")


def _check_type(where: str, value: Any, expected: Any) -> Any:
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigFileError(f"{where}: expected true or false, got {value!r}")
    elif expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigFileError(f"{where}: expected an integer, got {value!r}")
    elif expected is str:
        if not isinstance(value, str):
            raise ConfigFileError(f"{where}: expected a string, got {value!r}")
    elif expected in (list[int], list[str]):
        item = int if expected == list[int] else str
        if not isinstance(value, list):
            raise ConfigFileError(f"{where}: expected a list, got {value!r}")
        for i, v in enumerate(value):
            _check_type(f"{where}[{i}]", v, item)
    return value


def _section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigFileError(f"[{name}]: expected a table, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigFileError(f"[{name}] {key}: unknown key (known: {', '.join(known)})")
    hints = {"bool": bool, "int": int, "str": str, "list[int]": list[int], "list[str]": list[str]}
    values = {key: _check_type(f"[{name}] {key}", v, hints[str(known[key].type)])
              for key, v in raw.items()}
    return cls(**values)


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{source}: not valid TOML: {exc}") from None
    sections = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]
    for key in raw:
        if key not in sections:
            raise ConfigFileError(f"{source}: [{key}]: unknown section "
                                  f"(known: {', '.join(sections)})")
    try:
        built = {name: _section(name, type(factory()), raw.get(name, {}))
                 for name, factory in sections.items()}
    except ConfigFileError as exc:
        raise ConfigFileError(f"{source}: {exc}") from None
    config = Config(**built)
    _validate(config, source)
    return config


def _validate(config: Config, source: str) -> None:
    if config.daemon.log_level not in _LOG_LEVELS:
        raise ConfigFileError(f"{source}: [daemon] log_level: {config.daemon.log_level!r} "
                              f"is not one of {', '.join(_LOG_LEVELS)}")
    if not 1 <= config.daemon.io_threads <= 256:
        raise ConfigFileError(f"{source}: [daemon] io_threads: {config.daemon.io_threads} "
                              "is outside 1..256")
    if not 0 <= config.daemon.poll_us <= 1000:
        raise ConfigFileError(f"{source}: [daemon] poll_us: {config.daemon.poll_us} is not "
                              "between 0 and 1000")
    if config.daemon.process_model not in _PROCESS_MODELS:
        raise ConfigFileError(f"{source}: [daemon] process_model: "
                              f"{config.daemon.process_model!r} is not one of "
                              f"{', '.join(_PROCESS_MODELS)}")
    if config.daemon.worker_user:
        try:
            pwd.getpwnam(config.daemon.worker_user)
        except KeyError:
            raise ConfigFileError(f"{source}: [daemon] worker_user: no user "
                                  f"{config.daemon.worker_user!r}") from None
    if not 32 <= config.daemon.worker_max_open_files <= 1 << 20:
        raise ConfigFileError(f"{source}: [daemon] worker_max_open_files: "
                              f"{config.daemon.worker_max_open_files} is outside 32..1048576")
    if not 0 <= config.daemon.worker_max_memory_mib <= 1 << 30:
        raise ConfigFileError(f"{source}: [daemon] worker_max_memory_mib: "
                              f"{config.daemon.worker_max_memory_mib} is outside 0..1073741824")
    if config.daemon.guest_log_burst < 0:
        raise ConfigFileError(f"{source}: [daemon] guest_log_burst: must not be negative")
    for d in config.block.allowed_dirs:
        if not os.path.isabs(d):
            raise ConfigFileError(f"{source}: [block] allowed_dirs: {d!r} is not absolute")
    for name in ("nbd_tls_certificates", "nbd_tls_psk_file"):
        value = getattr(config.block, name)
        if value and not os.path.isabs(value):
            raise ConfigFileError(f"{source}: [block] {name}: {value!r} is not absolute")
    if not 1 <= config.block.nbd_connections <= 16:
        raise ConfigFileError(f"{source}: [block] nbd_connections: outside 1..16")
    for name in ("nbd_reconnect_timeout_ms", "nbd_io_timeout_ms"):
        if not 1 <= getattr(config.block, name) <= 3_600_000:
            raise ConfigFileError(f"{source}: [block] {name}: outside 1..3600000")
    if config.metrics.listen:
        host, _, port = config.metrics.listen.rpartition(":")
        if host not in ("127.0.0.1", "::1", "[::1]", "localhost") or not port.isdigit():
            raise ConfigFileError(f"{source}: [metrics] listen: {config.metrics.listen!r} "
                                  "must be a loopback host:port")


def load_config(path: Path | None) -> Config:
    """Load `path`; with None, the default path if it exists, else the built-in defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigFileError(f"{path}: {exc.strerror}") from None
    return parse_config(text, str(path))
