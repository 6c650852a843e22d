"""History and as-of through a takeover: a `kew worker` process is SIGKILLed
mid-task and a consumer in the test's process takes its tasks over."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import redis.asyncio as aioredis

from kew import QueueConfig, TaskQueueManager, TaskStatus
from kew.events.models import TaskReclaimed

from .conftest import eventually
from .terminal import piped
from .test_recovery import (
    TAKEOVER,
    StartWorker,
    start_worker,  # noqa: F401 (a fixture)
    started_by,
    survivor_with,
    task_events,
)

MakeManager = Callable[..., Awaitable[TaskQueueManager]]


async def test_history_and_as_of_through_a_takeover(
    make_manager: MakeManager,
    start_worker: StartWorker,  # noqa: F811 (the fixture imported above)
    client: aioredis.Redis,
    prefix: str,
    redis_url: str,
) -> None:
    """get_task_history follows the chain of `prev` ids through the takeover
    and finds exactly the task's events of a full scan of the log (another
    task's events are interleaved); task and queue status as of each step
    say who was running it and in which attempt; kew replay agrees."""
    submitter = await make_manager(consume=False)
    await submitter.create_queue(QueueConfig(name="q", lease_seconds=0.5))
    worker = start_worker("q")
    dead = await worker.ready()
    for task_id in ("t", "other"):
        await submitter.submit_task(task_id, "q", "recovery.sleep", 3600)

    async def both_started() -> bool:
        return all([await started_by(client, prefix, t, dead) for t in ("t", "other")])

    await eventually(both_started, what="the worker to start both tasks")
    await worker.kill()
    survivor = await survivor_with(make_manager, "recovery.sleep", "from the survivor")
    for task_id in ("t", "other"):
        await survivor.wait_for_task(task_id, timeout=TAKEOVER)

    history = await survivor.get_task_history("t")
    scanned = await task_events(client, prefix, "t")
    assert [e.id for e in history] == [e.id for e in scanned]
    assert [(e.type, e.attempt, e.actor) for e in history] == [
        ("task.submitted", 0, submitter.identity),
        ("task.started", 1, dead),
        ("task.reclaimed", 1, survivor.identity),
        ("task.started", 2, survivor.identity),
        ("task.succeeded", 2, survivor.identity),
    ]
    assert [e.prev for e in history[1:]] == [e.id for e in history[:-1]]
    _, started, reclaimed, restarted, succeeded = history
    assert isinstance(reclaimed, TaskReclaimed)
    assert reclaimed.previous == dead

    # The instant before the takeover: the log still has the dead worker on
    # its first attempt (it cannot know the process died).
    before = reclaimed.time - timedelta(milliseconds=1)

    def expected(moment: datetime) -> tuple[TaskStatus, int]:
        # An instant is a millisecond and takes in all of its events: the
        # takeover's call restarts the task in its own millisecond or the
        # next, and the survivor's attempt may end in either.
        if succeeded.time <= moment:
            return TaskStatus.COMPLETED, 2
        return TaskStatus.PROCESSING, 2 if restarted.time <= moment else 1

    assert expected(before) == (TaskStatus.PROCESSING, 1)
    assert expected(restarted.time)[1] == 2
    for moment in (started.time, before, reclaimed.time, restarted.time):
        info = await survivor.get_task_status("t", as_of=moment)
        assert (info.status, info.attempt) == expected(moment), moment
    info = await survivor.get_task_status("t", as_of=succeeded.time)
    assert (info.status, info.attempt) == (TaskStatus.COMPLETED, 2)
    assert (await survivor.get_task_status("t", as_of=succeeded.time)).result == (
        "from the survivor"
    )
    held = await survivor.get_queue_status("q", as_of=before)
    assert "t" in held["running_tasks"]
    assert held["processing_tasks"] == len(held["running_tasks"])
    done = await survivor.get_queue_status("q", as_of=succeeded.time)
    assert "t" not in done["running_tasks"]

    replayed = await asyncio.to_thread(
        piped, redis_url, prefix, "replay", "q", "--as-of", before.isoformat(), "--json"
    )
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["running_tasks"] == held["running_tasks"]
    shown = await asyncio.to_thread(piped, redis_url, prefix, "history", "t", "--json")
    assert [json.loads(line)["id"] for line in shown.stdout.splitlines()] == [
        e.id for e in history
    ]
