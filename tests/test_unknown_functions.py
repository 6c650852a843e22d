"""A task whose function the consumer that took it does not have (a worker
started without the right --import, an older release during a deploy): it is
handed back for a consumer that has the function, never failed by the one that
lacks it, and never counted by the circuit breaker; handed back max_deliveries
times, it is dead-lettered, to be requeued once the fix is deployed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from kew import QueueConfig, TaskQueueManager, TaskStatus
from kew.events.log import read
from kew.events.models import Event, TaskDeadLettered, TaskRefused
from kew.keys import QueueKeys
from kew.registry import Registry

from .conftest import DEADLINE, eventually

MakeManager = Callable[..., Awaitable[TaskQueueManager]]

NAME = "unknown.elsewhere"


async def elsewhere(value: int) -> int:
    return 2 * value


def knowing() -> Registry:
    registry = Registry()
    registry.register(elsewhere, NAME)
    return registry


async def _events(client: aioredis.Redis, keys: QueueKeys) -> list[Event]:
    return [e async for e in read(client, keys.log) if e.task_id == "orphan"]


async def _breaker_failures(client: aioredis.Redis, keys: QueueKeys) -> int:
    return int(await client.hget(keys.breaker, "failures") or 0)


async def test_a_consumer_without_the_function_hands_the_task_back(
    make_manager: MakeManager,
    client: aioredis.Redis,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The consumer that lacks the function hands the task back (task.refused,
    no failure, no breaker count); a consumer that has it then runs it."""
    submitter = await make_manager(consume=False, registry=knowing())
    lacking = await make_manager(registry=Registry())
    config = QueueConfig(name="q", lease_seconds=0.3, circuit_breaker_max_failures=1)
    await lacking.create_queue(config)
    keys = QueueKeys(prefix, "q")

    await submitter.submit_task("orphan", "q", NAME, 21)

    async def refused() -> bool:
        return any(isinstance(e, TaskRefused) for e in await _events(client, keys))

    await eventually(refused, what="the consumer without the function to refuse")
    await lacking.shutdown()
    assert (await submitter.get_task_status("orphan")).status is TaskStatus.RETRY
    has_it = await make_manager(registry=knowing())
    await has_it.attach_queue("q")
    info = await has_it.wait_for_task("orphan", DEADLINE)

    assert (info.status, info.result, info.retry_count) == (
        TaskStatus.COMPLETED,
        42,
        0,
    )
    events = await _events(client, keys)
    assert [(e.type, e.attempt, e.actor) for e in events] == [
        ("task.submitted", 0, submitter.identity),
        ("task.started", 1, lacking.identity),
        ("task.refused", 1, lacking.identity),
        ("task.enqueued", 1, has_it.identity),
        ("task.started", 2, has_it.identity),
        ("task.succeeded", 2, has_it.identity),
    ]
    refusal = events[2]
    assert isinstance(refusal, TaskRefused)
    assert (refusal.function, refusal.refusals) == (NAME, 1)
    warnings = [r.getMessage() for r in caplog.records if NAME in r.getMessage()]
    assert any("--import MODULE" in w for w in warnings), warnings
    assert await _breaker_failures(client, keys) == 0
    assert (await has_it.get_queue_status("q"))["circuit_breaker_status"] == "closed"
    assert await has_it.verify_projections("q") == []


async def test_a_task_no_consumer_can_run_is_dead_lettered_not_counted(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """Handed back max_deliveries times, the task is dead-lettered (cause
    unknown_function) with an error naming the function and the fix; the
    breaker, which would open at one failure, stays closed. Requeued once a
    consumer has the function, it runs."""
    submitter = await make_manager(consume=False, registry=knowing())
    lacking = await make_manager(registry=Registry())
    await lacking.create_queue(
        QueueConfig(
            name="q",
            lease_seconds=0.2,
            max_deliveries=2,
            circuit_breaker_max_failures=1,
        )
    )
    keys = QueueKeys(prefix, "q")

    await submitter.submit_task("orphan", "q", NAME, 21)
    info = await submitter.wait_for_task("orphan", DEADLINE)

    assert info.status is TaskStatus.FAILED
    assert info.error is not None
    assert f'"{NAME}"' in info.error
    assert "kew worker --import MODULE" in info.error
    events = await _events(client, keys)
    assert [(e.type, e.attempt) for e in events] == [
        ("task.submitted", 0),
        ("task.started", 1),
        ("task.refused", 1),
        ("task.enqueued", 1),
        ("task.started", 2),
        ("task.dead_lettered", 2),
    ]
    dead = events[-1]
    assert isinstance(dead, TaskDeadLettered)
    assert (dead.cause, dead.deliveries, dead.previous) == (
        "unknown_function",
        2,
        lacking.identity,
    )
    assert await _breaker_failures(client, keys) == 0
    assert (await submitter.get_queue_status("q"))["circuit_breaker_status"] == (
        "closed"
    )
    assert await lacking.verify_projections("q") == []

    await lacking.shutdown()
    has_it = await make_manager(registry=knowing())
    await has_it.attach_queue("q")
    assert await has_it.requeue_dead_letters("q") == 1
    info = await has_it.wait_for_task("orphan", DEADLINE)
    assert (info.status, info.result) == (TaskStatus.COMPLETED, 42)
    assert await client.hget(keys.task("orphan"), "refusals") is None
    assert await has_it.verify_projections("q") == []
