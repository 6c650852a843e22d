"""Turning a `submit_task` call into the arguments of the `submit` function.

Everything that can be wrong with a submission is found here, before anything
is sent: a task function that is not `async def`, arguments that do not fit
its signature, arguments that are not JSON, a bad task id or priority.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, cast

import pydantic_core

from kew.encoding import non_finite
from kew.errors import (
    ConfigurationError,
    KewError,
    QueueFullError,
    QueueNotFoundError,
    SerializationError,
    TaskAlreadyExistsError,
    TaskFunctionError,
)
from kew.models import QueueConfig, QueuePriority
from kew.registry import Registry

__all__ = [
    "Options",
    "Submission",
    "check_submit_reply",
    "options",
    "prepare",
    "prepare_batch",
]

MAX_TASK_ID = 512


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    """A task's policies, fixed at submit (the queue's defaults, overridden)."""

    max_retries: int
    retry_delay_ms: int
    timeout_ms: int
    """0: no timeout."""
    defer_until_ms: int = 0
    """Absolute due time (ms since the epoch), 0 for none."""
    defer_by_ms: int = 0
    """Due this long after the server receives the task, 0 for none."""


@dataclasses.dataclass(frozen=True, slots=True)
class Submission:
    """One task, ready for the `submit` function."""

    task_id: str
    name: str
    task_type: str
    priority: QueuePriority
    args: str
    """`{"args": [...], "kwargs": {...}}`, as the task hash stores it."""
    data: str
    """The `task.submitted` event's data (the function adds a due time)."""
    options: Options
    tp: str = ""
    """The W3C traceparent of the send span ("" if untraced), maybe followed
    by ";link"; set by kew.telemetry."""

    def argv(self) -> list[str]:
        o = self.options
        return [
            self.task_id,
            self.name,
            self.task_type,
            str(int(self.priority)),
            self.args,
            self.data,
            self.tp,
            str(o.max_retries),
            str(o.retry_delay_ms),
            str(o.timeout_ms),
            str(o.defer_until_ms),
            str(o.defer_by_ms),
        ]


def options(
    config: QueueConfig,
    *,
    max_retries: object = None,
    retry_delay: object = None,
    task_timeout: object = None,
    defer_by: object = None,
    defer_until: object = None,
) -> Options:
    """A task's policies from the queue's defaults and the caller's overrides."""
    if (
        max_retries is None
        and retry_delay is None
        and task_timeout is None
        and defer_by is None
        and defer_until is None
    ):
        return _defaults(config)
    retries = config.max_retries if max_retries is None else max_retries
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ConfigurationError(
            f"max_retries={max_retries!r} is not valid: give a whole number of "
            "retries, 0 or more."
        )
    delay = config.retry_delay if retry_delay is None else retry_delay
    timeout = config.task_timeout if task_timeout is None else task_timeout
    until_ms, by_ms = _due(defer_by, defer_until)
    return Options(
        max_retries=retries,
        retry_delay_ms=_ms("retry_delay", delay, zero_ok=True),
        timeout_ms=0 if timeout is None else _ms("task_timeout", timeout),
        defer_until_ms=until_ms,
        defer_by_ms=by_ms,
    )


@functools.lru_cache(maxsize=256)
def _defaults(config: QueueConfig) -> Options:
    """A queue's default policies (the common case of a batch), worked out once."""
    return options(config, max_retries=config.max_retries)


def _ms(name: str, seconds: object, *, zero_ok: bool = False) -> int:
    if isinstance(seconds, timedelta):
        seconds = seconds.total_seconds()
    ok = (
        isinstance(seconds, int | float)
        and not isinstance(seconds, bool)
        and math.isfinite(seconds)
        and (seconds >= 0 if zero_ok else seconds > 0)
    )
    if not ok:
        bound = "0 or more" if zero_ok else "more than 0"
        raise ConfigurationError(
            f"{name}={seconds!r} is not valid: give a number of seconds (or a "
            f"timedelta), {bound}."
        )
    assert isinstance(seconds, int | float)
    return round(seconds * 1000)


