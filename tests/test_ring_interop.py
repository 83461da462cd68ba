"""Python ring halves against ring.h's own macros (tests/native/ring_peer.c), in lockstep
over one shared file mapping.

Each scenario runs twice from the same seed: once with one half in C, once with both
halves in Python. Every push's notify decision, every final check and every request and
response must be identical in the two runs. A side acts only when woken (by a notify or by
its own final check), so a wrong "don't notify" would strand requests and fail the run."""

import mmap
import random
import subprocess
from pathlib import Path

import pytest
from native_build import compile_c

from rings import BLKIF, BLKIF_CODECS, BackRing, FrontRing, SharedRing
from rings.consts import BlkifAbi
from rings.sring import REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD

CODECS = BLKIF_CODECS[BlkifAbi.X86_64]
ENTRY = BLKIF[BlkifAbi.X86_64].entry_size
U32 = 0xFFFFFFFF


def make_request(rid: int) -> bytes:
    segs = [0] * 33
    segs[0], segs[2] = rid ^ 0x5A5A, 7
    return CODECS.request.pack(0, rid % 11 + 1, 0, rid, rid * 8, *segs)


def check_request(raw: bytes) -> int:
    values = CODECS.request.unpack_from(raw)
    rid = values[3]
    assert values[4] == rid * 8 and values[1] == rid % 11 + 1 and values[5] == rid ^ 0x5A5A
    return rid


