"""Rebuild a queue's stored projections from its log, or verify them.

Known limitations: `rebuild` rewrites the hashes while it reads the log, so run
it while the queue is quiet; a task that moves during the rebuild keeps
whichever write came last. `verify` only reads and is safe at any time (a task
that moves while it runs may show up as a difference; verify again).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import redis.asyncio as aioredis

from kew import functions
from kew.errors import ConfigurationError
from kew.events import log
from kew.events.log import gc_paused
from kew.events.models import Event, TaskEvent, TaskSubmitted
from kew.keys import QueueKeys
from kew.projections.breaker import BREAKER_EVENTS, BreakerState, apply_breaker
from kew.projections.queue import count_states, same_stats
from kew.projections.task import TaskState, advance, same_hash, submitted

__all__ = [
    "Difference",
    "Folder",
    "QueueFold",
    "Snapshot",
    "fold_events",
    "fold_queue",
    "rebuild",
    "verify",
]

_CHUNK = 1000
_SCAN_COUNT = 10_000


@dataclasses.dataclass(frozen=True)
class Difference:
    """One stored projection that disagrees with the fold of the log."""

    key: str
    fields: list[str]
    stored: dict[str, str]
    folded: dict[str, str]

    def __str__(self) -> str:
        parts = [
            f"{name}: stored {self.stored.get(name)!r}, log says "
            f"{self.folded.get(name)!r}"
            for name in self.fields
        ]
        return f"{self.key}: " + "; ".join(parts)


@dataclasses.dataclass(frozen=True)
class QueueFold:
    tasks: dict[str, TaskState]
    stats: dict[str, int]
    breaker: BreakerState | None
    events: int
    last_id: str | None = None
    """The last event folded (None if the live log held none)."""
    snapshot: Snapshot | None = None
    """What retention had trimmed before the fold, folded in first."""

    @property
    def existed(self) -> bool:
        """Did the queue have any event up to the end of the fold?"""
        return self.events > 0 or self.snapshot is not None

    @property
    def schedule(self) -> dict[str, int]:
        """The schedule: task id -> due time (ms) of each deferred task and
        each retry waiting for its delay."""
        return {
            t.task_id: t.due_at
            for t in self.tasks.values()
            if t.state in ("scheduled", "retry") and t.due_at is not None
        }

    @property
    def ended(self) -> dict[str, str]:
        """The index of ended tasks: task id -> its last event id."""
        return {t.task_id: t.last_event for t in self.tasks.values() if t.finished}


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What the retention policy trimmed from the head of the log, folded: the
    count of its (all ended) tasks by state and the breaker as it stood at
    `through`, the last trimmed event. Folds of the live log start from it."""

    through: str
    stats: dict[str, int]
    breaker: BreakerState | None
    events: int

    def to_hash(self) -> dict[str, str]:
        return {
            "through": self.through,
            "stats": json.dumps(self.stats, sort_keys=True),
            "breaker": json.dumps(
                dataclasses.asdict(self.breaker) if self.breaker else None
            ),
            "events": str(self.events),
        }

    @classmethod
    def from_hash(cls, fields: dict[str, str]) -> Snapshot | None:
        if not fields:
            return None
        breaker = json.loads(fields["breaker"])
        return cls(
            through=fields["through"],
            stats={k: int(v) for k, v in json.loads(fields["stats"]).items()},
            breaker=BreakerState(**breaker) if breaker else None,
            events=int(fields["events"]),
        )


