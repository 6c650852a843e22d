"""Cancellation: at once when waiting, cooperatively when running."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from kew import QueueConfig, TaskNotFoundError, TaskQueueManager, TaskStatus
from kew.events import Event, TaskCancelled
from kew.events.log import read
from kew.keys import QueueKeys
from kew.registry import Registry

from .conftest import eventually, hang
from .workers import started_by, survivor_registry, worker_process

MakeManager = Callable[..., Awaitable[TaskQueueManager]]

TAKEOVER = 20.0
"""A generous deadline for waits that include a lapsed lease."""


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
            await hang()
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
        await hang()

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
            await hang()
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


async def test_a_cancellation_the_task_function_turns_into_an_error_still_cancels(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """A function that raises its own error when cancelled ends `cancelled`,
    not `retry`: the request is not lost, and no retry is spent."""
    started = asyncio.Event()

    async def converts() -> None:
        started.set()
        try:
            await hang()
        except asyncio.CancelledError:
            raise RuntimeError("stopped on request") from None

    await manager.create_queue(QueueConfig(name="q", max_retries=3, retry_delay=0.01))
    await manager.submit_task("c", "q", converts)
    await asyncio.wait_for(started.wait(), 10)
    assert await manager.cancel_task("c") is True
    info = await manager.wait_for_task("c", timeout=10)
    assert info.status is TaskStatus.CANCELLED
    assert (info.attempt, info.retry_count) == (1, 0)
    events = await _events(client, prefix, "c")
    assert [e.type for e in events] == [
        "task.submitted",
        "task.started",
        "task.cancel_requested",
        "task.cancelled",
    ]
    assert isinstance(events[-1], TaskCancelled)
    assert events[-1].error == "stopped on request"
    assert await manager.verify_projections("q") == []


async def test_a_failure_just_after_the_cancel_request_ends_cancelled(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str, redis_url: str
) -> None:
    """A task that fails after the request was recorded, before its consumer
    could cancel it, ends `cancelled` (decided by `finish`): no retry, and the
    breaker does not count it."""

    def cancel_from_another_process() -> None:
        async def cancel() -> None:
            async with TaskQueueManager(
                redis_url=redis_url, key_prefix=prefix, consume=False
            ) as web:
                assert await web.cancel_task("f") is True

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, cancel()).result()

    async def fails_after_the_request() -> None:
        # Blocks this event loop while the request is made elsewhere, so the
        # consumer cannot learn of it before the function has failed.
        cancel_from_another_process()
        raise RuntimeError("failed just after the request")

    await manager.create_queue(
        QueueConfig(
            name="q", max_retries=2, retry_delay=0.01, circuit_breaker_max_failures=1
        )
    )
    await manager.submit_task("f", "q", fails_after_the_request)
    info = await manager.wait_for_task("f", timeout=10)
    assert info.status is TaskStatus.CANCELLED
    assert (info.attempt, info.retry_count) == (1, 0)
    events = await _events(client, prefix, "f")
    assert [e.type for e in events][-2:] == ["task.cancel_requested", "task.cancelled"]
    cancelled = events[-1]
    assert isinstance(cancelled, TaskCancelled)
    assert cancelled.actor == manager.identity
    assert cancelled.error == "failed just after the request"
    status = await manager.get_queue_status("q")
    assert status["circuit_breaker_status"] == "closed"
    assert status["circuit_breaker_failures"] == 0
    assert await manager.verify_projections("q") == []


async def test_a_task_asked_to_cancel_that_outlives_the_request_ends_at_shutdown(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """A function that ignores the cancel request (and every cancellation) is
    still running when its consumer shuts down and gives up on it: the
    shutdown ends the task `cancelled`, not handed back to run again."""
    asked, finish = asyncio.Event(), asyncio.Event()

    async def stubborn() -> str:
        while not finish.is_set():
            try:
                await finish.wait()
            except asyncio.CancelledError:
                asked.set()
        return "finished anyway"

    registry = Registry()
    registry.register(stubborn, "tests.stubborn")
    first = await make_manager(registry=registry)
    await first.create_queue(QueueConfig(name="q", lease_seconds=30))
    await first.submit_task("s", "q", "tests.stubborn")
    await eventually(
        lambda: _status_is(first, "s", TaskStatus.PROCESSING), what="s to start"
    )
    assert await first.cancel_task("s") is True
    await asyncio.wait_for(asked.wait(), 10)
    await first.shutdown(wait=False)

    watcher = await make_manager(consume=False)
    info = await watcher.get_task_status("s")
    assert info.status is TaskStatus.CANCELLED
    events = await _events(client, prefix, "s")
    assert [e.type for e in events] == [
        "task.submitted",
        "task.started",
        "task.cancel_requested",
        "task.cancelled",
    ]
    assert isinstance(events[-1], TaskCancelled)
    assert events[-1].reason == "its consumer shut down before the attempt stopped"
    assert await watcher.verify_projections("q") == []
    # Let the function end, so the test leaves nothing running.
    leftover = [t for t in asyncio.all_tasks() if t.get_name() == "kew task s"]
    finish.set()
    await asyncio.wait(leftover, timeout=10)
    assert all(t.done() for t in leftover)


async def _kill_while_running(
    make_manager: MakeManager,
    client: aioredis.Redis,
    prefix: str,
    redis_url: str,
    tmp_path: Path,
    config: QueueConfig,
) -> TaskQueueManager:
    """Start a worker process that runs task "t" (edge.hang), open the breaker
    with a failing task if the config says so (max failures 1), SIGKILL the
    worker and ask to cancel "t". Returns the non-consuming manager used."""
    creator = await make_manager(consume=False)
    await creator.create_queue(config)
    async with worker_process(tmp_path, redis_url, prefix) as worker:
        await creator.submit_task("t", "q", "edge.hang")
        await eventually(
            lambda: started_by(client, prefix, "t", worker.name),
            what="the worker to start t",
        )
        if config.circuit_breaker_max_failures == 1:
            await creator.submit_task("bad", "q", "edge.fail")
            assert (await creator.wait_for_task("bad", 10)).status is TaskStatus.FAILED
            assert await _breaker(creator) == "open"
        await worker.kill()
    assert await creator.cancel_task("t") is True
    info = await creator.get_task_status("t")
    assert (info.status, info.cancel_requested) == (TaskStatus.PROCESSING, True)
    return creator


async def test_a_task_whose_worker_was_killed_is_cancelled_by_the_next_consumer(
    make_manager: MakeManager,
    client: aioredis.Redis,
    prefix: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """cancel_task on a task whose process was SIGKILLed mid-run: the consumer
    that takes its entry over after the lease records it cancelled instead of
    running it again."""
    config = QueueConfig(name="q", lease_seconds=0.5)
    await _kill_while_running(make_manager, client, prefix, redis_url, tmp_path, config)
    survivor = await make_manager(registry=survivor_registry())
    await survivor.create_queue(config)
    info = await survivor.wait_for_task("t", timeout=TAKEOVER)
    assert info.status is TaskStatus.CANCELLED
    events = await _events(client, prefix, "t")
    assert [e.type for e in events] == [
        "task.submitted",
        "task.started",
        "task.cancel_requested",
        "task.cancelled",
    ]
    assert events[-1].actor == survivor.identity
    assert isinstance(events[-1], TaskCancelled)
    assert events[-1].reason == "cancelled while its consumer was gone"
    assert await survivor.verify_projections("q") == []


async def test_a_task_whose_worker_was_killed_is_cancelled_while_the_breaker_is_open(
    make_manager: MakeManager,
    client: aioredis.Redis,
    prefix: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """The same while the breaker is open (for a minute): the cancellation
    does not wait for the breaker, since it runs nothing; the breaker stays
    open."""
    config = QueueConfig(
        name="q",
        max_workers=2,
        lease_seconds=0.5,
        circuit_breaker_max_failures=1,
        circuit_breaker_reset_timeout=60,
    )
    await _kill_while_running(make_manager, client, prefix, redis_url, tmp_path, config)
    survivor = await make_manager(registry=survivor_registry())
    await survivor.create_queue(config)
    info = await survivor.wait_for_task("t", timeout=TAKEOVER)
    assert info.status is TaskStatus.CANCELLED
    assert [e.type for e in await _events(client, prefix, "t")][-1] == "task.cancelled"
    assert await _breaker(survivor) == "open"
    assert await survivor.verify_projections("q") == []


async def _breaker(manager: TaskQueueManager) -> str:
    return str((await manager.get_queue_status("q"))["circuit_breaker_status"])


async def _events(client: aioredis.Redis, prefix: str, task_id: str) -> list[Event]:
    return [
        e
        async for e in read(client, QueueKeys(prefix, "q").log)
        if e.task_id == task_id
    ]
