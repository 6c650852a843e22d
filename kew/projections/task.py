"""The task projection: a task's current state, folded from its events.

`apply` is a pure function `(state, event) -> state`. The Lua library writes
the same fields inline (kew/lua/*.lua), and `to_hash` renders a state exactly
as the task hash stores it, so a stored hash and a fold of the log can be
compared field by field. JSON-valued fields (`args`, `result`) compare by value,
because a round trip through JSON may change their spelling, never their value.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pydantic_core

from kew.events.models import (
    Event,
    TaskCancelled,
    TaskCancelRequested,
    TaskDeadLettered,
    TaskEnqueued,
    TaskEvent,
    TaskFailed,
    TaskInterrupted,
    TaskLost,
    TaskRefused,
    TaskReleased,
    TaskRequeued,
    TaskRetryScheduled,
    TaskStarted,
    TaskSubmitted,
    TaskSucceeded,
)

__all__ = ["JSON_FIELDS", "TaskState", "apply", "fold", "same_hash"]

JSON_FIELDS = frozenset({"args", "result"})


def dump_json(value: Any) -> str:
    """JSON as kew stores it: compact, UTF-8."""
    return pydantic_core.to_json(value).decode()


@dataclasses.dataclass(slots=True)
class TaskState:
    task_id: str
    state: str
    """queued, scheduled (deferred), retry, processing, completed, failed or
    cancelled: the hash's `state`, which TaskStatus reads."""
    version: int
    last_event: str
    name: str
    task_type: str
    priority: int
    args: str
    attempt: int
    submitted_at: int
    max_retries: int = 0
    retry_delay_ms: int = 1000
    retries: int | None = None
    """Retries scheduled so far (task.retry_scheduled events); absent until
    the first. Attempts handed back or taken over are not retries."""
    timeout_ms: int | None = None
    tp: str | None = None
    due_at: int | None = None
    owner: str | None = None
    entry: str | None = None
    started_at: int | None = None
    finished_at: int | None = None
    result: str | None = None
    error: str | None = None
    trial: str | None = None
    cancel_requested: str | None = None
    dead_letter: str | None = None
    """The task's entry in the dead-letter stream, while it is there."""
    refusals: int | None = None
    """How many times consumers without its task function handed it back
    (task.refused); absent until the first, cleared by a requeue."""

    @property
    def finished(self) -> bool:
        return self.state in ("completed", "failed", "cancelled")

    def to_hash(self) -> dict[str, str]:
        """The fields of the task hash, as the Lua library writes them."""
        fields = self.hash_fields()
        return dict(zip(fields[::2], fields[1::2], strict=True))

    def hash_fields(self) -> list[str]:
        """`to_hash` as a flat list: name, value, name, value, ..."""
        fields: list[str] = []
        for name, value in zip(_HASH_FIELDS, _hash_values(self), strict=True):
            if value is not None:
                fields += (name, str(value))
        return fields

    @classmethod
    def from_hash(cls, task_id: str, fields: Mapping[str, str]) -> TaskState:
        def opt_int(name: str) -> int | None:
            value = fields.get(name)
            return int(value) if value else None

        return cls(
            task_id=task_id,
            state=fields["state"],
            version=int(fields["version"]),
            last_event=fields["last_event"],
            name=fields["name"],
            task_type=fields["task_type"],
            priority=int(fields["priority"]),
            args=fields["args"],
            attempt=int(fields["attempt"]),
            submitted_at=int(fields["submitted_at"]),
            max_retries=int(fields.get("max_retries", 0)),
            retry_delay_ms=int(fields.get("retry_delay_ms", 1000)),
            retries=opt_int("retries"),
            timeout_ms=opt_int("timeout_ms"),
            tp=fields.get("tp"),
            due_at=opt_int("due_at"),
            owner=fields.get("owner"),
            entry=fields.get("entry"),
            started_at=opt_int("started_at"),
            finished_at=opt_int("finished_at"),
            result=fields.get("result"),
            error=fields.get("error"),
            trial=fields.get("trial"),
            cancel_requested=fields.get("cancel_requested"),
            dead_letter=fields.get("dead_letter"),
            refusals=opt_int("refusals"),
        )


def apply(state: TaskState | None, event: Event) -> TaskState | None:
    """Fold one event into a task's state, purely: `state` is left as it was
    and a new state is returned. Events of other tasks, and types this
    projection does not follow, return the state unchanged."""
    if not isinstance(event, TaskEvent):
        return state
    if isinstance(event, TaskSubmitted):
        return submitted(event)
    if state is None or state.task_id != event.task_id:
        return state
    after = _copy(state)
    advance(after, event)
    return after


