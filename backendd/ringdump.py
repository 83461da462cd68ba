"""Decoding a copy of a live ring for `backendd ring-dump`, with the construct layouts.

This is a debugging view of guest-written bytes: it never trusts them (a slot that does
not parse is shown as hex) and uses construct's checked, uncompiled parsers only.

Which slots mean what follows from the two shared producer indices. Slot k (mod the ring
size) holds request k while rsp_prod <= k < req_prod: that is the live window, requests the
backend has not answered yet (it may have taken them, and may even have written a response
it has not published). Indices req_prod - size <= k < rsp_prod hold response k. Anything
else in a slot is an old entry that a newer one overwrote, so it is never decoded."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from construct import Container, ListContainer

from rings.blkif import BLKIF
from rings.consts import BlkifAbi, BlkifOp, BlkifStatus, NetCtrlStatus, NetCtrlType, NetifRsp
from rings.netif import (
    CTRL_ENTRY_SIZE,
    RX_ENTRY_SIZE,
    TX_ENTRY_SIZE,
    netif_ctrl_request,
    netif_ctrl_response,
    netif_rx_request,
    netif_rx_response,
    netif_tx_request,
    netif_tx_response,
)
from rings.sring import SRING_HEADER_SIZE, ring_entries, sring_header

# How many answered slots to show before the live window, by default.
DEFAULT_SLOTS = 8
U32 = 2**32


def _blkif_request(abi: BlkifAbi) -> Callable[[bytes], Any]:
    layouts = BLKIF[abi]

    def parse(raw: bytes) -> Any:
        op = raw[0]
        if op == BlkifOp.DISCARD:
            return layouts.discard.parse(raw)
        if op == BlkifOp.INDIRECT:
            return layouts.indirect.parse(raw)
        parsed = layouts.request.parse(raw)
        # Only the segments the request claims are meaningful.
        parsed.seg = parsed.seg[: min(parsed.nr_segments, len(parsed.seg))]
        return parsed

    return parse


# layout name -> (entry size, request parser, response parser)
LAYOUTS: dict[str, tuple[int, Callable[[bytes], Any], Callable[[bytes], Any]]] = {
    **{f"blkif-{abi.name.lower()}": (BLKIF[abi].entry_size, _blkif_request(abi),
                                      BLKIF[abi].response.parse) for abi in BlkifAbi},
    "netif-tx": (TX_ENTRY_SIZE, netif_tx_request.parse, netif_tx_response.parse),
    "netif-rx": (RX_ENTRY_SIZE, netif_rx_request.parse, netif_rx_response.parse),
    "netifctrl": (CTRL_ENTRY_SIZE, netif_ctrl_request.parse, netif_ctrl_response.parse),
}

# Fields shown by name rather than number, per layout family.
_NAMES: dict[str, dict[str, type[enum.IntEnum]]] = {
    "blkif": {"operation": BlkifOp, "indirect_op": BlkifOp, "status": BlkifStatus},
    "netif": {"status": NetifRsp},
    "netifctrl": {"type": NetCtrlType, "status": NetCtrlStatus},
}


def _plain(value: Any) -> Any:
    """construct's containers as JSON-able values; bytes as hex."""
    if isinstance(value, Container):
        return {k: _plain(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, ListContainer | list):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, enum.IntEnum):
        return int(value)
    return value


def _named(family: str, field: str, value: int) -> str:
    kind = _NAMES.get(family, {}).get(field)
    if kind is not None:
        try:
            return f"{kind(value).name.lower()}({value})"
        except ValueError:
            pass
    return str(value)


