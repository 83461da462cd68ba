"""The daemon's metrics in the Prometheus text exposition format (version 0.0.4).

One source for `backendd stats --prometheus` and the `[metrics] listen` endpoint: both
render a DAEMON_STATUS map. Names follow the Prometheus conventions (a `backendd_`
prefix, base units in the name, `_total` on counters); every family has HELP and TYPE.
Each known counter of a device type is present from the device's start, at 0 until it
first counts. Device series are labelled by the guest's name (from HELLO), the devid and
the device type, so a guest's series survive its VMM reconnecting."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "counter" or "gauge"
    help: str


def _c(name: str, help_text: str) -> Family:
    return Family(name, "counter", help_text)


_QUEUES = Family("backendd_device_queues", "gauge", "Queues (ring pairs) the device serves.")

# Per device type: counter name as the device reports it -> its metric family.
DEVICE_FAMILIES: dict[str, dict[str, Family]] = {
    "blk": {
        "requests": _c("backendd_blk_requests_total", "Block requests taken from the rings."),
        "reads": _c("backendd_blk_reads_total", "Block read requests completed."),
        "writes": _c("backendd_blk_writes_total", "Block write requests completed."),
        "flushes": _c("backendd_blk_flushes_total", "Block flush and barrier requests."),
        "discards": _c("backendd_blk_discards_total", "Block discard requests."),
        "bytes_read": _c("backendd_blk_read_bytes_total", "Bytes read from the backing store."),
        "bytes_written": _c("backendd_blk_written_bytes_total",
                            "Bytes written to the backing store."),
        "errors": _c("backendd_blk_io_errors_total",
                     "Requests answered with an error after the backing store failed."),
        "invalid": _c("backendd_blk_invalid_requests_total",
                      "Requests refused as invalid (bad segments, grants, sectors)."),
        "unsupported": _c("backendd_blk_unsupported_requests_total",
                          "Requests with an operation the disk does not support."),
        "replayed": _c("backendd_blk_replayed_requests_total",
                       "In-flight requests run again after a daemon restart."),
        "rings_halted": _c("backendd_blk_rings_halted_total",
                           "Rings halted because the guest corrupted them."),
        "persistent": Family("backendd_blk_persistent_grants_negotiated", "gauge",
                             "1 when the frontend negotiated persistent grants at the "
                             "last connect."),
        "pgrants": Family("backendd_blk_persistent_grants_cached", "gauge",
                          "Persistent grants pinned and cached now, all rings."),
        "pgrant_hits": _c("backendd_blk_persistent_grant_hits_total",
                          "Segments served from a cached persistent grant."),
        "pgrant_misses": _c("backendd_blk_persistent_grant_misses_total",
                            "Persistent grants pinned and cached."),
        "pgrant_purged": _c("backendd_blk_persistent_grant_purged_total",
                            "Cached persistent grants released by a purge."),
        "pgrant_overflow": _c("backendd_blk_persistent_grant_overflow_total",
                              "Pins not cached: cache full and busy, or an entry in use "
                              "needing an upgrade."),
        "pgrant_upgrades": _c("backendd_blk_persistent_grant_upgrades_total",
                              "Read-only cached grants made writable."),
        # Disks on NBD exports (0 for the others).
        "nbd_degraded": Family("backendd_blk_nbd_degraded", "gauge",
                               "1 while the disk's NBD connection is down."),
        "nbd_failing": Family("backendd_blk_nbd_failing", "gauge",
                              "1 while requests fail: the NBD server has been away longer "
                              "than the reconnect timeout."),
        "nbd_connection_losses": _c("backendd_blk_nbd_connection_losses_total",
                                    "Times the NBD connection was lost."),
        "nbd_reconnects": _c("backendd_blk_nbd_reconnects_total",
                             "Times the NBD connection was made again after a loss."),
        "nbd_timeouts": _c("backendd_blk_nbd_timeouts_total",
                           "NBD servers given up on after the I/O timeout of silence."),
        "nbd_resent": _c("backendd_blk_nbd_resent_requests_total",
                         "Requests in flight on a lost NBD connection, sent again."),
        "nbd_issued_in_c": _c("backendd_blk_nbd_issued_in_c_total",
                              "NBD reads and writes issued and completed in C by the "
                              "compiled data plane."),
        "nbd_wakes_in_c": _c("backendd_blk_nbd_wakeups_in_c_total",
                             "Wake-ups of an NBD connection's socket served by one C call "
                             "(replies read, rings answered and served, commands issued)."),
        "nbd_replies_in_c": _c("backendd_blk_nbd_replies_in_c_total",
                               "NBD replies read in those wake-ups."),
        "nbd_waiting": Family("backendd_blk_nbd_waiting_requests", "gauge",
                              "Requests waiting for the NBD connection."),
        "nbd_in_flight": Family("backendd_blk_nbd_in_flight_requests", "gauge",
                                "Requests sent to the NBD server and not yet answered."),
        "nbd_connections": Family("backendd_blk_nbd_connections", "gauge",
                                  "The disk's NBD connections that are up (several with "
                                  "multi-conn)."),
        "inline_io": _c("backendd_blk_inline_requests_total",
                        "Requests the compiled data plane served on the event loop "
                        "(page-cache hits, RWF_NOWAIT)."),
        "pooled": _c("backendd_blk_pooled_requests_total",
                     "Requests handed to the I/O threads."),
        "parallel": _c("backendd_blk_parallel_ring_batches_total",
                       "Ring batches the compiled data plane served on a helper thread."),
        "compiled": Family("backendd_blk_compiled_dataplane", "gauge",
                           "1 when the compiled data plane serves the device's rings."),
        "queues": _QUEUES,
    },
    "net": {
        "tx_packets": _c("backendd_net_tx_packets_total", "Packets from the guest to the tap."),
        "tx_bytes": _c("backendd_net_tx_bytes_total", "Bytes from the guest to the tap."),
        "tx_gso": _c("backendd_net_tx_gso_packets_total",
                     "Segmentation-offload packets from the guest."),
        "tx_errors": _c("backendd_net_tx_errors_total",
                        "Guest packets answered with an error status."),
        "tx_dropped_csum": _c("backendd_net_tx_dropped_checksum_total",
                              "Guest packets dropped: checksum offload could not be done."),
        "tx_dropped_tap": _c("backendd_net_tx_dropped_tap_total",
                             "Guest packets the tap refused."),
        "tx_tap_full": _c("backendd_net_tx_tap_full_total",
                          "Times the tap's queue was full when writing a guest packet."),
        "tx_rate_limited": _c("backendd_net_tx_rate_limited_total",
                              "Times the rate limit held back the guest's transmit queue."),
        "tx_fatal": _c("backendd_net_tx_fatal_total",
                       "Transmit rings halted because the guest broke a ring rule."),
        "rx_packets": _c("backendd_net_rx_packets_total", "Packets from the tap to the guest."),
        "rx_bytes": _c("backendd_net_rx_bytes_total", "Bytes from the tap to the guest."),
        "rx_gso": _c("backendd_net_rx_gso_packets_total",
                     "Segmentation-offload packets to the guest."),
        "rx_dropped": _c("backendd_net_rx_dropped_total",
                         "Packets for the guest dropped (no room, too large, bad layout)."),
        "rx_mcast_filtered": _c("backendd_net_rx_multicast_filtered_total",
                                "Multicast packets the guest's filter dropped."),
        "rx_bad_grant": _c("backendd_net_rx_bad_grant_total",
                           "Receive slots with a grant the daemon could not use."),
        "rx_stalls": _c("backendd_net_rx_stalls_total",
                        "Times the receive ring had no room for a waiting packet."),
        "rx_fatal": _c("backendd_net_rx_fatal_total",
                       "Receive rings halted because the guest broke a ring rule."),
        "fatal": _c("backendd_net_fatal_total", "Vifs halted because the guest broke a rule."),
        "rx_steered": _c("backendd_net_rx_steered_total",
                         "Packets read on one queue and steered to another by the guest's "
                         "hash mapping."),
        "ctrl_requests": _c("backendd_net_ctrl_requests_total",
                            "Control-ring requests answered."),
        "ctrl_errors": _c("backendd_net_ctrl_errors_total",
                          "Control-ring requests answered with a status other than success."),
        "ctrl_halted": _c("backendd_net_ctrl_halted_total",
                          "Control rings halted because the guest broke a ring rule."),
        "ctrl_ring": Family("backendd_net_ctrl_ring", "gauge",
                            "1 while the frontend has a control ring connected."),
        "parallel": _c("backendd_net_parallel_wakeups_total",
                       "Ring wake-ups the compiled data plane served on a helper thread."),
        "queues": _QUEUES,
    },
}

# Daemon-wide families, from DAEMON_STATUS's top-level keys.
BUILD_INFO = Family("backendd_build_info", "gauge",
                    "The daemon's version, as a label; the value is always 1.")
CONNECTIONS = Family("backendd_connections", "gauge", "Open control connections (guests).")
DEVICES = Family("backendd_devices", "gauge", "Devices on all connections.")
START_TIME = Family("backendd_start_time_seconds", "gauge",
                    "When the daemon started, in seconds since the epoch.")
UPTIME = Family("backendd_uptime_seconds", "gauge", "Seconds since the daemon started.")
IO_THREADS = Family("backendd_io_threads", "gauge", "Threads doing blocking I/O.")
CONTROL_REQUESTS = Family("backendd_control_requests_total", "counter",
                          "Control requests handled, per connection.")
CONTROL_ERRORS = Family("backendd_control_errors_total", "counter",
                        "Control requests answered with an error, per connection.")

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")


def _fallback(type_name: str, counter: str) -> Family:
    """A counter this module does not know yet: still a well-formed family."""
    base = _NAME_BAD.sub("_", f"backendd_{type_name}_{counter}")
    return _c(base if base.endswith("_total") else base + "_total",
              f"{type_name} counter {counter}.")


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _help_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_label_value(str(v))}"' for k, v in labels.items()) + "}"


class _Exposition:
    def __init__(self) -> None:
        self.families: dict[str, Family] = {}
        self.samples: dict[str, list[tuple[Mapping[str, str], float | int]]] = {}

    def add(self, family: Family, labels: Mapping[str, str], value: float | int) -> None:
        self.families.setdefault(family.name, family)
        self.samples.setdefault(family.name, []).append((labels, value))

    def text(self) -> str:
        lines: list[str] = []
        for name in sorted(self.families):
            family = self.families[name]
            lines.append(f"# HELP {name} {_help_text(family.help)}")
            lines.append(f"# TYPE {name} {family.kind}")
            for labels, value in self.samples[name]:
                lines.append(f"{name}{_labels(labels)} {value}")
        return "\n".join(lines) + "\n"


def guest_label(info: Mapping[str, str], conn_id: str) -> str:
    """The guest's name from HELLO, or `conn-N` for a VMM that gave none."""
    return info.get("guest") or f"conn-{conn_id}"


