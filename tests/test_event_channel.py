"""EventChannel over real eventfds, driven by the simulated guest's port."""

import asyncio
import os

from backendd.evtchn import EventChannel
from backendd.guest import new_channel_pair


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _until(cond, loop_turns: int = 1000) -> None:
    # Yield to the loop until the condition holds; bounded by turns, not by wall time.
    for _ in range(loop_turns):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def test_kicks_are_coalesced_into_one_wakeup():
    guest, kick, call = new_channel_pair()
    ch = EventChannel(3, kick, call)
    calls: list[int] = []
    try:
        for _ in range(5):
            guest.send()  # all before the loop gets to run
        ch.start(asyncio.get_running_loop(), lambda: calls.append(ch.kicks))
        await _until(lambda: calls)
        for _ in range(20):  # more turns: no further wakeup is owed
            await asyncio.sleep(0)
        assert calls == [1]
        guest.send()
        await _until(lambda: len(calls) == 2)
        assert ch.kicks == 2
    finally:
        ch.close()
        guest.close()


async def test_stop_stops_delivery():
    guest, kick, call = new_channel_pair()
    ch = EventChannel(1, kick, call)
    calls: list[None] = []
    try:
        ch.start(asyncio.get_running_loop(), lambda: calls.append(None))
        ch.stop()
        guest.send()
        for _ in range(20):
            await asyncio.sleep(0)
        assert calls == []
        ch.start(asyncio.get_running_loop(), lambda: calls.append(None))
        await _until(lambda: calls)  # the kick was kept in the counter, not lost
    finally:
        ch.close()
        guest.close()


def test_notify_is_seen_by_the_guest():
    guest, kick, call = new_channel_pair()
    ch = EventChannel(1, kick, call)
    try:
        assert guest.poll() == 0
        ch.notify()
        ch.notify()
        assert ch.notifies == 2
        assert guest.poll() == 2
        assert guest.pending == 2
        assert guest.poll() == 0
        ch.notify()
        assert guest.wait(timeout=30) == 1
    finally:
        ch.close()
        guest.close()


def test_close_releases_both_fds_and_is_idempotent():
    before = _open_fds()
    guest, kick, call = new_channel_pair()
    ch = EventChannel(1, kick, call)
    assert _open_fds() == before + 4  # two eventfds, each also held by the guest port
    ch.close()
    ch.close()
    assert _open_fds() == before + 2
    guest.close()
    assert _open_fds() == before


async def test_mute_keeps_a_kick_out_of_the_loop_until_unmuted():
    """mute: the loop is not woken for the channel's kicks (the compiled data plane
    watches the fd itself meanwhile); unmute: a kick that came meanwhile is delivered."""
    guest, kick, call = new_channel_pair()
    ch = EventChannel(2, kick, call)
    calls: list[None] = []
    try:
        assert not ch.mute()  # not watched: nothing to mute
        ch.start(asyncio.get_running_loop(), lambda: calls.append(None))
        assert ch.mute()
        guest.send()
        for _ in range(20):
            await asyncio.sleep(0)
        assert calls == [] and ch.kicks == 0
        ch.unmute()
        await _until(lambda: calls)
        assert ch.kicks == 1
    finally:
        ch.close()
        guest.close()
