"""The event log and the projections folded from it."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from kew import (
    QueueConfig,
    ServerError,
    TaskAlreadyExistsError,
    TaskQueueManager,
    TaskStatus,
    functions,
)
from kew.events import (
    Event,
    TaskFailed,
    TaskStarted,
    TaskSubmitted,
    TaskSucceeded,
    codec,
    decode,
    encode,
)
from kew.events import models as models_module
from kew.events.log import read
from kew.events.models import EVENT_TYPES, TaskDeadLettered, TaskEvent
from kew.keys import QueueKeys
from kew.projections import TaskState, apply, fold, fold_queue

from .conftest import eventually

MakeManager = Callable[..., Awaitable[TaskQueueManager]]


async def add(a: int, b: int) -> int:
    return a + b


async def fail(reason: str) -> None:
    raise RuntimeError(reason)


async def _events(client: aioredis.Redis, prefix: str, queue: str = "q") -> list[Event]:
    return [e async for e in read(client, QueueKeys(prefix, queue).log)]


async def test_log_holds_one_event_per_transition_in_order(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """submitted, started, succeeded: one event each, chained by `prev`."""
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("t", "q", add, 2, b=3)
    await manager.wait_for_task("t", 10)

    events = [e for e in await _events(client, prefix) if e.task_id == "t"]
    assert [e.type for e in events] == [
        "task.submitted",
        "task.started",
        "task.succeeded",
    ]
    submitted, started, succeeded = events
    assert isinstance(submitted, TaskSubmitted)
    assert submitted.args == [2]
    assert submitted.kwargs == {"b": 3}
    assert submitted.prev is None
    assert submitted.attempt == 0
    assert submitted.actor == manager.identity
    assert isinstance(started, TaskStarted)
    assert started.prev == submitted.id
    assert started.attempt == 1
    assert started.actor == manager.identity
    assert isinstance(succeeded, TaskSucceeded)
    assert succeeded.prev == started.id
    assert succeeded.result == 5
    assert submitted.time <= started.time <= succeeded.time

    stored = await client.hgetall(QueueKeys(prefix, "q").task("t"))
    assert stored["last_event"] == succeeded.id
    assert stored["version"] == "3"


async def test_log_fields_are_readable_with_plain_xrange(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """The stream's fields are flat words; only `data` holds JSON."""
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("f", "q", fail, "broken pipe")
    await manager.wait_for_task("f", 10)
    entries = await client.xrange(QueueKeys(prefix, "q").log)
    failed = [fields for _, fields in entries if fields["type"] == "task.failed"]
    assert len(failed) == 1
    assert set(failed[0]) == {
        "type",
        "v",
        "task_id",
        "prev",
        "attempt",
        "actor",
        "data",
    }
    assert json.loads(failed[0]["data"]) == {
        "error": "broken pipe",
        "error_type": "RuntimeError",
        "retry": False,
    }


