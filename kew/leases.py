"""One consumer's lease loop: renewals, takeovers, dead letters, lost entries.

Every third of the lease, `Leases.run` calls the `maintain` function
(kew/lua/40_lease.lua) once for its consumer (kew/consumer.py). The call
renews the entries the consumer holds, takes over entries idle longer than the
lease (as many as the consumer has free slots, taken before the call),
dead-letters those redelivered too often, promotes due tasks, and reports the
entries the consumer no longer holds.

Invariants:

* Every entry a consumer holds is one of its running attempts, renewed every
  third of the lease here. Fetch and maintain never overlap in one consumer
  (`Consumer.exclusive`), so maintain always knows every attempt the fetch
  started. Entries it holds that someone else now owns are reported as lost,
  and their local attempt is cancelled: the new owner runs the task, and this
  consumer's outcome would be fenced anyway. So is the attempt of an entry
  deleted from its stream while held: `maintain` logs it as `task.lost` and
  queues the task again, to run as a new attempt.
* The loop starts its next round after a capped, jittered exponential backoff
  when the server cannot be reached (`kew.connection.Reconnect`), with one
  warning per outage. A fetch whose reply was lost leaves started attempts the
  consumer does not know of; `maintain` makes them idle at once, so they run
  again (a new attempt) here or elsewhere.
* The fetch, maintain and finish calls wait one lease for their reply (at
  least `MIN_CALL_TIMEOUT`, see `Leases.call_timeout`), not the general
  `COMMAND_TIMEOUT`: a half-open connection must not stall renewals while
  others take over.

Known limitations: an outage longer than a lease may let another consumer take
over the attempts this one was running or recording, which then run again
(at-least-once).

When the next deferred task or retry is due, the loop wakes then (rather than
at its next renewal), so that `maintain` promotes it on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from typing import TYPE_CHECKING, Any, cast

from kew import functions
from kew.keys import LEVELS
from kew.telemetry import internal

if TYPE_CHECKING:
    from kew.consumer import Consumer

__all__ = ["Leases"]

logger = logging.getLogger(__name__)

MIN_CALL_TIMEOUT = 1.0
"""The shortest deadline of a fetch or maintain call (see `call_timeout`)."""


class Leases:
    """The lease loop of one consumer, and what it knows of time: the lease
    renewed within, and when the next task is due."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.lease = consumer.config.lease_seconds
        """The lease renewed within: the shorter of this process's and the
        queue's stored one, which decides takeovers (kew/lua/40_lease.lua)."""
        self._next_due: float | None = None
        """When the next deferred task or retry is due, on this process's
        monotonic clock (converted from the server's), if known."""
        self._wake = asyncio.Event()

    @property
    def call_timeout(self) -> float:
        """How long a fetch or maintain call may wait for its reply: one lease
        (at least MIN_CALL_TIMEOUT). A renewal that has not answered within a
        lease is too late to keep it anyway; waiting longer on a half-open
        connection would only let other consumers take over what this one
        runs, while it still believes it holds them. A call cut short is
        retried with backoff, on a new connection."""
        return max(self.lease, MIN_CALL_TIMEOUT)

    def wake(self) -> None:
        """Run `maintain` now: something may have become due sooner (a task
        deferred from this process), or the consumer is stopping."""
        self._wake.set()

    def note_due(self, due: str, server_now: int) -> None:
        """Remember a due time (server ms) as a local monotonic deadline."""
        if not due:
            return
        at = time.monotonic() + (int(float(due)) - int(server_now)) / 1000
        if self._next_due is None or at < self._next_due:
            self._next_due = at
            self._wake.set()

    async def run(self) -> None:
        """Maintain every third of the lease (sooner when a task is due), until
        the consumer stops."""
        consumer = self.consumer
        reconnect = consumer.reconnect(logger, "renew the leases on")
        while not consumer.stopping:
            try:
                await self._maintain_once()
            except Exception as exc:
                failed = reconnect.round_failed(exc)
            else:
                reconnect.succeeded()
                failed = None
            # A little jitter keeps many consumers from renewing in lockstep;
            # a task due sooner than the next renewal wakes the loop earlier,
            # and its promotion wakes every consumer waiting for an entry.
            # After a failure the next round may come sooner, with backoff.
            pause = self.lease / 3 * random.uniform(0.9, 1.0)
            if failed is not None:
                pause = min(pause, failed)
            if self._next_due is not None:
                pause = min(pause, max(self._next_due - time.monotonic(), 0.001))
            self._wake.clear()
            if consumer.stopping:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._wake.wait()

    async def _maintain_once(self) -> None:
        consumer = self.consumer
        # Under the lock: a fetch whose started attempts are not registered yet
        # would make them look like entries this consumer does not know of.
        async with consumer.exclusive:
            room = 0 if consumer.stopping else consumer.slots.take_free()
            try:
                with internal():
                    reply = await functions.call(
                        consumer.client,
                        "maintain",
                        [
                            *consumer.keys.queue_keys,
                            consumer.keys.worker(consumer.name),
                        ],
                        self._maintain_args(room),
                        timeout=self.call_timeout,
                    )
            except BaseException:
                consumer.slots.release(room)
                raise
            self._after_maintain(room, reply)

    def _maintain_args(self, room: int) -> list[str | int]:
        consumer = self.consumer
        keys = consumer.keys
        held: dict[str, list[str]] = {stream: [] for stream in keys.ready_all}
        for attempt, _ in consumer.running.values():
            held[attempt.ready] += [attempt.entry, attempt.task_id]
        lease_ms = int(consumer.config.lease_seconds * 1000)
        args: list[str | int] = [
            consumer.name,
            lease_ms,
            lease_ms,
            json.dumps({"queue": keys.queue, "max_workers": consumer.slots.total}),
            keys.task_prefix,
            room,
            consumer.expiry_seconds,
            keys.finished_channel,
        ]
        for level in LEVELS:
            pairs = held[keys.ready(level)]
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
        consumer = self.consumer
        queue = consumer.keys.queue
        consumer.telemetry.breaker_moved(queue, moved)
        consumer.telemetry.dead_letters(queue, int(dead_lettered))
        self.lease = min(consumer.config.lease_seconds, int(lease_ms) / 1000)
        self._next_due = None
        self.note_due(next_due, now)
        taken_over = consumer.dispatch(rows, int(now), taken_over=True)
        consumer.slots.release(room - taken_over)
        if lost:
            self._forget({entry: why for entry, why in lost})
        for task_id in cancel:
            consumer.cancel(task_id)

    def _forget(self, lost: dict[str, str]) -> None:
        """Cancel the local runs of attempts whose entries this consumer no
        longer holds: `lost` maps each such entry to 'taken over' or 'deleted'
        (see `renew` in kew/lua/40_lease.lua)."""
        consumer = self.consumer
        for attempt, task in list(consumer.running.values()):
            why = lost.get(attempt.entry)
            # An entry whose outcome is being recorded is gone from the server
            # because `finish` acknowledged it first: not lost.
            if why is None or attempt.entry in consumer.finishing:
                continue
            if why == "deleted":
                logger.warning(
                    "consumer %s: the entry %s of task %r attempt %s was deleted "
                    "from its ready stream (by hand, or a trim); logged as "
                    "task.lost, the task is queued again; cancelling the local run",
                    consumer.name,
                    attempt.entry,
                    attempt.task_id,
                    attempt.attempt,
                )
            else:
                logger.warning(
                    "consumer %s lost its lease on task %r attempt %s (another "
                    "consumer took it over); cancelling the local run",
                    consumer.name,
                    attempt.task_id,
                    attempt.attempt,
                )
            task.cancel()
