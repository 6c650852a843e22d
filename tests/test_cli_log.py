"""The log commands, run as subprocesses, their output checked."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from kew import QueueConfig, TaskQueueManager
from kew.keys import QueueKeys

MakeManager = Callable[..., Awaitable[TaskQueueManager]]
TIMEOUT = 60


def kew(
    url: str, prefix: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KEW_REDIS_URL": url, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "kew", "--prefix", prefix, *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


async def server_ms(manager: TaskQueueManager) -> int:
    seconds, micros = await manager.client.time()
    return seconds * 1000 + micros // 1000


async def ok(n: int) -> int:
    return n


async def broken(n: int) -> None:
    raise RuntimeError(f"broken {n}")


@pytest.fixture
async def workload(make_manager: MakeManager) -> TaskQueueManager:
    """A queue with completed and failed tasks."""
    manager = await make_manager()
    await manager.create_queue(QueueConfig(name="q"))
    for i in range(3):
        await manager.submit_task(f"ok{i}", "q", ok, i)
    await manager.submit_task("bad", "q", broken, 1)
    for task_id in ("ok0", "ok1", "ok2", "bad"):
        await manager.wait_for_task(task_id, 10)
    return manager


async def test_status_shows_counts_consumers_and_breaker(
    workload: TaskQueueManager, redis_url: str, prefix: str
) -> None:
    """kew status prints the queue's counts and its live consumer; --json too."""
    done = kew(redis_url, prefix, "status", "q")
    assert done.returncode == 0, done.stderr
    assert "completed" in done.stdout
    assert "closed, consecutive failures: 1" in done.stdout
    assert workload.identity in done.stdout
    as_json = json.loads(kew(redis_url, prefix, "status", "q", "--json").stdout)
    assert as_json["completed_tasks"] == 3
    assert as_json["failed_tasks"] == 1
    assert as_json["consumers"] == [
        {"name": workload.identity, "pending": 0, "alive": True}
    ]


async def test_history_prints_a_timeline_with_the_error(
    workload: TaskQueueManager, redis_url: str, prefix: str
) -> None:
    """kew history shows the task's events and its error, or JSON lines."""
    done = kew(redis_url, prefix, "history", "bad")
    assert done.returncode == 0, done.stderr
    for word in ("task.submitted", "task.started", "task.failed", "broken 1"):
        assert word in done.stdout
    lines = kew(redis_url, prefix, "history", "bad", "--json").stdout.splitlines()
    assert [json.loads(line)["type"] for line in lines] == [
        "task.submitted",
        "task.started",
        "task.failed",
    ]
    missing = kew(redis_url, prefix, "history", "ghost")
    assert missing.returncode == 1
    assert "ghost" in missing.stderr
    assert "Traceback" not in missing.stderr


async def test_tail_filters_by_type(
    workload: TaskQueueManager, redis_url: str, prefix: str
) -> None:
    """kew tail shows the newest events, filtered by a type prefix."""
    done = kew(redis_url, prefix, "tail", "q", "--type", "task.failed", "--json")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(e["type"], e["task_id"]) for e in events] == [("task.failed", "bad")]


async def test_replay_shows_the_queue_as_of_an_instant(
    workload: TaskQueueManager, redis_url: str, prefix: str
) -> None:
    """kew replay folds the log up to the given time.

    A task deferred by an hour cannot start, so as of its submission it is
    queued whatever the timing; it is cancelled afterwards, so now it is not.
    """
    await workload.submit_task("later", "q", ok, 9, _defer_by=3600)
    submitted = (await workload.get_task_history("later"))[0]
    # The log's clock is the server's, in milliseconds: cancel in a later one.
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while await server_ms(workload) <= submitted.ms:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.001)
    await workload.cancel_task("later")
    at = submitted.time.isoformat()
    done = kew(redis_url, prefix, "replay", "q", "--as-of", at, "--json")
    assert done.returncode == 0, done.stderr
    then = json.loads(done.stdout)
    assert (then["completed_tasks"], then["scheduled_tasks"]) == (3, 1)
    assert then["cancelled_tasks"] == 0
    now = json.loads(
        kew(redis_url, prefix, "replay", "q", "--as-of", "now", "--json").stdout
    )
    assert (now["completed_tasks"], now["scheduled_tasks"]) == (3, 0)
    assert now["cancelled_tasks"] == 1
    bad_time = kew(redis_url, prefix, "replay", "q", "--as-of", "yesterday")
    assert bad_time.returncode == 2
    assert "not a time" in bad_time.stderr


