"""The circuit breaker: one per queue, in Redis, changed only by the functions."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

from kew import QueueConfig, TaskQueueManager, TaskStatus
from kew.events import Event, TaskStarted
from kew.events.log import read
from kew.keys import QueueKeys

from .conftest import eventually

MakeManager = Callable[..., Awaitable[TaskQueueManager]]


class Service:
    """A downstream that is up or down; tasks call it."""

    def __init__(self) -> None:
        self.down = True
        self.calls: list[str] = []

    async def call(self, name: str) -> str:
        self.calls.append(name)
        if self.down:
            raise ConnectionError(f"{name}: the service is down")
        return f"{name} ok"


async def _breaker(manager: TaskQueueManager, queue: str = "q") -> str:
    return str((await manager.get_queue_status(queue))["circuit_breaker_status"])


async def _breaker_is(manager: TaskQueueManager, state: str) -> bool:
    return await _breaker(manager) == state


async def _breaker_events(client: aioredis.Redis, prefix: str) -> list[str]:
    return [
        e.type
        async for e in read(client, QueueKeys(prefix, "q").log)
        if e.type.startswith("breaker.")
    ]


async def test_breaker_opens_waits_trials_and_closes(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """After max failures no task starts until the reset timeout; then one
    trial runs alone, its success closes the breaker, and the rest run."""
    service = Service()
    manager.registry.register(service.call, "tests.breaker_call")
    await manager.create_queue(
        QueueConfig(
            name="q",
            max_workers=5,
            circuit_breaker_max_failures=2,
            circuit_breaker_reset_timeout=0.5,
        )
    )
    for i in range(2):
        await manager.submit_task(f"bad{i}", "q", "tests.breaker_call", f"bad{i}")
        assert (await manager.wait_for_task(f"bad{i}", 10)).status is TaskStatus.FAILED
    status = await manager.get_queue_status("q")
    assert status["circuit_breaker_status"] == "open"
    assert status["circuit_breaker_failures"] == 2
    open_until = status["circuit_breaker_open_until"]

    # Submissions are accepted while open; nothing starts, nothing is spent.
    service.down = False
    for i in range(4):
        await manager.submit_task(f"ok{i}", "q", "tests.breaker_call", f"ok{i}")
    waiting = await manager.get_task_status("ok0")
    assert waiting.status is TaskStatus.QUEUED
    assert waiting.attempt == 0

    infos = [await manager.wait_for_task(f"ok{i}", 10) for i in range(4)]
    assert all(info.status is TaskStatus.COMPLETED for info in infos)
    assert all(info.attempt == 1 for info in infos)
    first, *rest = sorted(infos, key=lambda info: info.started_time)  # type: ignore[arg-type, return-value]
    assert first.started_time >= open_until  # type: ignore[operator]
    # The trial ran alone: the others started only after it succeeded.
    assert all(r.started_time >= first.completed_time for r in rest)  # type: ignore[operator]
    assert await _breaker(manager) == "closed"
    assert await _breaker_events(client, prefix) == [
        "breaker.opened",
        "breaker.half_opened",
        "breaker.closed",
    ]
    assert await manager.verify_projections("q") == []


async def test_a_failed_trial_opens_the_breaker_again(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """A trial that fails reopens the breaker for another reset timeout."""
    service = Service()
    manager.registry.register(service.call, "tests.breaker_call_2")
    await manager.create_queue(
        QueueConfig(
            name="q", circuit_breaker_max_failures=1, circuit_breaker_reset_timeout=0.3
        )
    )
    await manager.submit_task("bad", "q", "tests.breaker_call_2", "bad")
    await manager.wait_for_task("bad", 10)
    await manager.submit_task("trial", "q", "tests.breaker_call_2", "trial")
    assert (await manager.wait_for_task("trial", 10)).status is TaskStatus.FAILED
    await eventually(
        lambda: _breaker_events_are(
            client, prefix, ["breaker.opened", "breaker.half_opened", "breaker.opened"]
        ),
        what="the breaker to reopen",
    )
    service.down = False
    await manager.submit_task("later", "q", "tests.breaker_call_2", "later")
    assert (await manager.wait_for_task("later", 10)).status is TaskStatus.COMPLETED
    assert await _breaker(manager) == "closed"
    assert await manager.verify_projections("q") == []


async def _breaker_events_are(
    client: aioredis.Redis, prefix: str, expected: list[str]
) -> bool:
    return await _breaker_events(client, prefix) == expected


async def test_only_final_failures_count(manager: TaskQueueManager) -> None:
    """A failed attempt that will be retried does not count; the task's final
    failure counts once; a success resets the count."""
    calls = {"n": 0}

    async def twice_then_ok() -> str:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ValueError("not yet")
        return "ok"

    async def always_bad() -> None:
        raise ValueError("never")

    await manager.create_queue(
        QueueConfig(
            name="q",
            circuit_breaker_max_failures=2,
            max_retries=2,
            retry_delay=0.01,
        )
    )
    await manager.submit_task("retried", "q", twice_then_ok)
    assert (await manager.wait_for_task("retried", 10)).attempt == 3
    status = await manager.get_queue_status("q")
    assert status["circuit_breaker_status"] == "closed"
    assert status["circuit_breaker_failures"] == 0

    await manager.submit_task("lost", "q", always_bad)
    assert (await manager.wait_for_task("lost", 10)).attempt == 3
    status = await manager.get_queue_status("q")
    assert status["circuit_breaker_status"] == "closed"
    assert status["circuit_breaker_failures"] == 1
    assert await manager.verify_projections("q") == []


async def test_the_breaker_is_shared_by_every_process(
    make_manager: MakeManager,
) -> None:
    """Failures recorded by one process open the breaker for all of them."""
    worker = await make_manager()
    watcher = await make_manager(consume=False)

    async def bad() -> None:
        raise RuntimeError("down")

    await worker.create_queue(QueueConfig(name="q", circuit_breaker_max_failures=1))
    await watcher.submit_task("b", "q", bad)
    await watcher.wait_for_task("b", 10)
    assert await _breaker(watcher) == "open"


OWNER = textwrap.dedent(
    """\
    import asyncio, sys
    import kew
    from kew import TaskQueueManager, QueueConfig

    @kew.task(name="tests.trial_job")
    async def job(kind: str) -> str:
        if kind == "fail":
            raise RuntimeError("down")
        print("trial started", flush=True)
        await asyncio.Event().wait()  # until killed or cancelled
        return "never"

    async def main():
        async with TaskQueueManager() as manager:
            await manager.create_queue(QueueConfig(
                name="q", circuit_breaker_max_failures=1,
                circuit_breaker_reset_timeout=0.3, lease_seconds=0.6))
            print("ready", flush=True)
            await asyncio.Event().wait()  # until killed or cancelled

    asyncio.run(main())
    """
)


async def test_a_trial_whose_consumer_dies_does_not_leave_the_breaker_stuck(
    make_manager: MakeManager,
    redis_url: str,
    prefix: str,
    client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    """SIGKILL of the process running the half-open breaker's trial: another
    consumer takes the trial over after the lease, it succeeds, and the breaker
    closes."""
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    env = {**os.environ, "KEW_REDIS_URL": redis_url, "KEW_KEY_PREFIX": prefix}
    owner = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline().strip() == "ready"
        submitter = await make_manager(consume=False)
        await submitter.submit_task("f", "q", "tests.trial_job", "fail")
        await submitter.wait_for_task("f", 10)
        await submitter.submit_task("t", "q", "tests.trial_job", "ok")
        line = await asyncio.to_thread(owner.stdout.readline)
        assert line.strip() == "trial started"
        assert await _breaker(submitter) == "half_open"
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
    finally:
        owner.kill()
        owner.wait()

    async def finish_trial(kind: str) -> str:
        return f"taken over: {kind}"

    survivor = await make_manager()
    survivor.registry = type(survivor.registry)()
    survivor.registry.register(finish_trial, "tests.trial_job")
    await survivor.create_queue(
        QueueConfig(
            name="q",
            circuit_breaker_max_failures=1,
            circuit_breaker_reset_timeout=0.3,
            lease_seconds=0.6,
        )
    )
    info = await survivor.wait_for_task("t", timeout=15)
    assert info.status is TaskStatus.COMPLETED
    assert info.result == "taken over: ok"
    assert info.attempt == 2
    assert await _breaker(survivor) == "closed"
    types = [e.type async for e in read(client, QueueKeys(prefix, "q").log)]
    assert "task.reclaimed" in types
    assert await survivor.verify_projections("q") == []


def _most_trials_at_once(events: list[Event]) -> int:
    """The most trial attempts running at one moment, from the log."""
    running: set[str] = set()
    most = 0
    for event in events:
        if isinstance(event, TaskStarted) and event.trial:
            running.add(event.task_id or "")
            most = max(most, len(running))
        elif event.type in _ATTEMPT_ENDS:
            running.discard(event.task_id or "")
    return most


_ATTEMPT_ENDS = frozenset(
    {
        "task.succeeded",
        "task.failed",
        "task.cancelled",
        "task.interrupted",
        "task.dead_lettered",
    }
)


async def test_a_trial_left_from_an_earlier_half_open_period_keeps_its_slot(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """With circuit_breaker_trials=2, one trial fails (the breaker reopens)
    while the other still runs; in the next half-open period only one new
    trial starts beside it, so never more than two trials run at once."""
    hold = asyncio.Event()
    started: list[str] = []

    async def job(kind: str) -> str:
        started.append(kind)
        if kind == "fail":
            raise RuntimeError("down")
        if kind == "hold":
            await hold.wait()
        return kind

    await manager.create_queue(
        QueueConfig(
            name="q",
            max_workers=5,
            circuit_breaker_max_failures=1,
            circuit_breaker_reset_timeout=0.3,
            circuit_breaker_trials=2,
        )
    )
    await manager.submit_task("first", "q", job, "fail")
    await manager.wait_for_task("first", 10)
    assert await _breaker(manager) == "open"
    # The two trials of the first half-open period: one holds, one fails.
    await manager.submit_task("held", "q", job, "hold")
    await manager.submit_task("trial", "q", job, "fail")
    assert (await manager.wait_for_task("trial", 10)).status is TaskStatus.FAILED
    assert await _breaker(manager) == "open"
    assert (await manager.get_task_status("held")).status is TaskStatus.PROCESSING

    for i in range(3):
        await manager.submit_task(f"later{i}", "q", job, "ok")
    for i in range(3):
        done = await manager.wait_for_task(f"later{i}", 10)
        assert done.status is TaskStatus.COMPLETED
    assert await _breaker(manager) == "closed"
    events = [e async for e in read(client, QueueKeys(prefix, "q").log)]
    assert _most_trials_at_once(events) == 2
    trials = [e.task_id for e in events if isinstance(e, TaskStarted) and e.trial]
    assert trials == ["held", "trial", "later0"]
    # The held trial still counts while it runs, after the breaker closed.
    assert (await manager.get_queue_status("q"))["circuit_breaker_status"] == "closed"
    assert await client.hget(QueueKeys(prefix, "q").breaker, "trials") == "1"
    assert await manager.verify_projections("q") == []

    hold.set()
    assert (await manager.wait_for_task("held", 10)).status is TaskStatus.COMPLETED
    assert await client.hget(QueueKeys(prefix, "q").breaker, "trials") == "0"
    assert await manager.verify_projections("q") == []
