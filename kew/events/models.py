"""Events: immutable facts in a queue's log, named in the past tense.

A log entry's fields are flat, so `XRANGE` shows them plainly:

    type      the event type, e.g. "task.started"
    v         the schema version of this type
    task_id   the task it concerns (absent for queue-level events)
    prev      this task's previous event id: the per-task chain
    attempt   the attempt it concerns, numbered from 1 (0 before the first)
    actor     who wrote it: the submitter or the consumer's name
    tp        the W3C traceparent of the task's creation context, maybe
              followed by ";link" (see kew/telemetry.py)
    data      everything else, as a JSON object

In Python an event is one pydantic model per type, with the envelope and the
fields of `data` side by side. Its time is the time in its entry id, which the
Redis server's clock assigned when the event was appended.
"""

# Each event model narrows `type` from str to its Literal, which is how pydantic
# discriminates; pyright reads that as an unsafe override of a mutable field,
# but the models are frozen.
# pyright: reportIncompatibleVariableOverride=false

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

__all__ = [
    "EVENT_TYPES",
    "KNOWN_EVENT",
    "BreakerClosed",
    "BreakerHalfOpened",
    "BreakerOpened",
    "Event",
    "KnownEvent",
    "QueueConfigured",
    "TaskCancelRequested",
    "TaskCancelled",
    "TaskDeadLettered",
    "TaskEnqueued",
    "TaskEvent",
    "TaskFailed",
    "TaskInterrupted",
    "TaskLost",
    "TaskReclaimed",
    "TaskRefused",
    "TaskReleased",
    "TaskRequeued",
    "TaskRetryScheduled",
    "TaskStarted",
    "TaskSubmitted",
    "TaskSucceeded",
    "entry_ms",
    "entry_time",
]

ENVELOPE = ("type", "v", "task_id", "prev", "attempt", "actor", "tp")


def entry_ms(entry_id: str) -> int:
    """The milliseconds part of a stream entry id."""
    return int(entry_id.partition("-")[0])


def entry_time(entry_id: str) -> datetime:
    """The server time a stream entry id carries, as an aware UTC datetime."""
    return datetime.fromtimestamp(entry_ms(entry_id) / 1000, tz=UTC)