class Folder:
    """Folds events, in log order, into every projection of their queue,
    starting from the snapshot of what was trimmed, if any."""

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self.snapshot = snapshot
        self.tasks: dict[str, TaskState] = {}
        self.breaker: BreakerState | None = snapshot.breaker if snapshot else None
        self.events = 0
        self.last_id: str | None = None
        self.replaced: Counter[str] = Counter()
        """Tasks whose id was submitted again (after their record expired),
        by the state they were left in: the stats hash still counts them."""

    def feed(self, events: Iterable[Event]) -> None:
        # The hot loop of a rebuild: locals only, a dict lookup or two per event.
        tasks = self.tasks
        breaker = self.breaker
        event: Event | None = None
        count = 0
        for event in events:
            count += 1
            if isinstance(event, TaskSubmitted):  # never a breaker event
                earlier = tasks.get(event.task_id)
                if earlier is not None:  # an id reused after its record expired
                    self.replaced[earlier.state] += 1
                tasks[event.task_id] = submitted(event)
                continue
            task_id = event.task_id
            task = tasks.get(task_id) if task_id else None
            if type(event) in BREAKER_EVENTS:
                breaker = apply_breaker(breaker, event, task)
            if task is not None and isinstance(event, TaskEvent):
                advance(task, event)
        self.events += count
        self.breaker = breaker
        if event is not None:
            self.last_id = event.id

    def result(self) -> QueueFold:
        stats = count_states(self.tasks.values())
        earlier = [self.replaced, self.snapshot.stats if self.snapshot else {}]
        for counts in earlier:
            for state, count in counts.items():
                stats[state] = stats.get(state, 0) + count
        return QueueFold(
            self.tasks, stats, self.breaker, self.events, self.last_id, self.snapshot
        )


def fold_events(events: Iterable[Event]) -> QueueFold:
    """Fold events, in log order, into every projection of their queue."""
    folder = Folder()
    folder.feed(events)
    return folder.result()


async def fold_queue(
    client: aioredis.Redis, keys: QueueKeys, *, end: str = "+"
) -> QueueFold:
    """Fold a queue's whole log (up to `end`) into its projections."""
    folder = Folder(await _snapshot(client, keys, end))
    # The fold keeps one state per task; a full collection rescans all of them,
    # and with millions of tasks the collector would take half the time. The
    # states and events hold no reference cycles, so nothing is lost by
    # pausing it for the fold.
    with gc_paused():
        async for events in log.fold_pages(client, keys.log, end=end):
            folder.feed(events)
    return folder.result()


async def _snapshot(
    client: aioredis.Redis, keys: QueueKeys, end: str
) -> Snapshot | None:
    snapshot = Snapshot.from_hash(
        cast(dict[str, str], await functions.guarded(client.hgetall(keys.snapshot)))
    )
    if snapshot is not None and end != "+" and _before(end, snapshot.through):
        raise ConfigurationError(
            f"The log of queue {keys.queue!r} before {snapshot.through} was "
            "archived and trimmed by its retention policy: to look that far back, "
            "import the archive and an export of the log into an empty prefix "
            "(kew import FILE --prefix P) and ask there."
        )
    return snapshot


async def _stored_hashes(
    client: aioredis.Redis, keys: QueueKeys, task_ids: list[str]
) -> AsyncIterator[tuple[list[str], list[dict[str, str]]]]:
    """The stored hashes of tasks ({} for a task with none), `_CHUNK` tasks
    a call, as (task ids, their hashes); the server reads the next chunk
    while the caller works on this one."""

    async def read(chunk: list[str]) -> list[list[str]]:
        task_keys = [keys.task(task_id) for task_id in chunk]
        reply = await functions.call(client, "hashes", task_keys, [], readonly=True)
        return cast(list[list[str]], reply)

    chunks = [task_ids[i : i + _CHUNK] for i in range(0, len(task_ids), _CHUNK)]
    pending = await functions.in_flight(read(chunks[0])) if chunks else None
    try:
        for i, chunk in enumerate(chunks):
            assert pending is not None
            replies = await pending
            pending = None
            if i + 1 < len(chunks):
                pending = await functions.in_flight(read(chunks[i + 1]))
            yield chunk, [dict(zip(f[::2], f[1::2], strict=True)) for f in replies]
    finally:
        if pending is not None:
            pending.cancel()


_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


