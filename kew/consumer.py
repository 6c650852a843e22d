"""One process's consumer of one queue: its lifecycle, fetching and running.

A `Consumer` runs two loops: the fetch loop here, and the lease loop
(`Leases` in kew/leases.py: renewals, takeovers, dead letters, lost entries).
The outcomes of the attempts it runs are recorded by its `Recorder`
(kew/recording.py).

Invariants:

* A slot (a permit of the queue, and a unit of the manager's shared capacity
  if it has one) is taken before an entry is claimed, never after: the fetch
  asks the server for at most as many entries as there are free slots, and a
  takeover claims at most as many. When there is nothing to fetch, the
  consumer waits with a plain XREAD (outside the group) for entries newer than
  those the fetch saw: waiting claims nothing.
* Fetch and maintain never overlap in one consumer (`exclusive`), so maintain
  always knows every attempt the fetch started.
* A slot is released as soon as its task function returns, so the next fetch
  overlaps the recording of the outcome; the server may then briefly count,
  as processing, the attempts whose outcomes are on their way besides those
  running (never more task functions run at once than there are slots).
* Cancellation (shutdown, or the event loop closing) never loses a task: an
  attempt that did not record its outcome stays pending under this consumer
  and is handed back (`release`) or taken over after the lease.
* The task function runs in a task of its own, so that `cancel_task` can
  cancel the function without cancelling the bookkeeping around it.

Losing the server (a dropped connection, a restart) is survived by retrying,
never by resending blindly:

* The fetch loop, like the lease loop, starts its next round after a capped,
  jittered exponential backoff (`kew.connection.Reconnect`), with one warning
  per outage. The fetch call waits one lease for its reply
  (`Leases.call_timeout`).
* The blocking wait is a plain XREAD that claims nothing, so a lost reply
  costs nothing; it runs under a client-side deadline (`BLOCK_MS` plus
  `READ_MARGIN`), so a half-open connection cannot stall fetching for ever.

Known limitations: `shutdown` abandons, after a short grace, a task function
that ignores its cancellation (it is logged, and its entry is handed back
anyway). For an outage longer than a lease, see kew/leases.py.

Policies (retries, the breaker, due times) are decided by the functions; this
module only waits as they say: until the breaker's reset time, until the next
due task, or for a new entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import redis.asyncio as aioredis

from kew import functions
from kew.attempts import Attempt, Outcome, refuse
from kew.connection import Reconnect
from kew.errors import ConnectionFailedError, KewError
from kew.execution import AttemptKey, RunningFunctions, cancel_functions, run_attempt
from kew.hooks import Hooks
from kew.keys import QueueKeys
from kew.leases import Leases
from kew.models import QueueConfig
from kew.permits import Slots
from kew.recording import Recorder
from kew.registry import Registry
from kew.telemetry import Telemetry, internal

__all__ = ["Consumer"]

logger = logging.getLogger(__name__)

BLOCK_MS = 10_000
"""How long one wait for a new entry lasts before it is reissued."""
READ_MARGIN = 5.0
"""Seconds a blocking read may overrun its BLOCK before the connection is
taken for dead (half-open) and dropped."""
CANCEL_GRACE = 1.0
"""Seconds `stop` gives cancelled attempts, and the recording of outcomes,
before it abandons them."""
RELEASE_TIMEOUT = 2.0
"""Seconds `stop` waits for the server to take back this consumer's entries."""
HALF_OPEN_PAUSE = 0.25
"""How long to wait before asking again while every trial slot of a half-open
breaker is taken (the only state in which a consumer polls: a new entry could
not start, so waiting for one would not do)."""
_QUIET_SKIPS = ("task is cancelled", "the circuit breaker holds it")


