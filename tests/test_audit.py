"""The log as an audit tool: history, as-of, export/import and retention."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from kew import (
    ConfigurationError,
    KewError,
    QueueConfig,
    TaskNotFoundError,
    TaskQueueManager,
    TaskStatus,
)
from kew.audit import read_archive
from kew.keys import QueueKeys
from kew.projections.task import same_hash
from kew.registry import Registry

from .conftest import DEADLINE, eventually

MakeManager = Callable[..., Awaitable[TaskQueueManager]]


class Flaky:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def __call__(self, n: int) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"call {self.calls} failed")
        return n


async def ok(n: int) -> int:
    return n


async def bad(n: int) -> None:
    raise ValueError(f"bad {n}")


async def _mixed_workload(manager: TaskQueueManager) -> None:
    """Successes, failures, a retried task, a cancelled one."""
    flaky = Flaky(failures=1)
    manager.registry = Registry()  # each workload has its own flaky function
    manager.registry.register(flaky, "tests.audit_flaky")
    await manager.create_queue(
        QueueConfig(name="q", max_workers=3, retry_delay=0.01, max_retries=1)
    )
    for i in range(6):
        await manager.submit_task(f"ok{i}", "q", ok, i)
    await manager.submit_task("bad", "q", bad, 1, max_retries=0)
    await manager.submit_task("retried", "q", "tests.audit_flaky", 7)
    await manager.submit_task("later", "q", ok, 9, _defer_by=timedelta(hours=1))
    await manager.cancel_task("later")
    for task_id in [*(f"ok{i}" for i in range(6)), "bad", "retried"]:
        await manager.wait_for_task(task_id, timeout=10)


async def test_history_follows_the_chain_and_outlives_the_record(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """get_task_history returns typed events in order, also after the task's
    record expired."""
    manager = await make_manager(task_expiry_seconds=1)
    await _mixed_workload(manager)
    history = await manager.get_task_history("retried")
    assert [(e.type, e.attempt) for e in history] == [
        ("task.submitted", 0),
        ("task.started", 1),
        ("task.failed", 1),
        ("task.retry_scheduled", 1),
        ("task.enqueued", 1),
        ("task.started", 2),
        ("task.succeeded", 2),
    ]
    assert getattr(history[2], "error") == "call 1 failed"  # noqa: B009
    assert all(a.time <= b.time for a, b in itertools.pairwise(history))

    key = QueueKeys(prefix, "q").task("retried")
    await eventually(
        lambda: _gone(client, key), timeout=10, what="the record to expire"
    )
    with pytest.raises(TaskNotFoundError):
        await manager.get_task_status("retried")
    again = await manager.get_task_history("retried")
    assert [e.id for e in again] == [e.id for e in history]


async def _gone(client: aioredis.Redis, key: str) -> bool:
    return not await client.exists(key)


async def test_status_as_of_an_instant(manager: TaskQueueManager) -> None:
    """A task's and a queue's status as of an instant fold the log up to it."""
    gate = asyncio.Event()

    async def held() -> str:
        await gate.wait()
        return "done"

    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("h", "q", held)
    await eventually(
        lambda: _status_is(manager, "h", TaskStatus.PROCESSING), what="h to start"
    )
    gate.set()
    done = await manager.wait_for_task("h", 10)
    history = await manager.get_task_history("h")
    started_at = history[1].time
    before = history[0].time - timedelta(milliseconds=1)

    then = await manager.get_task_status("h", as_of=started_at)
    assert then.status is TaskStatus.PROCESSING
    assert then.attempt == 1
    assert (await manager.get_task_status("h", as_of=done.completed_time)).result == (
        "done"
    )
    with pytest.raises(TaskNotFoundError, match="not been submitted yet"):
        await manager.get_task_status("h", as_of=before)

    queue_then = await manager.get_queue_status("q", as_of=started_at)
    assert queue_then["running_tasks"] == ["h"]
    assert queue_then["processing_tasks"] == 1
    queue_now = await manager.get_queue_status("q", as_of=done.completed_time)
    assert queue_now["completed_tasks"] == 1
    assert queue_now["running_tasks"] == []
    with pytest.raises(ConfigurationError, match="time zone"):
        await manager.get_task_status("h", as_of=started_at.replace(tzinfo=None))


async def _status_is(
    manager: TaskQueueManager, task_id: str, status: TaskStatus
) -> bool:
    return (await manager.get_task_status(task_id)).status is status


async def test_export_then_import_reproduces_the_projections(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """An export imported into an empty prefix rebuilds the same projections."""
    source = await make_manager()
    await _mixed_workload(source)
    lines = [line async for line in source.export_log("q")]
    assert all(json.loads(json.dumps(line)) == line for line in lines)
    assert lines[0]["type"] == "queue.configured"

    copy_prefix = f"{prefix}:copy"
    copy = await make_manager(key_prefix=copy_prefix, consume=False)
    assert await copy.import_log(lines) == {"q": len(lines)}
    assert await copy.verify_projections("q") == []

    a, b = QueueKeys(prefix, "q"), QueueKeys(copy_prefix, "q")
    ids = [f"ok{i}" for i in range(6)] + ["bad", "retried", "later"]
    for task_id in ids:
        stored = await client.hgetall(a.task(task_id))
        imported = await client.hgetall(b.task(task_id))
        assert same_hash(stored, imported) == [], task_id
    assert _nonzero(await client.hgetall(a.stats)) == _nonzero(
        await client.hgetall(b.stats)
    )
    assert await client.hgetall(a.ended) == await client.hgetall(b.ended)

    with pytest.raises(ConfigurationError, match="empty prefix"):
        await copy.import_log(lines)

    one = [line async for line in source.export_log("q", task_id="retried")]
    assert {line["task_id"] for line in one} == {"retried"}
    assert len(one) == 7


def _nonzero(counts: dict[str, str]) -> dict[str, str]:
    return {state: n for state, n in counts.items() if n != "0"}


async def test_retention_archives_then_trims_only_whole_ended_tasks(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str, tmp_path: Path
) -> None:
    """Old events of ended tasks go to the archive and leave the log; an open
    task keeps all of its events; projections still verify; archive plus log
    still answer history."""
    manager = await make_manager()
    gate = asyncio.Event()

    async def held() -> str:
        await gate.wait()
        return "late"

    await manager.create_queue(QueueConfig(name="q", retention_seconds=0.001))
    for i in range(5):
        await manager.submit_task(f"old{i}", "q", ok, i)
        await manager.wait_for_task(f"old{i}", 10)
    await manager.submit_task("open", "q", held)
    await eventually(
        lambda: _status_is(manager, "open", TaskStatus.PROCESSING), what="open"
    )
    await manager.submit_task("young", "q", ok, 99)
    await manager.wait_for_task("young", 10)
    keys = QueueKeys(prefix, "q")
    length = await client.xlen(keys.log)

    archive = tmp_path / "archive.jsonl"
    archived = (await manager.apply_retention("q", archive)).archived
    # queue.configured + 3 events for each of the five old tasks; "open" (and
    # everything after its first event) stays.
    assert archived == 16
    assert await client.xlen(keys.log) == length - 16
    assert await manager.verify_projections("q") == []
    status = await manager.get_queue_status("q")
    assert status["completed_tasks"] == 6

    archived_events = list(read_archive(archive))
    assert len(archived_events) == 16
    assert {e.task_id for e in archived_events if e.task_id} == {
        f"old{i}" for i in range(5)
    }
    with pytest.raises(TaskNotFoundError):
        await manager.get_task_history("old0")
    open_history = await manager.get_task_history("open")
    assert [e.type for e in open_history] == ["task.submitted", "task.started"]

    # Nothing more to trim while "open" is open: it holds the floor.
    assert (await manager.apply_retention("q", archive)).archived == 0
    gate.set()
    await manager.wait_for_task("open", 10)

    # The archive and an export of the live log rebuild the whole history.
    whole = await make_manager(key_prefix=f"{prefix}:whole", consume=False)
    archived_lines = [json.loads(text) for text in archive.read_text().splitlines()]
    live = [line async for line in manager.export_log("q")]
    await whole.import_log(archived_lines + live)  # the snapshot line is ignored
    history = await whole.get_task_history("old0")
    assert [e.type for e in history] == [
        "task.submitted",
        "task.started",
        "task.succeeded",
    ]
    assert await whole.verify_projections("q") == []


async def test_retention_needs_a_policy(
    manager: TaskQueueManager, tmp_path: Path
) -> None:
    """A queue without retention_seconds refuses to be trimmed."""
    await manager.create_queue(QueueConfig(name="q"))
    with pytest.raises(ConfigurationError, match="retention_seconds"):
        await manager.apply_retention("q", tmp_path / "a.jsonl")


async def _dead_letter(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str, task_id: str
) -> TaskQueueManager:
    """Dead-letter a queued task of queue q (max_deliveries=1): a consumer that
    never answers takes its entry, then a real one reclaims it once too often.
    Returns the real consumer's manager."""
    keys = QueueKeys(prefix, "q")
    await client.xreadgroup("workers", "ghost", {keys.ready("medium"): ">"}, count=1)
    consumer = await make_manager(consume=False)
    await consumer.attach_queue("q")
    info = await consumer.wait_for_task(task_id, timeout=10)
    assert info.status is TaskStatus.FAILED
    assert [d["task_id"] for d in await consumer.dead_letters("q")] == [task_id]
    return consumer