async def _stray_tasks(
    client: aioredis.Redis, keys: QueueKeys, folded: QueueFold
) -> dict[str, dict[str, str]]:
    """Task records of the queue that the log knows nothing of (by a SCAN of
    the queue's own task keys): not folded, not archived by retention, and not
    newer than the fold (a task submitted while it ran is not a stray)."""
    pattern = _GLOB_SPECIAL.sub(r"\\\1", keys.task_prefix) + "*"
    start, tasks = len(keys.task_prefix), folded.tasks
    unknown: list[str] = []

    async def scan(cursor: int) -> tuple[int, list[str]]:
        reply = await functions.guarded(
            client.scan(cursor, match=pattern, count=_SCAN_COUNT)
        )
        return cast(tuple[int, list[str]], reply)

    cursor, found = await scan(0)
    while True:
        # The next batch is scanned while this one is checked.
        following = asyncio.ensure_future(scan(cursor)) if cursor else None
        unknown += [t for key in found if (t := key[start:]) not in tasks]
        if following is None:
            break
        cursor, found = await following
    strays: dict[str, dict[str, str]] = {}
    through = folded.snapshot.through if folded.snapshot else None
    async for chunk, hashes in _stored_hashes(client, keys, unknown):
        for task_id, stored in zip(chunk, hashes, strict=True):
            last = stored.get("last_event")
            if last and through and not _later(last, through):
                continue  # its events were archived and trimmed; the record remains
            if last and folded.last_id and _later(last, folded.last_id):
                continue  # submitted after the fold read the log
            if stored:
                strays[task_id] = stored
    return strays


def _later(entry_id: str, other: str) -> bool:
    a_ms, _, a_seq = entry_id.partition("-")
    b_ms, _, b_seq = other.partition("-")
    return (int(a_ms), int(a_seq or 0)) > (int(b_ms), int(b_seq or 0))


async def _stored_schedule(client: aioredis.Redis, keys: QueueKeys) -> dict[str, int]:
    reply = await functions.guarded(client.zrange(keys.sched, 0, -1, withscores=True))
    return {member: int(score) for member, score in cast(list[Any], reply)}


async def _hash(client: aioredis.Redis, key: str) -> dict[str, str]:
    return cast(dict[str, str], await functions.guarded(client.hgetall(key)))


async def verify(client: aioredis.Redis, keys: QueueKeys) -> list[Difference]:
    """Compare every stored projection of a queue with the fold of its log.

    A finished task whose record has expired is not a difference: expiry is
    the record's lifetime, not a disagreement with history. A task record the
    log knows nothing of is one, and so is a schedule that disagrees with the
    due times of the deferred tasks and retries."""
    folded = await fold_queue(client, keys)
    tasks = folded.tasks
    differences: list[Difference] = []
    async for chunk, hashes in _stored_hashes(client, keys, list(tasks)):
        for task_id, stored in zip(chunk, hashes, strict=True):
            state = tasks[task_id]
            if not stored and state.finished:
                continue
            expected = state.to_hash()
            if stored == expected:
                continue  # the common case, without comparing field by field
            fields = same_hash(stored, expected)
            if fields:
                differences.append(
                    Difference(f"task {task_id}", fields, stored, expected)
                )

    for task_id, stored in (await _stray_tasks(client, keys, folded)).items():
        fields = ["state"] if "state" in stored else sorted(stored)
        differences.append(Difference(f"task {task_id}", fields, stored, {}))

    stored_schedule = await _stored_schedule(client, keys)
    schedule = folded.schedule
    fields = sorted(
        name
        for name in set(stored_schedule) | set(schedule)
        if stored_schedule.get(name) != schedule.get(name)
    )
    if fields:
        differences.append(
            Difference("sched", fields, _mapping(stored_schedule), _mapping(schedule))
        )

    stored_breaker = await _hash(client, keys.breaker)
    expected_breaker = folded.breaker.to_hash() if folded.breaker else {}
    fields = same_hash(stored_breaker, expected_breaker)
    if fields:
        differences.append(
            Difference("breaker", fields, stored_breaker, expected_breaker)
        )

    stored_ended = await _hash(client, keys.ended)
    ended = folded.ended  # computed on each access: take it once
    fields = sorted(
        name
        for name in set(stored_ended) | set(ended)
        if stored_ended.get(name) != ended.get(name)
    )
    if fields:
        differences.append(Difference("ended", fields, stored_ended, ended))

    stored_stats = await _hash(client, keys.stats)
    fields = same_stats(stored_stats, folded.stats)
    if fields:
        differences.append(
            Difference(
                "stats",
                fields,
                stored_stats,
                {k: str(v) for k, v in folded.stats.items()},
            )
        )
    return differences


