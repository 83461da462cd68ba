"""Decoding a copy of a live ring for `backendd ring-dump`, with the construct layouts.

This is a debugging view of guest-written bytes: it never trusts them (a slot that does
not parse is shown as hex) and uses construct's checked, uncompiled parsers only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from construct import Container, ListContainer

from rings.blkif import BLKIF
from rings.consts import BlkifAbi, BlkifOp
from rings.netif import (
    RX_ENTRY_SIZE,
    TX_ENTRY_SIZE,
    netif_rx_request,
    netif_rx_response,
    netif_tx_request,
    netif_tx_response,
)
from rings.sring import SRING_HEADER_SIZE, ring_entries, sring_header

# How many slots to show on each side of the consumer positions.
DEFAULT_SLOTS = 8


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
}


def _text(value: Any) -> str:
    if isinstance(value, Container):
        return " ".join(f"{k}={_text(v)}" for k, v in value.items() if not k.startswith("_"))
    if isinstance(value, ListContainer):
        return "[" + ", ".join(f"({_text(v)})" for v in value) + "]"
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def decode(layout: str, data: bytes, ring_bytes: int, slots: int = DEFAULT_SLOTS) -> list[str]:
    """Lines describing the ring: the header, then the last `slots` requests up to req_prod
    and the last `slots` responses up to rsp_prod. `ring_bytes` is the whole ring's size
    (data may be a truncated prefix of it)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown ring layout {layout!r} (known: {', '.join(LAYOUTS)})")
    entry_size, parse_req, parse_rsp = LAYOUTS[layout]
    if len(data) < SRING_HEADER_SIZE:
        raise ValueError(f"{len(data)} bytes: shorter than the ring header")
    head = sring_header.parse(data)
    size = ring_entries(ring_bytes, entry_size)
    lines = [f"layout={layout} entries={size} req_prod={head.req_prod} "
             f"req_event={head.req_event} rsp_prod={head.rsp_prod} "
             f"rsp_event={head.rsp_event} outstanding={(head.req_prod - head.rsp_prod) % 2**32}"]

    def slot(index: int, parser: Callable[[bytes], Any], kind: str) -> str:
        off = SRING_HEADER_SIZE + (index % size) * entry_size
        raw = data[off:off + entry_size]
        if len(raw) < entry_size:
            return f"  {kind} [{index}] (not in the dump)"
        try:
            return f"  {kind} [{index}] {_text(parser(raw))}"
        except Exception as exc:  # guest bytes: show them rather than fail
            return f"  {kind} [{index}] unparsable ({exc.__class__.__name__}): {raw.hex()}"

    count = min(slots, size)
    lines.append("requests:")
    lines += [slot((head.req_prod - k) % 2**32, parse_req, "req")
              for k in range(count, 0, -1)]
    lines.append("responses:")
    lines += [slot((head.rsp_prod - k) % 2**32, parse_rsp, "rsp")
              for k in range(count, 0, -1)]
    return lines
