"""`kew worker` and `kew dead-letters`: running and repairing queues."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from kew.cli.base import AddParser, positive_int
from kew.connection import resolve_url
from kew.errors import KewError
from kew.manager import TaskQueueManager
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
    parser.set_defaults(run=dead_letters)


async def dead_letters(args: argparse.Namespace) -> int:
    console = Console()
    url = resolve_url(args.redis_url)
    if url is None:
        raise KewError(
            "Dead letters live on a shared server: pass --redis-url or set "
            "KEW_REDIS_URL."
        )
    async with TaskQueueManager(
        redis_url=url, key_prefix=args.prefix, consume=False
    ) as manager:
        if args.action == "requeue":
            count = await manager.requeue_dead_letters(args.queue)
            console.print(f"Requeued {count} dead-lettered tasks of {args.queue!r}.")
            return 0
        letters = await manager.dead_letters(args.queue)
        table = Table("dead letter", "task", "deliveries", "last consumer", "reason")
        for letter in letters:
            table.add_row(
                letter["id"],
                letter.get("task_id", ""),
                letter.get("deliveries", ""),
                letter.get("previous", ""),
                letter.get("reason", ""),
            )
        console.print(table)
        console.print(f"{len(letters)} dead letters in {args.queue!r}.")
    return 0
