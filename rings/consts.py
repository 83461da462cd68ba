"""Operation codes, flags and limits from Xen's public headers (io/blkif.h, io/netif.h,
io/xenbus.h, grant_table.h). Values only; layouts live in the layout modules."""

from enum import IntEnum, IntFlag

PAGE_SIZE = 4096
PAGE_SHIFT = 12
SECTOR_SIZE = 512  # blkif sectors are always 512-byte units, whatever the disk's block size
SECTORS_PER_PAGE = PAGE_SIZE // SECTOR_SIZE
MAX_RING_PAGES = 16  # max-ring-page-order 4

DOMID_SELF = 0x7FF0


# --- blkif -----------------------------------------------------------------------------

class BlkifOp(IntEnum):
    READ = 0
    WRITE = 1
    WRITE_BARRIER = 2
    FLUSH_DISKCACHE = 3
    RESERVED_1 = 4
    DISCARD = 5
    INDIRECT = 6


class BlkifStatus(IntEnum):
    OKAY = 0
    ERROR = -1
    EOPNOTSUPP = -2


class VDiskInfo(IntFlag):
    CDROM = 0x1
    REMOVABLE = 0x2
    READONLY = 0x4


BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
BLKIF_SEGMENTS_PER_INDIRECT_FRAME = 512  # PAGE_SIZE / sizeof(blkif_request_segment)
BLKIF_DISCARD_SECURE = 0x1


class BlkifAbi(IntEnum):
    """Guest ABIs; the enum value is the wire name's index in PROTOCOL_NAMES."""

    X86_64 = 0
    X86_32 = 1


BLKIF_PROTOCOL_NAMES = {BlkifAbi.X86_64: "x86_64-abi", BlkifAbi.X86_32: "x86_32-abi"}


# --- netif -----------------------------------------------------------------------------

class NetTxFlags(IntFlag):
    CSUM_BLANK = 1
    DATA_VALIDATED = 2
    MORE_DATA = 4
    EXTRA_INFO = 8


class NetRxFlags(IntFlag):
    DATA_VALIDATED = 1
    CSUM_BLANK = 2
    MORE_DATA = 4
    EXTRA_INFO = 8
    GSO_PREFIX = 16


class NetExtraType(IntEnum):
    NONE = 0
    GSO = 1
    MCAST_ADD = 2
    MCAST_DEL = 3
    HASH = 4


NETIF_EXTRA_FLAG_MORE = 1
NETIF_EXTRA_TYPE_MAX = 5


class NetGsoType(IntEnum):
    NONE = 0
    TCPV4 = 1
    TCPV6 = 2


class NetifRsp(IntEnum):
    DROPPED = -2
    ERROR = -1
    OKAY = 0
    NULL = 1


class NetCtrlType(IntEnum):
    INVALID = 0
    GET_HASH_FLAGS = 1
    SET_HASH_FLAGS = 2
    SET_HASH_KEY = 3
    GET_HASH_MAPPING_SIZE = 4
    SET_HASH_MAPPING_SIZE = 5
    SET_HASH_MAPPING = 6
    SET_HASH_ALGORITHM = 7
    GET_GREF_MAPPING_SIZE = 8
    ADD_GREF_MAPPING = 9
    DEL_GREF_MAPPING = 10


class NetCtrlStatus(IntEnum):
    SUCCESS = 0
    NOT_SUPPORTED = 1
    INVALID_PARAMETER = 2
    BUFFER_OVERFLOW = 3


XEN_NETIF_NR_SLOTS_MIN = 18
XEN_NETIF_MAX_TX_SIZE = 0xFFFF
NETBK_MAX_SLOTS_FATAL = 20  # netback: more slots than this in one packet is fatal
NETBK_MAX_PENDING = 256  # netback: more pending tx requests than this is fatal
NETBK_MCAST_MAX = 64
ETH_HLEN = 14


# --- grant table -----------------------------------------------------------------------

class GrantType(IntEnum):
    INVALID = 0
    PERMIT_ACCESS = 1
    ACCEPT_TRANSFER = 2
    TRANSITIVE = 3


GTF_TYPE_MASK = 0x3
GTF_READONLY = 1 << 2
GTF_READING = 1 << 3
GTF_WRITING = 1 << 4
GTF_PWT = 1 << 5
GTF_PCD = 1 << 6
GTF_PAT = 1 << 7
GTF_SUB_PAGE = 1 << 8


# --- xenbus ----------------------------------------------------------------------------

class XenbusState(IntEnum):
    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8