async def rebuild(
    client: aioredis.Redis, keys: QueueKeys, *, expiry_seconds: int
) -> QueueFold:
    """Rewrite every projection of a queue from its log. A finished task gets
    the rest of its lifetime as TTL; one whose lifetime is over is removed, and
    so is a task record the log knows nothing of. The schedule is set to the
    due times of the deferred tasks and retries."""
    folded = await fold_queue(client, keys)
    # Task records the log knows nothing of are looked for while the folded
    # ones are written (neither changes what the other reads).
    looking = asyncio.ensure_future(_stray_tasks(client, keys, folded))
    try:
        states = list(folded.tasks.values())
        await _restore(client, keys, states, expiry_seconds * 1000)
    except BaseException:
        looking.cancel()
        raise
    strays = await looking
    stored_schedule = await _stored_schedule(client, keys)
    schedule = folded.schedule
    # A member the fold does not know may be a task deferred while this ran:
    # only members of known (or stray) tasks are taken out.
    unscheduled = [
        task_id
        for task_id in stored_schedule
        if task_id not in schedule and (task_id in folded.tasks or task_id in strays)
    ]
    async with client.pipeline(transaction=True) as pipe:
        for i in range(0, len(strays), _CHUNK):
            pipe.delete(*[keys.task(t) for t in list(strays)[i : i + _CHUNK]])
        if unscheduled:
            pipe.zrem(keys.sched, *unscheduled)
        if schedule:
            pipe.zadd(keys.sched, cast(Any, schedule))
        pipe.delete(keys.stats, keys.breaker, keys.ended)
        ended = folded.ended
        if ended:
            pipe.hset(keys.ended, mapping=_mapping(ended))
        if folded.stats:
            pipe.hset(keys.stats, mapping=_mapping(folded.stats))
        if folded.breaker is not None:
            pipe.hset(keys.breaker, mapping=_mapping(folded.breaker.to_hash()))
        await functions.guarded(pipe.execute())
    return folded


async def _restore(
    client: aioredis.Redis, keys: QueueKeys, states: list[TaskState], expiry_ms: int
) -> None:
    """Write task states with the `restore` function, `_CHUNK` a call, the
    server writing one chunk while the next is rendered."""
    now_ms = int(time.time() * 1000)
    pending: asyncio.Future[Any] | None = None
    for i in range(0, len(states), _CHUNK):
        chunk = states[i : i + _CHUNK]
        args: list[str | int] = []
        for state in chunk:
            ttl = 0
            finished_at = state.finished_at
            if finished_at is not None and state.finished and not state.dead_letter:
                ttl = max(finished_at + expiry_ms - now_ms, -1)
            fields = state.hash_fields()
            args += (ttl, len(fields) // 2)
            args += fields
        task_keys = [*keys.queue_keys, *(keys.task(s.task_id) for s in chunk)]
        if pending is not None:
            await pending
        pending = await functions.in_flight(
            functions.call(client, "restore", task_keys, args)
        )
    if pending is not None:
        await pending


def _before(end: str, entry_id: str) -> bool:
    """Does a range ending at `end` (an id or bare ms) stop before `entry_id`?"""
    end_ms, _, end_seq = end.partition("-")
    ms, _, seq = entry_id.partition("-")
    return (int(end_ms), int(end_seq or 2**63)) < (int(ms), int(seq))


def _mapping(fields: dict[str, Any]) -> Any:
    """redis-py's hset annotation wants its own key types; a str dict is fine."""
    return {name: str(value) for name, value in fields.items()}