def _due(defer_by: object, defer_until: object) -> tuple[int, int]:
    if defer_by is not None and defer_until is not None:
        raise ConfigurationError(
            f"_defer_by={defer_by!r} and _defer_until={defer_until!r} were both "
            "given: pass one of them."
        )
    if defer_until is not None:
        if not isinstance(defer_until, datetime):
            raise ConfigurationError(
                f"_defer_until={defer_until!r} is not a datetime: pass an aware "
                "datetime, e.g. datetime.now(UTC) + timedelta(minutes=5)."
            )
        if defer_until.tzinfo is None or defer_until.utcoffset() is None:
            raise ConfigurationError(
                f"_defer_until={defer_until!r} has no time zone, so the instant it "
                "means is ambiguous: pass an aware datetime, e.g. "
                "datetime(2030, 1, 1, 9, tzinfo=UTC)."
            )
        return max(round(defer_until.timestamp() * 1000), 1), 0
    if defer_by is not None:
        return 0, _ms("_defer_by", defer_by, zero_ok=True)
    return 0, 0


def check_task_id(task_id: object) -> str:
    if (
        not isinstance(task_id, str)
        or not task_id
        or len(task_id) > MAX_TASK_ID
        or not task_id.isprintable()
    ):
        raise ConfigurationError(
            f"Task id {task_id!r} is not valid: use a non-empty printable string "
            f"of at most {MAX_TASK_ID} characters."
        )
    return task_id


def prepare(
    registry: Registry,
    *,
    task_id: object,
    task_func: Callable[..., Any] | str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    policies: Options,
    task_type: str | None = None,
    priority: object = None,
    task_name: str | None = None,
) -> Submission:
    """Validate a submission and encode it."""
    check_task_id(task_id)
    assert isinstance(task_id, str)
    if isinstance(task_func, str):
        name = task_name or task_func
        function = registry.get(name)
    elif callable(task_func):
        function = registry.register(task_func, task_name)
        name = function.name
    else:
        raise TaskFunctionError(
            f"task_func={task_func!r} is neither an async function nor the name of "
            "a registered task function."
        )
    if function is not None:
        function.check_arguments(args, kwargs)
    level = QueuePriority.MEDIUM if priority is None else QueuePriority.coerce(priority)
    if task_type is not None and not isinstance(task_type, str):
        raise ConfigurationError(f"task_type={task_type!r} is not valid: use a string.")
    kind = task_type or name.rpartition(":")[2]

    encoded_args = _encode("argument", list(args), name)
    encoded_kwargs = _encode("keyword argument", kwargs, name)
    stored = '{"args":' + encoded_args + ',"kwargs":' + encoded_kwargs + "}"
    data = (
        '{"name":'
        + json.dumps(name)
        + ',"task_type":'
        + json.dumps(kind)
        + ',"priority":'
        + str(int(level))
        + ',"args":'
        + encoded_args
        + ',"kwargs":'
        + encoded_kwargs
        + f',"max_retries":{policies.max_retries}'
        + f',"retry_delay_ms":{policies.retry_delay_ms}'
        + f',"timeout_ms":{policies.timeout_ms}'
        + "}"
    )
    return Submission(task_id, name, kind, level, stored, data, policies)


BATCH_KEYS = frozenset(
    {
        "task_id",
        "task_func",
        "args",
        "kwargs",
        "task_type",
        "priority",
        "task_name",
        "max_retries",
        "retry_delay",
        "task_timeout",
        "_defer_by",
        "_defer_until",
    }
)


def prepare_batch(
    registry: Registry, config: QueueConfig, tasks: list[dict[str, Any]]
) -> list[Submission]:
    """Validate and encode a batch; any bad task rejects the whole batch."""
    if not isinstance(tasks, list | tuple):
        raise ConfigurationError(
            f"submit_tasks expects a list of dicts, not {type(tasks).__name__}."
        )
    prepared: list[Submission] = []
    items: list[object] = list(tasks)
    for index, item in enumerate(items):
        if (
            not isinstance(item, dict)
            or "task_id" not in item
            or ("task_func" not in item)
        ):
            raise ConfigurationError(
                f"Task {index} of the batch ({item!r}) is not a dict with at least "
                "'task_id' and 'task_func'."
            )
        spec = cast(dict[str, Any], item)
        unknown = sorted(set(spec) - BATCH_KEYS)
        if unknown:
            raise ConfigurationError(
                f"Task {spec['task_id']!r} of the batch has unknown keys {unknown}; "
                f"the keys are {sorted(BATCH_KEYS)} (arguments go in 'args' and "
                "'kwargs')."
            )
        try:
            prepared.append(_prepare_one(registry, config, spec))
        except KewError as exc:
            # The same class, so `except` clauses still match, naming the task.
            raise type(exc)(f"Task {spec['task_id']!r} of the batch: {exc}") from None
    return prepared