async def test_retention_keeps_a_dead_letter_until_it_is_requeued(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str, tmp_path: Path
) -> None:
    """A dead-lettered task is never trimmed while it waits in the dead-letter
    stream: requeued and completed after retention, it still verifies and its
    history is whole."""
    creator = await make_manager(consume=False)
    await creator.create_queue(
        QueueConfig(
            name="q", retention_seconds=0.001, max_deliveries=1, lease_seconds=0.2
        )
    )
    await creator.submit_task("dl", "q", ok, 5)
    consumer = await _dead_letter(make_manager, client, prefix, "dl")
    await consumer.submit_task("done", "q", ok, 1)
    await consumer.wait_for_task("done", 10)
    await _after_server_ms(consumer, (await consumer.get_task_history("done"))[-1].ms)

    report = await consumer.apply_retention("q", tmp_path / "archive.jsonl")
    archived = report.archived
    assert archived == 1  # queue.configured; "dl" holds the floor
    assert (await consumer.get_task_history("dl"))[0].type == "task.submitted"

    assert await consumer.requeue_dead_letters("q") == 1
    info = await consumer.wait_for_task("dl", 10)
    assert info.status is TaskStatus.COMPLETED
    assert await consumer.verify_projections("q") == []
    types = [e.type for e in await consumer.get_task_history("dl")]
    assert types[0] == "task.submitted"
    assert "task.dead_lettered" in types
    assert types[-3:] == ["task.requeued", "task.started", "task.succeeded"]


