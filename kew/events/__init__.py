"""Events: the models, their stream encoding, and reading the log."""

from kew.events.codec import decode, encode
from kew.events.models import (
    Event,
    QueueConfigured,
    TaskEvent,
    TaskFailed,
    TaskInterrupted,
    TaskLost,
    TaskReclaimed,
    TaskReleased,
    TaskStarted,
    TaskSubmitted,
    TaskSucceeded,
)

__all__ = [
    "Event",
    "QueueConfigured",
    "TaskEvent",
    "TaskFailed",
    "TaskInterrupted",
    "TaskLost",
    "TaskReclaimed",
    "TaskReleased",
    "TaskStarted",
    "TaskSubmitted",
    "TaskSucceeded",
    "decode",
    "encode",
]
