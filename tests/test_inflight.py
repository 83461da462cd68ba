"""The in-flight table across daemon deaths: every crash window between consuming a
request and publishing its response, replayed on a real ring in a shared memfd."""

import mmap
import os

import pytest

from backendd.inflight import InflightError, InflightRegion, region_size, ring_id
from rings.ring import BackRing, FrontRing, SharedRing

ENTRY = 112
PAGE = 4096
RID = ring_id([8], 1)


class Setup:
    """A guest ring page and a VMM-held in-flight memfd, mapped afresh per 'daemon'."""

    def __init__(self) -> None:
        self.ring_area = bytearray(PAGE)
        self.shared = SharedRing(memoryview(self.ring_area), ENTRY)
        self.shared.init()
        self.front = FrontRing(self.shared)
        self.fd = os.memfd_create("inflight")
        os.ftruncate(self.fd, region_size(1))
        self.maps: list[mmap.mmap] = []

    def daemon_table(self):
        m = mmap.mmap(self.fd, region_size(1))
        self.maps.append(m)
        return InflightRegion(memoryview(m), 1).queue(0, self.shared.size)

    def send(self, n: int, start: int = 0) -> list[bytes]:
        reqs = [bytes([i % 256]) * 8 + (start + i).to_bytes(8, "little") + bytes(ENTRY - 16)
                for i in range(n)]
        for r in reqs:
            self.front.put_request(r)
        self.front.push_requests()
        return reqs


def recover(table, shared: SharedRing, rid: int = RID):
    return table.recover(shared.idx[0], shared.idx[2], rid)


def consume(back: BackRing, table, n: int) -> list[tuple[int, bytes]]:
    first = back.req_cons
    got = [((first + k) & 0xFFFFFFFF, raw) for k, raw in enumerate(back.take_requests(n))]
    # Record in ring order, then move the recorded req_cons.
    for index, raw in got:
        table.in_flight(index, raw)
    table.consumed_up_to(back.req_cons)
    return got


def answer(back: BackRing, table, index: int, publish: bool = True) -> None:
    table.answering(index, back.rsp_prod_pvt)
    back.put_response(b"R" + index.to_bytes(4, "little"))
    if publish:
        back.push_responses()
        table.answered(index)
        table.published(back.rsp_prod_pvt)


def test_fresh_region_starts_at_the_published_index():
    s = Setup()
    table = s.daemon_table()
    rec = recover(table, s.shared)
    assert (rec.req_cons, rec.rsp_prod, rec.replay) == (0, 0, [])


@pytest.mark.parametrize("window", ["after_record", "after_answering", "after_put",
                                    "after_push", "clean"])
def test_each_crash_window_replays_exactly_the_unanswered(window):
    s = Setup()
    reqs = s.send(6)
    back = BackRing(s.shared)
    table = s.daemon_table()
    recover(table, s.shared)
    got = consume(back, table, 6)
    # Out of order: 3 and 1 answered and published first.
    answer(back, table, got[3][0])
    answer(back, table, got[1][0])
    victim = got[4][0]
    if window == "after_answering":
        table.answering(victim, back.rsp_prod_pvt)
    elif window == "after_put":
        table.answering(victim, back.rsp_prod_pvt)
        back.put_response(b"lost")
    elif window == "after_push":
        table.answering(victim, back.rsp_prod_pvt)
        back.put_response(b"R4")
        back.push_responses()  # published, but the table was not told
    elif window == "clean":
        answer(back, table, victim)
    # --- the daemon dies here; a new one maps the same memfd ---
    table2 = s.daemon_table()
    rec = recover(table2, s.shared)
    assert rec.req_cons == 6
    published = s.shared.idx[2]
    replayed = {raw for _, raw in rec.replay}
    answered_before = {reqs[3], reqs[1]} | ({reqs[4]} if window in ("after_push", "clean")
                                            else set())
    assert replayed == set(reqs) - answered_before
    assert rec.rsp_prod == published
    # Every request is either answered once before the crash or replayed once after.
    assert len(replayed) + len(answered_before) == 6


def test_requests_recorded_but_not_consumed_are_read_again_from_the_ring():
    s = Setup()
    reqs = s.send(3)
    back = BackRing(s.shared)
    table = s.daemon_table()
    recover(table, s.shared)
    raws = back.take_requests(3)
    table.in_flight(0, raws[0])
    table.consumed_up_to(1)
    table.in_flight(1, raws[1])  # recorded, but the daemon died before req_cons moved
    rec = recover(s.daemon_table(), s.shared)
    assert rec.req_cons == 1
    assert [raw for _, raw in rec.replay] == [reqs[0]]
    # Resuming at req_cons=1 reads 1 and 2 from the ring itself.
    back2 = BackRing(s.shared)
    back2.req_cons, back2.rsp_prod_pvt = rec.req_cons, rec.rsp_prod
    assert back2.take_requests(5) == reqs[1:]


def test_recovery_across_index_wraparound():
    s = Setup()
    start = 0xFFFFFFFF - 2
    s.shared.idx[0] = s.shared.idx[2] = start
    s.front = FrontRing(s.shared, start)
    reqs = s.send(5)
    back = BackRing(s.shared, start)
    table = s.daemon_table()
    recover(table, s.shared)
    got = consume(back, table, 5)
    answer(back, table, got[0][0])
    rec = recover(s.daemon_table(), s.shared)
    assert rec.req_cons == (start + 5) & 0xFFFFFFFF
    assert [raw for _, raw in rec.replay] == reqs[1:]


