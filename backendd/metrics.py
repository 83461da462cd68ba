"""Per-device counters in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

_NAME_OK = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(counter: str) -> str:
    return "backendd_" + _NAME_OK.sub("_", counter)


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(devices: Iterable[tuple[Mapping[str, str], Mapping[str, int]]]) -> str:
    """`devices`: (labels, counters) per device. Counters with the same name across
    devices are grouped under one TYPE line, as the format requires."""
    by_name: dict[str, list[tuple[Mapping[str, str], int]]] = {}
    for labels, counters in devices:
        for counter, value in counters.items():
            by_name.setdefault(metric_name(counter), []).append((labels, value))
    lines: list[str] = []
    for name in sorted(by_name):
        kind = "gauge" if name.endswith(("in_flight", "_queued_bytes", "_pending")) else "counter"
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in by_name[name]:
            label_text = ",".join(f'{k}="{_label_value(str(v))}"' for k, v in labels.items())
            lines.append(f"{name}{{{label_text}}} {value}")
    return "\n".join(lines) + "\n"
