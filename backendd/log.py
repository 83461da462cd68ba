"""Structured logging: one logfmt line per event on stdout.

Each line starts with a `<N>` syslog priority prefix, which journald strips and turns into
the entry's priority (SyslogLevelPrefix=yes is systemd's default), so `journalctl -p warning`
works without a journald client library. Guest-caused events go through `GuestLogLimiter`:
a guest that floods bad requests must not flood the host's journal (XSA-332's spirit)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

LEVELS = {"debug": 7, "info": 6, "warning": 4, "error": 3}


def _format_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\n\\'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def format_event(level: str, event: str, fields: dict[str, Any]) -> str:
    parts = [f"<{LEVELS[level]}>level={level}", f"event={_format_value(event)}"]
    parts += [f"{key}={_format_value(value)}" for key, value in fields.items()]
    return " ".join(parts)


class EventLog:
    """Writes events at or above `level` to `stream`."""

    def __init__(self, level: str = "info", stream: TextIO | None = None) -> None:
        self._threshold = LEVELS[level]
        self._stream = stream if stream is not None else sys.stdout

    def log(self, level: str, event: str, **fields: Any) -> None:
        if LEVELS[level] > self._threshold:
            return
        self._stream.write(format_event(level, event, fields) + "\n")
        self._stream.flush()

    def debug(self, event: str, **fields: Any) -> None:
        self.log("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.log("error", event, **fields)


class GuestLogLimiter:
    """At most `burst` lines per `window` seconds for each (guest, device, kind); the count
    of suppressed lines is reported on the next line that gets through."""

    def __init__(self, log: EventLog, burst: int = 10, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._burst = burst
        self._window = window
        self._clock = clock
        self._state: dict[tuple, list[float | int]] = {}  # key -> [window start, sent, held]

    def warning(self, key: tuple, event: str, **fields: Any) -> bool:
        """Log unless over the limit; returns whether the line was written."""
        return self.log("warning", key, event, **fields)

    def log(self, level: str, key: tuple, event: str, **fields: Any) -> bool:
        now = self._clock()
        state = self._state.get(key)
        if state is None or now - state[0] >= self._window:
            suppressed = int(state[2]) if state else 0
            state = [now, 0, 0]
            self._state[key] = state
            if suppressed:
                fields = {**fields, "suppressed": suppressed}
        if state[1] >= self._burst:
            state[2] += 1
            return False
        state[1] += 1
        self._log.log(level, event, **fields)
        return True

    def forget(self, key_prefix: tuple) -> None:
        """Drop the state of a device or guest that went away."""
        n = len(key_prefix)
        for key in [k for k in self._state if k[:n] == key_prefix]:
            del self._state[key]


class EventLogHandler(logging.Handler):
    """Routes stdlib `logging` records (the device modules log through it) into the
    EventLog, so every line the daemon prints has the same logfmt shape and priority."""

    def __init__(self, log: EventLog) -> None:
        super().__init__()
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            level = "error"
        elif record.levelno >= logging.WARNING:
            level = "warning"
        elif record.levelno >= logging.INFO:
            level = "info"
        else:
            level = "debug"
        fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            fields["traceback"] = logging.Formatter().formatException(record.exc_info)
        try:
            self._log.log(level, "log", **fields)
        except Exception:
            self.handleError(record)


def route_stdlib_logging(log: EventLog, level: str) -> EventLogHandler:
    """Install the bridge on the root logger (idempotent per EventLog)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, EventLogHandler):
            root.removeHandler(handler)
    handler = EventLogHandler(log)
    root.addHandler(handler)
    root.setLevel({"debug": logging.DEBUG, "info": logging.INFO,
                   "warning": logging.WARNING, "error": logging.ERROR}[level])
    return handler
