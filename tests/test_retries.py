"""Retries with backoff, timeouts, hooks and the earlier release's spellings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from kew import (
    ConfigurationError,
    QueueConfig,
    QueuePriority,
    TaskInfo,
    TaskQueueManager,
    TaskStatus,
)
from kew.attempts import Attempt
from kew.errors import ConnectionFailedError
from kew.events import TaskRetryScheduled
from kew.events.log import read
from kew.keys import QueueKeys
from kew.registry import Registry

from .conftest import eventually, hang

MakeManager = Callable[..., Awaitable[TaskQueueManager]]


class Flaky:
    """A task function that fails its first `failures` calls."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"attempt {self.calls} failed")
        return "finally"


async def _task_events(
    client: aioredis.Redis, prefix: str, task_id: str, queue: str = "q"
) -> list[Any]:
    return [
        e
        async for e in read(client, QueueKeys(prefix, queue).log)
        if e.task_id == task_id
    ]


async def test_a_task_is_retried_until_it_succeeds(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """Each attempt is an event; attempt and retry_count agree with the log."""
    flaky = Flaky(failures=2)
    manager.registry.register(flaky, "tests.flaky_until_third")
    await manager.create_queue(QueueConfig(name="q", max_retries=3, retry_delay=0.05))
    await manager.submit_task("r", "q", "tests.flaky_until_third")
    info = await manager.wait_for_task("r", timeout=10)

    assert info.status is TaskStatus.COMPLETED
    assert info.result == "finally"
    assert info.attempt == 3
    assert info.retry_count == 2
    assert info.error is None
    assert flaky.calls == 3
    types = [(e.type, e.attempt) for e in await _task_events(client, prefix, "r")]
    assert types == [
        ("task.submitted", 0),
        ("task.started", 1),
        ("task.failed", 1),
        ("task.retry_scheduled", 1),
        ("task.enqueued", 1),
        ("task.started", 2),
        ("task.failed", 2),
        ("task.retry_scheduled", 2),
        ("task.enqueued", 2),
        ("task.started", 3),
        ("task.succeeded", 3),
    ]
    assert await manager.verify_projections("q") == []


async def test_a_task_fails_when_its_retries_run_out(
    manager: TaskQueueManager,
) -> None:
    """max_retries=2 means three attempts, then `failed` with the last error."""
    flaky = Flaky(failures=10)
    manager.registry.register(flaky, "tests.always_failing")
    await manager.create_queue(QueueConfig(name="q", max_retries=2, retry_delay=0.01))
    await manager.submit_task("r", "q", "tests.always_failing")
    info = await manager.wait_for_task("r", timeout=10)
    assert info.status is TaskStatus.FAILED
    assert info.attempt == 3
    assert info.error == "attempt 3 failed"
    assert flaky.calls == 3
    assert await manager.verify_projections("q") == []


async def test_backoff_doubles_with_jitter(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """The n-th retry waits between half and all of retry_delay * 2**(n-1)."""
    flaky = Flaky(failures=3)
    manager.registry.register(flaky, "tests.flaky_backoff")
    await manager.create_queue(QueueConfig(name="q", max_retries=3, retry_delay=0.04))
    await manager.submit_task("r", "q", "tests.flaky_backoff")
    await manager.wait_for_task("r", timeout=10)
    delays = [
        e.delay_ms
        for e in await _task_events(client, prefix, "r")
        if isinstance(e, TaskRetryScheduled)
    ]
    assert len(delays) == 3
    for n, delay in enumerate(delays, start=1):
        full = 40 * 2 ** (n - 1)
        assert full / 2 <= delay <= full


async def test_retry_waits_with_status_retry_and_can_be_cancelled(
    manager: TaskQueueManager,
) -> None:
    """Between attempts the task is `retry`, with its due time and last error."""
    flaky = Flaky(failures=1)
    manager.registry.register(flaky, "tests.flaky_slow_retry")
    await manager.create_queue(QueueConfig(name="q", max_retries=1, retry_delay=60))
    await manager.submit_task("r", "q", "tests.flaky_slow_retry")
    await eventually(
        lambda: _status_is(manager, "r", TaskStatus.RETRY), what="the retry wait"
    )
    info = await manager.get_task_status("r")
    assert info.error == "attempt 1 failed"
    assert info.due_time is not None
    assert info.due_time > info.started_time  # type: ignore[operator]
    assert (await manager.get_queue_status("q"))["retry_tasks"] == 1
    assert await manager.cancel_task("r") is True
    assert (await manager.wait_for_task("r", 10)).status is TaskStatus.CANCELLED
    assert await manager.verify_projections("q") == []


async def _status_is(
    manager: TaskQueueManager, task_id: str, status: TaskStatus
) -> bool:
    return (await manager.get_task_status(task_id)).status is status


async def test_per_task_overrides_of_the_queue_policy(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """max_retries and retry_delay given at submit win over the queue's."""
    flaky = Flaky(failures=1)
    manager.registry.register(flaky, "tests.flaky_override")
    # No retries by default, and a default delay of 1 s.
    await manager.create_queue(QueueConfig(name="q", retry_delay=1.0))
    await manager.submit_task(
        "r", "q", "tests.flaky_override", max_retries=1, retry_delay=0.01
    )
    assert (await manager.wait_for_task("r", 10)).status is TaskStatus.COMPLETED
    delays = [
        e.delay_ms
        for e in await _task_events(client, prefix, "r")
        if isinstance(e, TaskRetryScheduled)
    ]
    assert len(delays) == 1
    assert 5 <= delays[0] <= 10  # half to all of 10 ms, not of the queue's 1 s
    with pytest.raises(ConfigurationError, match="max_retries=-1"):
        await manager.submit_task("x", "q", "tests.flaky_override", max_retries=-1)
    with pytest.raises(ConfigurationError, match="task_timeout=0"):
        await manager.submit_task("y", "q", "tests.flaky_override", task_timeout=0)


async def test_a_timed_out_attempt_is_cancelled_and_counts_as_a_failure(
    manager: TaskQueueManager,
) -> None:
    """task_timeout cancels the attempt; the failure follows the retry policy."""
    cancelled: list[int] = []

    async def slow() -> None:
        try:
            await hang()
        except asyncio.CancelledError:
            cancelled.append(1)
            raise

    await manager.create_queue(
        QueueConfig(name="q", task_timeout=0.1, max_retries=1, retry_delay=0.01)
    )
    await manager.submit_task("t", "q", slow)
    info = await manager.wait_for_task("t", timeout=10)
    assert info.status is TaskStatus.FAILED
    assert info.error == "Task timed out after 0.1s"
    assert info.attempt == 2
    assert cancelled == [1, 1]

    assert await manager.verify_projections("q") == []


async def test_a_per_task_timeout_overrides_the_queues(
    manager: TaskQueueManager,
) -> None:
    """A task given task_timeout=30 outlives the queue's 0.1 s timeout: a
    later task on the default times out while the first is still running."""
    gate = asyncio.Event()

    async def waits() -> str:
        await gate.wait()
        return "in time"

    async def hangs() -> None:
        await hang()

    await manager.create_queue(QueueConfig(name="q", max_workers=2, task_timeout=0.1))
    await manager.submit_task("long", "q", waits, task_timeout=30)
    await eventually(
        lambda: _status_is(manager, "long", TaskStatus.PROCESSING),
        what="the long task to start",
    )
    await manager.submit_task("probe", "q", hangs)
    probe = await manager.wait_for_task("probe", timeout=10)
    assert probe.error == "Task timed out after 0.1s"
    # The long task started first, so it has run longer than 0.1 s by now.
    assert (await manager.get_task_status("long")).status is TaskStatus.PROCESSING
    gate.set()
    info = await manager.wait_for_task("long", timeout=10)
    assert info.status is TaskStatus.COMPLETED
    assert info.result == "in time"
    assert await manager.verify_projections("q") == []


async def test_a_timeout_the_task_function_swallows_is_still_a_failure(
    manager: TaskQueueManager,
) -> None:
    """A function that catches the cancellation of its timeout and returns
    fails with the timeout error; it does not complete."""

    async def stubborn() -> str:
        try:
            await hang()
        except asyncio.CancelledError:
            return "I ignore timeouts"
        return "never"

    async def converts() -> str:
        try:
            await hang()
        except asyncio.CancelledError:
            raise RuntimeError("interrupted") from None
        return "never"

    await manager.create_queue(QueueConfig(name="q", max_workers=2, task_timeout=0.1))
    await manager.submit_task("s", "q", stubborn)
    await manager.submit_task("c", "q", converts)
    for task_id in ("s", "c"):
        info = await manager.wait_for_task(task_id, timeout=10)
        assert info.status is TaskStatus.FAILED, task_id
        assert info.result is None
        assert info.error == "Task timed out after 0.1s"
    assert await manager.verify_projections("q") == []


async def test_hooks_run_sync_or_async_and_a_raising_hook_is_harmless(
    make_manager: MakeManager, caplog: pytest.LogCaptureFixture
) -> None:
    """on_task_start, on_task_complete and on_task_fail see each attempt; a hook
    that raises is logged and changes nothing."""
    seen: list[tuple[str, str, str]] = []

    def on_start(info: TaskInfo) -> None:
        seen.append(("start", info.task_id, info.status.value))

    async def on_complete(info: TaskInfo) -> None:
        seen.append(("complete", info.task_id, info.status.value))
        raise RuntimeError("a broken hook")

    def on_fail(info: TaskInfo, error: Exception) -> None:
        seen.append(("fail", info.task_id, f"{info.status.value}: {error}"))

    manager = await make_manager(
        on_task_start=on_start, on_task_complete=on_complete, on_task_fail=on_fail
    )
    flaky = Flaky(failures=1)
    manager.registry.register(flaky, "tests.flaky_hooks")
    await manager.create_queue(QueueConfig(name="q", max_retries=1, retry_delay=0.01))
    with caplog.at_level(logging.ERROR, logger="kew.hooks"):
        await manager.submit_task("h", "q", "tests.flaky_hooks")
        info = await manager.wait_for_task("h", timeout=10)
        await eventually(lambda: len(seen) == 4, what="four hook calls")
    assert info.status is TaskStatus.COMPLETED
    assert seen == [
        ("start", "h", "processing"),
        ("fail", "h", "retry: attempt 1 failed"),
        ("start", "h", "processing"),
        ("complete", "h", "completed"),
    ]
    assert "a broken hook" in caplog.text


async def test_earlier_release_spellings_are_accepted(
    manager: TaskQueueManager,
) -> None:
    """task_type= and priority= at submit, get_ongoing_tasks, shutdown(wait,
    timeout) letting a running task finish."""
    gate = asyncio.Event()

    async def job(n: int) -> int:
        await gate.wait()
        return n

    await manager.create_queue(QueueConfig(name="q", max_workers=2))
    info = await manager.submit_task(
        task_id="a",
        queue_name="q",
        task_type="process_item",
        task_func=job,
        priority=QueuePriority.HIGH,
        n=1,
    )
    assert info.task_type == "process_item"
    assert info.priority is QueuePriority.HIGH
    await eventually(
        lambda: _status_is(manager, "a", TaskStatus.PROCESSING), what="a to start"
    )
    ongoing = await manager.get_ongoing_tasks()
    assert [t.task_id for t in ongoing] == ["a"]

    loop = asyncio.get_running_loop()
    loop.call_soon(gate.set)
    await manager.shutdown(wait=True, timeout=10)
    # The task finished inside the shutdown's grace period.
    checker = await TaskQueueManager(
        redis_url=manager.redis_url, key_prefix=manager.key_prefix, consume=False
    ).__aenter__()
    try:
        done = await checker.get_task_status("a")
        assert done.status is TaskStatus.COMPLETED
        assert done.result == 1
    finally:
        await checker.shutdown()


async def test_an_attempt_handed_back_at_shutdown_uses_up_no_retry(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """max_retries=1: an attempt interrupted by a shutdown, then two failed
    attempts elsewhere; the first failure is retried, retry_count counts the
    one retry the log schedules, and attempt counts all three."""
    started = asyncio.Event()

    async def hangs() -> None:
        started.set()
        await hang()

    first_registry = Registry()
    first_registry.register(hangs, "tests.handed_back")
    first = await make_manager(registry=first_registry)
    config = QueueConfig(name="q", max_retries=1, retry_delay=0.01)
    await first.create_queue(config)
    await first.submit_task("h", "q", "tests.handed_back")
    await started.wait()
    await first.shutdown(wait=False)

    flaky = Flaky(failures=10)
    second_registry = Registry()
    second_registry.register(flaky, "tests.handed_back")
    second = await make_manager(registry=second_registry)
    await second.create_queue(config)
    info = await second.wait_for_task("h", timeout=10)

    assert info.status is TaskStatus.FAILED
    assert flaky.calls == 2
    assert info.attempt == 3
    assert info.retry_count == 1
    types = [e.type for e in await _task_events(client, prefix, "h")]
    assert types.count("task.interrupted") == 1
    assert types.count("task.retry_scheduled") == info.retry_count
    assert await second.verify_projections("q") == []


async def test_a_cancellation_turned_into_an_error_at_shutdown_is_handed_back(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """A function that raises its own error when the shutdown cancels it is
    interrupted and handed back, not failed: no retry is spent, the breaker
    does not count it, and the next consumer runs it."""
    started = asyncio.Event()

    async def converts() -> str:
        started.set()
        try:
            await hang()
        except asyncio.CancelledError:
            raise RuntimeError("interrupted") from None
        return "never"

    async def quick() -> str:
        return "done elsewhere"

    first_registry = Registry()
    first_registry.register(converts, "tests.converts")
    first = await make_manager(registry=first_registry)
    config = QueueConfig(name="q", circuit_breaker_max_failures=1)
    await first.create_queue(config)
    await first.submit_task("c", "q", "tests.converts")
    await started.wait()
    await first.shutdown(wait=False)

    second_registry = Registry()
    second_registry.register(quick, "tests.converts")
    second = await make_manager(registry=second_registry)
    await second.create_queue(config)
    info = await second.wait_for_task("c", timeout=10)
    assert info.status is TaskStatus.COMPLETED
    assert (info.attempt, info.retry_count) == (2, 0)
    types = [e.type for e in await _task_events(client, prefix, "c")]
    assert types == [
        "task.submitted",
        "task.started",
        "task.interrupted",
        "task.started",
        "task.succeeded",
    ]
    status = await second.get_queue_status("q")
    assert status["circuit_breaker_status"] == "closed"
    assert status["circuit_breaker_failures"] == 0
    assert await second.verify_projections("q") == []


async def test_max_retry_delay_caps_the_backoff(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """retry_delay=0.2 doubles to 0.4 and 0.8 s, but max_retry_delay=0.05
    caps every wait: each delay lies between half and all of 50 ms."""
    flaky = Flaky(failures=3)
    manager.registry.register(flaky, "tests.flaky_capped")
    await manager.create_queue(
        QueueConfig(name="q", max_retries=3, retry_delay=0.2, max_retry_delay=0.05)
    )
    await manager.submit_task("r", "q", "tests.flaky_capped")
    info = await manager.wait_for_task("r", timeout=10)
    assert info.status is TaskStatus.COMPLETED
    scheduled = [
        e
        for e in await _task_events(client, prefix, "r")
        if isinstance(e, TaskRetryScheduled)
    ]
    assert len(scheduled) == 3
    for event in scheduled:
        assert 25 <= event.delay_ms <= 50, event
    assert await manager.verify_projections("q") == []


async def test_a_task_waiting_for_a_retry_does_not_block_due_tasks(
    manager: TaskQueueManager,
) -> None:
    """A HIGH task waiting a minute for its retry leaves a one-worker queue
    free: MEDIUM and LOW tasks submitted after it run meanwhile."""
    flaky = Flaky(failures=1)
    manager.registry.register(flaky, "tests.flaky_high")

    async def echo(label: str) -> str:
        return label

    await manager.create_queue(
        QueueConfig(name="q", max_workers=1, max_retries=1, retry_delay=60)
    )
    await manager.submit_task(
        "urgent", "q", "tests.flaky_high", priority=QueuePriority.HIGH
    )
    await eventually(
        lambda: _status_is(manager, "urgent", TaskStatus.RETRY), what="the retry wait"
    )
    await manager.submit_task("m", "q", echo, "m")
    await manager.submit_task("l", "q", echo, "l", priority=QueuePriority.LOW)
    for task_id in ("m", "l"):
        done = await manager.wait_for_task(task_id, timeout=10)
        assert done.status is TaskStatus.COMPLETED
    waiting = await manager.get_task_status("urgent")
    assert waiting.status is TaskStatus.RETRY
    assert waiting.due_time is not None
    assert done.completed_time is not None
    assert done.completed_time < waiting.due_time
    assert await manager.cancel_task("urgent") is True
    assert await manager.verify_projections("q") == []


async def test_raising_sync_hooks_are_logged_and_the_consumer_carries_on(
    make_manager: MakeManager, caplog: pytest.LogCaptureFixture
) -> None:
    """A sync on_task_start and a sync on_task_complete that raise are logged;
    the tasks still complete, and the consumer runs the next ones."""
    calls: list[str] = []

    def on_start(info: TaskInfo) -> None:
        calls.append(f"start {info.task_id}")
        raise RuntimeError("a broken start hook")

    def on_complete(info: TaskInfo) -> None:
        calls.append(f"complete {info.task_id}")
        raise ValueError("a broken complete hook")

    async def echo(n: int) -> int:
        return n

    manager = await make_manager(on_task_start=on_start, on_task_complete=on_complete)
    await manager.create_queue(QueueConfig(name="q", max_workers=1))
    with caplog.at_level(logging.ERROR, logger="kew.hooks"):
        for n in range(3):
            await manager.submit_task(f"t{n}", "q", echo, n)
        for n in range(3):
            info = await manager.wait_for_task(f"t{n}", timeout=10)
            assert (info.status, info.result) == (TaskStatus.COMPLETED, n)
        await eventually(lambda: len(calls) == 6, what="six hook calls")
    assert sorted(calls) == sorted(
        f"{kind} t{n}" for n in range(3) for kind in ("start", "complete")
    )
    logged = sorted(str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert logged == ["a broken complete hook"] * 3 + ["a broken start hook"] * 3
    assert await manager.verify_projections("q") == []


async def test_hooks_whose_status_lookup_fails_are_skipped_and_logged_as_such(
    make_manager: MakeManager, caplog: pytest.LogCaptureFixture
) -> None:
    """When the TaskInfo for a hook cannot be read, the hook is skipped with a
    warning that says so; the outcome is recorded, and no log line claims it
    was not."""
    seen: list[str] = []

    def note(info: TaskInfo) -> None:
        seen.append(info.task_id)

    async def echo(n: int) -> int:
        return n

    manager = await make_manager(on_task_start=note, on_task_complete=note)
    hooks = manager._hooks  # pyright: ignore[reportPrivateUsage]
    lookups = {"n": 0}
    real_describe = hooks.describe
    assert real_describe is not None

    async def fails_once_per_task(attempt: Attempt) -> TaskInfo:
        # The lookup for the start hook works; the one after the outcome
        # fails, as when the server cannot be reached at that moment.
        lookups["n"] += 1
        if lookups["n"] % 2 == 0:
            raise ConnectionFailedError("The server went away for a moment.")
        return await real_describe(attempt)

    hooks.describe = fails_once_per_task
    await manager.create_queue(QueueConfig(name="q", max_workers=1))
    with caplog.at_level(logging.WARNING):
        await manager.submit_task("t", "q", echo, 1)
        info = await manager.wait_for_task("t", timeout=10)
        await eventually(lambda: lookups["n"] == 2, what="both lookups")
        await manager.submit_task("u", "q", echo, 2)
        assert (await manager.wait_for_task("u", timeout=10)).result == 2
    assert (info.status, info.result) == (TaskStatus.COMPLETED, 1)
    assert "could not record" not in caplog.text
    assert "taken over after the lease" not in caplog.text
    assert "on_task_complete hook of task 't' attempt 1 not run" in caplog.text
    assert seen == ["t", "u"]
    assert await manager.verify_projections("q") == []
