"""Ready entries deleted (XDEL, a trim) while a consumer holds them: logged as
task.lost naming the task, and the task runs again; never dropped in silence.

XCLAIM (Redis 7.0+, Valkey) drops a deleted entry from the pending list
without an error, whether the owner renews it (JUSTID leaves it out of the
reply) or another consumer takes it over; the entry named the task, so the
consumer's own bookkeeping, or the queue's pending index, must.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from kew import QueueConfig, TaskQueueManager, TaskStatus
from kew.events.log import read
from kew.events.models import Event, TaskLost
from kew.keys import GROUP, QueueKeys
from kew.registry import Registry

from .conftest import DEADLINE, eventually
from .test_recovery import (
    TAKEOVER,
    StartWorker,
    start_worker,  # noqa: F401 (a fixture)
    started_by,
    survivor_with,
    task_events,
)

MakeManager = Callable[..., Awaitable[TaskQueueManager]]


class Runs:
    """A task function whose first attempt runs until cancelled and whose
    later attempts return at once; it counts its attempts."""

    def __init__(self) -> None:
        self.attempts = 0
        self.first_cancelled = asyncio.Event()

    async def work(self) -> str:
        self.attempts += 1
        if self.attempts > 1:
            return f"done in attempt {self.attempts}"
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.first_cancelled.set()
            raise
        return "never"

    def registry(self) -> Registry:
        registry = Registry()
        registry.register(self.work, "lost.work")
        return registry


async def _running_entry(
    manager: TaskQueueManager, client: aioredis.Redis, keys: QueueKeys, task_id: str
) -> str:
    await eventually(
        lambda: started_by(client, keys.prefix, task_id, manager.identity),
        what=f"{task_id} to start",
    )
    entry = await client.hget(keys.task(task_id), "entry")
    assert entry is not None
    return entry


async def _lost_events(client: aioredis.Redis, keys: QueueKeys) -> list[TaskLost]:
    return [e async for e in read(client, keys.log) if isinstance(e, TaskLost)]


def _check_lost(
    lost: TaskLost, keys: QueueKeys, entry: str, previous: str, actor: str
) -> None:
    assert (lost.task_id, lost.entry, lost.stream) == ("t", entry, keys.ready("medium"))
    assert (lost.previous, lost.actor) == (previous, actor)
    assert lost.requeued_as not in ("", entry)


def _summary(events: list[Event]) -> list[tuple[str, int, str | None]]:
    return [(e.type, e.attempt, e.actor) for e in events]


async def test_an_entry_deleted_under_a_live_consumer_is_run_again(
    make_manager: MakeManager,
    client: aioredis.Redis,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """XDEL of the entry of a running task: the consumer running it notices at
    its next renewal, logs task.lost naming the task, cancels its local run
    and the task is queued again; it then runs to completion."""
    runs = Runs()
    manager = await make_manager(registry=runs.registry())
    await manager.create_queue(QueueConfig(name="q", lease_seconds=0.5))
    keys = QueueKeys(prefix, "q")
    await manager.submit_task("t", "q", "lost.work")
    entry = await _running_entry(manager, client, keys, "t")

    with caplog.at_level(logging.WARNING, logger="kew.leases"):
        assert await client.xdel(keys.ready("medium"), entry) == 1
        info = await manager.wait_for_task("t", TAKEOVER)

    assert (info.status, info.result, info.attempt) == (
        TaskStatus.COMPLETED,
        "done in attempt 2",
        2,
    )
    assert runs.first_cancelled.is_set()
    me = manager.identity
    events = await task_events(client, prefix, "t")
    assert _summary(events) == [
        ("task.submitted", 0, me),
        ("task.started", 1, me),
        ("task.lost", 1, me),
        ("task.started", 2, me),
        ("task.succeeded", 2, me),
    ]
    lost = events[2]
    assert isinstance(lost, TaskLost)
    _check_lost(lost, keys, entry, me, me)
    assert [e.entry for e in events if e.type == "task.started"][1] == lost.requeued_as
    warnings = [r.getMessage() for r in caplog.records]
    assert any(entry in w and "was deleted" in w for w in warnings), warnings
    assert not any("took it over" in w for w in warnings), warnings
    assert await client.hlen(keys.pending) == 0
    assert await manager.verify_projections("q") == []


async def test_an_entry_deleted_under_a_dead_consumer_names_its_task(
    make_manager: MakeManager,
    start_worker: StartWorker,  # noqa: F811 (the fixture imported above)
    client: aioredis.Redis,
    prefix: str,
) -> None:
    """An entry deleted under a SIGKILLed worker: the consumer that finds it
    lapsed logs task.lost naming the task (through the pending index) and its
    last consumer; the task is queued again and a survivor completes it."""
    creator = await make_manager(consume=False)
    await creator.create_queue(QueueConfig(name="q", lease_seconds=0.5))
    worker = start_worker("q")
    dead = await worker.ready()
    await creator.submit_task("t", "q", "recovery.sleep", 3600)
    await eventually(
        lambda: started_by(client, prefix, "t", dead), what="the worker to start t"
    )
    keys = QueueKeys(prefix, "q")
    entry = await client.hget(keys.task("t"), "entry")
    assert entry is not None
    await worker.kill()
    assert await client.xdel(keys.ready("medium"), entry) == 1

    survivor = await survivor_with(make_manager, "recovery.sleep", "from the survivor")
    info = await survivor.wait_for_task("t", timeout=TAKEOVER)

    assert (info.status, info.result) == (TaskStatus.COMPLETED, "from the survivor")
    (lost,) = await _lost_events(client, keys)
    _check_lost(lost, keys, entry, dead, survivor.identity)
    log = [e async for e in read(client, keys.log) if e.type != "queue.configured"]
    assert [(e.type, e.task_id, e.attempt, e.actor) for e in log] == [
        ("task.submitted", "t", 0, creator.identity),
        ("task.started", "t", 1, dead),
        ("task.lost", "t", 1, survivor.identity),
        ("task.started", "t", 2, survivor.identity),
        ("task.succeeded", "t", 2, survivor.identity),
    ]
    assert await client.xpending_range(keys.ready("medium"), GROUP, "-", "+", 10) == []
    assert await client.hlen(keys.pending) == 0
    assert await survivor.verify_projections("q") == []


async def test_an_entry_deleted_before_shutdown_is_handed_back_as_lost(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """An entry deleted just before its consumer shuts down: `release` logs
    task.lost naming the task instead of dropping it, the task is queued
    again, and another consumer completes it."""
    runs = Runs()
    # A lease far longer than the test: only the hand-back can notice.
    first = await make_manager(registry=runs.registry())
    await first.create_queue(QueueConfig(name="q", lease_seconds=60))
    keys = QueueKeys(prefix, "q")
    await first.submit_task("t", "q", "lost.work")
    entry = await _running_entry(first, client, keys, "t")
    assert await client.xdel(keys.ready("medium"), entry) == 1

    await first.shutdown(timeout=0)
    second = await make_manager(registry=runs.registry())
    await second.attach_queue("q")
    info = await second.wait_for_task("t", DEADLINE)

    assert (info.status, info.attempt) == (TaskStatus.COMPLETED, 2)
    events = await task_events(client, prefix, "t")
    assert _summary(events) == [
        ("task.submitted", 0, first.identity),
        ("task.started", 1, first.identity),
        ("task.lost", 1, first.identity),
        ("task.started", 2, second.identity),
        ("task.succeeded", 2, second.identity),
    ]
    lost = events[2]
    assert isinstance(lost, TaskLost)
    _check_lost(lost, keys, entry, first.identity, first.identity)
    assert await second.verify_projections("q") == []


async def test_a_lost_entry_of_a_task_asked_to_cancel_ends_it_cancelled(
    make_manager: MakeManager,
    start_worker: StartWorker,  # noqa: F811 (the fixture imported above)
    client: aioredis.Redis,
    prefix: str,
) -> None:
    """A task asked to cancel while its consumer was gone, whose entry was then
    deleted, is not run again: task.lost, then task.cancelled."""
    creator = await make_manager(consume=False)
    await creator.create_queue(QueueConfig(name="q", lease_seconds=0.5))
    worker = start_worker("q")
    dead = await worker.ready()
    await creator.submit_task("t", "q", "recovery.sleep", 3600)
    await eventually(
        lambda: started_by(client, prefix, "t", dead), what="the worker to start t"
    )
    keys = QueueKeys(prefix, "q")
    entry = await client.hget(keys.task("t"), "entry")
    assert entry is not None
    await worker.kill()
    assert await creator.cancel_task("t")  # requested: it was running
    assert await client.xdel(keys.ready("medium"), entry) == 1

    survivor = await survivor_with(make_manager, "recovery.sleep", "never runs")
    info = await survivor.wait_for_task("t", timeout=TAKEOVER)

    assert info.status is TaskStatus.CANCELLED
    events = await task_events(client, prefix, "t")
    assert _summary(events) == [
        ("task.submitted", 0, creator.identity),
        ("task.started", 1, dead),
        ("task.cancel_requested", 1, creator.identity),
        ("task.lost", 1, survivor.identity),
        ("task.cancelled", 1, survivor.identity),
    ]
    lost = events[3]
    assert isinstance(lost, TaskLost)
    assert (lost.task_id, lost.previous, lost.requeued_as) == ("t", dead, "")
    assert await survivor.verify_projections("q") == []
