"""Reading the log from the shell: status, history, tail and replay.

Output is tables with colour on a terminal, plain tab-separated lines
anywhere else, and JSON with `--json` (see kew/cli/output.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, cast

import redis.asyncio as aioredis

from kew.audit import read_archive
from kew.cli.base import (
    TIME_HELP,
    AddParser,
    instant,
    open_manager,
    positive_int,
    require_queue,
)
from kew.cli.output import (
    Column,
    Output,
    RowStream,
    clock,
    event_json,
    print_json,
    show_value,
    timeline,
    timeline_columns,
    timeline_row,
)
from kew.errors import KewError
from kew.events.codec import decode
from kew.events.models import Event
from kew.functions import guarded
from kew.keys import QueueKeys
from kew.status import consumers

__all__ = ["READ_COMMANDS"]

_KEY_VALUE = (Column("field", wrap=False), Column("value"))


# -- kew status -------------------------------------------------------------


def add_status(add_parser: AddParser) -> None:
    parser = add_parser(
        "status", help="queues, counts by state, consumers, breaker, dead letters"
    )
    parser.add_argument("queue", nargs="?", metavar="QUEUE")
    parser.add_argument("--json", action="store_true", help="one JSON object a queue")
    parser.set_defaults(run=status)


async def status(args: argparse.Namespace) -> int:
    output = Output()
    async with open_manager(args) as manager:
        if args.queue:
            await require_queue(manager, args.queue)
        names = [args.queue] if args.queue else await manager.queue_names()
        if not names:
            print(f"No queues under prefix {manager.key_prefix!r}.", file=sys.stderr)
        for name in names:
            info = await manager.get_queue_status(name)
            members = await consumers(
                manager.client, QueueKeys(manager.key_prefix, name)
            )
            if args.json:
                print_json({**info, "consumers": members})
            else:
                output.table(_KEY_VALUE, _status_rows(info, members), header=False)
    return 0


def _status_rows(
    info: dict[str, Any], members: list[dict[str, Any]]
) -> list[tuple[str, str]]:
    rows = [("queue", str(info["name"]))]
    for key, value in info.items():
        if key.endswith("_tasks"):
            rows.append((key.removesuffix("_tasks") + " tasks", str(value)))
    rows += [
        ("dead letters", str(info["dead_letters"])),
        (
            "circuit breaker",
            f"{info['circuit_breaker_status']}, consecutive failures: "
            f"{info['circuit_breaker_failures']}",
        ),
        ("max_workers", str(info["max_workers"])),
        ("priority", str(info["priority"])),
    ]
    if not members:
        rows.append(("consumers", "none"))
    for member in members:
        alive = "alive" if member["alive"] else "gone (no liveness key)"
        rows.append(
            ("consumer", f"{member['name']}: {alive}, holding {member['pending']}")
        )
    return rows


# -- kew history ------------------------------------------------------------

HISTORY_LIMIT = 10_000


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
    parser.add_argument(
        "--limit",
        type=positive_int,
        default=HISTORY_LIMIT,
        metavar="N",
        help=f"the newest N events of the log at most (default {HISTORY_LIMIT})",
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
    async with open_manager(args) as manager:
        try:
            live = await manager.get_task_history(
                args.task_id, queue_name=args.queue, limit=args.limit
            )
        except KewError:
            if not archived:
                raise
            live = []
    if len(live) == args.limit and live[0].prev:
        print(
            f"kew: task {args.task_id!r} has more than {args.limit} events in "
            f"the log; only the newest {args.limit} are shown. Pass a larger "
            "--limit to see the older ones.",
            file=sys.stderr,
        )
    by_id = {event.id: event for event in [*archived, *live]}
    events = sorted(by_id.values(), key=lambda e: tuple(map(int, e.id.split("-"))))
    if args.json:
        for event in events:
            print_json(event_json(event))
        return 0
    timeline(Output(), f"task {args.task_id!r}", events)
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
        "--count",
        "-n",
        type=positive_int,
        default=20,
        help="the last N events (of type T, with --type; default 20)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON event a line")
    parser.set_defaults(run=tail)


async def tail(args: argparse.Namespace) -> int:
    printer = _TailPrinter(Output(), as_json=args.json)
    async with open_manager(args) as manager:
        await require_queue(manager, args.queue)
        log = QueueKeys(manager.key_prefix, args.queue).log
        client = manager.client
        newest, last = await _newest(client, log, args.count, args.type)
        events = [decode(i, f) for i, f in newest]
        if not args.follow:
            printer.once(f"queue {args.queue!r}", events)
            return 0
        printer.show(events, first=True)
        while True:
            reply = cast(
                list[Any],
                await guarded(client.xread({log: last}, count=500, block=5000)),
            )
            for _, entries in reply or []:
                kept = [decode(i, f) for i, f in entries if _is_of(f, args.type)]
                printer.show(kept)
                last = entries[-1][0]


async def _newest(
    client: aioredis.Redis, log: str, count: int, type_prefix: str | None
) -> tuple[list[tuple[str, dict[str, str]]], str]:
    """The newest `count` entries of the log whose type starts with
    `type_prefix` (all, if it is None), oldest first, and the id of the
    newest entry of all (to follow from). Pages back through the log until it
    has them: for a rare type, through all of it."""
    # Unfiltered, the newest `count` entries are the answer: one page of them.
    page_size = max(count, 1000) if type_prefix else count
    kept: list[tuple[str, dict[str, str]]] = []
    newest, end = "0-0", "+"
    while len(kept) < count:
        page = cast(
            list[tuple[str, dict[str, str]]],
            await guarded(client.xrevrange(log, max=end, count=page_size)),
        )
        if not page:
            break
        if end == "+":
            newest = page[0][0]
        kept += [entry for entry in page if _is_of(entry[1], type_prefix)]
        if len(page) < page_size:
            break
        end = f"({page[-1][0]}"
    kept = kept[:count]
    kept.reverse()
    return kept, newest


def _is_of(fields: dict[str, str], type_prefix: str | None) -> bool:
    return not type_prefix or fields.get("type", "").startswith(type_prefix)


class _TailPrinter:
    """Events as rows under one header (see RowStream), or JSON lines. On a
    terminal the trace id column appears, with a new header, once an event
    carries one; plain output always has it."""

    def __init__(self, output: Output, *, as_json: bool) -> None:
        self.output = output
        self.as_json = as_json
        self.traced = not output.terminal
        self.stream: RowStream | None = None

    def once(self, title: str, events: list[Event]) -> None:
        """The newest events, as a table with a title (no --follow)."""
        if self.as_json:
            self.show(events)
        elif events:
            timeline(self.output, title, events, task=True)

    def show(self, events: list[Event], *, first: bool = False) -> None:
        """Events as they come; with `first`, the header even with none."""
        if self.as_json:
            for event in events:
                print_json(event_json(event))
            return
        if not events and not first:
            return
        traced = self.traced or any(event.trace_id for event in events)
        if self.stream is None or traced != self.traced:
            self.traced = traced
            columns = timeline_columns(task=True, traced=traced)
            self.stream = RowStream(self.output, columns)
        plain = not self.output.terminal
        self.stream.add(
            [
                timeline_row(e, task=True, traced=traced, plain=plain, with_day=True)
                for e in events
            ]
        )


# -- kew replay -------------------------------------------------------------


def add_replay(add_parser: AddParser) -> None:
    parser = add_parser("replay", help="the queue as it was at an instant")
    parser.add_argument("queue", metavar="QUEUE")
    parser.add_argument(
        "--as-of", required=True, type=instant, metavar="TIME", help=TIME_HELP
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=replay)


async def replay(args: argparse.Namespace) -> int:
    async with open_manager(args) as manager:
        await require_queue(manager, args.queue)
        info = await manager.get_queue_status(args.queue, as_of=args.as_of)
    if args.json:
        print_json(info)
        return 0
    rows = [(key, show_value(value)) for key, value in info.items()]
    Output().table(
        _KEY_VALUE,
        rows,
        title=f"queue {args.queue!r} as of {clock(args.as_of)}",
        header=False,
    )
    return 0


READ_COMMANDS: tuple[Callable[[AddParser], None], ...] = (
    add_status,
    add_history,
    add_tail,
    add_replay,
)