class Event(BaseModel):
    """The envelope every event shares. An event of a type this version of kew
    does not know is read as a plain `Event`, so old code can read new logs."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    VERSION: ClassVar[int] = 1

    id: str
    type: str
    v: int = 1
    task_id: str | None = None
    prev: str | None = None
    attempt: int = 0
    actor: str | None = None
    tp: str | None = None

    @property
    def time(self) -> datetime:
        return entry_time(self.id)

    @property
    def ms(self) -> int:
        return entry_ms(self.id)

    @property
    def trace_id(self) -> str | None:
        """The trace id in `tp`, the key to this task's trace in Jaeger. With
        `trace_links_only` it is the submitter's trace, which the attempts
        link to."""
        if not self.tp:
            return None
        # `tp` is a W3C traceparent, maybe followed by a mark such as ";link".
        parts = self.tp.partition(";")[0].split("-")
        return parts[1] if len(parts) == 4 else None


class TaskEvent(Event):
    """An event about one task; `task_id` is always set."""

    task_id: str = ""


class TaskSubmitted(TaskEvent):
    type: Literal["task.submitted"] = "task.submitted"
    name: str
    task_type: str
    priority: int
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    max_retries: int = 0
    retry_delay_ms: int = 1000
    timeout_ms: int = 0
    """0: no timeout."""
    due_at: int | None = None
    """Set for a deferred task: when it is due (server ms)."""


class TaskEnqueued(TaskEvent):
    """A deferred task, or a retry, became due and was put on its ready stream."""

    type: Literal["task.enqueued"] = "task.enqueued"
    entry: str
    from_: str = Field("", alias="from")


class TaskStarted(TaskEvent):
    type: Literal["task.started"] = "task.started"
    entry: str
    trial: bool = False
    """A trial attempt of a half-open circuit breaker."""


class TaskSucceeded(TaskEvent):
    type: Literal["task.succeeded"] = "task.succeeded"
    result: Any = None


class TaskFailed(TaskEvent):
    type: Literal["task.failed"] = "task.failed"
    error: str
    error_type: str | None = None
    retry: bool = False
    """Another attempt will follow (see the next task.retry_scheduled)."""


class TaskRetryScheduled(TaskEvent):
    type: Literal["task.retry_scheduled"] = "task.retry_scheduled"
    due_at: int
    delay_ms: int


class TaskCancelRequested(TaskEvent):
    """A running task was asked to stop; its consumer cancels the attempt."""

    type: Literal["task.cancel_requested"] = "task.cancel_requested"


class TaskCancelled(TaskEvent):
    type: Literal["task.cancelled"] = "task.cancelled"
    reason: str = ""
    error: str | None = None
    """The error the attempt ended with after it was asked to cancel (the
    function turned the cancellation into an error, or failed meanwhile)."""
    error_type: str | None = None


class TaskReclaimed(TaskEvent):
    """A live consumer took over an attempt whose consumer stopped renewing it."""

    type: Literal["task.reclaimed"] = "task.reclaimed"
    previous: str
    entry: str
    idle_ms: int = 0


class TaskInterrupted(TaskEvent):
    """A running attempt stopped without an outcome (its consumer shut down) and
    the task went back to the queue; the next consumer starts a new attempt."""

    type: Literal["task.interrupted"] = "task.interrupted"
    entry: str
    requeued_as: str
    reason: str = ""


class TaskReleased(TaskEvent):
    """A consumer handed back an entry it had received but not started."""

    type: Literal["task.released"] = "task.released"
    entry: str
    requeued_as: str
    reason: str = ""


class TaskDeadLettered(TaskEvent):
    """A crash loop: the task's entry was delivered more than max_deliveries
    times without an outcome; the task went to the dead-letter stream."""

    type: Literal["task.dead_lettered"] = "task.dead_lettered"
    reason: str
    deliveries: int
    entry: str
    dead_letter: str
    """The entry id in the dead-letter stream."""
    previous: str = ""
    """The consumer that held the entry last (the one that died or froze);
    empty in logs written before kew recorded it."""
    cause: str = "crash_loop"
    """"crash_loop" (its consumers died or froze; the breaker counts it as a
    failure) or "unknown_function" (handed back by consumers without its task
    function, see task.refused; the breaker does not count it)."""


class TaskRefused(TaskEvent):
    """A consumer that does not have the task's function handed the attempt
    back: the task waits until `due_at` (state retry) and is queued again, for
    a consumer that has it. Neither a retry nor a failure."""

    type: Literal["task.refused"] = "task.refused"
    entry: str
    function: str
    refusals: int
    """How many times the task has been refused so far."""
    due_at: int


class TaskRequeued(TaskEvent):
    """A dead-lettered task was sent back to its ready stream."""

    type: Literal["task.requeued"] = "task.requeued"
    entry: str
    dead_letter: str


class TaskLost(TaskEvent):
    """A ready entry that vanished from its stream while pending (trimmed or
    deleted by hand). The task it named is found through the consumer that
    held it or the queue's pending index; if that task was running on the
    entry, it went back to the queue under a new entry (`requeued_as`), and
    its next attempt starts as after an interrupted one. `task_id` is ""
    when no task could be named (logs written before kew kept the index)."""

    type: Literal["task.lost"] = "task.lost"
    entry: str
    stream: str
    previous: str = ""
    """The consumer that held the entry."""
    requeued_as: str = ""
    """The task's new ready entry, when the task was queued again."""


class BreakerOpened(Event):
    type: Literal["breaker.opened"] = "breaker.opened"
    reason: str
    failures: int
    until: int
    """Server ms until which no task starts."""


class BreakerHalfOpened(Event):
    type: Literal["breaker.half_opened"] = "breaker.half_opened"


class BreakerClosed(Event):
    type: Literal["breaker.closed"] = "breaker.closed"
    reason: str = ""


class QueueConfigured(Event):
    type: Literal["queue.configured"] = "queue.configured"
    config: dict[str, Any]


KnownEvent = Annotated[
    TaskSubmitted
    | TaskEnqueued
    | TaskStarted
    | TaskSucceeded
    | TaskFailed
    | TaskRetryScheduled
    | TaskCancelRequested
    | TaskCancelled
    | BreakerOpened
    | BreakerHalfOpened
    | BreakerClosed
    | TaskReclaimed
    | TaskInterrupted
    | TaskReleased
    | TaskDeadLettered
    | TaskRefused
    | TaskRequeued
    | TaskLost
    | QueueConfigured,
    Field(discriminator="type"),
]
"""Every event type this version of kew knows, discriminated on `type`."""

KNOWN_EVENT: TypeAdapter[KnownEvent] = TypeAdapter(KnownEvent)
"""Validates the fields of a known event into its model, chosen by `type`."""

EVENT_TYPES: dict[str, type[Event]] = {
    model.model_fields["type"].default: model
    for model in get_args(get_args(KnownEvent)[0])
}
"""The model of each known type, for its schema version."""
