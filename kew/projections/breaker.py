"""The circuit breaker projection, folded from the log.

It mirrors kew/lua/10_breaker.lua: `failures` counts consecutive final task
failures (a success resets it), transitions follow the breaker.* events, and
`trials` counts the trial attempts running now: one is added when a trial
starts and taken away when it ends, whatever its outcome and whatever the
breaker's state by then (never reset by a transition, so a trial left over
from an earlier half-open period still holds its slot). The hash exists from
the first change on; `to_hash` renders it as stored.
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
    TaskLost,
    TaskRefused,
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
        TaskLost,
        TaskRefused,
    }
)
"""The event types that can change the breaker; a fold skips the others."""


_NEVER_CHANGED = BreakerState()
"""The breaker before its first change (frozen: shared by every fold)."""


def apply_breaker(
    breaker: BreakerState | None, event: Event, task: TaskState | None
) -> BreakerState | None:
    """Fold one event into the breaker. `task` is the event's task as it was
    before the event (its `trial` mark decides what a task event means here).
    Returns None while the breaker has never changed."""
    current = breaker or _NEVER_CHANGED
    after = _step(current, event, task)
    if breaker is None and (after is current or after == current):
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
            version=b.version + 1,
            last_event=event.id,
        )
    if isinstance(event, BreakerHalfOpened):
        return replace(b, state="half_open", version=b.version + 1, last_event=event.id)
    if isinstance(event, BreakerClosed):
        return replace(
            b, state="closed", until=0, version=b.version + 1, last_event=event.id
        )
    if isinstance(event, TaskStarted):
        return replace(b, trials=b.trials + 1) if event.trial and not trial else b
    after = b
    if trial and _ends_trial(event) and b.trials > 0:
        after = replace(after, trials=b.trials - 1)
    if isinstance(event, TaskSucceeded) and b.failures:
        after = replace(after, failures=0)
    elif (isinstance(event, TaskFailed) and not event.retry) or (
        isinstance(event, TaskDeadLettered) and event.cause == "crash_loop"
    ):
        after = replace(after, failures=b.failures + 1)
    return after


_TRIAL_ENDS = (
    TaskSucceeded,
    TaskFailed,
    TaskCancelled,
    TaskInterrupted,
    TaskDeadLettered,
    TaskRefused,
)
"""The ends of an attempt: each frees the slot of a trial, whatever the
breaker's state (the breaker's own events never reset `trials`)."""


def _ends_trial(event: Event) -> bool:
    """Does the event end an attempt? A task.lost does when it queued the
    task again; when it did not, the task.cancelled after it is the end."""
    if isinstance(event, TaskLost):
        return bool(event.requeued_as)
    return isinstance(event, _TRIAL_ENDS)
