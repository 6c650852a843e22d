"""Shutting a manager down when its event loop ends without `shutdown`.

The quick start never calls `shutdown`: `asyncio.run` returns when `main`
does, cancels every task still pending (kew's consumers among them), and
closes the loop. Left at that, kew's connections would be collected later
with "unclosed Connection" and "unclosed transport" warnings, and the entries
the consumers held would wait for their lease to lapse.

A `LoopGuard` is a task that waits for nothing. When the loop's teardown
cancels it (as `asyncio.run` and pytest-asyncio do with pending tasks), it
runs the manager's `shutdown(wait=False)` before the loop closes: the running
attempts, already cancelled by the same teardown, are recorded as interrupted
and handed back with the entries fetched but not started, and the connections
(and an embedded server) are closed. An explicit `shutdown` disarms the guard.

Known limitations: a loop closed without cancelling its pending tasks (a bare
`loop.close()` after `run_until_complete`) never runs the guard; Python then
warns about the destroyed pending tasks, kew's as well as any others. The
guard's shutdown gets `TEARDOWN_TIMEOUT` seconds for its Redis calls, so an
unreachable server cannot hang the interpreter's exit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

__all__ = ["TEARDOWN_TIMEOUT", "LoopGuard"]

logger = logging.getLogger(__name__)

TEARDOWN_TIMEOUT = 5.0
"""The longest the guard's shutdown may take while the loop ends."""

_guards: set[asyncio.Task[None]] = set()
"""Strong references: the loop keeps only weak ones to its tasks, and a guard
collected while pending would itself warn that it was destroyed."""


class LoopGuard:
    """Runs `close` when the running loop's teardown cancels pending tasks."""

    def __init__(self, close: Callable[[], Awaitable[None]]) -> None:
        self._close = close
        self._armed = True
        self._task = asyncio.get_running_loop().create_task(
            self._wait(), name="kew shutdown at loop end"
        )
        _guards.add(self._task)
        self._task.add_done_callback(_guards.discard)

    def disarm(self) -> None:
        """`close` ran another way (an explicit shutdown): end the guard
        without running it, unless the guard is what is running it now."""
        if not self._armed:
            return
        self._armed = False
        if self._task is not asyncio.current_task():
            self._task.cancel()

    async def _wait(self) -> None:
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            if self._armed:
                logger.debug("the event loop is ending without shutdown: shutting down")
                try:
                    async with asyncio.timeout(TEARDOWN_TIMEOUT):
                        await self._close()
                except Exception as exc:  # the loop is ending: say so, never raise
                    logger.warning(
                        "kew could not shut down cleanly as the event loop ended "
                        "(%s); call `await manager.shutdown()` before it ends",
                        exc,
                    )
            raise
