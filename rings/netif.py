"""netif layouts (io/netif.h); identical on every ABI (no 64-bit fields)."""

from construct import Array, Bytes, Int8ul, Int16sl, Int16ul, Int32ul, Padding, Struct

from .codec import Codec

netif_tx_request = Struct(
    "gref" / Int32ul,
    "offset" / Int16ul,
    "flags" / Int16ul,
    "id" / Int16ul,
    "size" / Int16ul,
)

netif_tx_response = Struct(
    "id" / Int16ul,
    "status" / Int16sl,
)

# netif_extra_info: type, flags, then a 6-byte union. Each union member is its own layout
# over the same 8-byte slot; `netif_extra_info` keeps the union as raw bytes.
netif_extra_info = Struct(
    "type" / Int8ul,
    "flags" / Int8ul,
    "u" / Bytes(6),
)

netif_extra_gso = Struct(
    "type" / Int8ul,
    "flags" / Int8ul,
    "size" / Int16ul,
    "gso_type" / Int8ul,
    "pad" / Int8ul,
    "features" / Int16ul,
)

netif_extra_mcast = Struct(
    "type" / Int8ul,
    "flags" / Int8ul,
    "addr" / Bytes(6),
)

netif_extra_hash = Struct(
    "type" / Int8ul,
    "flags" / Int8ul,
    "hash_type" / Int8ul,
    "alg" / Int8ul,
    "value" / Bytes(4),
)

netif_rx_request = Struct(
    "id" / Int16ul,
    Padding(2),
    "gref" / Int32ul,
)

netif_rx_response = Struct(
    "id" / Int16ul,
    "offset" / Int16ul,
    "flags" / Int16ul,
    "status" / Int16sl,
)

netif_ctrl_request = Struct(
    "id" / Int16ul,
    "type" / Int16ul,
    "data" / Array(3, Int32ul),
)

netif_ctrl_response = Struct(
    "id" / Int16ul,
    "type" / Int16ul,
    "status" / Int32ul,
    "data" / Int32ul,
)

# sizeof(union <ring>_sring_entry): the larger of request and response.
TX_ENTRY_SIZE = max(netif_tx_request.sizeof(), netif_tx_response.sizeof(),
                    netif_extra_info.sizeof())
RX_ENTRY_SIZE = max(netif_rx_request.sizeof(), netif_rx_response.sizeof())
CTRL_ENTRY_SIZE = max(netif_ctrl_request.sizeof(), netif_ctrl_response.sizeof())

TX_REQUEST = Codec(netif_tx_request)
TX_RESPONSE = Codec(netif_tx_response)
EXTRA_INFO = Codec(netif_extra_info)
EXTRA_GSO = Codec(netif_extra_gso)
EXTRA_MCAST = Codec(netif_extra_mcast)
EXTRA_HASH = Codec(netif_extra_hash)
RX_REQUEST = Codec(netif_rx_request)
RX_RESPONSE = Codec(netif_rx_response)
CTRL_REQUEST = Codec(netif_ctrl_request)
CTRL_RESPONSE = Codec(netif_ctrl_response)
