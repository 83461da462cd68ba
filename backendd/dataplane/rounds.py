"""The work due in one event-loop turn, gathered and served by one kernel call.

A ring or path that has work asks its loop's round to serve it (`add`); the first ask
in a turn schedules `run` for later in the same turn, so everything kicked meanwhile
goes to the same call. Each kind of round (blk.ServiceRound, net.NetRound) says how its
due items make that call (`serve`); there is one round of each kind per loop.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, Generic, Protocol, TypeVar


class Due(Protocol):
    _in_round: bool  # already due in this turn's round


D = TypeVar("D", bound=Due)


class PollSetting:
    """[daemon] poll_us, for both compiled planes: after a batch their rings are watched
    this long for the next one before the loop goes back to sleep (0: not at all), and
    one such call lasts at most budget_ns, so the loop's other work waits no longer."""

    ns = 30_000
    budget_ns = 500_000
    # The nic queues' call (dataplane.net) watches the event loop's own poll set too, so
    # it can stay in the kernel while traffic flows: it ends when the loop or a queue
    # needs Python, once every queue has been idle for net_ns, or after net_budget_ns
    # (what the loop's timers and queued callbacks may wait at most).
    net_ns = 1_000_000
    net_budget_ns = 5_000_000


POLL = PollSetting()


def set_poll(poll_us: int) -> None:
    POLL.ns = poll_us * 1000
    POLL.net_ns = PollSetting.net_ns if poll_us else 0
R = TypeVar("R", bound="LoopRound[Any]")


class LoopRound(Generic[D]):
    def __init__(self, kernel: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.k = kernel
        # Weak: `_rounds` keeps a round for as long as its loop lives, so a strong
        # reference from the round would keep both (and what the round owns, such as
        # a nic round's eventfd) alive for ever once the loop is dropped.
        self._loop = weakref.ref(loop)
        self.due: list[D] = []
        self.scheduled = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        assert loop is not None, "a round is used only while its loop lives"
        return loop

    def add(self, item: D) -> None:
        if item._in_round:
            return
        item._in_round = True
        self.due.append(item)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.run)

    def run(self) -> None:
        self.scheduled = False
        due, self.due = self.due, []
        for item in due:
            item._in_round = False
        self.serve(due)

    def serve(self, due: list[D]) -> None:
        raise NotImplementedError


_rounds: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[type, LoopRound[Any]]] = \
    weakref.WeakKeyDictionary()


def loop_round(cls: type[R], kernel: Any, loop: asyncio.AbstractEventLoop) -> R:
    """The loop's round of kind `cls` for `kernel` (a new one if the kernel changed)."""
    kinds = _rounds.setdefault(loop, {})
    r = kinds.get(cls)
    if r is None or r.k is not kernel:
        r = kinds[cls] = cls(kernel, loop)
    assert isinstance(r, cls)
    return r
