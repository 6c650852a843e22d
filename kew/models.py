"""The public records: queue configuration, task status, priorities."""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime
from enum import IntEnum, StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

from kew.errors import ConfigurationError
from kew.keys import LEVELS, check_queue_name

__all__ = ["QueueConfig", "QueuePriority", "TaskInfo", "TaskStatus"]


class QueuePriority(IntEnum):
    """Priority of a task within its queue, or of a queue within a process.

    Lower values are served first, as in the earlier release.
    """

    HIGH = 1
    MEDIUM = 2
    LOW = 3

    @property
    def level(self) -> str:
        """The name of this priority's ready stream."""
        return LEVELS[self.value - 1]

    @classmethod
    def coerce(cls, value: object) -> QueuePriority:
        """Accept a member, its value (1-3) or its name ("high"), else raise."""
        if isinstance(value, QueuePriority):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        raise ConfigurationError(
            f"Priority {value!r} is not valid: use QueuePriority.HIGH, MEDIUM or "
            "LOW (or 1, 2, 3)."
        )


class TaskStatus(StrEnum):
    """Where a task stands.

    `queued` also covers a deferred task (its `due_time` is set); `retry` is a
    task whose attempt failed and that waits for its next attempt.
    """

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    RETRY = "retry"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @classmethod
    def of_state(cls, state: str) -> TaskStatus:
        """The status of a task hash's state (`scheduled` reads as queued)."""
        return cls.QUEUED if state == "scheduled" else cls(state)


_FINISHED = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})


@dataclasses.dataclass(frozen=True)
class QueueConfig:
    """How a queue behaves; stored in Redis when the queue is created, so other
    processes attach to the queue with the same settings.

    The positional order is the earlier release's. `max_circuit_breaker_failures`
    is accepted as the earlier spelling of `circuit_breaker_max_failures`.
    """

    name: str
    max_workers: int = 10
    priority: QueuePriority = QueuePriority.MEDIUM
    """Which of this process's queues gets a unit of its shared capacity first
    (TaskQueueManager(max_concurrency=...)). No effect without that capacity,
    and none between processes."""
    max_size: int = 1000
    task_timeout: float | None = None
    circuit_breaker_max_failures: int = 3
    circuit_breaker_reset_timeout: float = 60.0
    max_retries: int = 0
    retry_delay: float = 1.0
    lease_seconds: float = 2.0
    """How long a consumer may hold an entry without renewing it; others
    reclaim the entry afterwards. Renewed every third of it."""
    max_deliveries: int = 5
    """Deliveries of one entry without an outcome (a crash loop) before the
    task is dead-lettered."""
    circuit_breaker_trials: int = 1
    """Trial attempts allowed at once while the breaker is half-open."""
    max_retry_delay: float = 3600.0
    """The longest wait before a retry, however many attempts failed."""
    priority_weights: tuple[int, int, int] | None = None
    """None: strict priority (HIGH before MEDIUM before LOW). Three weights,
    e.g. (6, 3, 1): each fetch shares its entries among the levels in that
    proportion (what a level leaves unused goes to the others), so LOW
    progresses while HIGH is saturated."""
    retention_seconds: float | None = None
    """Events older than this are archived and trimmed from the log when the
    retention policy is applied (`apply_retention`, `kew retention`); None
    keeps the log whole."""
    max_circuit_breaker_failures: dataclasses.InitVar[int | None] = None

    def __post_init__(self, max_circuit_breaker_failures: int | None) -> None:
        check_queue_name(self.name)
        if max_circuit_breaker_failures is not None:
            object.__setattr__(
                self, "circuit_breaker_max_failures", max_circuit_breaker_failures
            )
        object.__setattr__(self, "priority", QueuePriority.coerce(self.priority))
        _positive_int("max_workers", self.max_workers)
        _positive_int("max_size", self.max_size)
        _positive_int("circuit_breaker_max_failures", self.circuit_breaker_max_failures)
        _positive_int("max_deliveries", self.max_deliveries)
        _positive_int("circuit_breaker_trials", self.circuit_breaker_trials)
        _seconds("max_retry_delay", self.max_retry_delay)
        if self.priority_weights is not None:
            weights = tuple(self.priority_weights)
            if not _valid_weights(weights):
                raise ConfigurationError(
                    f"priority_weights={self.priority_weights!r} is not valid: give "
                    "three whole numbers for HIGH, MEDIUM and LOW, e.g. (6, 3, 1), "
                    "not all 0; or None for strict priority."
                )
            object.__setattr__(self, "priority_weights", weights)
        _non_negative_int("max_retries", self.max_retries)
        _seconds("circuit_breaker_reset_timeout", self.circuit_breaker_reset_timeout)
        _seconds("retry_delay", self.retry_delay, zero_ok=True)
        _seconds("lease_seconds", self.lease_seconds)
        if self.lease_seconds < 0.1:
            raise ConfigurationError(
                f"lease_seconds={self.lease_seconds!r} is too short to renew: "
                "use 0.1 seconds or more (the default is 2)."
            )
        if self.task_timeout is not None:
            _seconds("task_timeout", self.task_timeout)
        if self.retention_seconds is not None:
            _seconds("retention_seconds", self.retention_seconds)

    def to_stored(self) -> dict[str, Any]:
        """The configuration as stored in Redis (JSON-friendly)."""
        data = dataclasses.asdict(self)
        data["priority"] = int(self.priority)
        if self.priority_weights is not None:
            data["priority_weights"] = list(self.priority_weights)
        return data

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> QueueConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("priority_weights") is not None:
            values["priority_weights"] = tuple(values["priority_weights"])
        return cls(**values)


def _valid_weights(weights: tuple[object, ...]) -> bool:
    return (
        len(weights) == 3
        and all(isinstance(w, int) and not isinstance(w, bool) for w in weights)
        and all(w >= 0 for w in weights)  # type: ignore[operator]
        and any(weights)
    )


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(
            f"{name}={value!r} is not valid: it must be a whole number of 1 or more."
        )


def _non_negative_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigurationError(
            f"{name}={value!r} is not valid: it must be a whole number of 0 or more."
        )


def _seconds(name: str, value: object, *, zero_ok: bool = False) -> None:
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if zero_ok else value > 0)
    )
    if not ok:
        bound = "0 or more" if zero_ok else "more than 0"
        raise ConfigurationError(
            f"{name}={value!r} is not valid: give a number of seconds, {bound}."
        )


class TaskInfo(BaseModel):
    """A task's status, read from its projection in Redis.

    A snapshot: it does not change after it is returned. Times are aware UTC
    datetimes taken from the Redis server's clock (the ids of the log's events).
    """

    model_config = ConfigDict(frozen=True)

    task_id: str
    queue_name: str
    task_type: str
    task_name: str
    """The registered name of the task function."""
    priority: QueuePriority
    status: TaskStatus
    queued_time: datetime
    started_time: datetime | None = None
    completed_time: datetime | None = None
    result: Any = None
    error: str | None = None
    attempt: int = 0
    """Attempts started so far, numbered from 1. An attempt handed back at a
    shutdown or taken over from a dead consumer counts, so this can exceed
    `retry_count + 1`."""
    retry_count: int = 0
    """Retries scheduled so far after failed attempts (task.retry_scheduled
    events): what max_retries bounds."""
    due_time: datetime | None = None
    """When a deferred task, or a failed one waiting to retry, is due."""
    cancel_requested: bool = False
    """A running task was asked to cancel and has not stopped yet."""
    version: int = 0
    """Events applied to this task; each transition adds one."""

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> TaskInfo:
        return cls.model_validate_json(text)
