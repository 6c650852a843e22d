"""What the subcommands share: the argument types and the manager they open."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["AddParser", "Run", "positive_int"]

Run = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]
AddParser = Callable[..., argparse.ArgumentParser]
"""`add_parser` of the subparsers: each `add_<name>` declares one subcommand."""


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
