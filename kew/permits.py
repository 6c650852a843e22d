"""Worker slots: a queue's own permits, and a capacity several queues share.

A consumer runs an attempt only while it holds one permit of its queue
(`max_workers`) and, when the manager has a `max_concurrency`, one unit of the
shared capacity. The shared capacity serves waiting queues by their
`QueueConfig.priority`: when a unit frees up, the most urgent queue waiting for
one gets it (HIGH before MEDIUM before LOW; first come first served within a
priority). A queue that is not waiting takes nothing, so an idle HIGH queue
never holds capacity back from the others.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

__all__ = ["Permits", "SharedCapacity", "Slots"]


class Permits:
    """A counting semaphore that can also hand out every free permit at once."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._changed = asyncio.Event()

    @property
    def in_use(self) -> int:
        return self.total - self.free

    async def acquire(self) -> None:
        while self.free < 1:
            self._changed.clear()
            await self._changed.wait()
        self.free -= 1

    def take_free(self, limit: int | None = None) -> int:
        n = self.free if limit is None else min(self.free, limit)
        self.free -= n
        return n

    def release(self, n: int = 1) -> None:
        if n:
            self.free += n
            self._changed.set()


class SharedCapacity:
    """Capacity shared by the queues of one manager, granted by priority."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def _urgent_waiter(self, priority: int) -> bool:
        """Is someone at least as urgent as `priority` waiting?"""
        self._drop_cancelled()
        return bool(self._waiters) and self._waiters[0][0] <= priority

    def _drop_cancelled(self) -> None:
        while self._waiters and self._waiters[0][2].done():
            heapq.heappop(self._waiters)

    async def acquire(self, priority: int) -> None:
        if self.free > 0 and not self._urgent_waiter(priority):
            self.free -= 1
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted just as the waiter gave up
            raise

    def take_free(self, priority: int, limit: int) -> int:
        """Take up to `limit` free units at once, unless a more urgent (or
        equally urgent, earlier) queue is waiting for them."""
        if self._urgent_waiter(priority):
            return 0
        n = min(self.free, limit)
        self.free -= n
        return n

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._drop_cancelled()
            if self._waiters:
                heapq.heappop(self._waiters)[2].set_result(None)
            else:
                self.free += 1


class Slots:
    """A consumer's view: its queue's permits, and the shared capacity if any.
    One slot is one permit plus one unit."""

    def __init__(
        self, own: Permits, shared: SharedCapacity | None, priority: int
    ) -> None:
        self.own = own
        self.shared = shared
        self.priority = priority

    @property
    def total(self) -> int:
        return self.own.total

    async def acquire(self, n: int = 1) -> None:
        for taken in range(n):
            try:
                await self.own.acquire()
                if self.shared is not None:
                    try:
                        await self.shared.acquire(self.priority)
                    except BaseException:
                        self.own.release()
                        raise
            except BaseException:
                self.release(taken)
                raise

    def take_free(self) -> int:
        n = self.own.take_free()
        if self.shared is not None and n:
            granted = self.shared.take_free(self.priority, n)
            self.own.release(n - granted)
            n = granted
        return n

    def release(self, n: int = 1) -> None:
        if n:
            self.own.release(n)
            if self.shared is not None:
                self.shared.release(n)
