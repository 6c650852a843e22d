"""Waking `wait_for_task` when a task ends, without polling, and hearing about
cancel requests: one pub/sub connection per manager.

The `finish` function publishes a task's id on its queue's `finished` channel
in the same call that records the outcome. A manager subscribes to a queue's
channel the first time somebody waits on one of its tasks, and keeps one
listener for all its channels. A task that ends in this very process wakes its
waiters directly, before the message comes back from the server.

A waiter woken for any reason reads the task's status and waits again if the
task has not ended. Pub/sub keeps nothing that was published while the
connection was down, so after losing it the listener reconnects (capped
exponential backoff, one warning per outage, see `kew.connection.Reconnect`)
and, as soon as the server confirms a channel again, wakes every waiter of
that channel's queue to read its task's status. Waking them earlier, while the
server is unreachable or before the subscription is back, would make them read
too soon: an end published after that read and before the confirmation would
go unheard.

Order matters: a waiter registers its future and waits until the subscription
is confirmed *before* it reads the task's status, so an outcome recorded in
between cannot slip past it.

A waiter for a task submitted after its channel was confirmed may skip that
first read: the task's end cannot have passed unheard. It must then know
whether the end was heard already, and the memory of ends heard is bounded
(`_ENDED_REMEMBERED`). So the time at which the latest forgotten end was
heard is kept too: a task submitted before that instant may have ended and
been forgotten, and its waiter reads first (`may_have_ended`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rex

from kew.connection import Reconnect
from kew.functions import guarded

__all__ = ["Waiters"]

logger = logging.getLogger(__name__)

_ENDED_REMEMBERED = 10_000


class Waiters:
    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._pubsub: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._futures: dict[tuple[str, str], set[asyncio.Future[None]]] = defaultdict(
            set
        )
        self._confirmed: dict[str, asyncio.Event] = {}
        self._confirmed_at: dict[str, float] = {}
        self._handlers: dict[str, Callable[[str], object]] = {}
        self._channel_queue: dict[str, str] = {}
        """Finished channel -> its queue."""
        self._resubscribing: set[str] = set()
        """Channels lost with the connection, not confirmed again yet."""
        self._ended: OrderedDict[tuple[str, str], float] = OrderedDict()
        """Tasks whose end was heard lately, waiters or not (bounded), with the
        time (time.monotonic) it was first heard."""
        self._forgotten_until = -math.inf
        """The latest time at which an end was heard that `_ended` has since
        forgotten."""

    def register(self, queue: str, task_id: str) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        self._futures[(queue, task_id)].add(future)
        return future

    def discard(self, queue: str, task_id: str, future: asyncio.Future[None]) -> None:
        futures = self._futures.get((queue, task_id))
        if futures is not None:
            futures.discard(future)
            if not futures:
                del self._futures[(queue, task_id)]

    def heard_since(self, channel: str, moment: float) -> bool:
        """Has the channel been subscribed, without a break, since `moment`
        (time.monotonic)? Then every end of a task submitted after it was
        heard here, and a waiter need not read the task before waiting."""
        confirmed = self._confirmed_at.get(channel)
        return confirmed is not None and confirmed <= moment

    def may_have_ended(self, queue: str, task_id: str, submitted: float) -> bool:
        """Might the end of this task, submitted at `submitted`
        (time.monotonic), have been heard already? Yes if it is remembered,
        and also if an end heard after the submission has been forgotten."""
        return (queue, task_id) in self._ended or submitted <= self._forgotten_until

    def notify(self, queue: str, task_id: str) -> None:
        """The task has ended: remember it and wake its waiters."""
        self._ended.setdefault((queue, task_id), time.monotonic())
        if len(self._ended) > _ENDED_REMEMBERED:
            _, heard = self._ended.popitem(last=False)
            self._forgotten_until = max(self._forgotten_until, heard)
        self._wake((queue, task_id))

    def _wake(self, key: tuple[str, str]) -> None:
        for future in self._futures.pop(key, ()):
            if not future.done():
                future.set_result(None)

    def wake_all(self) -> None:
        """Wake every waiter; each reads its task's status and waits again if
        the task has not ended."""
        for key in list(self._futures):
            self._wake(key)

    def _wake_queue(self, queue: str | None) -> None:
        """Wake the waiters of one queue's tasks (see `wake_all`)."""
        for key in [key for key in self._futures if key[0] == queue]:
            self._wake(key)

    async def subscribe(self, queue: str, channel: str) -> None:
        """Subscribe to a queue's finished channel; return once the server
        confirmed it."""
        self._channel_queue[channel] = queue
        await self.listen(channel, lambda task_id: self.notify(queue, task_id))

    async def listen(self, channel: str, handler: Callable[[str], object]) -> None:
        """Call `handler` with each message on `channel` (once subscribed;
        this returns when the server confirmed the subscription). Raises
        ConnectionFailedError (or another KewError) if the subscription
        cannot be made; the next call tries again."""
        while True:
            event = self._confirmed.get(channel)
            if event is None:
                event = self._confirmed[channel] = asyncio.Event()
                self._handlers[channel] = handler
                # Shielded: a caller cancelled (its timeout ran out) must not
                # leave a subscription half made, that no later call would make.
                await asyncio.shield(self._subscribe(channel, event))
            await event.wait()
            if self._confirmed.get(channel) is event:
                return
            # The subscription that this caller waited for failed: try again.

    async def _subscribe(self, channel: str, event: asyncio.Event) -> None:
        try:
            if self._pubsub is None:
                self._pubsub = self._client.pubsub()
            await guarded(self._pubsub.subscribe(channel))
        except BaseException:
            if self._confirmed.get(channel) is event:
                del self._confirmed[channel]
            event.set()  # whoever else waits for it tries again
            raise
        if self._listener is None:
            self._listener = asyncio.create_task(
                self._listen(), name="kew task-finished listener"
            )

    async def _listen(self) -> None:
        reconnect = Reconnect(
            logger, "the task-finished subscription", first=0.1, cap=5.0
        )
        while True:
            try:
                message = await self._pubsub.get_message(timeout=None)
            except (rex.RedisError, OSError) as exc:
                # redis-py reconnects and resubscribes on the next read.
                self._confirmed_at.clear()
                self._resubscribing.update(self._confirmed)
                await asyncio.sleep(reconnect.failed(exc))
                continue
            reconnect.succeeded()
            if message is None:
                continue
            channel = message["channel"]
            if message["type"] == "subscribe":
                # Also after a reconnection: what was published in the gap
                # is lost, so the channel has been heard only since now.
                self._confirmed_at[channel] = time.monotonic()
                event = self._confirmed.get(channel)
                if event is not None:
                    event.set()
                if channel in self._resubscribing:
                    self._resubscribing.discard(channel)
                    self._wake_queue(self._channel_queue.get(channel))
            elif message["type"] == "message":
                handler = self._handlers.get(channel)
                if handler is not None:
                    handler(message["data"])

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        if self._pubsub is not None:
            with contextlib.suppress(rex.RedisError, OSError):
                await self._pubsub.aclose()
            self._pubsub = None
        for futures in self._futures.values():
            for future in futures:
                future.cancel()
        self._futures.clear()
