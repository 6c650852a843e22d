"""Deferred tasks (_defer_by, _defer_until) and batches (submit_tasks)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import redis.asyncio as aioredis

from kew import (
    ConfigurationError,
    QueueConfig,
    QueueFullError,
    QueuePriority,
    SerializationError,
    TaskAlreadyExistsError,
    TaskInfo,
    TaskNotFoundError,
    TaskQueueManager,
    TaskStatus,
    functions,
)
from kew.events import Event, TaskEnqueued, TaskStarted, TaskSubmitted
from kew.events.log import read
from kew.keys import GROUP, QueueKeys

from .conftest import DEADLINE, eventually

MakeManager = Callable[..., Awaitable[TaskQueueManager]]


async def echo(value: Any) -> Any:
    return value


async def add(a: int, b: int = 0) -> int:
    return a + b


async def shout(value: Any) -> Any:
    return value


async def _events(client: aioredis.Redis, prefix: str, queue: str = "q") -> list[Event]:
    return [e async for e in read(client, QueueKeys(prefix, queue).log)]


async def _task_events(
    client: aioredis.Redis, prefix: str, task_id: str, queue: str = "q"
) -> list[Event]:
    return [e for e in await _events(client, prefix, queue) if e.task_id == task_id]


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


# -- deferral --------------------------------------------------------------


async def test_deferred_task_waits_queued_with_its_due_time(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """A deferred task reads `queued` with `due_time` set, counts as scheduled
    (and queued), and its record does not expire while it waits."""
    await manager.create_queue(QueueConfig(name="q"))
    until = datetime.now(UTC) + timedelta(minutes=10)
    await manager.submit_task("by", "q", echo, 1, _defer_by=600)
    await manager.submit_task("by-delta", "q", echo, 2, _defer_by=timedelta(hours=1))
    await manager.submit_task("until", "q", echo, 3, _defer_until=until)

    for task_id in ("by", "by-delta", "until"):
        info = await manager.get_task_status(task_id)
        assert info.status is TaskStatus.QUEUED
        assert info.due_time is not None
        assert info.due_time > info.queued_time
        assert info.started_time is None
        assert await client.ttl(QueueKeys(prefix, "q").task(task_id)) == -1
    until_info = await manager.get_task_status("until")
    assert until_info.due_time is not None
    assert abs(until_info.due_time - until) <= timedelta(milliseconds=1)

    status = await manager.get_queue_status("q")
    assert status["scheduled_tasks"] == 3
    assert status["queued_tasks"] == 3
    assert status["processing_tasks"] == 0
    assert await manager.verify_projections("q") == []


async def test_submit_returns_the_due_time_of_a_deferred_task(
    manager: TaskQueueManager,
) -> None:
    """The TaskInfo that submit_task and submit_tasks return carries the due
    time the server fixed, as get_task_status reports it; an immediate task
    has none."""
    await manager.create_queue(QueueConfig(name="q"))
    until = datetime.now(UTC) + timedelta(minutes=10)
    returned = [
        await manager.submit_task("by", "q", echo, 1, _defer_by=600),
        await manager.submit_task("until", "q", echo, 2, _defer_until=until),
        *await manager.submit_tasks(
            "q",
            [
                {
                    "task_id": "batch-by",
                    "task_func": echo,
                    "args": [3],
                    "_defer_by": 60,
                },
                {"task_id": "batch-now", "task_func": echo, "args": [4]},
            ],
        ),
    ]
    for info in returned:
        stored = await manager.get_task_status(info.task_id)
        assert info.due_time == stored.due_time, info.task_id
    by, by_until, batch_by, batch_now = returned
    assert by.due_time is not None
    # Fixed by the server's clock when it wrote the task.submitted event.
    assert abs(by.due_time - by.queued_time - timedelta(seconds=600)) <= timedelta(
        milliseconds=5
    )
    assert by_until.due_time is not None
    assert abs(by_until.due_time - until) <= timedelta(milliseconds=1)
    assert batch_by.due_time is not None
    assert batch_now.due_time is None
    await manager.wait_for_task("batch-now", DEADLINE)  # verify needs a quiet queue
    assert await manager.verify_projections("q") == []


@pytest.mark.parametrize(
    "deferral",
    [
        lambda: {"_defer_by": 0.3},
        lambda: {"_defer_by": timedelta(milliseconds=300)},
        lambda: {"_defer_until": datetime.now(UTC) + timedelta(milliseconds=300)},
        lambda: {
            "_defer_until": datetime.now(timezone(timedelta(hours=-5)))
            + timedelta(milliseconds=300)
        },
    ],
    ids=["defer_by seconds", "defer_by timedelta", "until UTC", "until UTC-5"],
)
async def test_deferred_task_runs_once_it_is_due(
    manager: TaskQueueManager,
    client: aioredis.Redis,
    prefix: str,
    deferral: Callable[[], dict[str, Any]],
) -> None:
    """A deferred task runs, and starts no earlier than its due time (both
    read from the server's clock); the log shows submitted (with due_at),
    enqueued, started."""
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("later", "q", echo, "ok", **deferral())

    done = await manager.wait_for_task("later", timeout=DEADLINE)
    assert done.status is TaskStatus.COMPLETED
    assert done.result == "ok"

    events = await _task_events(client, prefix, "later")
    assert [e.type for e in events] == [
        "task.submitted",
        "task.enqueued",
        "task.started",
        "task.succeeded",
    ]
    submitted, enqueued, started, _ = events
    assert isinstance(submitted, TaskSubmitted)
    assert isinstance(enqueued, TaskEnqueued)
    assert isinstance(started, TaskStarted)
    assert submitted.due_at is not None
    assert enqueued.from_ == "scheduled"
    assert enqueued.ms >= submitted.due_at
    assert done.started_time is not None
    assert done.started_time >= _from_ms(submitted.due_at)
    assert started.prev == enqueued.id
    assert await manager.verify_projections("q") == []


async def test_task_deferred_by_a_non_consuming_manager_runs_when_due(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """A task deferred from another process (which runs no consumer) is still
    promoted and run by the queue's consumer once it is due."""
    worker = await make_manager()
    web = await make_manager(consume=False)
    await worker.create_queue(QueueConfig(name="q"))
    await web.submit_task("remote", "q", add, 2, b=3, _defer_by=0.3)

    done = await web.wait_for_task("remote", timeout=DEADLINE)
    assert done.status is TaskStatus.COMPLETED
    assert done.result == 5
    submitted = (await _task_events(client, prefix, "remote"))[0]
    assert isinstance(submitted, TaskSubmitted)
    assert submitted.due_at is not None
    assert done.started_time is not None
    assert done.started_time >= _from_ms(submitted.due_at)
    assert await worker.verify_projections("q") == []


async def test_due_time_in_the_past_or_zero_delay_runs_at_once(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """_defer_by=0 and a _defer_until already past queue the task as if not
    deferred: no due_at, no task.enqueued."""
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("zero", "q", echo, 0, _defer_by=0)
    past = datetime.now(UTC) - timedelta(hours=1)
    await manager.submit_task("past", "q", echo, 1, _defer_until=past)
    for task_id in ("zero", "past"):
        done = await manager.wait_for_task(task_id, timeout=DEADLINE)
        assert done.status is TaskStatus.COMPLETED
        events = await _task_events(client, prefix, task_id)
        assert [e.type for e in events] == [
            "task.submitted",
            "task.started",
            "task.succeeded",
        ]
        assert isinstance(events[0], TaskSubmitted)
        assert events[0].due_at is None
    assert await manager.verify_projections("q") == []


async def test_an_entry_whose_read_reply_was_lost_is_run_by_maintain(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """An entry delivered to a consumer that never saw the reply (a lost
    reply) is started by that consumer's next `maintain`, and its outcome is
    recorded: the task completes instead of hanging in the PEL."""
    manager = await make_manager(consume=False)
    await manager.create_queue(QueueConfig(name="q"))
    keys = QueueKeys(prefix, "q")
    await manager.submit_task("t", "q", echo, 1)
    consumer = "reader"

    # The read is served on the server; its reply never reaches the consumer.
    reply = await client.xreadgroup(GROUP, consumer, {keys.ready("medium"): ">"})
    entry = reply[0][1][0][0]
    # Maintain runs, holding nothing it knows of, with a free slot.
    liveness = json.dumps({"queue": "q", "max_workers": 1})
    after = [keys.finished_channel, 0, 0, 0]  # then nothing held per level
    maintained = await functions.call(
        client,
        "maintain",
        [*keys.queue_keys, keys.worker(consumer)],
        [consumer, 2000, 2000, liveness, keys.task_prefix, 1, 60, *after],
    )
    (row,) = maintained[1]
    assert row[:3] == ["started", "t", entry]
    outcome = [row[3], row[4], "succeeded", "1", '{"result":1}', 0]
    finished = await functions.call(
        client,
        "finish",
        [*keys.queue_keys, keys.task("t")],
        [consumer, 60, keys.finished_channel, "t", entry, 2, *outcome],
    )
    assert finished[0][0] == "ok", finished
    assert (await manager.get_task_status("t")).status is TaskStatus.COMPLETED
    assert await manager.verify_projections("q") == []


async def test_deferred_high_task_does_not_block_due_tasks_behind_it(
    manager: TaskQueueManager,
) -> None:
    """A HIGH task deferred by 30 s leaves a one-worker queue free: a MEDIUM
    task submitted after it completes while the HIGH one still waits."""
    await manager.create_queue(QueueConfig(name="q", max_workers=1))
    await manager.submit_task(
        "urgent-later", "q", echo, "h", priority=QueuePriority.HIGH, _defer_by=30
    )
    await manager.submit_task("now", "q", echo, "m")

    done = await manager.wait_for_task("now", DEADLINE)
    assert done.status is TaskStatus.COMPLETED
    waiting = await manager.get_task_status("urgent-later")
    assert waiting.status is TaskStatus.QUEUED
    assert waiting.due_time is not None
    assert waiting.started_time is None
    assert done.started_time is not None
    assert done.started_time < waiting.due_time
    status = await manager.get_queue_status("q")
    assert status["scheduled_tasks"] == 1
    assert status["completed_tasks"] == 1
    assert await manager.verify_projections("q") == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"_defer_until": datetime(2030, 1, 1, 9)}, "time zone"),
        ({"_defer_until": "2030-01-01T09:00:00Z"}, "not a datetime"),
        (
            {"_defer_by": 5, "_defer_until": datetime(2030, 1, 1, tzinfo=UTC)},
            "both",
        ),
        ({"_defer_by": -1}, "_defer_by=-1"),
        ({"_defer_by": timedelta(seconds=-5)}, "_defer_by=-5.0"),
        ({"_defer_by": float("nan")}, "_defer_by=nan"),
        ({"_defer_by": "soon"}, "_defer_by='soon'"),
    ],
    ids=["naive", "string", "both", "negative", "negative delta", "nan", "word"],
)
async def test_bad_deferral_is_rejected_and_nothing_is_submitted(
    manager: TaskQueueManager,
    client: aioredis.Redis,
    prefix: str,
    options: dict[str, Any],
    message: str,
) -> None:
    """A bad _defer_by / _defer_until raises ConfigurationError saying what is
    wrong; the task does not exist afterwards."""
    await manager.create_queue(QueueConfig(name="q"))
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        await manager.submit_task("t", "q", echo, 1, **options)
    with pytest.raises(TaskNotFoundError):
        await manager.get_task_status("t")
    assert [e.type for e in await _events(client, prefix)] == ["queue.configured"]