async def _after_server_ms(manager: TaskQueueManager, ms: int) -> None:
    """Wait until the server's clock has passed millisecond `ms` (the log's
    clock), so that the next event falls in a later millisecond."""
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while True:
        seconds, micros = await manager.client.time()
        if seconds * 1000 + micros // 1000 > ms:
            return
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.001)


async def test_an_export_taken_after_retention_imports(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str, tmp_path: Path
) -> None:
    """Retention trimmed queue.configured, yet an export of the live log
    imports: its snapshot line carries the queue's configuration."""
    source = await make_manager()
    await source.create_queue(
        QueueConfig(name="q", retention_seconds=0.001, max_workers=3)
    )
    await source.submit_task("old", "q", ok, 1)
    await source.wait_for_task("old", 10)
    await _after_server_ms(source, (await source.get_task_history("old"))[-1].ms)
    report = await source.apply_retention("q", tmp_path / "archive.jsonl")
    assert report.archived == 4
    await source.submit_task("young", "q", ok, 2)
    await source.wait_for_task("young", 10)

    lines = [line async for line in source.export_log("q")]
    assert "snapshot" in lines[0]
    assert not any(line.get("type") == "queue.configured" for line in lines)
    copy_prefix = f"{prefix}:copy"
    copy = await make_manager(key_prefix=copy_prefix, consume=False)
    assert await copy.import_log(lines) == {"q": len(lines) - 1}
    assert await copy.verify_projections("q") == []
    status = await copy.get_queue_status("q")
    assert (status["completed_tasks"], status["max_workers"]) == (2, 3)


