"""Reading status: tasks by id, queue counts, tasks in progress, housekeeping.

Read-only helpers of TaskQueueManager (pruning aside, which goes through a
function of the library); each takes the client and the names it needs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

import redis.asyncio as aioredis

from kew import functions
from kew.errors import ConfigurationError, ServerError, TaskNotFoundError
from kew.events.codec import decode
from kew.events.models import Event, entry_time
from kew.functions import guarded
from kew.keys import GROUP, QueueKeys
from kew.models import QueueConfig, QueuePriority, TaskInfo, TaskStatus
from kew.projections.rebuild import QueueFold

__all__ = [
    "consumers",
    "find_task",
    "history",
    "locate_task",
    "ongoing_tasks",
    "prune_consumers",
    "queue_status",
    "queue_status_as_of",
    "task_info",
]

logger = logging.getLogger(__name__)


def task_info(queue: str, task_id: str, fields: Mapping[str, str]) -> TaskInfo:
    """A task's status from the fields of its hash."""

    def when(name: str) -> datetime | None:
        value = fields.get(name)
        return datetime.fromtimestamp(int(value) / 1000, UTC) if value else None

    result = fields.get("result")
    return TaskInfo.model_validate(
        {
            "task_id": task_id,
            "queue_name": queue,
            "task_type": fields.get("task_type", ""),
            "task_name": fields.get("name", ""),
            "priority": int(fields.get("priority", QueuePriority.MEDIUM)),
            "status": TaskStatus.of_state(fields["state"]),
            "due_time": when("due_at"),
            "cancel_requested": fields.get("cancel_requested") == "1",
            "queued_time": when("submitted_at"),
            "started_time": when("started_at"),
            "completed_time": when("finished_at"),
            "result": json.loads(result) if result else None,
            "error": fields.get("error"),
            "attempt": int(fields.get("attempt", 0)),
            "retry_count": int(fields.get("retries", 0)),
            "version": int(fields.get("version", 0)),
        }
    )


async def find_task(
    client: aioredis.Redis,
    prefix: str,
    task_id: str,
    candidates: list[str],
    queue_name: str | None = None,
) -> tuple[str, dict[str, str]]:
    """The queue a task is in, and its hash: in `queue_name` if given, else in
    whichever of `candidates` holds it (one pipelined round trip)."""
    if queue_name is not None:
        fields = await guarded(
            client.hgetall(QueueKeys(prefix, queue_name).task(task_id))
        )
        if not fields:
            raise TaskNotFoundError(
                f"Task {task_id!r} is not in queue {queue_name!r}: it was never "
                "submitted there, or its record expired. Check the id and the "
                "queue (or leave queue_name out to search every queue); the "
                "events of an expired task are still in get_task_history()."
            )
        return queue_name, cast(dict[str, str], fields)
    async with client.pipeline(transaction=False) as pipe:
        for name in candidates:
            pipe.hgetall(QueueKeys(prefix, name).task(task_id))
        replies = cast(list[dict[str, str]], await guarded(pipe.execute()))
    found = [(n, f) for n, f in zip(candidates, replies, strict=True) if f]
    if not found:
        raise TaskNotFoundError(
            f"No task {task_id!r} under prefix {prefix!r}: it was never submitted, "
            "or its record expired (task_expiry_seconds after it ended). Check "
            "the id and the key prefix (key_prefix= or KEW_KEY_PREFIX); the "
            "events of an expired task are still in get_task_history()."
        )
    if len(found) > 1:
        raise ConfigurationError(
            f"Task id {task_id!r} exists in queues "
            f"{', '.join(n for n, _ in found)}; pass queue_name= to choose one."
        )
    return found[0]


async def locate_task(
    client: aioredis.Redis, prefix: str, task_id: str, candidates: list[str]
) -> str | None:
    """The queue that has a record of the task, or an ended-task index entry
    for it (the record may have expired), or None."""
    async with client.pipeline(transaction=False) as pipe:
        for name in candidates:
            keys = QueueKeys(prefix, name)
            pipe.exists(keys.task(task_id))
            pipe.hexists(keys.ended, task_id)
        replies = cast(list[int], await guarded(pipe.execute()))
    for i, name in enumerate(candidates):
        if replies[2 * i] or replies[2 * i + 1]:
            return name
    return None


async def history(
    client: aioredis.Redis, keys: QueueKeys, task_id: str, limit: int
) -> list[Event]:
    """A task's events, oldest first (see the `history` function)."""
    reply = cast(
        list[tuple[str, list[str]]],
        await functions.call(
            client,
            "history",
            [keys.log, keys.task(task_id), keys.ended],
            [task_id, limit],
            readonly=True,
        ),
    )
    events = [
        decode(entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))
        for entry_id, flat in reply
    ]
    events.reverse()
    return events


