"""One process's consumer of one queue: fetch, run, finish, renew, reclaim.

Invariants:

* A slot (a permit of the queue, and a unit of the manager's shared capacity
  if it has one) is taken before an entry is claimed, never after: the fetch
  asks the server for at most as many entries as there are free slots, and a
  takeover claims at most as many. When there is nothing to fetch, the
  consumer waits with a plain XREAD (outside the group) for entries newer than
  those the fetch saw: waiting claims nothing.
* Every entry this consumer holds is one of its running attempts, renewed
  every third of the lease by `maintain`. Fetch and maintain never overlap in
  one consumer, so maintain always knows every attempt the fetch started.
  Entries it holds that someone else now owns are reported as lost, and their
  local attempt is cancelled: the new owner runs the task, and this
  consumer's outcome would be fenced anyway. So is the attempt of an entry
  deleted from its stream while held: `maintain` logs it as `task.lost` and
  queues the task again, to run as a new attempt.
* Outcomes are recorded by `finish`, batched: attempts that end in the same
  turn of the event loop share one round trip. A slot is released as soon as
  its task function returns, so the next fetch overlaps the recording of the
  outcome; the server may then briefly count, as processing, the attempts
  whose outcomes are on their way besides those running (never more task
  functions run at once than there are slots).
* Cancellation (shutdown, or the event loop closing) never loses a task: an
  attempt that did not record its outcome stays pending under this consumer
  and is handed back (`release`) or taken over after the lease.
* The task function runs in a task of its own, so that `cancel_task` can
  cancel the function without cancelling the bookkeeping around it.

Losing the server (a dropped connection, a restart) is survived by retrying,
never by resending blindly:

* The fetch and maintain loops start their next round after a capped,
  jittered exponential backoff (`kew.connection.Reconnect`), with one warning
  per outage. A fetch whose reply was lost leaves started attempts this
  consumer does not know of; `maintain` makes them idle at once, so they run
  again (a new attempt) here or elsewhere.
* The blocking wait is a plain XREAD that claims nothing, so a lost reply
  costs nothing; it runs under a client-side deadline (`BLOCK_MS` plus
  `READ_MARGIN`), so a half-open connection cannot stall fetching for ever.
* The fetch, maintain and finish calls wait one lease for their reply (at
  least `MIN_CALL_TIMEOUT`), not the general `COMMAND_TIMEOUT`: a half-open
  connection must not stall renewals while others take over.
* A `finish` call that fails for want of a connection is repeated with
  backoff for up to one lease (the entry stays held and renewed meanwhile).
  `finish` is fenced, so a repeat is harmless; when the first call was in
  fact recorded and only its reply was lost, the repeat is refused, and the
  task's history, which then holds this consumer's outcome of this attempt,
  tells it apart from a real fence.

Known limitations: an outage longer than a lease may let another consumer take
over the attempts this one was running or recording, which then run again
(at-least-once); `shutdown` abandons, after a short grace, a task function that
ignores its cancellation (it is logged, and its entry is handed back anyway).

Policies (retries, the breaker, due times) are decided by the functions; this
module only waits as they say: until the breaker's reset time, until the next
due task, or for a new entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions as rex

from kew import functions
from kew.attempts import Attempt, FinishBatcher, Outcome, refuse
from kew.connection import Reconnect
from kew.errors import ConnectionFailedError, KewError
from kew.events.models import (
    TaskCancelled,
    TaskFailed,
    TaskRetryScheduled,
    TaskSucceeded,
)
from kew.execution import AttemptKey, RunningFunctions, cancel_functions, run_attempt
from kew.hooks import Hooks
from kew.keys import LEVELS, QueueKeys
from kew.models import QueueConfig
from kew.permits import Slots
from kew.registry import Registry
from kew.status import history
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
MIN_CALL_TIMEOUT = 1.0
"""The shortest deadline of a fetch or maintain call (see `_call_timeout`)."""
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
        self._functions: RunningFunctions = {}
        self._batcher = FinishBatcher(self._record_surely)
        self._stopping = False
        self._stopped = asyncio.Event()
        self._fetcher: asyncio.Task[None] | None = None
        self._maintainer: asyncio.Task[None] | None = None
        self._read: asyncio.Future[Any] | None = None
        self._weights = config.priority_weights
        self._credit = [0, 0, 0]
        self._next_due: float | None = None
        """When the next deferred task or retry is due, on this process's
        monotonic clock (converted from the server's), if known."""
        self._wake = asyncio.Event()
        self._exclusive = asyncio.Lock()
        """Held by fetch and maintain around their call and the bookkeeping of
        its reply, so that maintain always sees every started attempt."""
        self._lease = config.lease_seconds
        """The lease renewed within: the shorter of this process's and the
        queue's stored one, which decides takeovers (kew/lua/40_lease.lua)."""

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        self._fetcher = asyncio.create_task(
            self._fetch_loop(), name=f"kew fetch {self.keys.queue}"
        )
        self._maintainer = asyncio.create_task(
            self._maintain_loop(), name=f"kew maintain {self.keys.queue}"
        )
        logger.info("consumer %s joined queue %s", self.name, self.keys.queue)

    async def stop(self, *, wait: bool, timeout: float | None) -> None:
        """Stop fetching, let running attempts finish within `timeout` (if
        `wait`), cancel the rest, and hand back whatever is still held."""
        self._stopping = True
        self._stopped.set()
        self._wake.set()
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
                await self._batcher.drain()
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
    def _call_timeout(self) -> float:
        """How long a fetch or maintain call may wait for its reply: one lease
        (at least MIN_CALL_TIMEOUT). A renewal that has not answered within a
        lease is too late to keep it anyway; waiting longer on a half-open
        connection would only let other consumers take over what this one
        runs, while it still believes it holds them. A call cut short is
        retried with backoff, on a new connection."""
        return max(self._lease, MIN_CALL_TIMEOUT)

    def wake(self) -> None:
        """Run `maintain` now: something may have become due sooner (a task
        deferred from this process)."""
        self._wake.set()

    def _note_due(self, due: str, server_now: int) -> None:
        """Remember a due time (server ms) as a local monotonic deadline."""
        if not due:
            return
        at = time.monotonic() + (int(float(due)) - int(server_now)) / 1000
        if self._next_due is None or at < self._next_due:
            self._next_due = at
            self._wake.set()

    # -- fetching --------------------------------------------------------

    async def _fetch_loop(self) -> None:
        reconnect = self._reconnect("fetch from")
        while not self._stopping:
            try:
                await self._fetch_once()
            except Exception as exc:
                await self._pause(self._loop_failed(reconnect, exc))
            else:
                reconnect.succeeded()

    def _reconnect(self, what: str) -> Reconnect:
        return Reconnect(
            logger, f"consumer {self.name}: {what} queue {self.keys.queue}"
        )

    @staticmethod
    def _loop_failed(reconnect: Reconnect, exc: Exception) -> float:
        """Note a failed round of a loop, which then carries on after the
        returned delay: a lost server is one warning per outage; anything
        else is a bug, logged with its traceback each time, that still must
        not stop the consumer for good."""
        if isinstance(exc, KewError | rex.RedisError | OSError):
            return reconnect.failed(exc)
        logger.error("%s failed; retrying", reconnect.what, exc_info=exc)
        return reconnect.failed(exc, logged=True)

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
        async with self._exclusive:
            try:
                with internal():
                    reply = await functions.call(
                        self.client,
                        "fetch",
                        self.keys.queue_keys,
                        args,
                        timeout=self._call_timeout,
                    )
            except BaseException:
                self.slots.release(n)
                raise
            rows, next_due, gate, now, newest, allowed, moved = cast(
                tuple[list[list[str]], str, str, int, list[str], int, list[str]],
                reply,
            )
            self.slots.release(n - self._dispatch(rows, int(now)))
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

    def _level(self, stream: str) -> int:
        return self.keys.ready_all.index(stream) + 1

    def _dispatch(
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
            row = await self._batcher.finish(outcome)
            if row[0] == "ok":
                if row[2] == "retry":
                    self._note_due(row[3], self._server_now(row[1]))
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
                timeout=self._call_timeout,
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

    async def _record_surely(self, outcomes: list[Outcome]) -> list[list[str]]:
        """Record outcomes (`_record`), repeating the call with backoff for up
        to one lease while the server cannot be reached. A repeat that is
        refused because the first call was recorded after all counts as
        recorded (see `_recorded_before`)."""
        reconnect = self._reconnect("record outcomes on")
        give_up = time.monotonic() + self._lease
        repeated = False
        while True:
            try:
                rows = await self._record(outcomes)
            except ConnectionFailedError as exc:
                delay = reconnect.failed(exc)
                if self._stopping or time.monotonic() + delay > give_up:
                    raise
                repeated = True
                await asyncio.sleep(delay)
            else:
                reconnect.succeeded()
                break
        if repeated:
            for i, row in enumerate(rows):
                if row[0] == "fenced":
                    rows[i] = await self._recorded_before(outcomes[i]) or row

        return rows

    async def _recorded_before(self, outcome: Outcome) -> list[str] | None:
        """The row `finish` returned for `outcome` if an earlier call recorded
        it, found in the task's history: an outcome event of this attempt
        written by this consumer (only its `finish` writes those); None if
        there is none, or the history cannot be read."""
        a = outcome.attempt
        try:
            with internal():
                events = await history(self.client, self.keys, a.task_id, 100)
        except KewError:
            return None
        for event in reversed(events):
            if event.attempt != a.attempt or event.actor != self.name:
                continue
            match event:
                case TaskRetryScheduled():
                    return ["ok", event.id, "retry", str(event.due_at)]
                case TaskSucceeded():
                    return ["ok", event.id, "completed", ""]
                case TaskCancelled():
                    return ["ok", event.id, "cancelled", ""]
                case TaskFailed():
                    return ["ok", event.id, "failed", ""]
                case _:
                    continue
        return None

    async def _record(self, outcomes: list[Outcome]) -> list[list[str]]:
        keys = list(self.keys.queue_keys)
        args: list[str | int | float] = [
            self.name,
            self.expiry_seconds,
            self.keys.finished_channel,
        ]
        for o in outcomes:
            a = o.attempt
            keys.append(self.keys.task(a.task_id))
            args += [
                a.task_id,
                a.entry,
                self._level(a.ready),
                str(a.attempt),
                str(a.version),
                o.kind,
                o.value,
                o.data,
                random.random(),
            ]
        # Suppressed: the process spans have ended, and one call records many.
        with internal():
            reply = await functions.call(
                self.client, "finish", keys, args, timeout=self._call_timeout
            )
        rows = functions.rows(reply)
        moved = [row[4] for row in rows if row[0] == "ok" and row[4]]
        self.telemetry.breaker_moved(self.keys.queue, moved)
        return rows

    # -- leases ----------------------------------------------------------

    async def _maintain_loop(self) -> None:
        reconnect = self._reconnect("renew the leases on")
        while not self._stopping:
            try:
                await self._maintain_once()
            except Exception as exc:
                failed = self._loop_failed(reconnect, exc)
            else:
                reconnect.succeeded()
                failed = None
            # A little jitter keeps many consumers from renewing in lockstep;
            # a task due sooner than the next renewal wakes the loop earlier,
            # and its promotion wakes every consumer waiting for an entry.
            # After a failure the next round may come sooner, with backoff.
            pause = self._lease / 3 * random.uniform(0.9, 1.0)
            if failed is not None:
                pause = min(pause, failed)
            if self._next_due is not None:
                pause = min(pause, max(self._next_due - time.monotonic(), 0.001))
            self._wake.clear()
            if self._stopping:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._wake.wait()

    async def _maintain_once(self) -> None:
        # Under the lock: a fetch whose started attempts are not registered yet
        # would make them look like entries this consumer does not know of.
        async with self._exclusive:
            room = 0 if self._stopping else self.slots.take_free()
            try:
                with internal():
                    reply = await functions.call(
                        self.client,
                        "maintain",
                        [*self.keys.queue_keys, self.keys.worker(self.name)],
                        self._maintain_args(room),
                        timeout=self._call_timeout,
                    )
            except BaseException:
                self.slots.release(room)
                raise
            self._after_maintain(room, reply)

    def _maintain_args(self, room: int) -> list[str | int]:
        held: dict[str, list[str]] = {stream: [] for stream in self.keys.ready_all}
        for attempt, _ in self.running.values():
            held[attempt.ready] += [attempt.entry, attempt.task_id]
        lease_ms = int(self.config.lease_seconds * 1000)
        args: list[str | int] = [
            self.name,
            lease_ms,
            lease_ms,
            json.dumps({"queue": self.keys.queue, "max_workers": self.slots.total}),
            self.keys.task_prefix,
            room,
            self.expiry_seconds,
            self.keys.finished_channel,
        ]
        for level in LEVELS:
            pairs = held[self.keys.ready(level)]
            args += [len(pairs) // 2, *pairs]
        return args

    def _after_maintain(self, room: int, reply: Any) -> None:
        lost, rows, cancel, next_due, now, lease_ms, moved, dead_lettered = cast(
            tuple[
                list[list[str]],
                list[list[str]],
                list[str],
                str,
                int,
                int,
                list[str],
                int,
            ],
            reply,
        )
        self.telemetry.breaker_moved(self.keys.queue, moved)
        self.telemetry.dead_letters(self.keys.queue, int(dead_lettered))
        self._lease = min(self.config.lease_seconds, int(lease_ms) / 1000)
        self._next_due = None
        self._note_due(next_due, now)
        self.slots.release(room - self._dispatch(rows, int(now), taken_over=True))
        if lost:
            self._forget({entry: why for entry, why in lost})
        for task_id in cancel:
            self.cancel(task_id)

    def _forget(self, lost: dict[str, str]) -> None:
        """Cancel the local runs of attempts whose entries this consumer no
        longer holds: `lost` maps each such entry to 'taken over' or 'deleted'
        (see `renew` in kew/lua/40_lease.lua)."""
        for attempt, task in list(self.running.values()):
            why = lost.get(attempt.entry)
            # An entry whose outcome is being recorded is gone from the server
            # because `finish` acknowledged it first: not lost.
            if why is None or attempt.entry in self.finishing:
                continue
            if why == "deleted":
                logger.warning(
                    "consumer %s: the entry %s of task %r attempt %s was deleted "
                    "from its ready stream (by hand, or a trim); logged as "
                    "task.lost, the task is queued again; cancelling the local run",
                    self.name,
                    attempt.entry,
                    attempt.task_id,
                    attempt.attempt,
                )
            else:
                logger.warning(
                    "consumer %s lost its lease on task %r attempt %s (another "
                    "consumer took it over); cancelling the local run",
                    self.name,
                    attempt.task_id,
                    attempt.attempt,
                )
            task.cancel()