def _text(family: str, fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        if key == "seg":
            segs = " ".join(f"{s['gref']}:{s['first_sect']}-{s['last_sect']}" for s in value)
            parts.append(f"seg=[{segs}]")
        elif isinstance(value, list):
            parts.append(f"{key}=[{' '.join(str(v) for v in value)}]")
        elif isinstance(value, int):
            parts.append(f"{key}={_named(family, key, value)}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def describe(layout: str, data: bytes, ring_bytes: int,
             slots: int = DEFAULT_SLOTS) -> dict[str, Any]:
    """The ring as data: its header, every slot of the live window (pending requests) and
    the latest `slots` answered slots. `ring_bytes` is the whole ring's size (data may be a
    truncated prefix of it)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown ring layout {layout!r} (known: {', '.join(LAYOUTS)})")
    entry_size, parse_req, parse_rsp = LAYOUTS[layout]
    if len(data) < SRING_HEADER_SIZE:
        raise ValueError(f"{len(data)} bytes: shorter than the ring header")
    head = sring_header.parse(data)
    size = ring_entries(ring_bytes, entry_size)
    outstanding = (head.req_prod - head.rsp_prod) % U32
    out: dict[str, Any] = {
        "layout": layout, "entries": size, "req_prod": head.req_prod,
        "req_event": head.req_event, "rsp_prod": head.rsp_prod,
        "rsp_event": head.rsp_event, "pending": outstanding, "slots": [],
    }
    family = layout.split("-")[0]
    if outstanding > size:
        # More requests than slots: the guest's indices are nonsense, nothing is trusted.
        out["corrupt"] = f"req_prod - rsp_prod = {outstanding} exceeds the {size} slots"
        return out

    def slot(index: int, parser: Callable[[bytes], Any], state: str) -> dict[str, Any]:
        off = SRING_HEADER_SIZE + (index % size) * entry_size
        raw = data[off:off + entry_size]
        entry: dict[str, Any] = {"index": index, "slot": index % size, "state": state}
        if len(raw) < entry_size:
            entry["missing"] = "not in the dump"
            return entry
        try:
            entry["fields"] = _plain(parser(raw))
        except Exception as exc:  # guest bytes: show them rather than fail
            entry["unparsable"] = f"{exc.__class__.__name__}: {raw.hex()}"
        entry["text"] = _entry_text(family, entry)
        return entry

    # Rings start at index 0: below rsp_prod's count nothing was ever answered.
    answered = min(slots, size - outstanding, head.rsp_prod)
    out["slots"] += [slot((head.rsp_prod - k) % U32, parse_rsp, "answered")
                     for k in range(answered, 0, -1)]
    out["slots"] += [slot((head.rsp_prod + k) % U32, parse_req, "pending")
                     for k in range(outstanding)]
    return out


def _entry_text(family: str, entry: dict[str, Any]) -> str:
    if "fields" in entry:
        return _text(family, entry["fields"])
    if "unparsable" in entry:
        return f"unparsable ({entry['unparsable']})"
    return f"({entry.get('missing', '')})"


def table(desc: dict[str, Any]) -> list[str]:
    """describe()'s result as aligned text lines."""
    lines = [f"layout {desc['layout']}, {desc['entries']} slots: req_prod={desc['req_prod']} "
             f"rsp_prod={desc['rsp_prod']} req_event={desc['req_event']} "
             f"rsp_event={desc['rsp_event']}",
             f"pending (rsp_prod..req_prod): {desc['pending']}"]
    if "corrupt" in desc:
        lines.append(f"ring corrupt: {desc['corrupt']}; slots not decoded")
        return lines
    if not desc["slots"]:
        lines.append("(no slots: nothing answered or pending yet)")
        return lines
    width = max(5, max(len(str(e["index"])) for e in desc["slots"]))
    lines.append(f"{'index':>{width}}  {'slot':>4}  {'state':<8}  entry")
    for entry in desc["slots"]:
        text = entry.get("text") or _entry_text(desc["layout"].split("-")[0], entry)
        lines.append(f"{entry['index']:>{width}}  {entry['slot']:>4}  {entry['state']:<8}  "
                     f"{text}")
    return lines


def decode(layout: str, data: bytes, ring_bytes: int, slots: int = DEFAULT_SLOTS) -> list[str]:
    """Lines describing the ring (see describe() and table())."""
    return table(describe(layout, data, ring_bytes, slots))