def group_status(status: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """DAEMON_STATUS's `conn.N.key` entries, per connection id (sorted numerically)."""
    conns: dict[str, dict[str, str]] = {}
    for key, value in status.items():
        parts = key.split(".", 2)
        if parts[0] == "conn" and len(parts) == 3 and parts[1].isdigit():
            conns.setdefault(parts[1], {})[parts[2]] = value
    return dict(sorted(conns.items(), key=lambda kv: int(kv[0])))


def device_counters(info: Mapping[str, str]) -> dict[str, tuple[str, dict[str, int]]]:
    """One connection's devices: devid -> (type, counters), with every counter the type is
    known to have (0 until counted)."""
    devices: dict[str, tuple[str, dict[str, int]]] = {}
    for key in info:
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "dev" and parts[2] == "type":
            type_name = info[key]
            known = DEVICE_FAMILIES.get(type_name, {})
            devices[parts[1]] = (type_name, dict.fromkeys(known, 0))
    for key, value in info.items():
        parts = key.split(".", 3)
        if len(parts) == 4 and parts[0] == "dev" and parts[2] == "stat" and parts[1] in devices:
            try:
                devices[parts[1]][1][parts[3]] = int(value)
            except ValueError:
                continue
    return dict(sorted(devices.items(), key=lambda kv: int(kv[0])))


def render_status(status: Mapping[str, str]) -> str:
    """The exposition text for one DAEMON_STATUS map."""
    out = _Exposition()
    out.add(BUILD_INFO, {"version": status.get("version", "")}, 1)
    conns = group_status(status)
    # The connection that asked (`backendd stats`) is not one of the guests.
    conns.pop(status.get("self", ""), None)
    out.add(CONNECTIONS, {}, len(conns))
    for key, family in (("start_time", START_TIME), ("uptime_seconds", UPTIME),
                        ("io_threads", IO_THREADS)):
        if key in status:
            out.add(family, {}, float(status[key]) if "." in status[key] else int(status[key]))
    devices = 0
    for conn_id, info in conns.items():
        guest = guest_label(info, conn_id)
        for key, family in (("requests", CONTROL_REQUESTS), ("errors", CONTROL_ERRORS)):
            if info.get(key, "").isdigit():
                out.add(family, {"guest": guest}, int(info[key]))
        for devid, (type_name, counters) in device_counters(info).items():
            devices += 1
            labels = {"guest": guest, "devid": devid, "type": type_name}
            known = DEVICE_FAMILIES.get(type_name, {})
            for counter, value in sorted(counters.items()):
                out.add(known.get(counter) or _fallback(type_name, counter), labels, value)
    out.add(DEVICES, {}, devices)
    return out.text()


def render(devices: Iterable[tuple[Mapping[str, str], Mapping[str, int]]]) -> str:
    """Device counters only: (labels with at least `type`, counters) per device."""
    out = _Exposition()
    for labels, counters in devices:
        type_name = labels.get("type", "")
        known = DEVICE_FAMILIES.get(type_name, {})
        for counter, value in sorted((dict.fromkeys(known, 0) | dict(counters)).items()):
            out.add(known.get(counter) or _fallback(type_name, counter), labels, value)
    return out.text()
