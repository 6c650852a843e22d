"""Every error kew raises, in one tree.

    KewError                       the root; catch it to catch anything from kew
    ├── ConfigurationError         bad input from the caller (also a ValueError)
    │   └── TaskFunctionError      a task function kew cannot run (also a TypeError)
    ├── SerializationError         an argument or result that is not JSON (TypeError)
    ├── TaskAlreadyExistsError     the task id is taken in that queue
    ├── TaskNotFoundError          no record of that task id (also a LookupError)
    ├── QueueNotFoundError         no queue of that name (also a LookupError)
    ├── QueueAlreadyExistsError    this manager already runs that queue (ValueError)
    ├── QueueProcessorError        the queue cannot take the task
    │   └── QueueFullError         ... because it holds max_size unfinished tasks
    ├── WaitTimeoutError           wait_for_task gave up (also a TimeoutError)
    ├── ConnectionFailedError      the server cannot be reached
    └── ServerError                the server misbehaved or cannot be started
        ├── ServerVersionError     the server is older than Redis 7.0 / Valkey 7.2
        └── ServerNotFoundError    no embedded server binary on this machine

`TaskQueueError` is the root's name in the earlier kew release; it is kept as an
alias so that `except TaskQueueError` in old code still catches everything.

Errors from redis-py are translated into this tree in one place
(`kew.functions.translate_redis_error`); callers never see a raw redis-py error.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "ConnectionFailedError",
    "KewError",
    "QueueAlreadyExistsError",
    "QueueFullError",
    "QueueNotFoundError",
    "QueueProcessorError",
    "SerializationError",
    "ServerError",
    "ServerNotFoundError",
    "ServerVersionError",
    "TaskAlreadyExistsError",
    "TaskFunctionError",
    "TaskNotFoundError",
    "TaskQueueError",
    "WaitTimeoutError",
]


class KewError(Exception):
    """The root of every error kew raises."""


TaskQueueError = KewError


class ConfigurationError(KewError, ValueError):
    """A value passed to kew is invalid; the message names it and the fix."""


class TaskFunctionError(ConfigurationError, TypeError):
    """A task function that kew cannot run, e.g. one that is not `async def`."""


class SerializationError(KewError, TypeError):
    """An argument or a result that cannot be stored as JSON."""


class TaskAlreadyExistsError(KewError):
    """A task with this id already exists in the queue (finished tasks count
    until their record expires)."""

    def __init__(self, message: str, task_ids: list[str] | None = None) -> None:
        super().__init__(message)
        self.task_ids = task_ids or []


class TaskNotFoundError(KewError, LookupError):
    """No record of the task: never submitted, or expired."""


class QueueNotFoundError(KewError, LookupError):
    """The queue has not been created, neither here nor by another process."""


class QueueAlreadyExistsError(KewError, ValueError):
    """This manager already runs a queue of that name."""


class QueueProcessorError(KewError):
    """The queue cannot take the task."""


class QueueFullError(QueueProcessorError):
    """The queue already holds `max_size` unfinished tasks."""


class WaitTimeoutError(KewError, TimeoutError):
    """`wait_for_task` reached its timeout before the task ended."""


class ConnectionFailedError(KewError, ConnectionError):
    """The Redis or Valkey server cannot be reached."""


class ServerError(KewError):
    """The server answered with an error kew did not expect, or cannot start."""


class ServerVersionError(ServerError):
    """The server lacks what kew needs (Redis Functions: Redis 7.0, Valkey 7.2)."""


class ServerNotFoundError(ServerError):
    """No server binary for the embedded default on this machine."""
