"""Turning a `submit_task` call into the arguments of the `submit` function.

Everything that can be wrong with a submission is found here, before anything
is sent: a task function that is not `async def`, arguments that do not fit
its signature, arguments that are not JSON, a bad task id or priority.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import pydantic_core

from kew.errors import ConfigurationError, SerializationError, TaskFunctionError
from kew.models import QueuePriority, TaskInfo, TaskStatus
from kew.registry import Registry

__all__ = ["Submission", "prepare", "task_info"]

MAX_TASK_ID = 512


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
    """The `task.submitted` event's data."""
    tp: str = ""

    def argv(self) -> list[str]:
        return [
            self.task_id,
            self.name,
            self.task_type,
            str(int(self.priority)),
            self.args,
            self.data,
            self.tp,
        ]


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
    if task_type is not None and not isinstance(task_type, str):  # pyright: ignore[reportUnnecessaryIsInstance]
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
        + "}"
    )
    return Submission(task_id, name, kind, level, stored, data)


def _encode(what: str, value: list[Any] | dict[str, Any], name: str) -> str:
    try:
        return pydantic_core.to_json(value).decode()
    except pydantic_core.PydanticSerializationError:
        pass
    items = enumerate(value) if isinstance(value, list) else value.items()
    for key, item in items:
        try:
            pydantic_core.to_json(item)
        except pydantic_core.PydanticSerializationError as exc:
            raise SerializationError(
                f"The {what} {key!r} of task function {name} is not JSON: "
                f"{type(item).__name__} {item!r} ({exc}). Pass JSON types, "
                "datetimes, UUIDs or pydantic models; kew never pickles."
            ) from None
    raise SerializationError(f"The arguments of {name} are not JSON.")


def task_info(queue: str, task_id: str, fields: Mapping[str, str]) -> TaskInfo:
    """A task's status from the fields of its hash."""

    def when(name: str) -> datetime | None:
        value = fields.get(name)
        return datetime.fromtimestamp(int(value) / 1000, UTC) if value else None

    result = fields.get("result")
    return TaskInfo.model_validate(
        {
            "task_id": task_id,
            "queue_name": queue,
            "task_type": fields.get("task_type", ""),
            "task_name": fields.get("name", ""),
            "priority": int(fields.get("priority", QueuePriority.MEDIUM)),
            "status": TaskStatus(fields["state"]),
            "queued_time": when("submitted_at"),
            "started_time": when("started_at"),
            "completed_time": when("finished_at"),
            "result": json.loads(result) if result else None,
            "error": fields.get("error"),
            "attempt": int(fields.get("attempt", 0)),
            "version": int(fields.get("version", 0)),
        }
    )
