"""Cancellation: at once when waiting, cooperatively when running."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest
import redis.asyncio as aioredis

from kew import QueueConfig, TaskNotFoundError, TaskQueueManager, TaskStatus
from kew.events.log import read
from kew.keys import QueueKeys

from .conftest import eventually

MakeManager = Callable[..., Awaitable[TaskQueueManager]]


async def _types(client: aioredis.Redis, prefix: str, task_id: str) -> list[str]:
    return [
        e.type
        async for e in read(client, QueueKeys(prefix, "q").log)
        if e.task_id == task_id
    ]


async def _status_is(
    manager: TaskQueueManager, task_id: str, status: TaskStatus
) -> bool:
    return (await manager.get_task_status(task_id)).status is status


async def test_a_queued_task_is_cancelled_at_once_and_never_runs(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """cancel_task on a queued task ends it now; its entry is skipped later."""
    gate = asyncio.Event()
    ran: list[str] = []

    async def job(name: str) -> None:
        ran.append(name)
        await gate.wait()

    await manager.create_queue(QueueConfig(name="q", max_workers=1))
    await manager.submit_task("busy", "q", job, "busy")
    await eventually(lambda: ran == ["busy"], what="the worker to be busy")
    await manager.submit_task("victim", "q", job, "victim")
    await manager.submit_task("after", "q", job, "after")

    waiting = asyncio.create_task(manager.wait_for_task("victim", timeout=10))
    assert await manager.cancel_task("victim") is True
    info = await waiting
    assert info.status is TaskStatus.CANCELLED
    assert info.completed_time is not None

    gate.set()
    await manager.wait_for_task("after", 10)
    assert ran == ["busy", "after"]
    assert await _types(client, prefix, "victim") == [
        "task.submitted",
        "task.cancelled",
    ]
    assert (await manager.get_queue_status("q"))["cancelled_tasks"] == 1
    assert await manager.verify_projections("q") == []


async def test_a_deferred_task_is_cancelled_before_it_is_due(
    manager: TaskQueueManager,
) -> None:
    """A deferred task leaves the schedule when cancelled."""

    async def never() -> None:
        raise AssertionError("a cancelled task ran")

    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("later", "q", never, _defer_by=timedelta(hours=1))
    assert (await manager.get_queue_status("q"))["scheduled_tasks"] == 1
    assert await manager.cancel_task("later") is True
    assert (await manager.get_task_status("later")).status is TaskStatus.CANCELLED
    status = await manager.get_queue_status("q")
    assert status["scheduled_tasks"] == 0
    assert status["queued_tasks"] == 0
    assert await manager.verify_projections("q") == []


async def test_a_running_task_is_cancelled_cooperatively(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """The attempt's asyncio task gets CancelledError; the task ends cancelled."""
    started = asyncio.Event()
    saw_cancel: list[bool] = []

    async def long_job() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            saw_cancel.append(True)
            raise

    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("long", "q", long_job)
    await asyncio.wait_for(started.wait(), 10)
    assert await manager.cancel_task("long") is True
    info = await manager.wait_for_task("long", timeout=10)
    assert info.status is TaskStatus.CANCELLED
    assert saw_cancel == [True]
    assert await _types(client, prefix, "long") == [
        "task.submitted",
        "task.started",
        "task.cancel_requested",
        "task.cancelled",
    ]
    assert await manager.verify_projections("q") == []


async def test_a_task_running_in_another_process_is_cancelled(
    make_manager: MakeManager,
) -> None:
    """The request reaches the consumer that runs the task, wherever it is."""
    started = asyncio.Event()

    async def long_job() -> None:
        started.set()
        await asyncio.sleep(3600)

    worker = await make_manager()
    await worker.create_queue(QueueConfig(name="q"))
    web = await make_manager(consume=False)
    await web.submit_task("remote", "q", long_job)
    await asyncio.wait_for(started.wait(), 10)
    assert await web.cancel_task("remote") is True
    info = await web.wait_for_task("remote", timeout=10)
    assert info.status is TaskStatus.CANCELLED


async def test_cancelling_an_ended_or_unknown_task(manager: TaskQueueManager) -> None:
    """An ended task cannot be cancelled (False); an unknown one raises."""

    async def quick() -> int:
        return 1

    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("done", "q", quick)
    await manager.wait_for_task("done", 10)
    assert await manager.cancel_task("done") is False
    assert (await manager.get_task_status("done")).status is TaskStatus.COMPLETED
    with pytest.raises(TaskNotFoundError, match="'ghost'"):
        await manager.cancel_task("ghost")


async def test_a_task_that_ignores_cancellation_keeps_its_outcome(
    manager: TaskQueueManager,
) -> None:
    """Cancellation is cooperative: a function that catches it and returns
    ends `completed`, with its result."""
    started = asyncio.Event()

    async def stubborn() -> str:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return "finished anyway"
        return "not reached"

    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("s", "q", stubborn)
    await asyncio.wait_for(started.wait(), 10)
    await manager.cancel_task("s")
    info = await manager.wait_for_task("s", 10)
    assert info.status is TaskStatus.COMPLETED
    assert info.result == "finished anyway"
    assert await manager.verify_projections("q") == []