async def test_verify_fails_on_a_tampered_projection_and_rebuild_repairs_it(
    workload: TaskQueueManager, redis_url: str, prefix: str, client: aioredis.Redis
) -> None:
    """kew verify exits 1 naming the difference; kew rebuild fixes it."""
    assert kew(redis_url, prefix, "verify", "q").returncode == 0
    await client.hset(QueueKeys(prefix, "q").task("ok1"), "result", "666")
    done = kew(redis_url, prefix, "verify", "q")
    assert done.returncode == 1
    assert "task ok1" in done.stdout
    assert "result" in done.stdout
    rebuilt = kew(redis_url, prefix, "rebuild", "q")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "Rebuilt" in rebuilt.stdout
    assert kew(redis_url, prefix, "verify", "q").returncode == 0


async def test_export_and_import_round_trip(
    workload: TaskQueueManager,
    redis_url: str,
    prefix: str,
    client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    """kew export > file; kew import file --prefix P reproduces the queue."""
    exported = kew(redis_url, prefix, "export", "q")
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert lines[0]["type"] == "queue.configured"
    assert all("id" in line and "time" in line for line in lines)
    path = tmp_path / "q.jsonl"
    path.write_text(exported.stdout)

    copy = f"{prefix}:copy"
    done = kew(redis_url, prefix, "import", str(path), "--prefix", copy)
    assert done.returncode == 0, done.stderr
    assert f"Imported {len(lines)} events" in done.stdout
    assert kew(redis_url, copy, "verify", "q").returncode == 0
    history = kew(redis_url, copy, "history", "bad", "--json").stdout.splitlines()
    assert json.loads(history[-1])["error"] == "broken 1"

    again = kew(
        redis_url, prefix, "import", "-", "--prefix", copy, stdin=path.read_text()
    )
    assert again.returncode == 1
    assert "empty prefix" in again.stderr

    one = kew(redis_url, prefix, "export", "q", "--task", "ok2").stdout.splitlines()
    assert {json.loads(line)["task_id"] for line in one} == {"ok2"}


async def test_retention_command_archives_and_trims(
    make_manager: MakeManager, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """kew retention archives old events to a file, then history reads both."""
    manager = await make_manager()
    await manager.create_queue(QueueConfig(name="q", retention_seconds=0.001))
    await manager.submit_task("old", "q", ok, 1)
    await manager.wait_for_task("old", 10)
    archive = tmp_path / "archive.jsonl"
    done = kew(redis_url, prefix, "retention", "q", "--archive", str(archive))
    assert done.returncode == 0, done.stderr
    assert "Archived 4 events" in done.stdout
    gone = kew(redis_url, prefix, "history", "old")
    assert gone.returncode == 1
    merged = kew(
        redis_url, prefix, "history", "old", "--archive", str(archive), "--json"
    )
    assert merged.returncode == 0, merged.stderr
    assert len(merged.stdout.splitlines()) == 3


async def test_verify_prints_json(
    workload: TaskQueueManager, redis_url: str, prefix: str, client: aioredis.Redis
) -> None:
    """kew verify --json: whether the projections agree, and each difference
    with its key, fields, stored and folded values; exit 1 on a difference."""
    agreed = kew(redis_url, prefix, "verify", "q", "--json")
    assert agreed.returncode == 0, agreed.stderr
    assert json.loads(agreed.stdout) == {
        "queue": "q",
        "agree": True,
        "differences": [],
    }

    await client.hset(QueueKeys(prefix, "q").task("ok1"), "result", "666")
    differs = kew(redis_url, prefix, "verify", "q", "--json")
    assert differs.returncode == 1
    report = json.loads(differs.stdout)
    assert report["agree"] is False
    (difference,) = report["differences"]
    assert (difference["key"], difference["fields"]) == ("task ok1", ["result"])
    assert (difference["stored"]["result"], difference["folded"]["result"]) == (
        "666",
        "1",
    )


async def test_dead_letters_list_prints_json_and_changes_nothing(
    make_manager: MakeManager, redis_url: str, prefix: str, client: aioredis.Redis
) -> None:
    """kew dead-letters list --json prints one object a dead letter; listing
    does not prune consumers (a gone consumer that holds nothing, which a
    manager's cleanup_on_start would remove, is still there)."""
    creator = await make_manager(consume=False)
    await creator.create_queue(
        QueueConfig(name="q", max_deliveries=1, lease_seconds=0.1)
    )
    await creator.submit_task("d", "q", ok, 1)
    # Read by a consumer that then vanishes; the next one finds the entry
    # lapsed, delivered twice with max_deliveries=1: a dead letter.
    ready = QueueKeys(prefix, "q").ready("medium")
    assert await client.xreadgroup("workers", "ghost", {ready: ">"}, count=1)
    consumer = await make_manager()
    await consumer.attach_queue("q")
    await consumer.wait_for_task("d", timeout=TIMEOUT)
    await client.xgroup_createconsumer(ready, "workers", "idle-ghost")

    listed = kew(redis_url, prefix, "dead-letters", "list", "q", "--json")

    assert listed.returncode == 0, listed.stderr
    letters = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(x["task_id"], x["previous"]) for x in letters] == [("d", "ghost")]
    names = {c["name"] for c in await client.xinfo_consumers(ready, "workers")}
    assert "idle-ghost" in names


async def test_retention_says_which_task_holds_the_trim_point(
    make_manager: MakeManager, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """A task deferred by an hour holds the trim point: kew retention archives
    what is before its submission, and says which task keeps the rest, since
    when and why; --json gives the same as fields."""
    manager = await make_manager()
    await manager.create_queue(QueueConfig(name="q", retention_seconds=0.001))
    await manager.submit_task("old", "q", ok, 1)
    await manager.wait_for_task("old", 10)
    await manager.submit_task("later", "q", ok, 2, _defer_by=3600)
    await manager.submit_task("young", "q", ok, 3)
    await manager.wait_for_task("young", 10)
    since = (await manager.get_task_history("later"))[0].time
    archive = tmp_path / "archive.jsonl"

    done = kew(redis_url, prefix, "retention", "q", "--archive", str(archive))
    again = kew(
        redis_url, prefix, "retention", "q", "--archive", str(archive), "--json"
    )

    assert done.returncode == 0, done.stderr
    assert "Archived 4 events" in done.stdout
    assert "task 'later' holds the trim point since" in done.stdout
    assert "(it is still scheduled)" in done.stdout
    report = json.loads(again.stdout)
    assert (report["archived"], report["kept"]) == (0, 4)
    assert (report["held_by"], report["held_because"]) == (
        "later",
        "it is still scheduled",
    )
    assert datetime.fromisoformat(report["held_since"]) == since


async def test_history_says_when_its_limit_left_events_out(
    make_manager: MakeManager, redis_url: str, prefix: str
) -> None:
    """get_task_history(limit=N) keeps the newest N events (it follows the
    chain back from the last); kew history --limit N says on stderr that
    older events were left out, and says nothing when none were."""
    manager = await make_manager()
    await manager.create_queue(QueueConfig(name="q", retry_delay=0, max_retries=2))
    await manager.submit_task("t", "q", broken, 1)
    await manager.wait_for_task("t", 10)
    whole = await manager.get_task_history("t")
    newest = await manager.get_task_history("t", limit=3)
    assert [e.id for e in newest] == [e.id for e in whole[-3:]]

    cut = kew(redis_url, prefix, "history", "t", "--limit", "3", "--json")
    full = kew(redis_url, prefix, "history", "t", "--limit", str(len(whole)))

    assert cut.returncode == 0, cut.stderr
    assert len(cut.stdout.splitlines()) == 3
    assert "more than 3 events" in cut.stderr
    assert "--limit" in cut.stderr
    assert full.returncode == 0, full.stderr
    assert full.stderr == ""
    assert len(full.stdout.splitlines()) == len(whole) + 1  # and the column names
