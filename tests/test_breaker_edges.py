"""The circuit breaker's edge cases: what does and does not move it, how a
trial's slot is freed, and the earlier release's breaker bugs (see
kew/lua/10_breaker.lua for the rules)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

from kew import QueueConfig, TaskQueueManager, TaskStatus
from kew.events import Event, TaskStarted
from kew.events.log import read
from kew.keys import GROUP, QueueKeys
from kew.registry import Registry

from .conftest import eventually
from .workers import started_by, survivor_registry, worker_process

MakeManager = Callable[..., Awaitable[TaskQueueManager]]

TAKEOVER = 20.0
"""A generous deadline for waits that include a lapsed lease."""


class Jobs:
    """A task function whose calls fail, succeed, or wait for their gate."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.entered: dict[str, asyncio.Event] = {}

    def gate(self, label: str) -> asyncio.Event:
        return self.gates.setdefault(label, asyncio.Event())

    def entered_by(self, label: str) -> asyncio.Event:
        return self.entered.setdefault(label, asyncio.Event())

    async def job(self, kind: str, label: str = "") -> str:
        self.entered_by(label).set()
        if kind == "fail":
            raise RuntimeError("the service is down")
        if kind == "hold":
            await self.gate(label).wait()
        return label or kind


async def _breaker(manager: TaskQueueManager) -> str:
    return str((await manager.get_queue_status("q"))["circuit_breaker_status"])


async def _events(client: aioredis.Redis, prefix: str) -> list[Event]:
    return [e async for e in read(client, QueueKeys(prefix, "q").log)]


async def _breaker_events(client: aioredis.Redis, prefix: str) -> list[str]:
    return [
        e.type for e in await _events(client, prefix) if e.type.startswith("breaker.")
    ]


async def _trials(client: aioredis.Redis, prefix: str) -> list[str | None]:
    """The tasks that started a trial attempt, in order."""
    return [
        e.task_id
        for e in await _events(client, prefix)
        if isinstance(e, TaskStarted) and e.trial
    ]


async def _trial_slots(client: aioredis.Redis, prefix: str) -> str | None:
    value = await client.hget(QueueKeys(prefix, "q").breaker, "trials")
    return None if value is None else str(value)


async def _manager(make_manager: MakeManager) -> TaskQueueManager:
    """A consuming manager with a registry of its own: every test registers a
    Jobs.job of its own under the same name."""
    return await make_manager(registry=Registry())


async def _fail(manager: TaskQueueManager, jobs: Jobs, task_id: str) -> None:
    await manager.submit_task(task_id, "q", jobs.job, "fail")
    assert (await manager.wait_for_task(task_id, 10)).status is TaskStatus.FAILED


# -- the earlier release's bugs ----------------------------------------------


