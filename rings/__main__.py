"""python -m rings: print the layouts' sizes and ring capacities, then run a front end and
a back end against each other across index wrap-around as a self-check."""

import sys

from . import BLKIF, BLKIF_CODECS, BackRing, FrontRing, SharedRing, netif
from .consts import BlkifAbi
from .sring import REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD, ring_entries_for_pages


def describe() -> None:
    for abi, layouts in BLKIF.items():
        print(f"blkif {abi.name.lower()}: request {layouts.request.sizeof()} B, "
              f"discard {layouts.discard.sizeof()} B, indirect {layouts.indirect.sizeof()} B, "
              f"response {layouts.response.sizeof()} B; entries per ring at order 0..4: "
              f"{[ring_entries_for_pages(1 << o, layouts.entry_size) for o in range(5)]}")
    for name, entry in (("tx", netif.TX_ENTRY_SIZE), ("rx", netif.RX_ENTRY_SIZE),
                        ("ctrl", netif.CTRL_ENTRY_SIZE)):
        print(f"netif {name}: {entry}-byte slots, {ring_entries_for_pages(1, entry)} per page")


def self_check(total: int = 100_000, start: int = 0xFFFFFFFF - 5000) -> int:
    codecs = BLKIF_CODECS[BlkifAbi.X86_64]
    area = memoryview(bytearray(4096))
    shared = SharedRing(area, codecs.entry_size)
    shared.init()
    shared.idx[REQ_PROD] = shared.idx[RSP_PROD] = start
    shared.idx[REQ_EVENT] = shared.idx[RSP_EVENT] = (start + 1) & 0xFFFFFFFF
    front, back = FrontRing(shared, start), BackRing(shared, start)
    sent = answered = 0
    while answered < total:
        while front.free_requests() and sent < total:
            front.put_request(codecs.request.pack(0, 1, 0, sent, sent * 8, *([0] * 33)))
            sent += 1
        front.push_requests()
        for raw in back.take_requests(64):
            rid = codecs.request.unpack_from(raw)[3]
            back.put_response(codecs.response.pack(rid, 0, 0))
        back.push_responses()
        for raw in front.take_responses():
            if codecs.response.unpack_from(raw)[0] != answered:
                print(f"self-check FAILED: response {answered} out of order")
                return 1
            answered += 1
    print(f"self-check ok: {total} requests and responses across index wrap-around "
          f"(req_prod now {shared.idx[REQ_PROD]:#x})")
    return 0


if __name__ == "__main__":
    describe()
    sys.exit(self_check())