def queue_status_as_of(
    folded: QueueFold, config: QueueConfig, at: datetime
) -> dict[str, Any]:
    """The queue as a fold of its log up to an instant says it was."""
    count = folded.stats
    breaker = folded.breaker
    until = breaker.until if breaker else 0
    running = sorted(
        t.task_id for t in folded.tasks.values() if t.state == "processing"
    )
    return {
        "name": config.name,
        "as_of": at,
        "max_workers": config.max_workers,
        "queued_tasks": count.get("queued", 0) + count.get("scheduled", 0),
        "scheduled_tasks": count.get("scheduled", 0),
        "processing_tasks": count.get("processing", 0),
        "retry_tasks": count.get("retry", 0),
        "completed_tasks": count.get("completed", 0),
        "failed_tasks": count.get("failed", 0),
        "cancelled_tasks": count.get("cancelled", 0),
        "running_tasks": running,
        "circuit_breaker_status": breaker.state if breaker else "closed",
        "circuit_breaker_failures": breaker.failures if breaker else 0,
        "circuit_breaker_open_until": entry_time(f"{until}-0") if until else None,
        "events": folded.events,
    }


async def queue_status(
    client: aioredis.Redis, keys: QueueKeys, config: QueueConfig, busy: int
) -> dict[str, Any]:
    """What get_queue_status returns (see there)."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.stats)
        pipe.hgetall(keys.breaker)
        pipe.xlen(keys.dlq)
        stats, breaker, dead = cast(
            tuple[dict[str, str], dict[str, str], int], await guarded(pipe.execute())
        )
    count = {name: int(value) for name, value in stats.items()}
    until = int(breaker.get("until", 0))
    return {
        "name": keys.queue,
        "max_workers": config.max_workers,
        "max_size": config.max_size,
        "priority": config.priority.name.lower(),
        "current_workers": busy,
        "queued_tasks": count.get("queued", 0) + count.get("scheduled", 0),
        "scheduled_tasks": count.get("scheduled", 0),
        "processing_tasks": count.get("processing", 0),
        "retry_tasks": count.get("retry", 0),
        "completed_tasks": count.get("completed", 0),
        "failed_tasks": count.get("failed", 0),
        "cancelled_tasks": count.get("cancelled", 0),
        "dead_letters": int(dead),
        "circuit_breaker_status": breaker.get("state", "closed"),
        "circuit_breaker_failures": int(breaker.get("failures", 0)),
        "circuit_breaker_open_until": entry_time(f"{until}-0") if until else None,
    }


async def ongoing_tasks(client: aioredis.Redis, keys: QueueKeys) -> list[TaskInfo]:
    """The queue's tasks being processed now, by any process (from the
    pending entries of its consumer group)."""
    ids: list[str] = []
    for stream in keys.ready_all:
        try:
            pending = cast(
                list[dict[str, Any]],
                await guarded(client.xpending_range(stream, GROUP, "-", "+", 100_000)),
            )
        except ServerError:
            continue  # no such stream or group: nothing pending
        async with client.pipeline(transaction=False) as pipe:
            for p in pending:
                pipe.xrange(stream, p["message_id"], p["message_id"])
            results: list[Any] = await guarded(pipe.execute())
        for entries in results:
            ids += [fields["task_id"] for _, fields in entries]
    async with client.pipeline(transaction=False) as pipe:
        for task_id in ids:
            pipe.hgetall(keys.task(task_id))
        replies = cast(list[dict[str, str]], await guarded(pipe.execute()))
    return [
        task_info(keys.queue, task_id, fields)
        for task_id, fields in zip(ids, replies, strict=True)
        if fields.get("state") == TaskStatus.PROCESSING
    ]


async def consumers(client: aioredis.Redis, keys: QueueKeys) -> list[dict[str, Any]]:
    """The queue's consumers: name, entries held, and whether its liveness key
    is there (a consumer that died keeps its name until it is pruned)."""
    held: dict[str, int] = {}
    for stream in keys.ready_all:
        try:
            infos: list[dict[str, Any]] = await guarded(
                client.xinfo_consumers(stream, GROUP)
            )
        except ServerError:
            continue
        for info in infos:
            name = str(info["name"])
            held[name] = held.get(name, 0) + int(info["pending"])
    names = sorted(held)
    async with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.exists(keys.worker(name))
        alive = cast(list[int], await guarded(pipe.execute()))
    return [
        {"name": name, "pending": held[name], "alive": bool(up)}
        for name, up in zip(names, alive, strict=True)
    ]


async def prune_consumers(client: aioredis.Redis, queues: list[QueueKeys]) -> int:
    """Remove consumers that are gone and hold nothing; returns how many."""
    removed = 0
    for keys in queues:
        consumers: set[str] = set()
        for stream in keys.ready_all:
            try:
                infos: list[dict[str, Any]] = await guarded(
                    client.xinfo_consumers(stream, GROUP)
                )
            except ServerError:
                continue
            consumers.update(str(info["name"]) for info in infos)
        for consumer in consumers:
            done = await functions.call(
                client, "prune", [*keys.queue_keys, keys.worker(consumer)], [consumer]
            )
            removed += int(done)
    if removed:
        logger.info("removed %s consumers that were gone and held nothing", removed)
    return removed