def test_region_too_small_is_refused_and_a_corrupt_table_starts_a_new_generation():
    with pytest.raises(InflightError, match="need"):
        InflightRegion(memoryview(bytearray(100)), 1)
    s = Setup()
    s.send(3)
    table = s.daemon_table()
    first = recover(table, s.shared)
    consume(BackRing(s.shared), table, 3)
    table.consumed_up_to(1000)  # more outstanding than the ring holds
    rec = recover(s.daemon_table(), s.shared)
    assert rec.fresh and "outstanding" in rec.reason
    assert (rec.req_cons, rec.replay, rec.generation) == (0, [], first.generation + 1)


def test_driver_reload_starts_a_new_generation_and_voids_the_old_entries():
    s = Setup()
    table = s.daemon_table()
    g1 = recover(table, s.shared)
    assert g1.fresh
    s.send(27)
    back = BackRing(s.shared)
    got = consume(back, table, 27)
    for index, _ in got[:20]:
        answer(back, table, index)
    # The ring is torn down (the daemon answered or dropped the rest), the frontend sets
    # up a fresh one on the same page, with the same in-flight memory.
    table.close()
    s.shared.init()
    s.front = FrontRing(s.shared)
    reqs = s.send(5)
    rec = recover(s.daemon_table(), s.shared)
    assert rec.fresh and rec.reason == ""
    assert (rec.req_cons, rec.rsp_prod, rec.replay) == (0, 0, [])
    assert rec.generation == g1.generation + 1
    # The new generation survives a crash of its own: only its own requests replay.
    table2 = s.daemon_table()
    back2 = BackRing(s.shared)
    consume(back2, table2, 5)
    again = recover(s.daemon_table(), s.shared)
    assert not again.fresh and again.generation == rec.generation
    assert [raw for _, raw in again.replay] == reqs


def test_a_fresh_ring_set_up_while_no_daemon_ran_is_not_resumed():
    s = Setup()
    table = s.daemon_table()
    recover(table, s.shared)
    s.send(30)
    back = BackRing(s.shared)
    got = consume(back, table, 30)
    for index, _ in got[:27]:
        answer(back, table, index)
    # The daemon dies (no close); the guest reloads its driver meanwhile.
    s.shared.init()
    s.front = FrontRing(s.shared)
    s.send(5)
    rec = recover(s.daemon_table(), s.shared)
    assert rec.fresh and rec.replay == [] and rec.req_cons == 0
    assert "rsp_prod" in rec.reason
    # Same indices but another ring-ref: not resumed either.
    t = s.daemon_table()
    consume(BackRing(s.shared), t, 5)
    rec = recover(s.daemon_table(), s.shared, ring_id([9], 1))
    assert rec.fresh and "another ring" in rec.reason


def test_replayed_requests_replay_again_after_a_second_crash():
    s = Setup()
    reqs = s.send(4)
    table = s.daemon_table()
    recover(table, s.shared)
    back = BackRing(s.shared)
    got = consume(back, table, 4)
    answer(back, table, got[2][0])
    rec = recover(s.daemon_table(), s.shared)
    assert [raw for _, raw in rec.replay] == [reqs[0], reqs[1], reqs[3]]
    # The restarted daemon records each replayed request again, then dies before any
    # is answered.
    t2 = s.daemon_table()
    for index, raw in rec.replay:
        t2.in_flight(index, raw)
    rec2 = recover(s.daemon_table(), s.shared)
    assert not rec2.fresh and rec2.generation == rec.generation
    assert [raw for _, raw in rec2.replay] == [reqs[0], reqs[1], reqs[3]]


def test_a_plan_writes_nothing():
    s = Setup()
    s.send(2)
    table = s.daemon_table()
    recover(table, s.shared)
    consume(BackRing(s.shared), table, 2)
    table.close()
    before = bytes(table.view[:4096])
    rec = s.daemon_table().plan(s.shared.idx[0], s.shared.idx[2], RID)
    assert rec.fresh
    assert bytes(table.view[:4096]) == before


def test_a_slow_request_survives_later_ones_reusing_its_slot():
    """Request 0 stays in flight while 1..31 are answered (out of order) and the frontend
    reuses their slots: 32.. are taken while 0 still is. A crash then replays 0 too."""
    s = Setup()
    size = s.shared.size
    reqs = s.send(size)
    back = BackRing(s.shared)
    table = s.daemon_table()
    recover(table, s.shared)
    got = consume(back, table, size)
    for index, _ in got[1:]:
        answer(back, table, index)
    for _ in s.front.take_responses():
        pass
    later = s.send(size - 1, start=size)
    more = consume(back, table, size)
    assert [i for i, _ in more] == list(range(size, 2 * size - 1))
    rec = recover(s.daemon_table(), s.shared)
    assert not rec.fresh
    assert [raw for _, raw in rec.replay] == [reqs[0], *later]
    # Recorded again by the restarted daemon, they replay again after a second crash.
    t2 = s.daemon_table()
    for index, raw in rec.replay:
        t2.in_flight(index, raw)
    assert [raw for _, raw in recover(s.daemon_table(), s.shared).replay] == \
        [reqs[0], *later]
