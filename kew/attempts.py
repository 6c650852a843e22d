"""Attempts as the functions return them, outcomes, their batched recording,
and the hand-back of an attempt whose task function is not here."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from kew import functions
from kew.errors import KewError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from kew.keys import QueueKeys

__all__ = ["Attempt", "FinishBatcher", "Outcome", "refuse"]

logger = logging.getLogger(__name__)

_REFUSED = {
    "retry": "it is queued again after a lease, for a consumer that has it",
    "failed": "handed back max_deliveries times, it is dead-lettered",
    "cancelled": "it was asked to cancel, and is cancelled",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One started attempt, as `fetch`, `start` or `maintain` returns it."""

    task_id: str
    entry: str
    attempt: int
    version: int
    name: str
    args: str
    tp: str
    ready: str
    timeout: float | None
    """Seconds the attempt may run, or None."""
    deliveries: int = 1
    """How many times its entry was delivered: 1 when a fetch read it, more
    when it was taken over from a consumer that stopped renewing it."""

    @classmethod
    def from_row(cls, row: list[str]) -> Attempt:
        _, task_id, entry, attempt, version, name, args, tp, ready, *rest = row
        timeout_ms, deliveries = rest
        timeout = int(timeout_ms) / 1000 if timeout_ms and timeout_ms != "0" else None
        return cls(
            task_id,
            entry,
            int(attempt),
            int(version),
            name,
            args,
            tp,
            ready,
            timeout,
            int(deliveries),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    attempt: Attempt
    kind: str
    """succeeded, failed or cancelled."""
    value: str
    """The result as JSON, or the error message."""
    data: str
    """The event's data, as JSON."""
    error_type: str | None = None
    exception: BaseException | None = dataclasses.field(
        default=None, compare=False, repr=False
    )
    """The exception a failed attempt raised, if any (for its span)."""

    @property
    def succeeded(self) -> bool:
        return self.kind == "succeeded"


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


async def refuse(
    client: aioredis.Redis,
    keys: QueueKeys,
    attempt: Attempt,
    *,
    consumer: str,
    expiry_seconds: int,
    lease_ms: int,
    timeout: float,
) -> str:
    """Hand back an attempt whose task function this process does not have,
    for a consumer that has it (`refuse` in kew/lua/40_lease.lua): not a
    failure of the task, nor one the breaker counts. Logs what became of it;
    returns the task's state after it: "retry" (queued again after a lease),
    "failed" (dead-lettered) or "cancelled", or "" if it was not handed back
    (fenced, or the server could not be reached)."""
    level = keys.ready_all.index(attempt.ready) + 1
    try:
        reply = await functions.call(
            client,
            "refuse",
            [*keys.queue_keys, keys.task(attempt.task_id)],
            [
                consumer,
                attempt.task_id,
                attempt.entry,
                level,
                str(attempt.attempt),
                expiry_seconds,
                keys.finished_channel,
                lease_ms,
            ],
            timeout=timeout,
        )
    except KewError as exc:
        logger.warning(
            "consumer %s could not hand back task %r (%s); it will be taken over "
            "after the lease",
            consumer,
            attempt.task_id,
            exc,
        )
        return ""
    ok, state = str(reply[0]), str(reply[1])
    logger.warning(
        "consumer %s does not have task function %r of task %r (attempt %s) and "
        "handed it back: %s. Import the module that defines it (kew worker "
        "--import MODULE).",
        consumer,
        attempt.name,
        attempt.task_id,
        attempt.attempt,
        _REFUSED.get(state, state) if ok == "ok" else state,
    )
    return state if ok == "ok" else ""