def submitted(event: TaskSubmitted) -> TaskState:
    """The state a task.submitted event creates."""
    return TaskState(
        task_id=event.task_id,
        state="scheduled" if event.due_at is not None else "queued",
        version=1,
        last_event=event.id,
        name=event.name,
        task_type=event.task_type,
        priority=event.priority,
        args=dump_json({"args": event.args, "kwargs": event.kwargs}),
        attempt=0,
        submitted_at=event.ms,
        max_retries=event.max_retries,
        retry_delay_ms=event.retry_delay_ms,
        timeout_ms=event.timeout_ms or None,
        tp=event.tp,
        due_at=event.due_at,
    )


_FIELDS = tuple(f.name for f in dataclasses.fields(TaskState))
_HASH_FIELDS = tuple(name for name in _FIELDS if name != "task_id")
# One C call reads every field of a state (to_hash runs once per task in a
# rebuild of millions).
_hash_values: Callable[[TaskState], tuple[str | int | None, ...]] = operator.attrgetter(
    *_HASH_FIELDS
)


def _copy(state: TaskState) -> TaskState:
    copy = object.__new__(TaskState)
    for name in _FIELDS:
        object.__setattr__(copy, name, getattr(state, name))
    return copy


def advance(s: TaskState, event: TaskEvent) -> None:
    """Apply a later event of the same task to `s`, in place (the one copy of
    the transition rules; `apply` wraps it purely, a rebuild uses it as is)."""
    s.version += 1
    s.last_event = event.id
    if isinstance(event, TaskStarted):
        s.state = "processing"
        s.attempt = event.attempt
        s.owner = event.actor
        s.entry = event.entry
        s.started_at = event.ms
        if event.trial:
            s.trial = "1"
    elif isinstance(event, TaskEnqueued):
        s.state = "queued"
        s.due_at = None
    elif isinstance(event, TaskSucceeded):
        s.state = "completed"
        s.result = dump_json(event.result)
        s.error = None
        _ended(s, event)
    elif isinstance(event, TaskFailed):
        s.error = event.error
        s.trial = s.cancel_requested = None
        if not event.retry:
            s.state = "failed"
            _ended(s, event)
    elif isinstance(event, TaskRetryScheduled):
        s.state = "retry"
        s.due_at = event.due_at
        s.retries = (s.retries or 0) + 1
    elif isinstance(event, TaskCancelRequested):
        s.cancel_requested = "1"
    elif isinstance(event, TaskCancelled):
        s.state = "cancelled"
        s.due_at = None
        _ended(s, event)
    elif isinstance(event, TaskDeadLettered):
        s.state = "failed"
        s.error = event.reason
        s.dead_letter = event.dead_letter
        _ended(s, event)
    elif isinstance(event, TaskRequeued):
        s.state = "queued"
        s.dead_letter = s.finished_at = s.refusals = None
    elif isinstance(event, TaskRefused):
        s.state = "retry"
        s.due_at = event.due_at
        s.refusals = event.refusals
        s.trial = None
    elif isinstance(event, TaskInterrupted):
        s.state = "queued"
        s.trial = None
    elif isinstance(event, TaskReleased):
        s.state = "queued"
    elif isinstance(event, TaskLost) and event.requeued_as:
        s.state = "queued"
        s.trial = None
    # task.reclaimed changes only the version, like every event.


def _ended(s: TaskState, event: TaskEvent) -> None:
    s.finished_at = event.ms
    s.trial = s.cancel_requested = None


def fold(events: Iterable[Event]) -> dict[str, TaskState]:
    """Fold a stream of events into the state of every task it mentions."""
    tasks: dict[str, TaskState] = {}
    for event in events:
        if isinstance(event, TaskSubmitted):
            tasks[event.task_id] = submitted(event)
        elif isinstance(event, TaskEvent) and event.task_id in tasks:
            advance(tasks[event.task_id], event)
    return tasks


def same_hash(stored: Mapping[str, str], folded: Mapping[str, str]) -> list[str]:
    """The names of the fields where a stored hash and a folded one differ."""
    differing: list[str] = []
    for name in sorted(set(stored) | set(folded)):
        a, b = stored.get(name), folded.get(name)
        if a == b:
            continue
        if name in JSON_FIELDS and a is not None and b is not None:
            try:
                if json.loads(a) == json.loads(b):
                    continue
            except ValueError:
                pass
        differing.append(name)
    return differing
