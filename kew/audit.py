"""The log as a tool: export, import, and the retention policy.

Export writes a queue's events as JSON Lines, one event a line, exactly as the
log holds them (entry id, the flat fields, `data` as an object), plus its time
and trace id for readers. Import loads such lines into an empty prefix, with
the same entry ids, and rebuilds the projections from them: the result equals
the source's projections. It restores history for audit; it does not queue the
unfinished tasks again (their ready entries are not part of the log).

The retention policy keeps a log bounded. Events older than the queue's
`retention_seconds` are archived (appended to a JSON Lines file and fsynced,
or handed to a callback) and only then trimmed, and only at a task boundary:
the head that is trimmed holds whole tasks that have ended, never an event of
a task still open, nor of a dead-lettered task while it waits in the
dead-letter stream (it can still be requeued). What was trimmed is folded
into the queue's snapshot, so verify and rebuild still agree with the
projections. No consumer group reads the log, so no group can still need a
trimmed event.

Known limitation: the log is trimmed only at its head (XTRIM MINID), up to the
first event of the oldest task that must keep its events. So one such task
holds the trim point for the whole queue: a task deferred by an hour keeps
every event written after its submission, those of tasks that ended long ago
included, for that hour; a task that waits in the dead-letter stream holds it
until it is requeued and ends. `RetentionReport.held_by`, `held_since` and
`held_because` say which task holds it and since when (`kew retention` prints
them). Trimming the ended tasks' events around the open ones (XDEL by id)
would lift this, but the snapshot stands for a contiguous head of the log
(`Snapshot.through`): the fold of the live log starts after it, as-of refuses
instants before it, and the breaker's state at `through` assumes every event
before it was folded in. A log with holes below `through` would break all
three, so it is not done.

The archive plus the live log answer history and as-of queries together:
`read_archive` reads an archive back (`kew history TASK --archive FILE` merges
it with the live events), and importing the archive and an export of the live
log into an empty prefix rebuilds the whole history in one place.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO, cast

import redis.asyncio as aioredis

from kew import functions
from kew.errors import ConfigurationError, KewError
from kew.events.codec import decode
from kew.events.log import read_entries
from kew.events.models import Event, entry_time
from kew.functions import guarded
from kew.keys import QueueKeys, queue_directory
from kew.projections.breaker import BreakerState
from kew.projections.rebuild import Folder, Snapshot

__all__ = [
    "Archive",
    "RetentionReport",
    "apply_retention",
    "event_line",
    "export_lines",
    "import_lines",
    "read_archive",
]

logger = logging.getLogger(__name__)

Archive = Path | str | Callable[[list[Event]], Awaitable[object] | object]
"""Where trimmed events go: a JSON Lines file (appended to), or a callback."""

ENVELOPE_FIELDS = ("type", "v", "task_id", "prev", "attempt", "actor", "tp")


def event_line(queue: str, entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """One exported event: its entry id and stream fields, `data` parsed."""
    line: dict[str, Any] = {"queue": queue, "id": entry_id}
    line["time"] = entry_time(entry_id).isoformat(timespec="milliseconds")
    for name in ENVELOPE_FIELDS:
        if name in fields:
            line[name] = fields[name]
    tp = fields.get("tp")
    if tp:
        line["trace_id"] = decode(entry_id, fields).trace_id
    if "data" in fields:
        line["data"] = json.loads(fields["data"])
    return line


def line_fields(line: dict[str, Any]) -> dict[str, str]:
    """The stream fields of an exported event, as the log stores them."""
    fields = {name: str(line[name]) for name in ENVELOPE_FIELDS if name in line}
    if "data" in line:
        fields["data"] = json.dumps(line["data"], separators=(",", ":"))
    return fields


async def export_lines(
    client: aioredis.Redis,
    keys: QueueKeys,
    *,
    task_id: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """A queue's events as export lines, oldest first: all of them, one task's
    (by its chain), or those of a time window. The first line is the queue's
    snapshot, if retention trimmed its log and the whole log is exported."""
    if task_id is None and since_ms is None:
        snapshot = cast(dict[str, str], await guarded(client.hgetall(keys.snapshot)))
        if snapshot:
            # The trimmed head may have held the queue.configured events, so
            # the line carries the configuration an import needs.
            stored = cast(str | None, await guarded(client.hget(keys.config, "json")))
            line: dict[str, Any] = {"queue": keys.queue, "snapshot": snapshot}
            if stored is not None:
                line["config"] = json.loads(stored)
            yield line
    if task_id is not None:
        for entry_id, fields in await _task_entries(client, keys, task_id):
            if _within(entry_id, since_ms, until_ms):
                yield event_line(keys.queue, entry_id, fields)
        return
    start = f"{since_ms}" if since_ms is not None else "-"
    end = f"{until_ms}" if until_ms is not None else "+"
    async for entries in read_entries(client, keys.log, start=start, end=end):
        for entry_id, fields in entries:
            yield event_line(keys.queue, entry_id, fields)


async def _task_entries(
    client: aioredis.Redis, keys: QueueKeys, task_id: str
) -> list[tuple[str, dict[str, str]]]:
    reply = cast(
        list[tuple[str, list[str]]],
        await functions.call(
            client,
            "history",
            [keys.log, keys.task(task_id), keys.ended],
            [task_id, 1_000_000],
            readonly=True,
        ),
    )
    entries = [(i, dict(zip(f[::2], f[1::2], strict=True))) for i, f in reply]
    entries.reverse()
    return entries


def _within(entry_id: str, since_ms: int | None, until_ms: int | None) -> bool:
    ms = int(entry_id.partition("-")[0])
    return (since_ms is None or ms >= since_ms) and (until_ms is None or ms <= until_ms)


def read_lines(stream: TextIO) -> Iterator[dict[str, Any]]:
    """Parse JSON Lines, naming the line of any error."""
    for number, text in enumerate(stream, start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except ValueError as exc:
            raise ConfigurationError(
                f"Line {number} is not JSON ({exc}): {text[:80]!r}"
            ) from None
        if not isinstance(line, dict) or "queue" not in line:
            raise ConfigurationError(
                f"Line {number} is not an exported kew event (no 'queue'): "
                f"{text[:80]!r}"
            )
        yield cast(dict[str, Any], line)


def read_archive(path: Path | str) -> Iterator[Event]:
    """The events of an archive (or export) file, oldest first."""
    with open(path, encoding="utf-8") as stream:
        for line in read_lines(stream):
            if "id" in line:
                yield decode(line["id"], line_fields(line))


@dataclasses.dataclass
class ImportReport:
    queues: dict[str, int]
    """Events imported per queue."""
    skipped: int
    """Lines whose entry id the log already held (an archive overlapping an
    export of the live log)."""


@dataclasses.dataclass
class _QueueImport:
    """What the lines hold for one queue, checked before anything is written."""

    entries: list[tuple[str, dict[str, str]]] = dataclasses.field(
        default_factory=list[tuple[str, dict[str, str]]]
    )
    config: dict[str, Any] | None = None
    snapshot: dict[str, str] | None = None
    snapshot_config: dict[str, Any] | None = None
    skipped: int = 0


async def import_lines(
    client: aioredis.Redis, prefix: str, lines: Iterable[dict[str, Any]]
) -> ImportReport:
    """Load exported lines into `prefix`, which must hold none of their queues
    yet, then rebuild those queues' projections from the imported log.

    A bulk load of a log, not a transition: events go in with XADD and their
    original ids; the projections are then rebuilt from them by the usual
    rebuild (kew.projections.rebuild). Every line is read and checked before
    the first write, so an import that is refused writes nothing. (One that
    fails while writing, e.g. the connection drops, leaves what it wrote:
    delete the prefix's keys and import again.)
    """
    from kew.models import QueueConfig
    from kew.projections.rebuild import rebuild

    plans = _plan_import(lines)
    for queue, plan in plans.items():
        keys = QueueKeys(prefix, queue)
        if await guarded(client.exists(keys.log, keys.config)):
            raise ConfigurationError(
                f"Queue {queue!r} already exists under prefix {prefix!r}: import "
                "into an empty prefix (pick a new --prefix)."
            )
        if plan.config is None:
            plan.config = plan.snapshot_config
        if plan.config is None:
            raise KewError(
                f"The lines of queue {queue!r} hold no queue.configured event, so "
                "its configuration is unknown; export the whole log (or include "
                "the archive that holds its start)."
            )
        QueueConfig.from_stored(plan.config)  # refuse a bad one before writing

    for queue, plan in plans.items():
        keys = QueueKeys(prefix, queue)
        for i in range(0, len(plan.entries), 1000):
            await _append(client, keys, plan.entries[i : i + 1000])
        snapshot = plan.snapshot
        first = plan.entries[0][0] if plan.entries else None
        # The snapshot stands for the events before it; if they are imported
        # too (an archive ahead of the export), it would count them twice.
        if snapshot and (first is None or not _after(snapshot["through"], first)):
            await guarded(client.hset(keys.snapshot, mapping=cast(Any, snapshot)))
        stored = QueueConfig.from_stored(cast(dict[str, Any], plan.config)).to_stored()
        encoded = json.dumps(stored, sort_keys=True)
        async with client.pipeline(transaction=True) as pipe:
            pipe.hset(keys.config, mapping=cast(Any, _config_fields(stored, encoded)))
            pipe.hset(queue_directory(prefix), queue, encoded)
            for stream in keys.ready_all:
                pipe.xgroup_create(stream, "workers", id="0", mkstream=True)
            await guarded(pipe.execute())
        await rebuild(client, keys, expiry_seconds=86_400)
    return ImportReport(
        {queue: len(plan.entries) for queue, plan in plans.items()},
        sum(plan.skipped for plan in plans.values()),
    )


def _plan_import(lines: Iterable[dict[str, Any]]) -> dict[str, _QueueImport]:
    """Sort the lines by queue, in order, dropping the ones an earlier line
    already covered (an archive overlapping an export of the live log)."""
    plans: dict[str, _QueueImport] = {}
    for line in lines:
        queue = str(line["queue"])
        plan = plans.setdefault(queue, _QueueImport())
        if "snapshot" in line:
            plan.snapshot = {str(k): str(v) for k, v in line["snapshot"].items()}
            if isinstance(line.get("config"), dict):
                plan.snapshot_config = dict(line["config"])
            continue
        entry_id = str(line["id"])
        if plan.entries and not _after(entry_id, plan.entries[-1][0]):
            plan.skipped += 1
            continue
        fields = line_fields(line)
        if fields.get("type") == "queue.configured":
            plan.config = dict(line.get("data", {}).get("config", {}))
        plan.entries.append((entry_id, fields))
    return plans


def _config_fields(stored: dict[str, Any], encoded: str) -> dict[str, str]:
    fields = {"json": encoded}
    for name, value in stored.items():
        fields[name] = "" if value is None else str(value)
    return fields


async def _append(
    client: aioredis.Redis, keys: QueueKeys, entries: list[tuple[str, dict[str, str]]]
) -> None:
    async with client.pipeline(transaction=False) as pipe:
        for entry_id, fields in entries:
            pipe.xadd(keys.log, cast(Any, fields), id=entry_id)
        await guarded(pipe.execute())


def _after(entry_id: str, other: str) -> bool:
    a_ms, _, a_seq = entry_id.partition("-")
    b_ms, _, b_seq = other.partition("-")
    return (int(a_ms), int(a_seq or 0)) > (int(b_ms), int(b_seq or 0))


@dataclasses.dataclass
class RetentionReport:
    """What one application of the retention policy did, and what held it."""

    archived: int
    """Events written to the archive and trimmed from the log."""
    kept: int
    """Events older than the cutoff that stay in the log, because a task
    holds the trim point (below)."""
    through: str | None
    """The last trimmed entry id (None if nothing was trimmed)."""
    held_by: str | None = None
    """The task whose first event is the trim point, if one is: the log is
    trimmed only up to it, so every event from there on stays (those of tasks
    that ended long ago too) until it has ended and its end is older than
    the cutoff."""
    held_since: datetime | None = None
    """The time of that task's first event in the log."""
    held_because: str = ""
    """Why it holds the trim point: still open (in which state), ended after
    the cutoff, or waiting in the dead-letter stream."""


async def apply_retention(
    client: aioredis.Redis, keys: QueueKeys, retention_ms: int, archive: Archive
) -> RetentionReport:
    """Archive, then trim, the events older than `retention_ms` (see the module
    docstring for what is never trimmed)."""
    seconds, micros = await guarded(client.time())
    cutoff = int(seconds) * 1000 + int(micros) // 1000 - retention_ms
    raw: list[tuple[str, dict[str, str]]] = []
    async for entries in read_entries(client, keys.log, end=str(cutoff)):
        raw += entries
    old = [decode(entry_id, fields) for entry_id, fields in raw]
    if not old:
        return RetentionReport(0, 0, None)

    hold = await _trim_point(client, keys, old)
    floor = hold.floor if hold else _next_id(old[-1].id)
    trimmed = [e for e in old if _after(floor, e.id)]
    held = _held_fields(hold)
    if hold is not None:
        logger.info(
            "retention of queue %s: task %s holds the trim point since %s (%s)",
            keys.queue,
            hold.task_id,
            held["held_since"],
            hold.because,
        )
    if not trimmed:
        return RetentionReport(0, len(old), None, **held)

    await _write_archive(archive, keys.queue, raw[: len(trimmed)], trimmed)
    previous = Snapshot.from_hash(
        cast(dict[str, str], await guarded(client.hgetall(keys.snapshot)))
    )
    folder = Folder(previous)
    folder.feed(trimmed)
    folded = folder.result()
    breaker: BreakerState | None = folded.breaker
    snapshot = Snapshot(
        through=trimmed[-1].id,
        stats=folded.stats,
        breaker=breaker,
        events=(previous.events if previous else 0) + len(trimmed),
    )
    gone = [(t.task_id, t.last_event) for t in folded.tasks.values()]
    args: list[str] = [floor, *snapshot.to_hash().values()]
    for task_id, last_event in gone:
        args += [task_id, last_event]
    reply = cast(
        list[str],
        await functions.call(client, "trim", [*keys.queue_keys, keys.snapshot], args),
    )
    if reply[0] != "ok":
        raise KewError(
            f"Task {reply[1]!r} of queue {keys.queue!r} changed while its events "
            "were being archived (a dead letter requeued?); nothing was trimmed. "
            "Apply the retention policy again."
        )
    logger.info(
        "archived and trimmed %s events of queue %s through %s",
        len(trimmed),
        keys.queue,
        snapshot.through,
    )
    return RetentionReport(
        len(trimmed), len(old) - len(trimmed), snapshot.through, **held
    )


@dataclasses.dataclass(frozen=True)
class _Hold:
    """The task whose first old event is the trim point, and why."""

    task_id: str
    floor: str
    because: str


async def _trim_point(
    client: aioredis.Redis, keys: QueueKeys, old: list[Event]
) -> _Hold | None:
    """Of the tasks with events before the cutoff, the one with the oldest
    first event among those that must keep their events: open, ended after
    the newest old event, or waiting in the dead-letter stream. None if no
    task holds the trim point (every old event may go)."""
    first: dict[str, str] = {}
    for event in old:
        if event.task_id:
            first.setdefault(event.task_id, event.id)
    ids = list(first)
    ended = cast(
        list[str | None],
        await guarded(client.hmget(keys.ended, ids)) if ids else [],
    )
    newest = old[-1].id
    # A dead letter is in the ended index, yet it can be requeued: while it
    # waits in the dead-letter stream its task is as open as a queued one.
    dead = await _dead_lettered(client, keys)
    holders = [
        (first[task_id], task_id, last)
        for task_id, last in zip(ids, ended, strict=True)
        if last is None or _after(last, newest) or task_id in dead
    ]
    if not holders:
        return None
    floor, task_id, last = min(holders, key=lambda h: _order(h[0]))
    if task_id in dead:
        because = "it waits in the dead-letter stream, and may be requeued"
    elif last is not None:
        because = "it ended after the cutoff"
    else:
        state = await guarded(client.hget(keys.task(task_id), "state"))
        because = f"it is still {state or 'open'}"
    return _Hold(task_id, floor, because)


def _held_fields(hold: _Hold | None) -> dict[str, Any]:
    if hold is None:
        return {}
    return {
        "held_by": hold.task_id,
        "held_since": entry_time(hold.floor),
        "held_because": hold.because,
    }


async def _dead_lettered(client: aioredis.Redis, keys: QueueKeys) -> set[str]:
    """The ids of the tasks waiting in the queue's dead-letter stream."""
    dead: set[str] = set()
    async for entries in read_entries(client, keys.dlq):
        dead.update(fields.get("task_id", "") for _, fields in entries)
    return dead


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _next_id(entry_id: str) -> str:
    ms, seq = _order(entry_id)
    return f"{ms}-{seq + 1}"


def _append_lines(path: Path, lines: list[str]) -> None:
    with open(path, "a", encoding="utf-8") as stream:
        for line in lines:
            stream.write(line + "\n")
        stream.flush()
        os.fsync(stream.fileno())


async def _write_archive(
    archive: Archive,
    queue: str,
    entries: list[tuple[str, dict[str, str]]],
    events: list[Event],
) -> None:
    if isinstance(archive, Path | str):
        lines = [
            json.dumps(event_line(queue, entry_id, fields), ensure_ascii=False)
            for entry_id, fields in entries
        ]
        # A thread: writing and fsyncing must not block the event loop.
        await asyncio.to_thread(_append_lines, Path(archive), lines)
        return
    result = archive(events)
    if inspect.isawaitable(result):
        await result
