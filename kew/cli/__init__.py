"""The `kew` command.

    kew [--redis-url URL] [--prefix PREFIX] [-v] demo [--tasks N] [--workers W]
        [--otlp-endpoint URL]
    kew ... worker --queue NAME [--queue ...] --import MODULE [--import ...]
        [--redis-url URL] [--prefix PREFIX]
    kew ... dead-letters {list,requeue} QUEUE [--json]
    kew ... status | history | tail | replay         (kew/cli/log.py)
    kew ... verify | rebuild | export | import | retention   (kew/cli/maintain.py)

Each subcommand is a pair: an `add_<name>(add_parser)` function that declares
its arguments and points `run` at an async `<name>(args)` function returning
the exit code. `main` parses, configures logging (the command is an
application; the library never does) and turns a `KewError` into one line on
stderr and exit code 1.

The server is `--redis-url`, else `KEW_REDIS_URL`, else an embedded server that
lives as long as the command. `--redis-url` and `--prefix` may come before the
command or after it (the one after wins). How the commands print is in
kew/cli/output.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from typing import Any, cast

from kew.cli.base import AddParser, Run, attach_relative_times
from kew.cli.demo import add_demo
from kew.cli.log import READ_COMMANDS
from kew.cli.maintain import MAINTAIN_COMMANDS
from kew.cli.ops import add_dead_letters, add_worker
from kew.errors import KewError
from kew.keys import DEFAULT_PREFIX, PREFIX_ENV

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the `kew` command; returns the exit code."""
    words = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(attach_relative_times(words))
    _configure_logging(args.verbose)
    run = cast(Run, args.run)
    try:
        return asyncio.run(run(args))
    except KewError as exc:
        print(f"kew: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kew: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kew",
        description="kew: an asyncio task queue whose source of truth is an event "
        "log in Redis Streams.",
        epilog="Output is tables on a terminal, tab-separated lines where stdout "
        "is not one (a pipe, a file), and JSON with --json. Times are shown in "
        "local time with their UTC offset; a time given without a zone "
        "(--as-of, --since, --until) is local time too.",
    )
    _add_server_options(parser, default=None)
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log INFO (-vv: DEBUG)"
    )
    subparsers = parser.add_subparsers(title="commands", dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers.add_parser)
    # Also after the command (`kew worker --queue Q --redis-url URL`). SUPPRESS
    # leaves the attribute alone when the option is not repeated there, so a
    # value given before the command still holds.
    for subparser in subparsers.choices.values():
        _add_server_options(subparser, default=argparse.SUPPRESS)
    return parser


def _add_server_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    """--redis-url and --prefix, each unless the parser has its own (`kew
    import --prefix` names where to load)."""
    options = (
        (
            "--redis-url",
            "URL",
            "the server, e.g. redis://localhost:6379/0 (default: $KEW_REDIS_URL, "
            "else an embedded server that lives as long as the command)",
        ),
        (
            "--prefix",
            "PREFIX",
            f"the key prefix (default: ${PREFIX_ENV}, else {DEFAULT_PREFIX!r})",
        ),
    )
    for flag, metavar, text in options:
        with contextlib.suppress(argparse.ArgumentError):
            parser.add_argument(flag, metavar=metavar, default=default, help=text)


def _configure_logging(verbose: int) -> None:
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    line_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, stream=sys.stderr, format=line_format)
    if verbose == 0:
        # The consumer logs each failed attempt as a warning; the command shows
        # outcomes in its own output, so those lines would only be noise.
        logging.getLogger("kew.execution").setLevel(logging.ERROR)


_SUBCOMMANDS: tuple[Callable[[AddParser], None], ...] = (
    add_demo,
    add_worker,
    add_dead_letters,
    *READ_COMMANDS,
    *MAINTAIN_COMMANDS,
)