async def test_rebuilt_projection_equals_stored_after_mixed_workload(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """Successes, failures and rejected duplicates: the fold of the log equals
    the stored task hashes and stats, field for field."""
    worker = await make_manager()
    submitter = await make_manager(consume=False)
    await worker.create_queue(QueueConfig(name="q", max_workers=5))
    for i in range(30):
        if i % 4 == 0:
            await submitter.submit_task(f"t{i}", "q", fail, f"reason {i}")
        else:
            await submitter.submit_task(f"t{i}", "q", add, i, b=i)
    for i in range(0, 30, 3):
        with pytest.raises(TaskAlreadyExistsError):
            await submitter.submit_task(f"t{i}", "q", add, 0, b=0)
    infos = await asyncio.gather(
        *(submitter.wait_for_task(f"t{i}", 10) for i in range(30))
    )
    assert sum(i.status is TaskStatus.FAILED for i in infos) == 8

    assert await worker.verify_projections("q") == []
    keys = QueueKeys(prefix, "q")
    folded = await fold_queue(client, keys)
    assert len(folded.tasks) == 30
    for task_id, state in folded.tasks.items():
        stored = await client.hgetall(keys.task(task_id))
        assert TaskState.from_hash(task_id, stored) == state
    assert folded.stats == {"completed": 22, "failed": 8}

    # A projection edited by hand is reported, and a rebuild repairs it.
    await client.hset(keys.task("t1"), "state", "failed")
    await client.hincrby(keys.stats, "completed", 5)
    differences = await worker.verify_projections("q")
    assert [d.key for d in differences] == ["task t1", "stats"]
    assert differences[0].fields == ["state"]
    assert await worker.rebuild_projections("q") == folded.events
    assert await worker.verify_projections("q") == []
    assert (await worker.get_task_status("t1")).status is TaskStatus.COMPLETED


async def test_an_id_reused_after_its_record_expired_keeps_log_and_projections_agreed(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """A second task under an expired task's id: the stats count both, the
    index of ended tasks forgets the first at the second submit, and verify
    and rebuild agree with what the functions wrote, while it runs and after."""
    manager = await make_manager(task_expiry_seconds=1)
    await manager.create_queue(QueueConfig(name="q"))
    keys = QueueKeys(prefix, "q")
    await manager.submit_task("again", "q", add, 1, b=1)
    await manager.wait_for_task("again", 10)

    async def expired() -> bool:
        return await client.exists(keys.task("again")) == 0

    await eventually(expired, what="the first task's record to expire")
    gate = asyncio.Event()

    async def held() -> str:
        await gate.wait()
        return "second"

    await manager.submit_task("again", "q", held)
    await eventually(
        lambda: _has_status(manager, "again", TaskStatus.PROCESSING),
        what="the second task to start",
    )
    assert await manager.verify_projections("q") == []
    gate.set()
    assert (await manager.wait_for_task("again", 10)).result == "second"

    stats = await client.hgetall(keys.stats)
    assert _nonzero(stats) == {"completed": "2"}
    assert await manager.verify_projections("q") == []
    ended = await client.hgetall(keys.ended)
    await manager.rebuild_projections("q")
    assert await manager.verify_projections("q") == []
    assert _nonzero(await client.hgetall(keys.stats)) == _nonzero(stats)
    assert await client.hgetall(keys.ended) == ended


async def test_verify_turns_a_server_error_into_a_kew_error(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """Each projection verify reads, overwritten by hand with a value of the
    wrong type, gives a ServerError (not redis-py's error); a rebuild then
    repairs it."""
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("t", "q", fail, "once")
    await manager.wait_for_task("t", 10)
    keys = QueueKeys(prefix, "q")
    for key in (keys.task("t"), keys.breaker, keys.ended, keys.stats):
        await client.delete(key)
        await client.set(key, "not a hash")
        with pytest.raises(ServerError, match="WRONGTYPE"):
            await manager.verify_projections("q")
        await manager.rebuild_projections("q")
        assert await manager.verify_projections("q") == [], key


def _nonzero(stats: dict[str, str]) -> dict[str, str]:
    return {state: count for state, count in stats.items() if count != "0"}


async def _has_status(
    manager: TaskQueueManager, task_id: str, status: TaskStatus
) -> bool:
    return (await manager.get_task_status(task_id)).status is status


def test_fold_is_pure_and_ignores_other_tasks() -> None:
    """apply() builds state from events alone and leaves unrelated tasks be."""
    submitted = TaskSubmitted(
        id="1000-0",
        type="task.submitted",
        task_id="a",
        name="m:f",
        task_type="f",
        priority=2,
        args=[1],
        kwargs={},
    )
    started = TaskStarted(
        id="1001-0", type="task.started", task_id="a", attempt=1, actor="c", entry="9-0"
    )
    failed = TaskFailed(
        id="1002-0", type="task.failed", task_id="a", attempt=1, error="boom"
    )
    other = TaskStarted(id="1003-0", type="task.started", task_id="b", entry="9-1")
    state = fold([submitted, started, other, failed])["a"]
    assert state.state == "failed"
    assert state.version == 3
    assert state.attempt == 1
    assert state.owner == "c"
    assert state.error == "boom"
    assert (state.submitted_at, state.started_at, state.finished_at) == (
        1000,
        1001,
        1002,
    )
    assert apply(None, started) is None


def test_codec_round_trips_and_tolerates_unknown_input() -> None:
    """Events survive encode/decode; unknown types and fields do not break a
    reader, and old versions pass through the upcasters."""
    event = TaskSucceeded(
        id="5-1", type="task.succeeded", task_id="x", attempt=2, result={"k": [1]}
    )
    assert decode(event.id, encode(event)) == event

    future = decode("6-0", {"type": "task.teleported", "v": "3", "task_id": "x"})
    assert type(future) is Event
    assert future.type == "task.teleported"

    extra = decode(
        "7-0",
        {
            "type": "task.failed",
            "v": "1",
            "task_id": "x",
            "data": '{"error": "e", "hint": "new field"}',
        },
    )
    assert isinstance(extra, TaskFailed)
    assert extra.error == "e"


def test_fields_added_later_have_defaults_for_old_logs() -> None:
    """An event written before a field existed still decodes: task.dead_lettered
    without `previous` (added later) reads as an empty previous consumer."""
    old = decode(
        "9-0",
        {
            "type": "task.dead_lettered",
            "v": "1",
            "task_id": "x",
            "data": '{"reason":"r","deliveries":2,"entry":"1-0","dead_letter":"2-0"}',
        },
    )
    assert isinstance(old, TaskDeadLettered)
    assert old.previous == ""


def test_upcaster_upgrades_an_old_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader applies the upcaster chain for versions older than the model's."""

    def rename(raw: dict[str, Any]) -> dict[str, Any]:
        raw["error"] = raw.pop("message")
        return raw

    monkeypatch.setattr(TaskFailed, "VERSION", 2)
    monkeypatch.setitem(codec.UPCASTERS, ("task.failed", 1), rename)
    event = decode(
        "8-0",
        {"type": "task.failed", "v": "1", "task_id": "x", "data": '{"message":"m"}'},
    )
    assert isinstance(event, TaskFailed)
    assert event.error == "m"
    assert event.v == 2


async def test_queue_creation_is_logged(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """create_queue appends queue.configured with the stored configuration."""
    await manager.create_queue(QueueConfig(name="q", max_workers=3))
    (event,) = await _events(client, prefix)
    assert event.type == "queue.configured"
    assert getattr(event, "config")["max_workers"] == 3  # noqa: B009


def test_every_event_model_is_in_the_discriminated_union() -> None:
    """Each event model is a member of the union on `type`, so decoding its
    fields yields that model and not a plain Event."""

    def models(base: type[Event]) -> list[type[Event]]:
        found: list[type[Event]] = []
        for sub in base.__subclasses__():
            found += [sub, *models(sub)]
        return found

    concrete = [m for m in models(Event) if m is not TaskEvent]
    assert concrete
    for model in concrete:
        name = model.model_fields["type"].default
        assert EVENT_TYPES.get(name) is model, name
        assert model.__name__ in models_module.__all__


def _lua_versions() -> dict[str, str]:
    """The VERSIONS table of the Lua library: event type -> schema version."""
    source = functions.SOURCE
    table = re.search(r"local VERSIONS = \{(.*?)\n\}", source, re.S)
    assert table, "no VERSIONS table in the Lua library"
    return dict(re.findall(r"\['([\w.]+)'\] = '(\d+)'", table[1]))


def test_the_lua_library_writes_each_types_model_version() -> None:
    """The Lua library's VERSIONS table gives every event type the VERSION of
    its Python model, and names no type the models do not know; every event
    type the library's source mentions has a version there."""
    versions = _lua_versions()
    assert versions == {name: str(m.VERSION) for name, m in EVENT_TYPES.items()}
    mentioned = set(
        re.findall(r"'((?:task|breaker|queue)\.[a-z_]+)'", functions.SOURCE)
    )
    assert mentioned <= set(versions)


async def test_every_logged_event_carries_its_types_version(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """On a real server, each entry's `v` is the VERSION of its type's model."""
    await manager.create_queue(QueueConfig(name="q", max_retries=1, retry_delay=0))
    await manager.submit_task("ok", "q", add, 1, 2)
    await manager.submit_task("bad", "q", fail, "no")
    for task_id in ("ok", "bad"):
        await manager.wait_for_task(task_id, 10)
    entries = await client.xrange(QueueKeys(prefix, "q").log)
    seen = {fields["type"]: fields["v"] for _, fields in entries}
    assert len(seen) >= 6, seen
    assert seen == {t: str(EVENT_TYPES[t].VERSION) for t in seen}