# -- batches ---------------------------------------------------------------


async def test_batch_returns_infos_in_order_and_every_task_runs(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """submit_tasks returns one queued TaskInfo per dict, in order, honouring
    each dict's options; every task then runs."""
    await manager.create_queue(QueueConfig(name="q", max_workers=4))
    specs: list[dict[str, Any]] = [
        {"task_id": "b1", "task_func": add, "args": [1], "kwargs": {"b": 2}},
        {
            "task_id": "b2",
            "task_func": echo,
            "args": ["x"],
            "task_type": "echoing",
            "priority": "high",
            "max_retries": 2,
            "retry_delay": 0.1,
            "task_timeout": 30,
        },
        {"task_id": "b3", "task_func": add, "kwargs": {"a": 5}, "priority": 3},
        {
            "task_id": "b4",
            "task_func": "tests.shout",
            "args": [{"k": [1, 2]}],
            "_defer_by": 0.2,
        },
        {
            "task_id": "b5",
            "task_func": echo,
            "args": [None],
            "_defer_until": datetime.now(UTC) + timedelta(milliseconds=200),
        },
    ]
    manager.registry.register(shout, "tests.shout")

    infos = await manager.submit_tasks("q", specs)
    assert all(isinstance(info, TaskInfo) for info in infos)
    assert [info.task_id for info in infos] == ["b1", "b2", "b3", "b4", "b5"]
    assert all(info.status is TaskStatus.QUEUED for info in infos)
    assert [info.priority for info in infos] == [
        QueuePriority.MEDIUM,
        QueuePriority.HIGH,
        QueuePriority.LOW,
        QueuePriority.MEDIUM,
        QueuePriority.MEDIUM,
    ]
    assert infos[1].task_type == "echoing"
    assert infos[3].task_name == "tests.shout"

    results = {}
    for info in infos:
        done = await manager.wait_for_task(info.task_id, timeout=DEADLINE)
        assert done.status is TaskStatus.COMPLETED, done
        results[info.task_id] = done.result
    assert results == {"b1": 3, "b2": "x", "b3": 5, "b4": {"k": [1, 2]}, "b5": None}

    submitted = {
        e.task_id: e
        for e in await _events(client, prefix)
        if isinstance(e, TaskSubmitted)
    }
    assert list(submitted) == ["b1", "b2", "b3", "b4", "b5"]
    assert (submitted["b2"].max_retries, submitted["b2"].retry_delay_ms) == (2, 100)
    assert submitted["b2"].timeout_ms == 30_000
    assert submitted["b1"].due_at is None
    assert submitted["b4"].due_at is not None
    assert submitted["b5"].due_at is not None
    assert await manager.verify_projections("q") == []


async def _assert_none_submitted(
    manager: TaskQueueManager,
    client: aioredis.Redis,
    prefix: str,
    task_ids: list[str],
) -> None:
    """None of the ids exists, and the log has no task.submitted for them."""
    for task_id in task_ids:
        with pytest.raises(TaskNotFoundError):
            await manager.get_task_status(task_id, queue_name="q")
    submitted = [
        e.task_id for e in await _events(client, prefix) if e.type == "task.submitted"
    ]
    assert not set(submitted) & set(task_ids), submitted


async def test_duplicate_id_inside_a_batch_rejects_the_whole_batch(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """An id given twice in one batch raises TaskAlreadyExistsError naming it;
    no task of the batch is submitted."""
    await manager.create_queue(QueueConfig(name="q"))
    batch = [
        {"task_id": task_id, "task_func": echo, "args": [task_id]}
        for task_id in ("a", "b", "a", "c")
    ]
    with pytest.raises(TaskAlreadyExistsError, match="'a'") as caught:
        await manager.submit_tasks("q", batch)
    assert caught.value.task_ids == ["a"]
    assert "'b'" not in str(caught.value)
    await _assert_none_submitted(manager, client, prefix, ["a", "b", "c"])
    assert (await manager.get_queue_status("q"))["queued_tasks"] == 0
    assert await manager.verify_projections("q") == []


async def test_existing_id_rejects_the_whole_batch(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """A batch holding ids already in the queue raises TaskAlreadyExistsError
    naming those ids; the batch's other tasks are not submitted."""
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("old", "q", echo, "first")
    await manager.submit_task("older", "q", echo, "second")
    await manager.wait_for_task("old", DEADLINE)
    await manager.wait_for_task("older", DEADLINE)

    batch = [
        {"task_id": task_id, "task_func": echo, "args": [task_id]}
        for task_id in ("n1", "old", "n2", "older")
    ]
    with pytest.raises(TaskAlreadyExistsError, match=r"'old'.*'older'") as caught:
        await manager.submit_tasks("q", batch)
    assert caught.value.task_ids == ["old", "older"]
    await _assert_none_submitted(manager, client, prefix, ["n1", "n2"])
    assert (await manager.get_task_status("old")).result == "first"
    assert (await manager.get_task_status("older")).result == "second"
    assert await manager.verify_projections("q") == []


async def test_batch_larger_than_the_room_left_is_rejected_whole(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """With room for two more tasks under max_size, a batch of three raises
    QueueFullError and none of it is submitted; a batch of two fits."""
    gate = asyncio.Event()

    async def held() -> None:
        await gate.wait()

    await manager.create_queue(QueueConfig(name="q", max_workers=1, max_size=3))
    await manager.submit_task("running", "q", held)
    batch = [{"task_id": f"f{i}", "task_func": held} for i in range(3)]
    with pytest.raises(QueueFullError, match="max_size=3") as caught:
        await manager.submit_tasks("q", batch)
    message = str(caught.value)
    assert "batch of 3 tasks" in message
    assert "1 unfinished" in message
    assert "2 more fit and 1 do not ('f2')" in message
    await _assert_none_submitted(manager, client, prefix, ["f0", "f1", "f2"])
    assert (await manager.get_queue_status("q"))["queued_tasks"] + (
        await manager.get_queue_status("q")
    )["processing_tasks"] == 1

    infos = await manager.submit_tasks("q", batch[:2])
    assert [info.task_id for info in infos] == ["f0", "f1"]
    gate.set()
    for task_id in ("running", "f0", "f1"):
        done = await manager.wait_for_task(task_id, DEADLINE)
        assert done.status is TaskStatus.COMPLETED
    assert await manager.verify_projections("q") == []


@pytest.mark.parametrize("key", ["args ", "delay", "defer_by", "queue_name"])
async def test_unknown_key_in_a_batch_is_rejected(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str, key: str
) -> None:
    """A dict with a key submit_tasks does not know raises ConfigurationError
    naming the key; nothing is submitted."""
    await manager.create_queue(QueueConfig(name="q"))
    batch: list[dict[str, Any]] = [
        {"task_id": "ok", "task_func": echo, "args": [1]},
        {"task_id": "typo", "task_func": echo, "args": [2], key: 5},
    ]
    with pytest.raises(ConfigurationError, match=re.escape(repr(key))):
        await manager.submit_tasks("q", batch)
    await _assert_none_submitted(manager, client, prefix, ["ok", "typo"])
    assert [e.type for e in await _events(client, prefix)] == ["queue.configured"]


async def test_non_json_argument_rejects_the_batch(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """An argument that is not JSON in the third task raises SerializationError;
    the two valid tasks before it are not submitted either."""
    await manager.create_queue(QueueConfig(name="q"))
    batch: list[dict[str, Any]] = [
        {"task_id": "j1", "task_func": echo, "args": [1]},
        {"task_id": "j2", "task_func": echo, "args": ["two"]},
        {"task_id": "j3", "task_func": echo, "kwargs": {"value": object()}},
        {"task_id": "j4", "task_func": echo, "args": [4]},
    ]
    with pytest.raises(SerializationError, match=r"^Task 'j3' of the batch: .*'value'"):
        await manager.submit_tasks("q", batch)
    await _assert_none_submitted(manager, client, prefix, ["j1", "j2", "j3", "j4"])
    assert [e.type for e in await _events(client, prefix)] == ["queue.configured"]


@pytest.mark.parametrize(
    "bad",
    [
        {"task_id": "x", "task_func": echo, "args": [1], "priority": 9},
        {"task_id": "x", "task_func": echo, "args": [1], "_defer_by": -1},
        {"task_id": "x", "task_func": echo, "args": [1], "max_retries": -1},
        {"task_id": "x", "task_func": add, "args": [1, 2, 3]},
        {"task_id": "", "task_func": echo, "args": [1]},
        {"task_func": echo, "args": [1]},
    ],
    ids=["priority", "defer", "retries", "arguments", "empty id", "no id"],
)
async def test_any_bad_task_rejects_the_batch(
    manager: TaskQueueManager,
    client: aioredis.Redis,
    prefix: str,
    bad: dict[str, Any],
) -> None:
    """A bad option in one dict raises ConfigurationError naming that task; the
    valid tasks of the batch are not submitted."""
    await manager.create_queue(QueueConfig(name="q"))
    batch = [{"task_id": "fine", "task_func": echo, "args": [0]}, bad]
    with pytest.raises(ConfigurationError) as caught:
        await manager.submit_tasks("q", batch)
    if "task_id" in bad:
        assert str(caught.value).startswith(f"Task {bad['task_id']!r} of the batch: ")
    else:
        assert str(caught.value).startswith("Task 1 of the batch")
    await _assert_none_submitted(manager, client, prefix, ["fine"])
    assert [e.type for e in await _events(client, prefix)] == ["queue.configured"]


async def test_empty_batch_returns_an_empty_list(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """submit_tasks([]) returns [] and writes nothing."""
    await manager.create_queue(QueueConfig(name="q"))
    assert await manager.submit_tasks("q", []) == []
    assert [e.type for e in await _events(client, prefix)] == ["queue.configured"]
    assert await manager.verify_projections("q") == []


async def test_batch_mixing_priorities_runs_on_a_one_worker_queue(
    manager: TaskQueueManager, client: aioredis.Redis
) -> None:
    """A batch with HIGH, MEDIUM and LOW tasks, submitted to an idle queue with
    a single worker, runs in full, HIGH first."""
    order: list[str] = []

    async def note(label: str) -> None:
        order.append(label)

    blocked_before = await _blocked_reads(client)
    await manager.create_queue(QueueConfig(name="q", max_workers=1))
    # The consumer is idle once it waits in its blocking read for new entries.
    await eventually(
        lambda: _has_new_blocked_read(client, blocked_before),
        what="the consumer to go idle",
    )
    batch = [
        {"task_id": task_id, "task_func": note, "args": [task_id], "priority": level}
        for task_id, level in (("low", "low"), ("medium", "medium"), ("high", "high"))
    ]
    await manager.submit_tasks("q", batch)
    for task_id in ("low", "medium", "high"):
        done = await manager.wait_for_task(task_id, timeout=DEADLINE)
        assert done.status is TaskStatus.COMPLETED
    assert order[0] == "high"
    assert sorted(order) == ["high", "low", "medium"]
    assert await manager.verify_projections("q") == []


async def _blocked_reads(client: aioredis.Redis) -> set[str]:
    """Ids of the server's clients now blocked waiting for new entries."""
    clients: list[dict[str, Any]] = await client.client_list()
    return {
        c["id"]
        for c in clients
        if c.get("cmd") in ("xread", "xreadgroup") and "b" in c["flags"]
    }


async def _has_new_blocked_read(client: aioredis.Redis, before: set[str]) -> bool:
    return bool(await _blocked_reads(client) - before)


async def test_a_batch_of_two_thousand_is_accepted_and_completes(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """2,000 tasks go in with one submit_tasks call and all of them complete."""
    await manager.create_queue(QueueConfig(name="q", max_workers=50, max_size=5000))
    batch = [
        {"task_id": f"bulk-{i:04}", "task_func": add, "args": [i, 1]}
        for i in range(2000)
    ]
    infos = await manager.submit_tasks("q", batch)
    assert [info.task_id for info in infos] == [spec["task_id"] for spec in batch]

    async def all_completed() -> bool:
        return (await manager.get_queue_status("q"))["completed_tasks"] == 2000

    await eventually(all_completed, timeout=60, what="2,000 tasks to complete")
    status = await manager.get_queue_status("q")
    assert status["queued_tasks"] == status["processing_tasks"] == 0
    assert status["failed_tasks"] == 0
    assert (await manager.get_task_status("bulk-1999")).result == 2000
    submitted = [e for e in await _events(client, prefix) if e.type == "task.submitted"]
    assert len(submitted) == 2000
    assert await manager.verify_projections("q") == []
