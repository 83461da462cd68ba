"""The daemon's I/O threads, shared fairly between devices.

A plain FIFO executor serves work in arrival order, so a device that keeps 64 requests
queued gets 64 turns for every one of a device with a single request: one busy guest
starves a quiet one. Here every key (a device) has its own queue and the threads take
from the keys in turn, so a quiet device waits for at most one job per thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Any

_Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future]
_Done = tuple[asyncio.Future, bool, Any]


def _resolve(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.cancelled():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class FairPool:
    def __init__(self, workers: int, name: str = "backendd-io") -> None:
        self._cond = threading.Condition()
        self._queues: OrderedDict[Hashable, deque[_Job]] = OrderedDict()
        self._stopping = False
        # Finished jobs not yet taken by their loop, per loop (see _finished).
        self._done_lock = threading.Lock()
        self._done: dict[asyncio.AbstractEventLoop, list[_Done]] = {}
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("I/O pool stopped")
            self._queues.setdefault(key, deque()).append((fn, args, fut))
            self._cond.notify()
        return fut

    def _next(self) -> _Job | None:
        with self._cond:
            while not self._queues:
                if self._stopping:
                    return None
                self._cond.wait()
            key, queue = next(iter(self._queues.items()))
            job = queue.popleft()
            # Round robin: this key goes to the back of the line.
            del self._queues[key]
            if queue:
                self._queues[key] = queue
            return job

    def _work(self) -> None:
        while (job := self._next()) is not None:
            fn, args, fut = job
            try:
                result, ok = fn(*args), True
            except BaseException as exc:  # handed to the awaiting coroutine
                result, ok = exc, False
            self._finished(fut, ok, result)
            # An idle thread keeps nothing of its last job alive (a removed device's
            # image, its request buffers) until the next job comes.
            del job, fn, args, fut, result

    def _finished(self, fut: asyncio.Future, ok: bool, result: Any) -> None:
        loop = fut.get_loop()
        with self._done_lock:
            pending = self._done.get(loop)
            wake = pending is None
            if wake:
                pending = self._done[loop] = []
            pending.append((fut, ok, result))
        if wake:
            try:
                loop.call_soon_threadsafe(self._resolve_all, loop)
            except RuntimeError:
                # The loop has gone away during shutdown; nobody waits for these then.
                with self._done_lock:
                    self._done.pop(loop, None)

    def _resolve_all(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._done_lock:
            pending = self._done.pop(loop, [])
        for fut, ok, result in pending:
            _resolve(fut, ok, result)

    def shutdown(self) -> None:
        """Finish the queued work, then stop the threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
