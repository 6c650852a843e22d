"""Keeping the log and its projections: verify, rebuild, export, import and
retention.

Output is messages (plain lines where no terminal is attached), or JSON with
`--json`; export always writes JSON Lines.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any

from kew.audit import RetentionReport, read_lines
from kew.cli.base import TIME_HELP, AddParser, instant, open_manager, require_queue
from kew.cli.output import Output, clock, print_json
from kew.errors import ConfigurationError

__all__ = ["MAINTAIN_COMMANDS"]

_JSON_HELP = "print the outcome as one JSON object"


# -- kew verify / rebuild ---------------------------------------------------


def add_verify(add_parser: AddParser) -> None:
    parser = add_parser(
        "verify", help="compare the stored projections with the log (exit 1 if not)"
    )
    parser.add_argument("queue", metavar="QUEUE")
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"queue", "agree", "differences": [{"key", "fields", '
        '"stored", "folded"}]}',
    )
    parser.set_defaults(run=verify)


async def verify(args: argparse.Namespace) -> int:
    async with open_manager(args) as manager:
        await require_queue(manager, args.queue)
        differences = await manager.verify_projections(args.queue)
    if args.json:
        print_json(
            {
                "queue": args.queue,
                "agree": not differences,
                "differences": [dataclasses.asdict(d) for d in differences],
            }
        )
        return 1 if differences else 0
    output = Output()
    for difference in differences:
        output.line(str(difference))
    if differences:
        output.line(
            f"{len(differences)} projections of {args.queue!r} disagree with the "
            f"log; `kew rebuild {args.queue}` rewrites them from it."
        )
        return 1
    output.line(f"The projections of {args.queue!r} agree with its log.")
    return 0


def add_rebuild(add_parser: AddParser) -> None:
    parser = add_parser("rebuild", help="rewrite the projections from the log")
    parser.add_argument("queue", metavar="QUEUE")
    parser.add_argument("--json", action="store_true", help=_JSON_HELP)
    parser.set_defaults(run=rebuild)


async def rebuild(args: argparse.Namespace) -> int:
    async with open_manager(args) as manager:
        await require_queue(manager, args.queue)
        loop = asyncio.get_running_loop()
        started = loop.time()
        events = await manager.rebuild_projections(args.queue)
        seconds = loop.time() - started
    if args.json:
        print_json({"queue": args.queue, "events": events, "seconds": seconds})
        return 0
    Output().line(
        f"Rebuilt the projections of {args.queue!r} from {events} events in "
        f"{seconds:.2f}s."
    )
    return 0


# -- kew export / import ----------------------------------------------------


def add_export(add_parser: AddParser) -> None:
    parser = add_parser("export", help="the log as JSON Lines, on stdout")
    parser.add_argument("queue", metavar="QUEUE")
    parser.add_argument("--task", metavar="ID", help="only this task's events")
    parser.add_argument(
        "--since", type=instant, metavar="T", help=f"from T on: {TIME_HELP}"
    )
    parser.add_argument("--until", type=instant, metavar="T", help="up to T")
    parser.set_defaults(run=export)


async def export(args: argparse.Namespace) -> int:
    async with open_manager(args) as manager:
        await require_queue(manager, args.queue)
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
    parser.add_argument(
        "--json", action="store_true", help="print the events imported per queue"
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
    async with open_manager(args, prefix=args.import_prefix) as manager:
        counts = await manager.import_log(lines)
    if args.json:
        print_json({"prefix": args.import_prefix, "events": counts})
        return 0
    for queue, count in counts.items():
        Output().line(
            f"Imported {count} events of queue {queue!r} into prefix "
            f"{args.import_prefix!r} and rebuilt its projections."
        )
    return 0


# -- kew retention ----------------------------------------------------------


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
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the report: archived, kept, through, held_by, held_since, "
        "held_because",
    )
    parser.set_defaults(run=retention)


async def retention(args: argparse.Namespace) -> int:
    async with open_manager(args) as manager:
        await require_queue(manager, args.queue)
        report = await manager.apply_retention(args.queue, args.archive)
    if args.json:
        print_json({"queue": args.queue, **dataclasses.asdict(report)})
        return 0
    output = Output()
    output.line(
        f"Archived {report.archived} events of {args.queue!r} to {args.archive} "
        "and trimmed them from the log."
    )
    held = _held(report)
    if held:
        output.line(held)
    return 0


def _held(report: RetentionReport) -> str:
    """What keeps older events in the log, if anything does."""
    if report.held_by is None or report.held_since is None:
        return ""
    return (
        f"Kept {report.kept} older events: task {report.held_by!r} holds the "
        f"trim point since {clock(report.held_since)} ({report.held_because}). "
        "The log is trimmed no further than its first event until it has ended "
        "and its end is older than retention_seconds."
    )


MAINTAIN_COMMANDS: tuple[Callable[[AddParser], None], ...] = (
    add_verify,
    add_rebuild,
    add_export,
    add_import,
    add_retention,
)
