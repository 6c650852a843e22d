"""What the subcommands share: the argument types, the manager they open and
the queue they name.

Times on the command line (`--as-of`, `--since`, `--until`) are ISO 8601,
`now`, or a moment ago such as -90s, -15m, -2h, -1d. An ISO time that names no
zone is local time, the zone the command shows times in.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import AsyncGenerator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

from kew.connection import resolve_url
from kew.errors import KewError, QueueNotFoundError
from kew.manager import TaskQueueManager

__all__ = [
    "TIME_HELP",
    "AddParser",
    "Run",
    "attach_relative_times",
    "instant",
    "open_manager",
    "positive_int",
    "require_queue",
]

Run = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]
AddParser = Callable[..., argparse.ArgumentParser]
"""`add_parser` of the subparsers: each `add_<name>` declares one subcommand."""

TIME_OPTIONS = ("--as-of", "--since", "--until")
TIME_HELP = "ISO 8601 (local time if it names no zone), now, or -15m, -2h, -1d"
_RELATIVE = re.compile(r"-(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not valid: give a whole number of 1 or more."
        )
    return value


def instant(text: str) -> datetime:
    """An aware datetime from a time argument (see the module docstring)."""
    if text == "now":
        return datetime.now().astimezone()
    relative = _RELATIVE.fullmatch(text)
    if relative:
        delta = timedelta(**{_UNITS[relative[2]]: float(relative[1])})
        return datetime.now().astimezone() - delta
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use ISO 8601 (2026-12-03T03:14:00, local "
            "time, or with a zone: 2026-12-03T03:14:00Z), now, or a moment ago "
            "such as -15m, -2h, -1d."
        ) from None
    # A naive datetime's astimezone() takes it as local time.
    return moment.astimezone()


def attach_relative_times(argv: list[str]) -> list[str]:
    """`--as-of -15m` as `--as-of=-15m`.

    argparse takes a word that starts with "-" (and is not a negative number)
    for an option, so `--as-of -15m` fails with "expected one argument". A
    relative time after a time option is attached to it with "=", which
    argparse reads as the option's value. Nothing after "--" is touched.
    """
    attached: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "--":
            attached += [word, *words]
            break
        if word in TIME_OPTIONS:
            value = next(words, None)
            if value is not None and _RELATIVE.fullmatch(value):
                attached.append(f"{word}={value}")
                continue
            attached += [word] if value is None else [word, value]
            continue
        attached.append(word)
    return attached


@asynccontextmanager
async def open_manager(
    args: argparse.Namespace, prefix: str | None = None
) -> AsyncGenerator[TaskQueueManager]:
    """A manager on the shared server that runs no tasks and changes nothing
    on start (no cleanup: a command that only looks must not prune
    consumers)."""
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
        cleanup_on_start=False,
    )
    async with manager:
        yield manager


async def require_queue(manager: TaskQueueManager, name: str) -> None:
    """Refuse a queue that does not exist, naming the ones that do."""
    names = await manager.queue_names()
    if name in names:
        return
    where = f"under prefix {manager.key_prefix!r}"
    known = (
        f"the queues {where} are {', '.join(repr(n) for n in names)}"
        if names
        else f"there are no queues {where}"
    )
    raise QueueNotFoundError(
        f"Queue {name!r} does not exist: {known}. Check the name, or pass "
        "--prefix (or set KEW_KEY_PREFIX) to look under another prefix."
    )