class CPeer:
    def __init__(self, binary: Path, ring_file: Path, role: str) -> None:
        self.proc = subprocess.Popen([str(binary), str(ring_file), role], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def ask(self, line: str) -> list[str]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().split()
        assert reply and reply[0] != "error", reply
        return reply

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        assert self.proc.wait(timeout=10) == 0


class CFront(CPeer):
    def attach(self, start: int) -> None:
        self.ask(f"attach {start}")

    def push(self, k: int) -> bool:
        return self.ask(f"push {k}") == ["notify", "1"]

    def consume(self) -> list[tuple[int, int, int]]:
        return [tuple(map(int, item.split(":"))) for item in self.ask("consume")[1:]]

    def final(self) -> bool:
        return self.ask("final") == ["work", "1"]


class CBack(CPeer):
    def attach(self, start: int) -> None:
        self.ask(f"attach {start}")

    def take(self, k: int) -> list[int]:
        reply = self.ask(f"take {k}")[1:]
        assert "bad" not in reply
        return [int(x) for x in reply]

    def respond(self, k: int) -> bool:
        return self.ask(f"respond {k}") == ["notify", "1"]

    def final(self) -> bool:
        return self.ask("final") == ["work", "1"]


class PyFront:
    def __init__(self, shared: SharedRing) -> None:
        self.shared = shared
        self.next_id = 0

    def attach(self, start: int) -> None:
        self.ring = FrontRing(self.shared, start)

    def push(self, k: int) -> bool:
        for _ in range(k):
            self.ring.put_request(make_request(self.next_id))
            self.next_id += 1
        return self.ring.push_requests()

    def consume(self) -> list[tuple[int, int, int]]:
        out = []
        for raw in self.ring.take_responses():
            rid, op, status = CODECS.response.unpack_from(raw)
            out.append((rid, status, op))
        return out

    def final(self) -> bool:
        return self.ring.final_check_for_responses()

    def close(self) -> None:
        pass


class PyBack:
    def __init__(self, shared: SharedRing) -> None:
        self.shared = shared
        self.pending: list[int] = []

    def attach(self, start: int) -> None:
        self.ring = BackRing(self.shared, start)

    def take(self, k: int) -> list[int]:
        ids = [check_request(raw) for raw in self.ring.take_requests(k)]
        self.pending += ids
        return ids

    def respond(self, k: int) -> bool:
        for rid in self.pending[:k]:
            self.ring.put_response(CODECS.response.pack(rid, rid % 2, rid % 3 - 1))
        del self.pending[:k]
        return self.ring.push_responses()

    def final(self) -> bool:
        return self.ring.final_check_for_requests()

    def close(self) -> None:
        pass


def consume_or_sleep(label: str, items: list, final, log: list) -> bool:
    """A consumer's step: log what it got; with nothing, the final check decides whether
    it stays awake. Returns whether it is still awake."""
    log.append((label, items))
    if items:
        return True
    work = final()
    log.append((f"{label}-final", work))
    return work


def run_scenario(front, back, shared: SharedRing, seed: int, start: int, total: int) -> list:
    """Drive both halves; returns the log of every decision."""
    shared.init()
    shared.idx[REQ_PROD] = shared.idx[RSP_PROD] = start
    shared.idx[REQ_EVENT] = shared.idx[RSP_EVENT] = (start + 1) & U32
    front.attach(start)
    back.attach(start)
    rng = random.Random(seed)
    log: list = []
    sent = taken = responded = 0
    answered: list[tuple[int, int, int]] = []
    back_awake = front_awake = False
    while len(answered) < total:
        roll = rng.random()
        in_flight = sent - len(answered)
        if roll < 0.35 and sent < total and in_flight < shared.size:
            k = min(rng.randint(1, 12), shared.size - in_flight, total - sent)
            notify = front.push(k)
            sent += k
            log.append(("push", k, notify))
            back_awake |= notify
        elif roll < 0.6 and back_awake:
            ids = back.take(rng.randint(1, 16))
            taken += len(ids)
            back_awake = consume_or_sleep("take", ids, back.final, log)
        elif roll < 0.8 and taken > responded:
            k = rng.randint(1, taken - responded)  # completions arrive whenever I/O ends
            notify = back.respond(k)
            responded += k
            log.append(("respond", k, notify))
            front_awake |= notify
        elif front_awake:
            rsps = front.consume()
            answered += rsps
            front_awake = consume_or_sleep("consume", rsps, front.final, log)
        # Nobody awake, nothing left to send or complete: a lost wakeup.
        stuck = not back_awake and not front_awake and taken == responded and (
            sent == total or in_flight >= shared.size)
        assert not (stuck and len(answered) < total), f"lost wakeup after {log[-5:]}"
    assert [a[0] for a in answered] == list(range(total))
    assert all(status == rid % 3 - 1 and op == rid % 2 for rid, status, op in answered)
    assert (shared.idx[REQ_PROD] - start) & U32 == total
    front.close()
    back.close()
    return log


@pytest.fixture(scope="module")
def peer_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c("ring_peer.c", tmp_path_factory.mktemp("peer"))


@pytest.fixture
def ring_file(tmp_path: Path):
    path = tmp_path / "ring"
    path.write_bytes(bytes(4096))
    with path.open("r+b") as f:
        area = mmap.mmap(f.fileno(), 4096)
    view = memoryview(area)
    shared = SharedRing(view, ENTRY)
    yield path, shared
    shared.release()
    view.release()
    area.close()


CASES = [(1, 0xFFFFFFFF - 300), (2, 0xFFFFFF00), (3, 0x7FFFFFF0), (4, 0)]


@pytest.mark.parametrize("c_side", ["front", "back"])
@pytest.mark.parametrize(("seed", "start"), CASES)
def test_c_and_python_agree(peer_binary: Path, ring_file, c_side: str, seed: int,
                            start: int) -> None:
    path, shared = ring_file
    total = 2500
    if c_side == "front":
        front, back = CFront(peer_binary, path, "front"), PyBack(shared)
    else:
        front, back = PyFront(shared), CBack(peer_binary, path, "back")
    c_log = run_scenario(front, back, shared, seed, start, total)
    py_log = run_scenario(PyFront(shared), PyBack(shared), shared, seed, start, total)
    assert c_log == py_log
    # Both notify outcomes were exercised on the C side's pushes.
    c_pushes = {"front": "push", "back": "respond"}[c_side]
    assert {entry[2] for entry in c_log if entry[0] == c_pushes} == {True, False}
