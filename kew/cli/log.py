"""The log from the shell: status, history, tail, replay, verify, rebuild,
export, import and retention.

Where a terminal is attached, output is tables with colour; otherwise plain
text (rich decides). `--json` prints JSON instead, one object per line where a
command lists events, for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kew.audit import read_archive, read_lines
from kew.cli.base import AddParser, positive_int
from kew.connection import resolve_url
from kew.errors import ConfigurationError, KewError
from kew.events.codec import decode
from kew.events.models import Event
from kew.functions import guarded
from kew.keys import QueueKeys
from kew.manager import TaskQueueManager
from kew.status import consumers

__all__ = ["LOG_COMMANDS", "timeline"]


@asynccontextmanager
async def _manager(
    args: argparse.Namespace, prefix: str | None = None
) -> AsyncGenerator[TaskQueueManager]:
    """A manager that only reads and writes the log; it runs no tasks."""
    url = resolve_url(args.redis_url)
    if url is None:
        raise KewError(
            f"kew {args.command} reads a shared server: pass --redis-url or set "
            "KEW_REDIS_URL (an embedded server would start empty)."
        )
    manager = TaskQueueManager(
        redis_url=url,
        key_prefix=prefix or args.prefix,
        consume=False,
        cleanup_on_start=False,  # a command that looks must not change things
    )
    async with manager:
        yield manager


def _instant(text: str) -> datetime:
    """An instant: ISO 8601 (UTC when it names no zone), `now`, or a moment
    relative to now such as -90s, -15m, -2h, -1d."""
    if text == "now":
        return datetime.now(UTC)
    relative = re.fullmatch(r"-(\d+(?:\.\d+)?)([smhd])", text)
    if relative:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
        delta = timedelta(**{unit[relative[2]]: float(relative[1])})
        return datetime.now(UTC) - delta
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use ISO 8601 (2026-12-03T03:14:00Z), now, "
            "or a moment ago such as -15m, -2h, -1d."
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _print_json(value: Any) -> None:
    print(json.dumps(value, default=str, ensure_ascii=False), flush=True)


def _event_json(event: Event) -> dict[str, Any]:
    data = event.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["time"] = event.time.isoformat(timespec="milliseconds")
    data["trace_id"] = event.trace_id
    return data


def _detail(event: Event) -> str:
    """The one thing worth reading about an event, besides its type."""
    fields = event.model_dump(by_alias=True, exclude_none=True)
    for name in ("error", "reason", "result", "previous", "due_at", "entry"):
        if name in fields and fields[name] not in ("", None):
            value = fields[name]
            if name == "due_at":
                return "due " + _clock(datetime.fromtimestamp(value / 1000, UTC))
            if name == "previous":
                return f"from {value}"
            text = value if isinstance(value, str) else json.dumps(value)
            return text if name != "entry" else f"entry {text}"
    return ""


def _show(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(str(item) for item in cast(list[object], value))
    return str(value)


def _clock(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def timeline(title: str, events: list[Event]) -> Table:
    """A table of events: time, type, attempt, actor, detail, and the trace id
    when the events carry one."""
    days = {event.time.astimezone().date() for event in events}
    if len(days) == 1 and title:
        title = f"{title}, {days.pop().isoformat()}"
    traced = any(event.trace_id for event in events)
    table = Table(title=title, box=box.SIMPLE_HEAD)
    columns = ["time", "event", "attempt", "actor", "detail"]
    for name in [*columns, "trace id"] if traced else columns:
        table.add_column(name, overflow="fold", no_wrap=name in ("time", "event"))
    for event in events:
        style = "red" if event.type in ("task.failed", "task.dead_lettered") else ""
        row: list[str | Text] = [
            event.time.astimezone().strftime("%H:%M:%S.%f")[:-3],
            Text(event.type, style=style),
            str(event.attempt) if event.task_id else "",
            Text(event.actor or ""),
            Text(_detail(event)),
        ]
        if traced:
            row.append(event.trace_id or "")
        table.add_row(*row)
    return table


# -- kew status -------------------------------------------------------------


def add_status(add_parser: AddParser) -> None:
    parser = add_parser(
        "status", help="queues, counts by state, consumers, breaker, dead letters"
    )
    parser.add_argument("queue", nargs="?", metavar="QUEUE")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=status)


async def status(args: argparse.Namespace) -> int:
    console = Console()
    async with _manager(args) as manager:
        names = [args.queue] if args.queue else await manager.queue_names()
        if not names:
            console.print(f"No queues under prefix {manager.key_prefix!r}.")
        for name in names:
            info = await manager.get_queue_status(name)
            members = await consumers(
                manager.client, QueueKeys(manager.key_prefix, name)
            )
            if args.json:
                _print_json({**info, "consumers": members})
                continue
            table = Table(title=f"queue {name!r}", box=box.SIMPLE_HEAD)
            table.add_column("")
            table.add_column("", overflow="fold")
            for key, value in info.items():
                if key.endswith("_tasks"):
                    table.add_row(key.removesuffix("_tasks") + " tasks", str(value))
            table.add_row("dead letters", str(info["dead_letters"]))
            table.add_row(
                "circuit breaker",
                f"{info['circuit_breaker_status']}, consecutive failures: "
                f"{info['circuit_breaker_failures']}",
            )
            table.add_row("max_workers", str(info["max_workers"]))
            table.add_row("priority", str(info["priority"]))
            if not members:
                table.add_row("consumers", "none")
            for member in members:
                alive = "alive" if member["alive"] else "gone (no liveness key)"
                table.add_row(
                    "consumer",
                    Text(f"{member['name']}: {alive}, holding {member['pending']}"),
                )
            console.print(table)
    return 0


# -- kew history ------------------------------------------------------------


def add_history(add_parser: AddParser) -> None:
    parser = add_parser("history", help="a task's events as a timeline")
    parser.add_argument("task_id", metavar="TASK_ID")
    parser.add_argument("--queue", metavar="Q", help="the task's queue")
    parser.add_argument(
        "--archive",
        action="append",
        default=[],
        metavar="FILE",
        help="also read an archive written by the retention policy (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON event a line")
    parser.set_defaults(run=history)


async def history(args: argparse.Namespace) -> int:
    archived = [
        event
        for path in args.archive
        for event in read_archive(path)
        if event.task_id == args.task_id
    ]
    async with _manager(args) as manager:
        try:
            live = await manager.get_task_history(args.task_id, queue_name=args.queue)
        except KewError:
            if not archived:
                raise
            live = []
    by_id = {event.id: event for event in [*archived, *live]}
    events = sorted(by_id.values(), key=lambda e: tuple(map(int, e.id.split("-"))))
    if args.json:
        for event in events:
            _print_json(_event_json(event))
        return 0
    Console().print(timeline(f"task {args.task_id!r}", events))
    return 0


# -- kew tail ---------------------------------------------------------------


def add_tail(add_parser: AddParser) -> None:
    parser = add_parser("tail", help="the log as it grows")
    parser.add_argument("queue", metavar="QUEUE")
    parser.add_argument("--follow", "-f", action="store_true", help="keep reading")
    parser.add_argument(
        "--type", metavar="T", help="only events whose type starts with T"
    )
    parser.add_argument(
        "--count", "-n", type=positive_int, default=20, help="last N events (20)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON event a line")
    parser.set_defaults(run=tail)


async def tail(args: argparse.Namespace) -> int:
    console = Console()

    def wanted(e: Event) -> bool:
        return not args.type or e.type.startswith(args.type)

    def show(events: list[Event]) -> None:
        shown = [e for e in events if wanted(e)]
        if args.json:
            for event in shown:
                _print_json(_event_json(event))
        elif shown:
            console.print(timeline("", shown))

    async with _manager(args) as manager:
        keys = QueueKeys(manager.key_prefix, args.queue)
        client = manager.client
        newest = cast(
            list[tuple[str, dict[str, str]]],
            await guarded(client.xrevrange(keys.log, count=args.count)),
        )
        newest.reverse()
        show([decode(i, f) for i, f in newest])
        last = newest[-1][0] if newest else "0-0"
        while args.follow:
            reply = cast(
                list[Any],
                await guarded(client.xread({keys.log: last}, count=500, block=5000)),
            )
            for _, entries in reply or []:
                show([decode(i, f) for i, f in entries])
                last = entries[-1][0]
    return 0


# -- kew replay -------------------------------------------------------------


def add_replay(add_parser: AddParser) -> None:
    parser = add_parser("replay", help="the queue as it was at an instant")
    parser.add_argument("queue", metavar="QUEUE")
    parser.add_argument(
        "--as-of",
        required=True,
        type=_instant,
        metavar="TIME",
        help="ISO 8601 (UTC if no zone), or -15m, -2h, -1d",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=replay)


async def replay(args: argparse.Namespace) -> int:
    async with _manager(args) as manager:
        info = await manager.get_queue_status(args.queue, as_of=args.as_of)
    if args.json:
        _print_json(info)
        return 0
    table = Table(
        title=f"queue {args.queue!r} as of {_clock(args.as_of)}", box=box.SIMPLE_HEAD
    )
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for key, value in cast(dict[str, object], info).items():
        table.add_row(key, _show(value))
    Console().print(table)
    return 0


# -- kew verify / rebuild ---------------------------------------------------


def add_verify(add_parser: AddParser) -> None:
    parser = add_parser(
        "verify", help="compare the stored projections with the log (exit 1 if not)"
    )
    parser.add_argument("queue", metavar="QUEUE")
    parser.set_defaults(run=verify)


async def verify(args: argparse.Namespace) -> int:
    console = Console()
    async with _manager(args) as manager:
        differences = await manager.verify_projections(args.queue)
    for difference in differences:
        console.print(Text(str(difference)))
    if differences:
        console.print(
            f"{len(differences)} projections of {args.queue!r} disagree with the "
            f"log; `kew rebuild {args.queue}` rewrites them from it."
        )
        return 1
    console.print(f"The projections of {args.queue!r} agree with its log.")
    return 0


def add_rebuild(add_parser: AddParser) -> None:
    parser = add_parser("rebuild", help="rewrite the projections from the log")
    parser.add_argument("queue", metavar="QUEUE")
    parser.set_defaults(run=rebuild)


async def rebuild(args: argparse.Namespace) -> int:
    async with _manager(args) as manager:
        loop = asyncio.get_running_loop()
        started = loop.time()
        events = await manager.rebuild_projections(args.queue)
        seconds = loop.time() - started
    Console().print(
        f"Rebuilt the projections of {args.queue!r} from {events} events in "
        f"{seconds:.2f}s."
    )
    return 0


# -- kew export / import / retention ----------------------------------------


def add_export(add_parser: AddParser) -> None:
    parser = add_parser("export", help="the log as JSON Lines, on stdout")
    parser.add_argument("queue", metavar="QUEUE")
    parser.add_argument("--task", metavar="ID", help="only this task's events")
    parser.add_argument("--since", type=_instant, metavar="T", help="from T on")
    parser.add_argument("--until", type=_instant, metavar="T", help="up to T")
    parser.set_defaults(run=export)


async def export(args: argparse.Namespace) -> int:
    async with _manager(args) as manager:
        async for line in manager.export_log(
            args.queue, task_id=args.task, since=args.since, until=args.until
        ):
            sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
    sys.stdout.flush()
    return 0


def add_import(add_parser: AddParser) -> None:
    parser = add_parser("import", help="load exported JSON Lines into an empty prefix")
    parser.add_argument("file", metavar="FILE", help="a .jsonl file, or - for stdin")
    parser.add_argument(
        "--prefix",
        dest="import_prefix",
        required=True,
        metavar="P",
        help="the (empty) key prefix to load into",
    )
    parser.set_defaults(run=import_)


def _read_file(path: str) -> list[dict[str, Any]]:
    """Exported lines from a file, or stdin for "-" (read before any await)."""
    if path == "-":
        return list(read_lines(sys.stdin))
    try:
        with open(path, encoding="utf-8") as stream:
            return list(read_lines(stream))
    except OSError as exc:
        raise ConfigurationError(f"Cannot read {path!r}: {exc}") from None


async def import_(args: argparse.Namespace) -> int:
    lines = _read_file(args.file)
    async with _manager(args, prefix=args.import_prefix) as manager:
        counts = await manager.import_log(lines)
    for queue, count in counts.items():
        Console().print(
            f"Imported {count} events of queue {queue!r} into prefix "
            f"{args.import_prefix!r} and rebuilt its projections."
        )
    return 0


def add_retention(add_parser: AddParser) -> None:
    parser = add_parser(
        "retention",
        help="archive, then trim, events older than the queue's retention_seconds",
    )
    parser.add_argument("queue", metavar="QUEUE")
    parser.add_argument(
        "--archive",
        required=True,
        metavar="FILE",
        help="JSON Lines file the trimmed events are appended to",
    )
    parser.set_defaults(run=retention)


async def retention(args: argparse.Namespace) -> int:
    async with _manager(args) as manager:
        count = await manager.apply_retention(args.queue, args.archive)
    Console().print(
        f"Archived {count} events of {args.queue!r} to {args.archive} and trimmed "
        "them from the log."
    )
    return 0


LOG_COMMANDS: tuple[Callable[[AddParser], None], ...] = (
    add_status,
    add_history,
    add_tail,
    add_replay,
    add_verify,
    add_rebuild,
    add_export,
    add_import,
    add_retention,
)
