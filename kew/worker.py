"""A stand-alone consumer process: `kew worker`.

It imports the modules that define task functions (so that they register),
attaches to queues created elsewhere, with their stored configuration, and
runs their tasks until SIGTERM or SIGINT. Then it shuts down gracefully:
it stops fetching, gives running tasks `grace` seconds, cancels the rest (their
attempts are recorded as interrupted) and hands everything back, so the other
consumers take over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from kew.connection import resolve_url, safe_url
from kew.errors import ConfigurationError
from kew.manager import TaskQueueManager

__all__ = ["import_task_modules", "run_worker"]

logger = logging.getLogger(__name__)


def import_task_modules(modules: Sequence[str]) -> None:
    """Import each module (from the working directory too), so that the task
    functions it defines register themselves."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigurationError(
                f"Cannot import task module {name!r} ({exc}); check the name and "
                "that it is importable from the working directory or PYTHONPATH."
            ) from exc


def _print(line: str) -> None:
    print(line, flush=True)


async def run_worker(
    *,
    queues: Sequence[str],
    modules: Sequence[str],
    redis_url: str | None = None,
    key_prefix: str | None = None,
    grace: float = 10.0,
    max_concurrency: int | None = None,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Consume `queues` until SIGTERM or SIGINT, then shut down gracefully."""
    if not queues:
        raise ConfigurationError("Name at least one queue to consume: --queue NAME.")
    url = resolve_url(redis_url)
    if url is None:
        raise ConfigurationError(
            "kew worker needs the server the submitting processes use: pass "
            "--redis-url redis://host:6379/0 or set KEW_REDIS_URL (an embedded "
            "server would be private to the worker)."
        )
    import_task_modules(modules)
    say = announce or _print

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        manager = TaskQueueManager(
            redis_url=url,
            key_prefix=key_prefix,
            consume=False,
            max_concurrency=max_concurrency,
        )
        async with manager:
            for name in queues:
                config = await manager.attach_queue(name)
                logger.info("attached to queue %s (%s)", name, config)
            say(
                f"kew worker {manager.identity} consuming {', '.join(queues)} on "
                f"{safe_url(url)} (SIGTERM or Ctrl-C stops it)"
            )
            await stop.wait()
            say(f"kew worker {manager.identity} stopping (grace {grace:g}s)")
            await manager.shutdown(wait=True, timeout=grace)
    finally:
        for signum in signals:
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signum)