class Consumer:
    """This process's member of one queue's consumer group."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        blocking_client: aioredis.Redis,
        keys: QueueKeys,
        config: QueueConfig,
        name: str,
        registry: Registry,
        slots: Slots,
        expiry_seconds: int,
        hooks: Hooks,
        on_finished: Callable[[str, str], None],
        telemetry: Telemetry | None = None,
    ) -> None:
        self.client = client
        self.blocking_client = blocking_client
        self.keys = keys
        self.config = config
        self.name = name
        self.registry = registry
        self.slots = slots
        self.expiry_seconds = expiry_seconds
        self.hooks = hooks
        self.on_finished = on_finished
        self.telemetry = telemetry or Telemetry()
        self.running: dict[AttemptKey, tuple[Attempt, asyncio.Task[None]]] = {}
        """Attempts running here, by (task id, attempt): an attempt cancelled
        as lost may still be ending when this consumer starts the task again."""
        self.finishing: set[str] = set()
        """Entries whose outcome is being recorded: still held (and renewed)
        until `finish` answers, but never cancelled as lost meanwhile."""
        self.exclusive = asyncio.Lock()
        """Held by fetch and maintain around their call and the bookkeeping of
        its reply, so that maintain always sees every started attempt."""
        self.leases = Leases(self)
        self.recorder = Recorder(self)
        self._functions: RunningFunctions = {}
        self._stopping = False
        self._stopped = asyncio.Event()
        self._fetcher: asyncio.Task[None] | None = None
        self._maintainer: asyncio.Task[None] | None = None
        self._read: asyncio.Future[Any] | None = None
        self._weights = config.priority_weights
        self._credit = [0, 0, 0]

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        self._fetcher = asyncio.create_task(
            self._fetch_loop(), name=f"kew fetch {self.keys.queue}"
        )
        self._maintainer = asyncio.create_task(
            self.leases.run(), name=f"kew maintain {self.keys.queue}"
        )
        logger.info("consumer %s joined queue %s", self.name, self.keys.queue)

    async def stop(self, *, wait: bool, timeout: float | None) -> None:
        """Stop fetching, let running attempts finish within `timeout` (if
        `wait`), cancel the rest, and hand back whatever is still held."""
        self._stopping = True
        self._stopped.set()
        self.leases.wake()
        if self._read is not None:
            self._read.cancel()
        if self._fetcher is not None:
            self._fetcher.cancel()
            await asyncio.gather(self._fetcher, return_exceptions=True)

        tasks = [task for _, task in self.running.values()]
        if tasks and wait:
            await asyncio.wait(tasks, timeout=timeout)
        for _, task in list(self.running.values()):
            task.cancel()
        await self._settle_within(tasks, CANCEL_GRACE)

        if self._maintainer is not None:
            self._maintainer.cancel()
            await asyncio.gather(self._maintainer, return_exceptions=True)
        try:
            # Bookkeeping, like the renewals: no span of the application's.
            with internal():
                released = await self._release()
        except (KewError, TimeoutError) as exc:
            logger.warning(
                "consumer %s could not hand back its entries (%s); they will be "
                "taken over after the lease",
                self.name,
                exc,
            )
        else:
            if released:
                logger.info(
                    "consumer %s handed back %s tasks of queue %s",
                    self.name,
                    released,
                    self.keys.queue,
                )
        logger.info("consumer %s left queue %s", self.name, self.keys.queue)

    async def _settle_within(
        self, tasks: list[asyncio.Task[None]], grace: float
    ) -> None:
        """Give cancelled attempts, then the recording of outcomes, `grace`
        seconds in all; log what is left (a task function that ignores its
        cancellation, a server that does not answer)."""
        deadline = time.monotonic() + grace
        if tasks:
            _, left = await asyncio.wait(tasks, timeout=grace)
            if left:
                logger.warning(
                    "consumer %s: %d attempts of queue %s did not stop within "
                    "%.1f s of being cancelled (their task functions ignore "
                    "cancellation); leaving them, their tasks are handed back: %s",
                    self.name,
                    len(left),
                    self.keys.queue,
                    grace,
                    ", ".join(sorted(t.get_name() for t in left)),
                )
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.01)):
                await self.recorder.drain()
        except TimeoutError:
            logger.warning(
                "consumer %s: outcomes on queue %s were still being recorded "
                "after %.1f s; leaving them, their tasks are taken over after "
                "the lease if they were not recorded",
                self.name,
                self.keys.queue,
                grace,
            )

    async def _release(self) -> int:
        """Hand back every entry still held, and drop the liveness key;
        returns how many tasks went back."""
        async with asyncio.timeout(RELEASE_TIMEOUT):
            released = await functions.call(
                self.client,
                "release",
                self.keys.queue_keys,
                [
                    self.name,
                    self.keys.task_prefix,
                    "its consumer shut down",
                    self.expiry_seconds,
                    self.keys.finished_channel,
                ],
            )
            await functions.guarded(self.client.delete(self.keys.worker(self.name)))
        return int(released)

    def cancel(self, task_id: str) -> bool:
        """Cancel the running task function of `task_id`, if it runs here."""
        return cancel_functions(self._functions, task_id)

    @property
    def busy(self) -> int:
        return len(self.running)

    @property
    def stopping(self) -> bool:
        """Whether `stop` has begun: the loops end, and take nothing more."""
        return self._stopping

    def reconnect(self, log: logging.Logger, what: str) -> Reconnect:
        """The backoff of one of this consumer's loops, logged through `log` as
        "consumer <name>: <what> queue <queue>" (e.g. what="fetch from")."""
        return Reconnect(log, f"consumer {self.name}: {what} queue {self.keys.queue}")

    # -- fetching --------------------------------------------------------

    async def _fetch_loop(self) -> None:
        reconnect = self.reconnect(logger, "fetch from")
        while not self._stopping:
            try:
                await self._fetch_once()
            except Exception as exc:
                await self._pause(reconnect.round_failed(exc))
            else:
                reconnect.succeeded()

    async def _fetch_once(self) -> None:
        await self.slots.acquire()
        n = 1 + self.slots.take_free()
        args: list[str | int] = [
            self.name,
            n,
            self.keys.task_prefix,
            self.expiry_seconds,
            self.keys.finished_channel,
        ]
        if self._weights is not None:
            # Picks for every free slot; only those the fetch may use (fewer
            # while the breaker limits it) are charged, after the reply.
            args.append("".join(map(str, self._picks(list(self._credit), n))))
        async with self.exclusive:
            try:
                with internal():
                    reply = await functions.call(
                        self.client,
                        "fetch",
                        self.keys.queue_keys,
                        args,
                        timeout=self.leases.call_timeout,
                    )
            except BaseException:
                self.slots.release(n)
                raise
            rows, next_due, gate, now, newest, allowed, moved = cast(
                tuple[list[list[str]], str, str, int, list[str], int, list[str]],
                reply,
            )
            self.slots.release(n - self.dispatch(rows, int(now)))
        if self._weights is not None:
            self._picks(self._credit, int(allowed))
        self.telemetry.breaker_moved(self.keys.queue, moved)
        if rows or self._stopping:
            return
        if gate.startswith("open:"):
            await self._pause((int(gate[5:]) - int(now)) / 1000)
            return
        if gate == "half_open:0":
            # Every trial slot is taken: a new entry could not start either.
            await self._pause(HALF_OPEN_PAUSE)
            return
        block = BLOCK_MS
        if next_due:
            block = max(1, min(block, int(float(next_due)) - int(now)))
        await self._wait_for_entries(block, newest)

    def _picks(self, credit: list[int], n: int) -> list[int]:
        """The levels (1-3) of the next n entries by smooth weighted round
        robin, advancing `credit`. The consumer's credit carries over from
        fetch to fetch, so shares hold even when n is 1 at a time; a fetch
        plans on a copy and charges the picks it used."""
        weights = cast(tuple[int, int, int], self._weights)
        total = sum(weights)
        picks: list[int] = []
        for _ in range(n):
            for i, weight in enumerate(weights):
                credit[i] += weight
            best = max(range(3), key=lambda i: credit[i])
            credit[best] -= total
            picks.append(best + 1)
        return picks

    async def _wait_for_entries(self, block_ms: int, after: list[str]) -> None:
        """Block until an entry newer than `after` (one id per ready stream)
        arrives, or `block_ms` passes. A plain XREAD, outside the group: it
        claims nothing, so the next fetch takes entries by priority and by
        free slots, and a consumer that stops here holds nothing."""
        streams: dict[Any, Any] = dict(zip(self.keys.ready_all, after, strict=True))

        async def read() -> Any:
            # The command is made inside the read's own task: a task cancelled
            # before its first step (by `stop`) never runs its coroutine, and
            # a redis-py coroutine made outside would be left never awaited.
            return await self.blocking_client.xread(streams, count=1, block=block_ms)

        with internal():  # the read's task copies this context
            self._read = asyncio.ensure_future(read())
        # No socket timeout on this connection (a block is not a dead server),
        # so this deadline is what catches a half-open one. Running out of it
        # cancels the read, and redis-py then drops the connection, whose
        # late reply can no longer be mistaken for the next command's.
        limit = block_ms / 1000 + READ_MARGIN
        try:
            async with asyncio.timeout(limit):
                await self._read
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        except TimeoutError:
            raise ConnectionFailedError(
                f"The Redis server did not end a {block_ms} ms blocking read "
                f"within {limit:g} s; the connection was dropped. Check the "
                "network between this process and the server."
            ) from None
        finally:
            self._read = None

    async def _pause(self, seconds: float) -> None:
        """Sleep, unless the consumer is stopped meanwhile."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopped.wait()

    @staticmethod
    def _server_now(event_id: str) -> int:
        """The server's time when it wrote an event (ms)."""
        return int(event_id.partition("-")[0])

    def dispatch(
        self, rows: list[list[str]], server_now: int, *, taken_over: bool = False
    ) -> int:
        """Start a local run for each started attempt (started by a fetch, or
        taken over by maintain, at `server_now`); return how many."""
        started = 0
        for row in rows:
            if row[0] != "started":
                quiet = row[3] in _QUIET_SKIPS
                logger.log(
                    logging.DEBUG if quiet else logging.WARNING,
                    "consumer %s skipped entry %s of task %r: %s",
                    self.name,
                    row[2],
                    row[1],
                    row[3],
                )
                continue
            attempt = Attempt.from_row(row)
            self.telemetry.received(
                self.keys.queue, attempt, server_now, taken_over=taken_over
            )
            task = asyncio.create_task(
                self._run(attempt), name=f"kew task {attempt.task_id}"
            )
            self.running[attempt.task_id, attempt.attempt] = (attempt, task)
            started += 1
        return started

    # -- running ---------------------------------------------------------

    async def _run(self, attempt: Attempt) -> None:
        slot_held = True
        try:
            if self.registry.get(attempt.name) is None:
                await self._refuse(attempt)
                return
            outcome = await self._execute(attempt)
            # The function is done: its slot may start the next attempt while
            # this outcome is being recorded (the entry stays held and renewed).
            self.slots.release()
            slot_held = False
            self.finishing.add(attempt.entry)
            row = await self.recorder.finish(outcome)
            if row[0] == "ok":
                if row[2] == "retry":
                    self.leases.note_due(row[3], self._server_now(row[1]))
                else:
                    self.on_finished(self.keys.queue, attempt.task_id)
                # A failure `finish` recorded as a cancellation (the task was
                # asked to cancel) calls no hook, like any cancelled task.
                if not self.hooks.empty and row[2] != "cancelled":
                    await self.hooks.after(attempt, outcome)
            else:
                logger.warning(
                    "consumer %s dropped the outcome of task %r attempt %s: %s",
                    self.name,
                    attempt.task_id,
                    attempt.attempt,
                    row[1],
                )
        except asyncio.CancelledError:
            logger.info(
                "task %r attempt %s on queue %s interrupted",
                attempt.task_id,
                attempt.attempt,
                self.keys.queue,
            )
            raise
        except Exception:
            logger.exception(
                "consumer %s could not record task %r attempt %s; it will be "
                "taken over after the lease",
                self.name,
                attempt.task_id,
                attempt.attempt,
            )
        finally:
            self.finishing.discard(attempt.entry)
            self.running.pop((attempt.task_id, attempt.attempt), None)
            if slot_held:
                self.slots.release()

    async def _refuse(self, attempt: Attempt) -> None:
        """Hand back an attempt whose task function is not registered here."""
        with internal():
            state = await refuse(
                self.client,
                self.keys,
                attempt,
                consumer=self.name,
                expiry_seconds=self.expiry_seconds,
                lease_ms=int(self.config.lease_seconds * 1000),
                timeout=self.leases.call_timeout,
            )
        if state in ("failed", "cancelled"):
            self.on_finished(self.keys.queue, attempt.task_id)
        if state == "failed":  # dead-lettered
            self.telemetry.dead_letters(self.keys.queue, 1)

    async def _execute(self, attempt: Attempt) -> Outcome:
        """Run one attempt inside its process span."""
        with self.telemetry.process(self.keys.queue, self.name, attempt) as process:
            outcome = await self._attempt(attempt)
            process.ended(outcome)
            return outcome

    async def _attempt(self, attempt: Attempt) -> Outcome:
        return await run_attempt(
            attempt,
            self.registry.get(attempt.name),
            consumer=self.name,
            queue=self.keys.queue,
            hooks=self.hooks,
            functions=self._functions,
        )
