"""Grant table entry layouts (public/grant_table.h), v1 and v2."""

from construct import Int16ul, Int32ul, Int64ul, Padding, Struct

from .codec import Codec

grant_entry_v1 = Struct(
    "flags" / Int16ul,
    "domid" / Int16ul,
    "frame" / Int32ul,
)

grant_entry_header = Struct(
    "flags" / Int16ul,
    "domid" / Int16ul,
)

# grant_entry_v2 is a 16-byte union; each variant is declared over the whole slot.
grant_entry_v2_full_page = Struct(
    "flags" / Int16ul,
    "domid" / Int16ul,
    Padding(4),
    "frame" / Int64ul,
)

grant_entry_v2_sub_page = Struct(
    "flags" / Int16ul,
    "domid" / Int16ul,
    "page_off" / Int16ul,
    "length" / Int16ul,
    "frame" / Int64ul,
)

grant_entry_v2_transitive = Struct(
    "flags" / Int16ul,
    "domid" / Int16ul,
    "trans_domid" / Int16ul,
    Padding(2),
    "gref" / Int32ul,
    Padding(4),
)

GRANT_ENTRY_V1_SIZE = grant_entry_v1.sizeof()
GRANT_ENTRY_V2_SIZE = 16
GRANT_STATUS_SIZE = 2  # grant_status_t: uint16_t, in separate status frames (v2)

# Offsets of the header words inside an entry (same for v1 and v2).
GRANT_FLAGS_OFFSET = 0
GRANT_DOMID_OFFSET = 2

GRANT_V1 = Codec(grant_entry_v1)
GRANT_V2_FULL_PAGE = Codec(grant_entry_v2_full_page)
GRANT_V2_SUB_PAGE = Codec(grant_entry_v2_sub_page)