def _prepare_one(
    registry: Registry, config: QueueConfig, spec: dict[str, Any]
) -> Submission:
    return prepare(
        registry,
        task_id=spec["task_id"],
        task_func=spec["task_func"],
        args=tuple(spec.get("args", ())),
        kwargs=dict(spec.get("kwargs", {})),
        policies=options(
            config,
            max_retries=spec.get("max_retries"),
            retry_delay=spec.get("retry_delay"),
            task_timeout=spec.get("task_timeout"),
            defer_by=spec.get("_defer_by"),
            defer_until=spec.get("_defer_until"),
        ),
        task_type=spec.get("task_type"),
        priority=spec.get("priority"),
        task_name=spec.get("task_name"),
    )


def _encode(what: str, value: list[Any] | dict[str, Any], name: str) -> str:
    try:
        encoded = pydantic_core.to_json(value).decode()
        if non_finite(encoded) is None:
            return encoded
    except pydantic_core.PydanticSerializationError:
        pass
    # Something is wrong: find the argument to name.
    items = enumerate(value) if isinstance(value, list) else value.items()
    for key, item in items:
        try:
            bad = non_finite(pydantic_core.to_json(item).decode())
        except pydantic_core.PydanticSerializationError as exc:
            raise SerializationError(
                f"The {what} {key!r} of task function {name} is not JSON: "
                f"{type(item).__name__} {item!r} ({exc}). Pass JSON types, "
                "datetimes, UUIDs or pydantic models; kew never pickles."
            ) from None
        if bad is not None:
            raise SerializationError(
                f"The {what} {key!r} of task function {name} holds {bad} "
                f"({item!r}), which JSON cannot represent: pass finite numbers "
                "(None, or a string, for a missing or unbounded value)."
            )
    raise SerializationError(f"The arguments of {name} are not JSON.")


def check_submit_reply(reply: list[str], queue_name: str) -> None:
    """Raise the error a `submit` reply stands for, if any."""
    status = reply[0]
    if status == "ok":
        return
    if status == "duplicate":
        ids = list(dict.fromkeys(reply[1:]))
        raise TaskAlreadyExistsError(
            f"Task {', '.join(repr(i) for i in ids)} appears more than once in the "
            "batch; give each task of a batch its own id.",
            ids,
        )
    if status == "exists":
        ids = reply[1:]
        raise TaskAlreadyExistsError(
            f"Task {', '.join(repr(i) for i in ids)} already exists in queue "
            f"{queue_name!r} (a finished task keeps its id until its record "
            "expires); use another task id.",
            ids,
        )
    if status == "full":
        raise _full(queue_name, reply)
    if status == "noqueue":
        raise QueueNotFoundError(
            f"Queue {queue_name!r} has no ready streams on the server (deleted by "
            "hand?); create it again with create_queue."
        )
    raise KewError(f"Unexpected reply from the submit function: {reply!r}")


def _full(queue_name: str, reply: list[str]) -> QueueFullError:
    unfinished, max_size = int(reply[1]), int(reply[2])
    size = int(reply[3]) if len(reply) > 3 else 1
    left_out = reply[4:]
    if size == 1:
        task = f" for task {left_out[0]!r}" if left_out else ""
        return QueueFullError(
            f"Queue {queue_name!r} is full: {unfinished} unfinished tasks, "
            f"max_size={max_size}, no room{task}. Wait for tasks to finish, or "
            "raise max_size."
        )
    room = max(max_size - unfinished, 0)
    names = ", ".join(repr(i) for i in left_out)
    return QueueFullError(
        f"Queue {queue_name!r} cannot take the batch of {size} tasks: it holds "
        f"{unfinished} unfinished tasks, max_size={max_size}, so {room} more "
        f"fit and {len(left_out)} do not ({names}); nothing was submitted. "
        "Submit a smaller batch, wait for tasks to finish, or raise max_size."
    )