async def test_a_refused_import_writes_nothing(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """An import refused for one of its queues writes nothing at all, so it can
    be retried once the lines are fixed."""
    source = await make_manager()
    for name in ("a", "b"):
        await source.create_queue(QueueConfig(name=name))
        await source.submit_task(f"{name}1", name, ok, 1)
        await source.wait_for_task(f"{name}1", 10)
    whole_a = [line async for line in source.export_log("a")]
    # One task's events: no queue.configured, so queue b's config is unknown.
    task_b = [line async for line in source.export_log("b", task_id="b1")]

    copy_prefix = f"{prefix}:copy"
    copy = await make_manager(key_prefix=copy_prefix, consume=False)
    with pytest.raises(KewError, match=r"no queue\.configured"):
        await copy.import_log(whole_a + task_b)
    written = [key async for key in client.scan_iter(match=f"{copy_prefix}:*")]
    assert written == []

    assert await copy.import_log(whole_a) == {"a": len(whole_a)}
    assert await copy.verify_projections("a") == []


async def test_verify_reports_and_rebuild_repairs_what_the_log_cannot_reach(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """A task record with no events and a deferred task missing from the
    schedule are differences; rebuild deletes the one and reschedules the
    other."""
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("later", "q", ok, 1, _defer_by=timedelta(hours=1))
    keys = QueueKeys(prefix, "q")
    due = await client.zscore(keys.sched, "later")
    assert due is not None
    assert await manager.verify_projections("q") == []

    await client.hset(keys.task("stray[1]"), mapping={"state": "queued"})
    await client.zrem(keys.sched, "later")
    differences = {d.key: d for d in await manager.verify_projections("q")}
    assert set(differences) == {"task stray[1]", "sched"}
    assert differences["sched"].fields == ["later"]
    assert differences["sched"].folded == {"later": str(int(due))}

    await manager.rebuild_projections("q")
    assert await manager.verify_projections("q") == []
    assert not await client.exists(keys.task("stray[1]"))
    assert await client.zscore(keys.sched, "later") == due


async def test_verify_and_rebuild_read_every_chunk_of_a_large_queue(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """Stored hashes are read a chunk at a time, the next chunk while this
    one is compared: a tampered task in each chunk is found, and a rebuild
    repairs them all."""
    manager = await make_manager(consume=False)
    await manager.create_queue(QueueConfig(name="q", max_size=10_000))
    ids = [f"t{i}" for i in range(2_500)]
    await manager.submit_tasks(
        "q", [{"task_id": t, "task_func": ok, "args": [1]} for t in ids]
    )
    assert await manager.verify_projections("q") == []
    keys = QueueKeys(prefix, "q")
    tampered = ["t0", "t999", "t1000", "t2499"]
    for task_id in tampered:
        await client.hset(keys.task(task_id), "priority", "3")
    await client.delete(keys.task("t1500"))

    differences = await manager.verify_projections("q")
    assert sorted(d.key for d in differences) == sorted(
        f"task {t}" for t in [*tampered, "t1500"]
    )
    assert all(d.fields == ["priority"] for d in differences if d.key != "task t1500")

    await manager.rebuild_projections("q")
    assert await manager.verify_projections("q") == []


async def test_as_of_follows_the_breaker_through_its_transitions(
    manager: TaskQueueManager,
) -> None:
    """Queue and task status as of each step of the breaker's round: closed
    while the first task runs, open after its failure tripped it, half open
    with the trial running, closed once the trial succeeded. Each task is
    held until the server's clock has moved past its start, and the next is
    submitted once it has moved past the log's last event, so that no two of
    these instants share a millisecond (the log's clock)."""
    gates = {"trips": asyncio.Event(), "trial": asyncio.Event()}

    async def trips() -> None:
        await gates["trips"].wait()
        raise RuntimeError("the service is down")

    async def trial() -> str:
        await gates["trial"].wait()
        return "up again"

    manager.registry = Registry()
    manager.registry.register(trips, "tests.audit_trips")
    manager.registry.register(trial, "tests.audit_trial")
    await manager.create_queue(
        QueueConfig(
            name="q", circuit_breaker_max_failures=1, circuit_breaker_reset_timeout=0.2
        )
    )
    log_key = QueueKeys(manager.key_prefix, "q").log
    started: dict[str, datetime] = {}
    for task_id in ("trips", "trial"):
        await manager.submit_task(task_id, "q", f"tests.audit_{task_id}")
        await eventually(
            lambda t=task_id: _status_is(manager, t, TaskStatus.PROCESSING),
            what=f"{task_id} to start",
        )
        start = (await manager.get_task_history(task_id))[-1]
        started[task_id] = start.time
        await _after_server_ms(manager, start.ms)
        gates[task_id].set()
        await manager.wait_for_task(task_id, 10)
        # Past the log's last event: a breaker event may follow the task's end
        # a millisecond later.
        ((last, _),) = await manager.client.xrevrange(log_key, count=1)
        await _after_server_ms(manager, int(last.split("-")[0]))

    log = [line async for line in manager.export_log("q")]
    at = {
        line["type"]: datetime.fromisoformat(line["time"])
        for line in log
        if line["type"].startswith("breaker.")
    }
    assert list(at) == ["breaker.opened", "breaker.half_opened", "breaker.closed"]
    # The breaker turns half open at a consumer's first fetch or renewal after
    # its timeout; the trial starts then or a moment later.
    assert at["breaker.half_opened"] <= started["trial"] < at["breaker.closed"]
    expected = [
        (started["trips"], "closed", 0, "trips", TaskStatus.PROCESSING),
        (at["breaker.opened"], "open", 1, "trips", TaskStatus.FAILED),
        (started["trial"], "half_open", 1, "trial", TaskStatus.PROCESSING),
        (at["breaker.closed"], "closed", 0, "trial", TaskStatus.COMPLETED),
    ]
    for moment, state, failures, task_id, status in expected:
        then = await manager.get_queue_status("q", as_of=moment)
        assert (then["circuit_breaker_status"], then["circuit_breaker_failures"]) == (
            state,
            failures,
        ), moment
        info = await manager.get_task_status(task_id, as_of=moment)
        assert info.status is status, moment
    opened = await manager.get_queue_status("q", as_of=at["breaker.opened"])
    assert (opened["failed_tasks"], opened["running_tasks"]) == (1, [])
    assert opened["circuit_breaker_open_until"] is not None
    trying = await manager.get_queue_status("q", as_of=started["trial"])
    assert trying["running_tasks"] == ["trial"]
    with pytest.raises(TaskNotFoundError, match="not been submitted yet"):
        await manager.get_task_status("trial", as_of=at["breaker.opened"])


async def test_retention_reports_the_task_that_holds_the_trim_point(
    manager: TaskQueueManager, tmp_path: Path
) -> None:
    """apply_retention returns what it archived, and which task holds the
    trim point, since its first event, and why: here a task still running."""
    gate = asyncio.Event()

    async def held() -> str:
        await gate.wait()
        return "late"

    await manager.create_queue(QueueConfig(name="q", retention_seconds=0.001))
    await manager.submit_task("old", "q", ok, 1)
    await manager.wait_for_task("old", 10)
    await manager.submit_task("open", "q", held)
    await eventually(
        lambda: _status_is(manager, "open", TaskStatus.PROCESSING), what="open"
    )
    first, started = await manager.get_task_history("open")
    await _after_server_ms(manager, started.ms)  # older than the cutoff

    report = await manager.apply_retention("q", tmp_path / "archive.jsonl")

    assert (report.archived, report.kept) == (4, 2)
    assert (report.held_by, report.held_since) == ("open", first.time)
    assert report.held_because == "it is still processing"
    gate.set()
    await manager.wait_for_task("open", 10)
    await _after_server_ms(manager, (await manager.get_task_history("open"))[-1].ms)
    freed = await manager.apply_retention("q", tmp_path / "archive.jsonl")
    assert (freed.archived, freed.held_by, freed.held_since) == (3, None, None)
