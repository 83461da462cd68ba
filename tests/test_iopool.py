"""The shared I/O threads serve devices in turn, not in arrival order."""

import asyncio
import threading

from backendd.iopool import FairPool


async def test_a_late_device_is_served_before_an_earlier_backlog():
    pool = FairPool(1)
    gate = threading.Event()
    order: list[str] = []
    blocker = pool.submit("busy", gate.wait)  # holds the only thread
    backlog = [pool.submit("busy", order.append, f"busy{i}") for i in range(100)]
    quiet = pool.submit("quiet", order.append, "quiet")
    gate.set()
    await asyncio.gather(blocker, quiet, *backlog)
    # FIFO would run it 101st; in turn, it runs after at most one job of the busy device
    # (none if the thread had not yet taken the blocker when "quiet" arrived).
    assert order.index("quiet") <= 1
    assert [o for o in order if o != "quiet"] == [f"busy{i}" for i in range(100)]
    pool.shutdown()


async def test_errors_reach_the_awaiting_coroutine_and_shutdown_drains():
    pool = FairPool(2)

    def fail() -> None:
        raise OSError(5, "EIO")

    fut = pool.submit("d", fail)
    try:
        await fut
    except OSError as exc:
        assert exc.errno == 5
    else:
        raise AssertionError("no error")
    results = [pool.submit(k % 3, lambda k=k: k * k) for k in range(30)]
    assert await asyncio.gather(*results) == [k * k for k in range(30)]
    pool.shutdown()
