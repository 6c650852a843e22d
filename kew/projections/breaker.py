"""The circuit breaker projection, folded from the log.

It mirrors kew/lua/10_breaker.lua: `failures` counts consecutive final task
failures (a success resets it), transitions follow the breaker.* events, and
`trials` counts trial attempts of a half-open breaker that have not ended. The
hash exists from the first change on; `to_hash` renders it as stored.
"""

from __future__ import annotations

import dataclasses

from kew.events.models import (
    BreakerClosed,
    BreakerHalfOpened,
    BreakerOpened,
    Event,
    TaskCancelled,
    TaskDeadLettered,
    TaskFailed,
    TaskInterrupted,
    TaskStarted,
    TaskSucceeded,
)
from kew.projections.task import TaskState

__all__ = ["BREAKER_EVENTS", "BreakerState", "apply_breaker"]


@dataclasses.dataclass(frozen=True, slots=True)
class BreakerState:
    state: str = "closed"
    failures: int = 0
    until: int = 0
    trials: int = 0
    version: int = 0
    last_event: str = ""

    def to_hash(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}


BREAKER_EVENTS: frozenset[type[Event]] = frozenset(
    {
        BreakerOpened,
        BreakerHalfOpened,
        BreakerClosed,
        TaskSucceeded,
        TaskFailed,
        TaskDeadLettered,
        TaskStarted,
        TaskCancelled,
        TaskInterrupted,
    }
)
"""The event types that can change the breaker; a fold skips the others."""


def apply_breaker(
    breaker: BreakerState | None, event: Event, task: TaskState | None
) -> BreakerState | None:
    """Fold one event into the breaker. `task` is the event's task as it was
    before the event (its `trial` mark decides what a task event means here).
    Returns None while the breaker has never changed."""
    current = breaker or BreakerState()
    after = _step(current, event, task)
    if breaker is None and after == current:
        return None
    return after


def _step(b: BreakerState, event: Event, task: TaskState | None) -> BreakerState:
    replace = dataclasses.replace
    trial = task is not None and task.trial == "1"
    if isinstance(event, BreakerOpened):
        return replace(
            b,
            state="open",
            until=event.until,
            trials=0,
            version=b.version + 1,
            last_event=event.id,
        )
    if isinstance(event, BreakerHalfOpened):
        return replace(
            b, state="half_open", trials=0, version=b.version + 1, last_event=event.id
        )
    if isinstance(event, BreakerClosed):
        return replace(
            b,
            state="closed",
            trials=0,
            until=0,
            version=b.version + 1,
            last_event=event.id,
        )
    if isinstance(event, TaskSucceeded):
        return replace(b, failures=0) if b.failures else b
    if (isinstance(event, TaskFailed) and not event.retry) or isinstance(
        event, TaskDeadLettered
    ):
        return replace(b, failures=b.failures + 1)
    if isinstance(event, TaskStarted) and event.trial and not trial:
        return replace(b, trials=b.trials + 1)
    if (
        isinstance(event, TaskCancelled | TaskInterrupted)
        and trial
        and b.state == "half_open"
        and b.trials > 0
    ):
        return replace(b, trials=b.trials - 1)
    return b