async def test_a_success_of_a_task_running_since_before_the_opening_keeps_it_open(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """A task that started while the breaker was closed and succeeds after it
    opened is no trial: the breaker stays open (the earlier release closed it)."""
    manager = await _manager(make_manager)
    jobs = Jobs()
    await manager.create_queue(
        QueueConfig(
            name="q",
            max_workers=2,
            circuit_breaker_max_failures=1,
            circuit_breaker_reset_timeout=60,
        )
    )
    await manager.submit_task("slow", "q", jobs.job, "hold", "slow")
    await asyncio.wait_for(jobs.entered_by("slow").wait(), 10)
    await _fail(manager, jobs, "bad")
    assert await _breaker(manager) == "open"

    jobs.gate("slow").set()
    assert (await manager.wait_for_task("slow", 10)).status is TaskStatus.COMPLETED
    assert await _breaker(manager) == "open"
    assert await _breaker_events(client, prefix) == ["breaker.opened"]
    assert await manager.verify_projections("q") == []


async def test_after_closing_one_failure_does_not_reopen_the_breaker(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """With circuit_breaker_max_failures=2, a trial success closes the breaker
    with its count at 0: one more failure leaves it closed (the earlier
    release reopened it at once), the second opens it."""
    manager = await _manager(make_manager)
    jobs = Jobs()
    await manager.create_queue(
        QueueConfig(
            name="q", circuit_breaker_max_failures=2, circuit_breaker_reset_timeout=0.3
        )
    )
    await _fail(manager, jobs, "bad1")
    await _fail(manager, jobs, "bad2")
    assert await _breaker(manager) == "open"
    await manager.submit_task("trial", "q", jobs.job, "ok")
    assert (await manager.wait_for_task("trial", 10)).status is TaskStatus.COMPLETED
    assert await _breaker(manager) == "closed"

    await _fail(manager, jobs, "bad3")
    status = await manager.get_queue_status("q")
    assert (status["circuit_breaker_status"], status["circuit_breaker_failures"]) == (
        "closed",
        1,
    )
    await _fail(manager, jobs, "bad4")
    assert await _breaker(manager) == "open"
    assert await _breaker_events(client, prefix) == [
        "breaker.opened",
        "breaker.half_opened",
        "breaker.closed",
        "breaker.opened",
    ]
    assert await manager.verify_projections("q") == []


# -- half-open --------------------------------------------------------------


async def test_a_non_trial_success_while_half_open_does_not_close_the_breaker(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """A task running since before the opening succeeds while the trial still
    runs: the breaker stays half-open; the trial's success closes it."""
    manager = await _manager(make_manager)
    jobs = Jobs()
    await manager.create_queue(
        QueueConfig(
            name="q",
            max_workers=3,
            circuit_breaker_max_failures=1,
            circuit_breaker_reset_timeout=0.3,
        )
    )
    await manager.submit_task("slow", "q", jobs.job, "hold", "slow")
    await asyncio.wait_for(jobs.entered_by("slow").wait(), 10)
    await _fail(manager, jobs, "bad")
    await manager.submit_task("trial", "q", jobs.job, "hold", "trial")
    await asyncio.wait_for(jobs.entered_by("trial").wait(), 10)
    assert await _breaker(manager) == "half_open"

    jobs.gate("slow").set()
    assert (await manager.wait_for_task("slow", 10)).status is TaskStatus.COMPLETED
    assert await _breaker(manager) == "half_open"
    jobs.gate("trial").set()
    assert (await manager.wait_for_task("trial", 10)).status is TaskStatus.COMPLETED
    assert await _breaker(manager) == "closed"
    assert await _trials(client, prefix) == ["trial"]
    assert await _breaker_events(client, prefix) == [
        "breaker.opened",
        "breaker.half_opened",
        "breaker.closed",
    ]
    assert await manager.verify_projections("q") == []


async def test_a_cancelled_trial_frees_its_slot(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """cancel_task on the running trial ends it without a verdict: the breaker
    stays half-open, its slot is free, and the next task is the new trial."""
    manager = await _manager(make_manager)
    jobs = Jobs()
    await manager.create_queue(
        QueueConfig(
            name="q", circuit_breaker_max_failures=1, circuit_breaker_reset_timeout=0.3
        )
    )
    await _fail(manager, jobs, "bad")
    await manager.submit_task("trial", "q", jobs.job, "hold", "trial")
    await asyncio.wait_for(jobs.entered_by("trial").wait(), 10)
    assert await _trial_slots(client, prefix) == "1"
    assert await manager.cancel_task("trial") is True
    cancelled = await manager.wait_for_task("trial", 10)
    assert cancelled.status is TaskStatus.CANCELLED
    assert await _breaker(manager) == "half_open"
    assert await _trial_slots(client, prefix) == "0"

    await manager.submit_task("next", "q", jobs.job, "ok")
    assert (await manager.wait_for_task("next", 10)).status is TaskStatus.COMPLETED
    assert await _breaker(manager) == "closed"
    assert await _trials(client, prefix) == ["trial", "next"]
    assert await manager.verify_projections("q") == []


async def test_a_trial_handed_back_at_shutdown_frees_its_slot(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """A consumer that shuts down while running the trial hands it back
    (task.interrupted) and frees the slot; the next consumer runs the task as
    the trial again, and its success closes the breaker."""
    jobs = Jobs()
    first_registry = Registry()
    first_registry.register(jobs.job, "tests.edge_job")
    first = await make_manager(registry=first_registry)
    config = QueueConfig(
        name="q", circuit_breaker_max_failures=1, circuit_breaker_reset_timeout=0.3
    )
    await first.create_queue(config)
    await first.submit_task("bad", "q", "tests.edge_job", "fail")
    await first.wait_for_task("bad", 10)
    await first.submit_task("trial", "q", "tests.edge_job", "hold", "trial")
    await asyncio.wait_for(jobs.entered_by("trial").wait(), 10)
    await first.shutdown(wait=False)
    assert await _trial_slots(client, prefix) == "0"

    async def quick(kind: str, label: str = "") -> str:
        return f"{label} elsewhere"

    second_registry = Registry()
    second_registry.register(quick, "tests.edge_job")
    second = await make_manager(registry=second_registry)
    await second.create_queue(config)
    info = await second.wait_for_task("trial", 10)
    assert (info.status, info.attempt) == (TaskStatus.COMPLETED, 2)
    assert await _breaker(second) == "closed"
    assert await _trials(client, prefix) == ["trial", "trial"]
    assert await _trial_slots(client, prefix) == "0"
    assert await second.verify_projections("q") == []


# -- dead consumers -----------------------------------------------------------


async def test_a_dead_lettered_trial_opens_the_breaker_again(
    make_manager: MakeManager,
    client: aioredis.Redis,
    prefix: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """The trial's worker is SIGKILLed and max_deliveries=1: the consumer that
    finds the lapsed entry dead-letters the task, which is a failed trial: the
    breaker opens again, and the trial's slot is free."""
    creator = await make_manager(consume=False)
    config = QueueConfig(
        name="q",
        lease_seconds=0.5,
        max_deliveries=1,
        circuit_breaker_max_failures=1,
        circuit_breaker_reset_timeout=0.3,
    )
    await creator.create_queue(config)
    async with worker_process(tmp_path, redis_url, prefix) as worker:
        await creator.submit_task("bad", "q", "edge.fail")
        await creator.wait_for_task("bad", 10)
        await creator.submit_task("t", "q", "edge.hang")
        await eventually(
            lambda: started_by(client, prefix, "t", worker.name),
            what="the worker to start the trial",
        )
        assert await _trials(client, prefix) == ["t"]
        await worker.kill()

    survivor = await make_manager(registry=survivor_registry())
    await survivor.create_queue(config)
    info = await survivor.wait_for_task("t", timeout=TAKEOVER)
    assert info.status is TaskStatus.FAILED
    assert info.error is not None
    assert "max_deliveries=1" in info.error
    await eventually(
        lambda: _breaker_events_are(
            client, prefix, ["breaker.opened", "breaker.half_opened", "breaker.opened"]
        ),
        what="the breaker to open again",
    )
    assert await _trial_slots(client, prefix) == "0"
    assert await survivor.verify_projections("q") == []


async def _breaker_events_are(
    client: aioredis.Redis, prefix: str, expected: list[str]
) -> bool:
    return (await _breaker_events(client, prefix))[: len(expected)] == expected


async def _idle_ms(client: aioredis.Redis, prefix: str) -> int:
    """How long the medium stream's one pending entry has gone unrenewed."""
    stream = QueueKeys(prefix, "q").ready("medium")
    pending = await client.xpending_range(stream, GROUP, "-", "+", 1)
    return int(pending[0]["time_since_delivered"]) if pending else 0


async def test_nothing_is_taken_over_while_the_breaker_is_open(
    make_manager: MakeManager,
    client: aioredis.Redis,
    prefix: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """A task whose worker was SIGKILLed while the breaker is open stays with
    the dead consumer long past its lease (a takeover would start it); once
    the breaker half-opens it is taken over as the trial."""
    creator = await make_manager(consume=False)
    config = QueueConfig(
        name="q",
        max_workers=2,
        lease_seconds=0.3,
        circuit_breaker_max_failures=1,
        circuit_breaker_reset_timeout=5,
    )
    await creator.create_queue(config)
    async with worker_process(tmp_path, redis_url, prefix) as worker:
        await creator.submit_task("t", "q", "edge.hang")
        await eventually(
            lambda: started_by(client, prefix, "t", worker.name),
            what="the worker to start t",
        )
        await creator.submit_task("bad", "q", "edge.fail")
        await creator.wait_for_task("bad", 10)
        await worker.kill()

    survivor = await make_manager(registry=survivor_registry())
    await survivor.create_queue(config)
    await eventually(
        lambda: _idle_ms_over(client, prefix, 3 * 300), what="three lapsed leases"
    )
    assert await _breaker(survivor) == "open", "the reset timeout passed too soon"
    types = [e.type for e in await _events(client, prefix) if e.task_id == "t"]
    assert types == ["task.submitted", "task.started"]

    info = await survivor.wait_for_task("t", timeout=TAKEOVER)
    assert (info.status, info.result) == (TaskStatus.COMPLETED, "taken over")
    assert await _trials(client, prefix) == ["t"]
    assert await _breaker(survivor) == "closed"
    assert await survivor.verify_projections("q") == []


async def _idle_ms_over(client: aioredis.Redis, prefix: str, ms: int) -> bool:
    return await _idle_ms(client, prefix) > ms
