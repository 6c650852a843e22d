"""`kew worker` and `kew dead-letters`: running and repairing queues."""

from __future__ import annotations

import argparse

from kew.cli.base import AddParser, open_manager, positive_int, require_queue
from kew.cli.output import Column, Output, print_json
from kew.worker import run_worker

__all__ = ["add_dead_letters", "add_worker"]

# -- kew worker -------------------------------------------------------------


def add_worker(add_parser: AddParser) -> None:
    parser = add_parser(
        "worker",
        help="run the tasks of queues created elsewhere, until SIGTERM",
        description="Import the modules that define task functions, join the "
        "queues' consumer groups with their stored configuration, and run their "
        "tasks until SIGTERM or Ctrl-C; then stop gracefully.",
    )
    parser.add_argument(
        "--queue",
        "-q",
        action="append",
        required=True,
        metavar="NAME",
        help="a queue to consume (repeat for several)",
    )
    parser.add_argument(
        "--import",
        "-i",
        dest="modules",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module defining task functions (repeat for several)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long running tasks may finish at shutdown (default 10)",
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        metavar="N",
        help="tasks at once across all the queues (default: each queue's max_workers)",
    )
    parser.set_defaults(run=worker)


async def worker(args: argparse.Namespace) -> int:
    await run_worker(
        queues=args.queue,
        modules=args.modules,
        redis_url=args.redis_url,
        key_prefix=args.prefix,
        grace=args.grace,
        max_concurrency=args.concurrency,
    )
    return 0


# -- kew dead-letters -------------------------------------------------------


def add_dead_letters(add_parser: AddParser) -> None:
    parser = add_parser(
        "dead-letters",
        help="list or requeue a queue's dead letters",
        description="Tasks whose entry was delivered more than max_deliveries "
        "times without an outcome (a crash loop) wait in the queue's dead-letter "
        "stream. List them, or send them back to the queue once the cause is fixed.",
    )
    parser.add_argument("action", choices=("list", "requeue"))
    parser.add_argument("queue", metavar="QUEUE")
    parser.add_argument(
        "--json",
        action="store_true",
        help="list: one JSON object a dead letter; requeue: the count as JSON",
    )
    parser.set_defaults(run=dead_letters)


_LETTER_COLUMNS = (
    Column("dead letter", wrap=False),
    Column("task"),
    Column("deliveries", wrap=False),
    Column("last consumer"),
    Column("reason"),
)


async def dead_letters(args: argparse.Namespace) -> int:
    output = Output()
    async with open_manager(args) as manager:
        await require_queue(manager, args.queue)
        if args.action == "requeue":
            count = await manager.requeue_dead_letters(args.queue)
            if args.json:
                print_json({"queue": args.queue, "requeued": count})
            else:
                output.line(f"Requeued {count} dead-lettered tasks of {args.queue!r}.")
            return 0
        letters = await manager.dead_letters(args.queue)
    if args.json:
        for letter in letters:
            print_json(letter)
        return 0
    rows = [
        [
            letter["id"],
            letter.get("task_id", ""),
            letter.get("deliveries", ""),
            letter.get("previous", ""),
            letter.get("reason", ""),
        ]
        for letter in letters
    ]
    # The count is a sentence for a reader; plain output stays rows only.
    caption = f"{len(letters)} dead letters in {args.queue!r}."
    output.table(_LETTER_COLUMNS, rows, caption=caption)
    return 0
