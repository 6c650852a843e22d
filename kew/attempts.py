"""Attempts as the functions return them, outcomes, and the hand-back of an
attempt whose task function is not here. Outcomes are recorded by
kew/recording.py."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from kew import functions
from kew.errors import KewError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from kew.keys import QueueKeys

__all__ = ["Attempt", "Outcome", "refuse"]

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
