"""Running one attempt: what a task function can see, and how attempts of one
task running side by side are kept apart."""

from __future__ import annotations

import asyncio

import kew
from kew import QueueConfig, TaskContext, TaskQueueManager, TaskStatus
from kew.attempts import Attempt
from kew.execution import RunningFunctions, cancel_functions, run_attempt
from kew.hooks import Hooks
from kew.registry import TaskFunction

from .conftest import DEADLINE, eventually


async def test_a_task_function_sees_its_task_and_attempt(
    manager: TaskQueueManager,
) -> None:
    """kew.current_task() gives the running function its task id, attempt and
    queue; the attempt goes up when the task runs again (a retry)."""
    seen: list[TaskContext | None] = []

    async def charge(amount: int) -> int:
        seen.append(kew.current_task())
        if len(seen) == 1:
            raise RuntimeError("the payment service timed out")
        return amount

    await manager.create_queue(QueueConfig(name="payments"))
    await manager.submit_task(
        "order-7", "payments", charge, 12, max_retries=1, retry_delay=0.01
    )
    info = await manager.wait_for_task("order-7", DEADLINE)

    assert (info.status, info.result) == (TaskStatus.COMPLETED, 12)
    assert seen == [
        TaskContext("order-7", 1, "payments"),
        TaskContext("order-7", 2, "payments"),
    ]
    assert seen[0] is not None
    assert seen[0].task_id == "order-7"


async def test_current_task_is_none_outside_a_task_function() -> None:
    """Outside a task function (a direct call, this test) there is no current
    task: current_task() returns None rather than a stale one."""
    assert kew.current_task() is None

    async def direct() -> TaskContext | None:
        return kew.current_task()

    assert await direct() is None


def _attempt(task_id: str, number: int) -> Attempt:
    arguments = '{"args":[],"kwargs":{}}'
    return Attempt(task_id, f"{number}-0", number, 1, "f", arguments, "", "r", None)


async def test_an_ending_attempt_leaves_a_newer_one_cancellable() -> None:
    """An attempt still ending its cancellation (cleanup in the function) while
    a newer attempt of the same task runs here does not remove the newer one
    from the running functions when it ends: cancel_task still reaches it."""
    old_may_end = asyncio.Event()
    newer_started = asyncio.Event()
    calls = 0

    async def slow_cleanup() -> str:
        nonlocal calls
        calls += 1
        number = calls
        if number == 2:
            newer_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if number == 1:
                await old_may_end.wait()
            raise
        return "never"

    function = TaskFunction("f", slow_cleanup)
    functions: RunningFunctions = {}

    def run(number: int) -> asyncio.Task[object]:
        return asyncio.create_task(
            run_attempt(
                _attempt("t", number),
                function,
                consumer="c",
                queue="q",
                hooks=Hooks(),
                functions=functions,
            )
        )

    old = run(1)
    await eventually(lambda: ("t", 1) in functions, what="attempt 1 to run")
    old.cancel()  # its consumer gave it up; its function is cleaning up
    newer = run(2)
    await asyncio.wait_for(newer_started.wait(), DEADLINE)
    old_may_end.set()
    await asyncio.gather(old, return_exceptions=True)

    assert list(functions) == [("t", 2)]
    assert cancel_functions(functions, "t")
    outcome = await asyncio.wait_for(newer, DEADLINE)
    assert outcome.kind == "cancelled"
    assert functions == {}
