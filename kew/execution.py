"""Running one attempt of a task function: arguments in, an Outcome out.

Everything that can go wrong in a task function, or around it (undecodable
arguments, a timeout, a result that is not JSON), ends as an Outcome; only the
consumer's own cancellation escapes, as it must. (A consumer hands back an
attempt whose function it does not have before it gets here, see `refuse` in
kew/attempts.py; given no function, `run_attempt` fails the attempt.)
The function runs in a task of its own (kept in `functions` while it runs), so
that `cancel_task` can cancel it without cancelling the bookkeeping around it.

While a task function runs, `current_task()` tells it which task and attempt
it is running (a context variable, copied into the function's own task), so
that it can key its side effects on the task id.

Who cancelled the function is told by the cancellers, not by the exception
that comes out, since a function may catch its cancellation and return, or
raise something else instead:

* the deadline (`expired()`): the attempt fails with "Task timed out after
  Ns", even if the function returned;
* this consumer stopping (shutdown, or a lost lease: the attempt's own task is
  being cancelled, `cancelling()`): the attempt is interrupted, and
  CancelledError goes on up, so that its entry is handed back;
* `cancel_task` (the function's task was cancelled, and neither of the above
  holds): the attempt is cancelled, unless the function returned a result.

Known limitations: the deadline cancels the function once. A function that
catches that cancellation and keeps running is not cancelled again; its
attempt holds a worker slot until it returns, and then counts as timed out.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from typing import Any, NamedTuple

import pydantic_core

from kew.attempts import Attempt, Outcome
from kew.encoding import non_finite
from kew.hooks import Hooks
from kew.registry import TaskFunction

__all__ = [
    "AttemptKey",
    "RunningFunctions",
    "TaskContext",
    "cancel_functions",
    "current_task",
    "run_attempt",
]

logger = logging.getLogger(__name__)


class TaskContext(NamedTuple):
    """The task and attempt a task function is running for."""

    task_id: str
    attempt: int
    """Numbered from 1; a task run again (after its consumer died, a retry)
    has a higher number."""
    queue: str


_current: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "kew_current_task", default=None
)


def current_task() -> TaskContext | None:
    """The task and attempt the calling task function runs for, or None when
    it is not called by kew (a direct call, a test).

    `task_id` is unique in its queue and the same in every attempt: it is the
    natural idempotency key for the function's side effects outside Redis.
    """
    return _current.get()


AttemptKey = tuple[str, int]
"""(task id, attempt): one attempt of a task, as the consumer tracks it."""
RunningFunctions = dict[AttemptKey, asyncio.Future[Any]]
"""The task functions running now, by attempt. An attempt cancelled but not
yet ended may run beside a newer attempt of its task that this consumer took
back: keyed by attempt, neither removes the other's entry."""


def cancel_functions(functions: RunningFunctions, task_id: str) -> bool:
    """Cancel every running attempt of `task_id` here; True if there was one."""
    found = False
    for (running_id, _), function in list(functions.items()):
        if running_id == task_id and not function.done():
            function.cancel()
            found = True
    return found


async def run_attempt(
    attempt: Attempt,
    function: TaskFunction | None,
    *,
    consumer: str,
    queue: str,
    hooks: Hooks,
    functions: RunningFunctions,
) -> Outcome:
    """Run the attempt's task function and say how it ended."""
    started = time.perf_counter()
    if function is None:
        return _failure(
            attempt,
            f"Task function {attempt.name!r} is not registered in this process "
            f"({consumer}): import the module that defines it (kew worker "
            "--import MODULE) or submit the task from a process that has it.",
            "TaskFunctionError",
        )
    if hooks.on_task_start is not None:
        await hooks.before(attempt)
    try:
        arguments = json.loads(attempt.args)
        args, kwargs = list(arguments["args"]), dict(arguments["kwargs"])
    except (ValueError, KeyError, TypeError) as exc:
        return _failure(
            attempt,
            f"The stored arguments of task {attempt.task_id!r} cannot be "
            f"decoded ({exc}); submit the task again.",
            "SerializationError",
        )
    # The function's task copies the context as it is made: it sees its own
    # TaskContext, and this task's context is left as it was.
    token = _current.set(TaskContext(attempt.task_id, attempt.attempt, queue))
    try:
        run = asyncio.create_task(function.run(args, kwargs))
    finally:
        _current.reset(token)
    key = (attempt.task_id, attempt.attempt)
    functions[key] = run
    deadline = asyncio.timeout(attempt.timeout)
    try:
        async with deadline:
            result = await run
    except asyncio.CancelledError:
        if _stopping():
            raise
        return _cancelled(attempt)
    except Exception as exc:
        if deadline.expired():
            return _timed_out(attempt, exc)
        if _stopping():
            raise asyncio.CancelledError from exc
        if run.cancelling():
            return _cancelled(attempt, exc)
        return _failure(attempt, _describe(exc), _type_name(exc), exc)
    finally:
        if functions.get(key) is run:
            del functions[key]
    if deadline.expired():
        # The function caught the cancellation and returned: still a timeout.
        return _timed_out(attempt)
    try:
        value = pydantic_core.to_json(result).decode()
    except pydantic_core.PydanticSerializationError as exc:
        return _failure(
            attempt,
            f"The result of task {attempt.task_id!r} is not JSON-serialisable "
            f"({exc}); return JSON types, or a pydantic model.",
            "SerializationError",
        )
    bad = non_finite(value)
    if bad is not None:
        return _failure(
            attempt,
            f"The result of task {attempt.task_id!r} holds {bad}, which JSON "
            "cannot represent; return finite numbers (None, or a string, for a "
            "missing or unbounded value).",
            "SerializationError",
        )
    logger.info(
        "task %r (%s) attempt %s on queue %s succeeded in %.3fs",
        attempt.task_id,
        attempt.name,
        attempt.attempt,
        queue,
        time.perf_counter() - started,
    )
    return Outcome(attempt, "succeeded", value, '{"result":' + value + "}")


def _stopping() -> bool:
    """Is this attempt's own task being cancelled (its consumer is stopping,
    or lost the attempt's lease)?"""
    current = asyncio.current_task()
    return current is not None and current.cancelling() > 0


def _cancelled(attempt: Attempt, exc: BaseException | None = None) -> Outcome:
    """The attempt was cancelled by cancel_task; `exc` is the error the
    function raised instead of CancelledError, if it did."""
    logger.info("task %r cancelled on request", attempt.task_id)
    data: dict[str, str] = {"reason": "cancel_task"}
    if exc is not None:
        data |= {"error": _describe(exc), "error_type": _type_name(exc)}
    return Outcome(attempt, "cancelled", "", pydantic_core.to_json(data).decode())


def _timed_out(attempt: Attempt, exc: BaseException | None = None) -> Outcome:
    return _failure(
        attempt, f"Task timed out after {attempt.timeout:g}s", "TimeoutError", exc
    )


def _type_name(exc: BaseException) -> str:
    return type(exc).__qualname__


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text if text else _type_name(exc)


def _failure(
    attempt: Attempt, error: str, error_type: str, exc: BaseException | None = None
) -> Outcome:
    logger.warning(
        "task %r (%s) attempt %s failed: %s",
        attempt.task_id,
        attempt.name,
        attempt.attempt,
        error,
    )
    if exc is not None:
        logger.debug("task %r failed with", attempt.task_id, exc_info=exc)
    data = pydantic_core.to_json({"error": error, "error_type": error_type}).decode()
    return Outcome(attempt, "failed", error, data, error_type, exc)
