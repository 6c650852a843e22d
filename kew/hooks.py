"""Lifecycle hooks of the earlier release: on_task_start, on_task_complete and
on_task_fail, each sync or async.

A hook receives the task's `TaskInfo` (and `on_task_fail` the error message as
an exception). A hook that raises is logged and ignored: a hook never kills a
consumer or changes a task's outcome. `on_task_start` runs inside the
attempt's worker slot, so a slow one holds a permit; the others run once the
outcome is recorded, after the slot is free. `on_task_fail` runs after every failed
attempt, including those that will be retried (the TaskInfo then shows status
`retry`), as in the earlier release. A cancelled task calls no hook.

A hook receives a TaskInfo read from the server; when that read fails, the
hook is skipped and a warning says so (the task is not affected either).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kew.attempts import Attempt, Outcome

__all__ = ["Hook", "Hooks"]

logger = logging.getLogger(__name__)

Hook = Callable[..., Any]


class TaskFailure(Exception):
    """The error a failed attempt ended with, as `on_task_fail` receives it."""

    def __init__(self, message: str, error_type: str | None) -> None:
        super().__init__(message)
        self.error_type = error_type


class Hooks:
    def __init__(
        self,
        *,
        on_task_start: Hook | None = None,
        on_task_complete: Hook | None = None,
        on_task_fail: Hook | None = None,
        describe: Callable[[Attempt], Awaitable[Any]] | None = None,
    ) -> None:
        self.on_task_start = on_task_start
        self.on_task_complete = on_task_complete
        self.on_task_fail = on_task_fail
        self.describe = describe

    @property
    def empty(self) -> bool:
        return not (self.on_task_start or self.on_task_complete or self.on_task_fail)

    async def before(self, attempt: Attempt) -> None:
        if self.on_task_start is None:
            return
        info = await self._info(attempt, "on_task_start")
        if info is not None:
            await _call(self.on_task_start, info)

    async def after(self, attempt: Attempt, outcome: Outcome) -> None:
        """Run after the outcome is recorded, so the TaskInfo shows it."""
        if outcome.succeeded:
            name, hook, extra = "on_task_complete", self.on_task_complete, ()
        elif outcome.kind == "failed":
            name, hook = "on_task_fail", self.on_task_fail
            extra = (TaskFailure(outcome.value, outcome.error_type),)
        else:
            return
        if hook is None:
            return
        info = await self._info(attempt, name)
        if info is not None:
            await _call(hook, info, *extra)

    async def _info(self, attempt: Attempt, hook: str) -> Any:
        """The attempt's TaskInfo for the hook named `hook`, or None (logged)
        if it cannot be read."""
        if self.describe is None:
            return None
        try:
            return await self.describe(attempt)
        except Exception as exc:
            logger.warning(
                "%s hook of task %r attempt %s not run: its status could not be "
                "read (%s); the task is not affected",
                hook,
                attempt.task_id,
                attempt.attempt,
                exc,
            )
            return None


async def _call(hook: Hook, *args: Any) -> None:
    try:
        result = hook(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("hook %r raised; the task is not affected", hook)
