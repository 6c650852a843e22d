"""Recording the outcomes of one consumer's attempts: the `finish` function.

Invariants:

* Outcomes are recorded by `finish` (kew/lua/30_run.lua), batched: attempts
  that end in the same turn of the event loop share one round trip
  (`FinishBatcher`). Until `finish` answers, the entry stays held, and renewed
  by the lease loop (kew/leases.py).
* A `finish` call that fails for want of a connection is repeated with
  backoff for up to one lease (the entry stays held and renewed meanwhile).
  `finish` is fenced, so a repeat is harmless; when the first call was in
  fact recorded and only its reply was lost, the repeat is refused, and the
  task's history, which then holds this consumer's outcome of this attempt,
  tells it apart from a real fence.

Known limitations: an outage longer than a lease may let another consumer take
over the attempts whose outcomes were being recorded, which then run again
(at-least-once).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from kew import functions
from kew.attempts import Outcome
from kew.errors import ConnectionFailedError, KewError
from kew.events.models import (
    TaskCancelled,
    TaskFailed,
    TaskRetryScheduled,
    TaskSucceeded,
)
from kew.status import history
from kew.telemetry import internal

if TYPE_CHECKING:
    from kew.consumer import Consumer

__all__ = ["FinishBatcher", "Recorder"]

logger = logging.getLogger(__name__)


class FinishBatcher:
    """Records outcomes: one `finish` call for all those that arrive together.

    The first outcome schedules a flush; everything handed in before the flush
    runs (the same turn of the event loop, or while the previous call is in
    flight) goes into one call.
    """

    def __init__(self, record: Callable[[list[Outcome]], Awaitable[list[list[str]]]]):
        self._record = record
        self._pending: list[tuple[Outcome, asyncio.Future[list[str]]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def finish(self, outcome: Outcome) -> list[str]:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((outcome, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:500], self._pending[500:]
                try:
                    rows = await self._record([outcome for outcome, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), row in zip(batch, rows, strict=True):
                    if not future.done():
                        future.set_result(row)
        finally:
            self._flusher = None

    async def drain(self) -> None:
        """Wait until every outcome handed in so far is recorded."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)


class Recorder:
    """Records the outcomes of one consumer's attempts, batched and surely."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self._batcher = FinishBatcher(self._record_surely)

    async def finish(self, outcome: Outcome) -> list[str]:
        """Record one outcome; return the row `finish` returned for it."""
        return await self._batcher.finish(outcome)

    async def drain(self) -> None:
        """Wait until every outcome handed in so far is recorded."""
        await self._batcher.drain()

    async def _record_surely(self, outcomes: list[Outcome]) -> list[list[str]]:
        """Record outcomes (`_record`), repeating the call with backoff for up
        to one lease while the server cannot be reached. A repeat that is
        refused because the first call was recorded after all counts as
        recorded (see `_recorded_before`)."""
        consumer = self.consumer
        reconnect = consumer.reconnect(logger, "record outcomes on")
        give_up = time.monotonic() + consumer.leases.lease
        repeated = False
        while True:
            try:
                rows = await self._record(outcomes)
            except ConnectionFailedError as exc:
                delay = reconnect.failed(exc)
                if consumer.stopping or time.monotonic() + delay > give_up:
                    raise
                repeated = True
                await asyncio.sleep(delay)
            else:
                reconnect.succeeded()
                break
        if repeated:
            for i, row in enumerate(rows):
                if row[0] == "fenced":
                    rows[i] = await self._recorded_before(outcomes[i]) or row

        return rows

    async def _recorded_before(self, outcome: Outcome) -> list[str] | None:
        """The row `finish` returned for `outcome` if an earlier call recorded
        it, found in the task's history: an outcome event of this attempt
        written by this consumer (only its `finish` writes those); None if
        there is none, or the history cannot be read."""
        consumer = self.consumer
        a = outcome.attempt
        try:
            with internal():
                events = await history(consumer.client, consumer.keys, a.task_id, 100)
        except KewError:
            return None
        for event in reversed(events):
            if event.attempt != a.attempt or event.actor != consumer.name:
                continue
            match event:
                case TaskRetryScheduled():
                    return ["ok", event.id, "retry", str(event.due_at)]
                case TaskSucceeded():
                    return ["ok", event.id, "completed", ""]
                case TaskCancelled():
                    return ["ok", event.id, "cancelled", ""]
                case TaskFailed():
                    return ["ok", event.id, "failed", ""]
                case _:
                    continue
        return None

    async def _record(self, outcomes: list[Outcome]) -> list[list[str]]:
        consumer = self.consumer
        keys = consumer.keys
        call_keys = list(keys.queue_keys)
        args: list[str | int | float] = [
            consumer.name,
            consumer.expiry_seconds,
            keys.finished_channel,
        ]
        for o in outcomes:
            a = o.attempt
            call_keys.append(keys.task(a.task_id))
            args += [
                a.task_id,
                a.entry,
                keys.ready_all.index(a.ready) + 1,
                str(a.attempt),
                str(a.version),
                o.kind,
                o.value,
                o.data,
                random.random(),
            ]
        # Suppressed: the process spans have ended, and one call records many.
        with internal():
            reply = await functions.call(
                consumer.client,
                "finish",
                call_keys,
                args,
                timeout=consumer.leases.call_timeout,
            )
        rows = functions.rows(reply)
        moved = [row[4] for row in rows if row[0] == "ok" and row[4]]
        consumer.telemetry.breaker_moved(keys.queue, moved)
        return rows
