"""The read side of TaskQueueManager: status (now or as of an instant),
history, waiting for a task, queue status, dead letters, projections.

A mixin: TaskQueueManager inherits it, and provides the connection and the
queues it declares below.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import redis.asyncio as aioredis

from kew.audit import export_lines
from kew.connection import Reconnect
from kew.errors import (
    ConfigurationError,
    ConnectionFailedError,
    KewError,
    TaskNotFoundError,
    WaitTimeoutError,
)
from kew.events.models import Event
from kew.functions import guarded
from kew.keys import QueueKeys
from kew.models import QueueConfig, TaskInfo
from kew.projections import Difference, apply, fold_queue, rebuild, verify
from kew.status import (
    find_task,
    history,
    locate_task,
    ongoing_tasks,
    queue_status,
    queue_status_as_of,
    task_info,
)
from kew.telemetry import internal
from kew.waiters import Waiters

if TYPE_CHECKING:
    from kew.consumer import Consumer

__all__ = ["NOT_CONNECTED", "Reads"]

NOT_CONNECTED = (
    "The TaskQueueManager is not connected: await manager.initialize() first, or "
    "use `async with TaskQueueManager() as manager`."
)


class QueueHandle:
    """What a manager knows of one queue."""

    def __init__(self, config: QueueConfig, keys: QueueKeys) -> None:
        self.config = config
        self.keys = keys
        self.consumer: Consumer | None = None
        self.blocking_client: aioredis.Redis | None = None


class Reads:
    """Status, history and waiting; see TaskQueueManager."""

    key_prefix: str
    task_expiry_seconds: int
    _task_queue: dict[str, str]
    _submitted: dict[str, float]
    _waiters: Waiters | None

    @property
    def client(self) -> aioredis.Redis:
        raise NotImplementedError

    async def _queue(self, name: str) -> QueueHandle:
        raise NotImplementedError

    async def _queue_names(self) -> list[str]:
        raise NotImplementedError

    def _queues_keys(self, queue: str) -> QueueKeys:
        raise NotImplementedError

    def _remember(self, task_id: str, queue_name: str) -> None:
        raise NotImplementedError

    async def _find(
        self, task_id: str, queue_name: str | None
    ) -> tuple[str, dict[str, str]]:
        """The queue a task is in, and its hash."""
        remembered = self._task_queue.get(task_id)
        if queue_name is None and remembered is not None:
            try:
                return await find_task(
                    self.client, self.key_prefix, task_id, [], remembered
                )
            except TaskNotFoundError:
                pass  # expired, or an id reused in another queue: search them all
        candidates = [] if queue_name else await self._queue_names()
        found = await find_task(
            self.client, self.key_prefix, task_id, candidates, queue_name
        )
        self._remember(task_id, found[0])
        return found

    async def get_task_status(
        self,
        task_id: str,
        *,
        queue_name: str | None = None,
        as_of: datetime | None = None,
    ) -> TaskInfo:
        """The task's current status, or, with `as_of` (an aware datetime), its
        status at that instant, folded from its events. Raises
        TaskNotFoundError (also for an instant before it was submitted)."""
        if as_of is None:
            queue, fields = await self._find(task_id, queue_name)
            return task_info(queue, task_id, fields)
        at_ms = _instant_ms(as_of)
        queue, events = await self._history(task_id, queue_name)
        state = None
        for event in events:
            if event.ms <= at_ms:
                state = apply(state, event)
        if state is None:
            raise TaskNotFoundError(
                f"Task {task_id!r} had not been submitted yet at "
                f"{as_of.isoformat()}: ask about a later instant (its history, "
                "get_task_history(), shows when it was submitted)."
            )
        return task_info(queue, task_id, state.to_hash())

    async def get_task_history(
        self, task_id: str, *, queue_name: str | None = None, limit: int = 10_000
    ) -> list[Event]:
        """The task's events, oldest first, as typed models (time, type,
        attempt, actor, error, trace id...). Also after the task's record has
        expired, as long as the log still holds the events.

        The history follows the task's chain of events backwards from its
        last one, so `limit` keeps the newest `limit` events and leaves out
        the oldest: when exactly `limit` came back and the first of them has
        a `prev`, there were more (`kew history` says so). Events trimmed by
        the retention policy are in its archive, not here."""
        _, events = await self._history(task_id, queue_name, limit)
        return events

    async def _history(
        self, task_id: str, queue_name: str | None, limit: int = 10_000
    ) -> tuple[str, list[Event]]:
        queue = queue_name or self._task_queue.get(task_id)
        if queue is None:
            queue = await locate_task(
                self.client, self.key_prefix, task_id, await self._queue_names()
            )
        events = (
            await history(self.client, self._queues_keys(queue), task_id, limit)
            if queue is not None
            else []
        )
        if queue is None or not events:
            raise TaskNotFoundError(
                f"No history of task {task_id!r} under prefix {self.key_prefix!r}: "
                "it was never submitted, or its events were trimmed from the log. "
                "Check the id and the key prefix; trimmed events are in the "
                "retention archive (kew history ID --archive FILE)."
            )
        return queue, events

    async def wait_for_task(
        self,
        task_id: str,
        timeout: float | None = None,
        *,
        queue_name: str | None = None,
    ) -> TaskInfo:
        """Wait until the task has ended and return its final status.

        Blocks on a notification from the server, not a polling loop. Raises
        WaitTimeoutError after `timeout` seconds (None waits for ever) and
        TaskNotFoundError for an unknown task. The status is read at least
        once, so a task that has ended is returned even with `timeout=0` (a
        timeout too short for any read is exceeded by that one read). A read
        that fails for want of a connection, once waiting, is repeated with
        backoff (within `timeout`).
        """
        waiters = self._waiters_ready()
        queue = queue_name or self._task_queue.get(task_id)
        last: TaskInfo | None = None
        """The last status read."""
        if queue is None:
            with internal():
                queue, fields = await self._find(task_id, None)
            last = task_info(queue, task_id, fields)
            if last.status.finished:
                return last
        channel = self._queues_keys(queue).finished_channel
        unreachable = False
        try:
            async with asyncio.timeout(timeout):
                submitted = self._submitted.get(task_id)
                if (
                    submitted is not None
                    and waiters.heard_since(channel, submitted)
                    and not waiters.may_have_ended(queue, task_id, submitted)
                ):
                    # Its end cannot have passed unheard: wait before reading.
                    future = waiters.register(queue, task_id)
                    try:
                        await future
                    finally:
                        waiters.discard(queue, task_id, future)
                # Subscribed first, then read: an end in between is not missed.
                await waiters.subscribe(queue, channel)
                backoff = Reconnect.silent()
                while True:
                    future = waiters.register(queue, task_id)
                    try:
                        try:
                            last = await self._read_quietly(task_id, queue)
                        except ConnectionFailedError as exc:
                            # A read is safe to repeat. Quietly: the consumers
                            # and the listener report the outage.
                            unreachable = True
                            await asyncio.sleep(backoff.failed(exc))
                            continue
                        if last.status.finished:
                            return last
                        await future
                    finally:
                        waiters.discard(queue, task_id, future)
        except TimeoutError:
            pass
        if last is None and not unreachable:
            # The time ran out before the first read (timeout=0, say): read
            # once, so that a task that has ended is not reported as waited for.
            last = await self._read_quietly(task_id, queue)
            if last.status.finished:
                return last
        state = "unknown: the server could not be reached"
        if last is not None:
            state = last.status.value
        raise WaitTimeoutError(
            f"Task {task_id!r} did not end within {timeout}s (it is {state}); "
            "wait longer, or check its consumers."
        )

    async def _read_quietly(self, task_id: str, queue: str) -> TaskInfo:
        """The task's status, read for waiting (no span of its own)."""
        with internal():
            return await self.get_task_status(task_id, queue_name=queue)

    def _waiters_ready(self) -> Waiters:
        if self._waiters is None:
            raise KewError(NOT_CONNECTED)
        return self._waiters

    async def get_queue_status(
        self, queue_name: str, *, as_of: datetime | None = None
    ) -> dict[str, Any]:
        """Counts by state across all processes, plus this process's view.

        `current_workers` is the number of this queue's tasks running in this
        process; `processing_tasks` counts them in every process. `queued_tasks`
        includes deferred tasks (also counted in `scheduled_tasks`).
        `circuit_breaker_status` is closed, open or half_open; an open breaker
        whose reset time has passed turns half_open at the next fetch.

        With `as_of` (an aware datetime), the queue as its log says it was then:
        counts by state, the tasks running (`running_tasks`) and the breaker.
        """
        queue = await self._queue(queue_name)
        if as_of is not None:
            folded = await fold_queue(
                self.client, queue.keys, end=str(_instant_ms(as_of))
            )
            return queue_status_as_of(folded, queue.config, as_of)
        busy = queue.consumer.busy if queue.consumer else 0
        return await queue_status(self.client, queue.keys, queue.config, busy)

    async def get_ongoing_tasks(self) -> list[TaskInfo]:
        """Tasks being processed right now, by any process, in any queue."""
        ongoing: list[TaskInfo] = []
        for name in await self._queue_names():
            ongoing += await ongoing_tasks(
                self.client, QueueKeys(self.key_prefix, name)
            )
        return ongoing

    async def export_log(
        self,
        queue_name: str,
        *,
        task_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """The queue's events as JSON-ready dicts, one per event, oldest first
        (a JSON Lines export: `kew export`): all of them, one task's, or those
        between two aware datetimes."""
        queue = await self._queue(queue_name)
        async for line in export_lines(
            self.client,
            queue.keys,
            task_id=task_id,
            since_ms=_instant_ms(since) if since else None,
            until_ms=_instant_ms(until) if until else None,
        ):
            yield line

    # -- dead letters and projections -------------------------------------

    async def dead_letters(self, queue_name: str) -> list[dict[str, str]]:
        """The queue's dead letters, oldest first: each with its stream `id`,
        `task_id`, `deliveries`, `previous` (the last consumer) and `reason`."""
        queue = await self._queue(queue_name)
        entries = cast(
            list[tuple[str, dict[str, str]]],
            await guarded(self.client.xrange(queue.keys.dlq)),
        )
        return [{"id": entry_id, **fields} for entry_id, fields in entries]

    async def verify_projections(self, queue_name: str) -> list[Difference]:
        """Compare the queue's stored projections with a fold of its log; an
        empty list means they agree."""
        queue = await self._queue(queue_name)
        return await verify(self.client, queue.keys)

    async def rebuild_projections(self, queue_name: str) -> int:
        """Rewrite the queue's projections from its log; returns the number of
        events folded. Run it while the queue is quiet."""
        queue = await self._queue(queue_name)
        folded = await rebuild(
            self.client, queue.keys, expiry_seconds=self.task_expiry_seconds
        )
        return folded.events


def _instant_ms(at: datetime) -> int:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ConfigurationError(
            f"as_of={at!r} has no time zone, so the instant it means is ambiguous: "
            "pass an aware datetime, e.g. datetime(2030, 1, 1, 3, 14, tzinfo=UTC)."
        )
    return int(at.timestamp() * 1000)
