"""xenstore keys: what the backend publishes, and reading what the frontend wrote.

Key names and their meaning follow io/blkif.h and Linux blkback: features at InitWait,
disk geometry at Connected. The frontend's keys are untrusted text; each one is parsed
strictly and a bad one refuses the connection, naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from backendd.errors import GuestError
from rings.consts import BLKIF_PROTOCOL_NAMES, BlkifAbi, VDiskInfo

from .image import Image
from .request import MAX_INDIRECT_SEGMENTS

MAX_RING_PAGE_ORDER = 4
MAX_QUEUES = max(4, min(16, os.cpu_count() or 1))
_ABI_BY_NAME = {name: abi for abi, name in BLKIF_PROTOCOL_NAMES.items()}


class FrontendKeyError(GuestError):
    """The frontend wrote a missing or malformed key."""


@dataclass(frozen=True)
class QueueKeys:
    ring_refs: tuple[int, ...]
    port: int


@dataclass(frozen=True)
class FrontendConfig:
    abi: BlkifAbi
    ring_order: int
    queues: tuple[QueueKeys, ...]
    persistent: bool = False  # the frontend's feature-persistent


def feature_keys(image: Image) -> dict[str, str]:
    keys = {
        "feature-flush-cache": "1",
        "feature-barrier": "1",
        "feature-discard": "1" if image.discard else "0",
        "feature-max-indirect-segments": str(MAX_INDIRECT_SEGMENTS),
        "feature-persistent": "1" if image.cfg.persistent else "0",
        "max-ring-page-order": str(MAX_RING_PAGE_ORDER),
        "multi-queue-max-queues": str(MAX_QUEUES),
    }
    if image.discard:
        keys |= {
            "discard-granularity": str(image.discard_granularity),
            "discard-alignment": "0",
            "discard-secure": "1" if image.discard_secure else "0",
        }
    return keys


def connected_keys(image: Image) -> dict[str, str]:
    info = 0
    if image.cfg.readonly:
        info |= VDiskInfo.READONLY
    if image.cfg.cdrom:
        info |= VDiskInfo.CDROM | VDiskInfo.REMOVABLE
    return feature_keys(image) | {
        "sectors": str(image.sectors),  # always 512-byte units, whatever sector-size
        "info": str(int(info)),
        "sector-size": str(image.cfg.sector_size),
        "physical-sector-size": str(image.physical_sector_size),
    }


def _uint(keys: Mapping[str, str], key: str, limit: int) -> int:
    value = keys.get(key)
    if value is None:
        raise FrontendKeyError(f"{key}: missing")
    # Decimal digits only: int() would also take "+1", " 1", "1_0" and non-ASCII digits.
    if not value.isascii() or not value.isdigit() or len(value) > 20:
        raise FrontendKeyError(f"{key}: {value!r} is not a decimal number")
    n = int(value)
    if n > limit:
        raise FrontendKeyError(f"{key}: {n} is above {limit}")
    return n


def parse_frontend_keys(keys: Mapping[str, str], max_queues: int = MAX_QUEUES
                        ) -> FrontendConfig:
    protocol = keys.get("protocol", BLKIF_PROTOCOL_NAMES[BlkifAbi.X86_64])
    if protocol not in _ABI_BY_NAME:
        raise FrontendKeyError(f"protocol: {protocol!r} is not supported")
    nqueues = _uint(keys, "multi-queue-num-queues", max_queues) \
        if "multi-queue-num-queues" in keys else 1
    if nqueues == 0:
        raise FrontendKeyError("multi-queue-num-queues: 0")
    # As blkback: the page order is one key for the whole device; without it, each
    # queue has a single "ring-ref".
    order = _uint(keys, "ring-page-order", MAX_RING_PAGE_ORDER) \
        if "ring-page-order" in keys else None
    queues = []
    for q in range(nqueues):
        prefix = f"queue-{q}/" if nqueues > 1 else ""
        if order is None:
            refs: tuple[int, ...] = (_uint(keys, f"{prefix}ring-ref", 0xFFFFFFFF),)
        else:
            refs = tuple(_uint(keys, f"{prefix}ring-ref{i}", 0xFFFFFFFF)
                         for i in range(1 << order))
        queues.append(QueueKeys(refs, _uint(keys, f"{prefix}event-channel", 0xFFFFFFFF)))
    ports = [q.port for q in queues]
    if len(set(ports)) != len(ports):
        raise FrontendKeyError(f"event-channel: queues share a port ({ports})")
    # As blkback: absent means 0; the frontend's value is read at every connect.
    persistent = _uint(keys, "feature-persistent", 1) == 1 \
        if "feature-persistent" in keys else False
    return FrontendConfig(_ABI_BY_NAME[protocol], order or 0, tuple(queues), persistent)
