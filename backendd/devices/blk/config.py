"""The toolstack's device keys (ADD_DEVICE config), checked once; unknown keys refused."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from backendd.errors import ConfigError

KNOWN_KEYS = ("path", "mode", "device-type", "direct-io", "sector-size", "discard",
              "persistent", "dataplane")


@dataclass(frozen=True)
class BlkConfig:
    path: str
    readonly: bool = False
    cdrom: bool = False
    direct_io: bool = False
    sector_size: int = 512
    discard: bool = True  # "0" disables it even when the backing could punch holes
    persistent: bool = True  # offer feature-persistent (used when the frontend says 1 too)
    # "compiled": the C kernel serves the rings (backendd/dataplane); "python": the
    # reference path; "auto": compiled when the kernel is built. Both planes keep
    # persistent grants.
    dataplane: str = "auto"


def _choice(config: Mapping[str, str], key: str, choices: dict[str, object],
            default: str) -> object:
    value = config.get(key, default)
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    return choices[value]


def parse_config(config: Mapping[str, str],
                 image_allowed: Callable[[str], bool] | None = None) -> BlkConfig:
    for key in config:
        if key not in KNOWN_KEYS:
            raise ConfigError(f"{key}: unknown blk device key")
    path = config.get("path", "")
    if not path:
        raise ConfigError("path: required")
    if "\0" in path:
        raise ConfigError("path: contains a NUL byte")
    if image_allowed is not None and not image_allowed(path):
        raise ConfigError(f"path: {path!r} is outside the allowed image directories")
    bools = {"0": False, "1": True}
    dataplane = str(_choice(config, "dataplane",
                            {"auto": "auto", "compiled": "compiled", "python": "python"},
                            "auto"))
    return BlkConfig(
        path=path,
        readonly=bool(_choice(config, "mode", {"r": True, "w": False}, "w")),
        cdrom=bool(_choice(config, "device-type", {"disk": False, "cdrom": True}, "disk")),
        direct_io=bool(_choice(config, "direct-io", bools, "0")),
        sector_size=int(_choice(config, "sector-size", {"512": 512, "4096": 4096}, "512")),
        discard=bool(_choice(config, "discard", bools, "1")),
        persistent=bool(_choice(config, "persistent", bools, "1")),
        dataplane=dataplane,
    )
