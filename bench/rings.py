"""Request decoding and ring turnaround cost: the derived struct codec against construct's
own parser (the baseline), on the same bytes, in the same run.

    python -m bench.rings
"""

import mmap
import random
import time

from rings import BLKIF, BLKIF_CODECS, BackRing, FrontRing, SharedRing
from rings.consts import BlkifAbi

from .report import table


def _per_call_us(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def decode_costs(n: int = 20000) -> list[tuple[str, float]]:
    layout = BLKIF[BlkifAbi.X86_64].request
    codec = BLKIF_CODECS[BlkifAbi.X86_64].request
    raw = random.Random(1).randbytes(layout.sizeof())
    compiled = layout.compile()
    return [
        ("construct Struct.parse (baseline)", _per_call_us(lambda: layout.parse(raw), n // 10)),
        ("construct compiled parse", _per_call_us(lambda: compiled.parse(raw), n // 4)),
        ("derived struct codec", _per_call_us(lambda: codec.unpack(raw), n)),
    ]


def ring_turnaround(n: int = 200_000) -> float:
    """Microseconds per request for take + put_response + push on a one-page blkif ring."""
    area = mmap.mmap(-1, 4096)
    view = memoryview(area)
    entry = BLKIF[BlkifAbi.X86_64].entry_size
    shared = SharedRing(view, entry)
    shared.init()
    front, back = FrontRing(shared), BackRing(shared)
    request = bytes(entry)
    response = BLKIF_CODECS[BlkifAbi.X86_64].response.pack(1, 0, 0)
    done = 0
    start = time.perf_counter()
    while done < n:
        while front.free_requests():
            front.put_request(request)
        front.push_requests()
        for _ in back.take_requests(64):
            back.put_response(response)
            done += 1
        back.push_responses()
        front.take_responses()
    elapsed = time.perf_counter() - start
    shared.release()
    view.release()
    area.close()
    return elapsed / done * 1e6


def main() -> None:
    rows = decode_costs()
    base = rows[0][1]
    print(table("blkif request decode (x86_64, 112 bytes)", ["decoder", "us/request", "speed-up"],
                [(name, us, f"{base / us:.0f}x") for name, us in rows]))
    print()
    print(table("ring turnaround (front+back in one process)", ["what", "us/request"],
                [("take + respond + push, 1-page blkif ring", ring_turnaround())]))


if __name__ == "__main__":
    main()
