"""One process's consumer of one queue: fetch, run, finish, renew, reclaim.

Invariants:

* A permit is taken before an entry is claimed, never after: the fetch asks
  the server for at most as many entries as there are free permits, and a
  reclaim takes over at most as many. The one exception is a blocking read
  over several ready streams, which may return one entry per stream; those
  entries are held (and their leases renewed) until permits free up.
* Every entry this consumer holds, running or waiting, is renewed every third
  of the lease by `maintain`. Entries it holds that someone else now owns are
  reported as lost, and their local attempt is cancelled: the new owner runs
  the task, and this consumer's outcome would be fenced anyway.
* Outcomes are recorded by `finish`, batched: attempts that end in the same
  turn of the event loop share one round trip. A permit is released only after
  its outcome is recorded, so the server never shows more attempts of this
  consumer in progress than it has permits.
* Cancellation (shutdown, or the event loop closing) never loses a task: an
  attempt that did not record its outcome stays pending under this consumer
  and is handed back (`release`) or reclaimed after the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pydantic_core
import redis.asyncio as aioredis
import redis.exceptions as rex

from kew import functions
from kew.errors import KewError
from kew.hooks import Hooks
from kew.keys import GROUP, LEVELS, QueueKeys
from kew.models import QueueConfig
from kew.registry import Registry

__all__ = ["Attempt", "Consumer"]

logger = logging.getLogger(__name__)

BLOCK_MS = 10_000
"""How long one blocking read waits for a new entry before it is reissued."""


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One started attempt, as the fetch, start or maintain function returns it."""

    task_id: str
    entry: str
    attempt: int
    version: int
    name: str
    args: str
    tp: str
    ready: str

    @classmethod
    def from_row(cls, row: list[str]) -> Attempt:
        _, task_id, entry, attempt, version, name, args, tp, ready = row
        return cls(task_id, entry, int(attempt), int(version), name, args, tp, ready)


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    attempt: Attempt
    succeeded: bool
    value: str
    """The result as JSON, or the error message."""
    data: str
    """The event's data, as JSON."""
    error_type: str | None = None


class Permits:
    """A counting semaphore that can also hand out every free permit at once."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._changed = asyncio.Event()

    @property
    def in_use(self) -> int:
        return self.total - self.free

    async def acquire(self, n: int = 1) -> None:
        while self.free < n:
            self._changed.clear()
            await self._changed.wait()
        self.free -= n

    def take_free(self) -> int:
        n, self.free = self.free, 0
        return n

    def release(self, n: int = 1) -> None:
        if n:
            self.free += n
            self._changed.set()


class FinishBatcher:
    """Records outcomes, one `finish` call for all those that arrive together."""

    def __init__(self, record: Callable[[list[Outcome]], Awaitable[list[list[str]]]]):
        self._record = record
        self._pending: list[tuple[Outcome, asyncio.Future[list[str]]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def finish(self, outcome: Outcome) -> list[str]:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((outcome, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:500], self._pending[500:]
                try:
                    rows = await self._record([outcome for outcome, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), row in zip(batch, rows, strict=True):
                    if not future.done():
                        future.set_result(row)
        finally:
            self._flusher = None

    async def drain(self) -> None:
        """Wait until every outcome handed in so far is recorded."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)


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
        expiry_seconds: int,
        hooks: Hooks,
        on_finished: Callable[[str, str], None],
    ) -> None:
        self.client = client
        self.blocking_client = blocking_client
        self.keys = keys
        self.config = config
        self.name = name
        self.registry = registry
        self.expiry_seconds = expiry_seconds
        self.hooks = hooks
        self.on_finished = on_finished
        self.permits = Permits(config.max_workers)
        self.running: dict[str, tuple[Attempt, asyncio.Task[None]]] = {}
        self.finishing: set[str] = set()
        """Entries whose outcome is being recorded: still held (and renewed)
        until `finish` answers, but never cancelled as lost meanwhile."""
        self.waiting: dict[str, str] = {}
        """Entries received by a blocking read, not yet started: entry -> stream."""
        self._batcher = FinishBatcher(self._record)
        self._stopping = False
        self._fetcher: asyncio.Task[None] | None = None
        self._maintainer: asyncio.Task[None] | None = None
        self._read: asyncio.Task[Any] | None = None
        self._stopped = asyncio.Event()

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
        if self._read is not None:
            self._read.cancel()
        self.permits.release(0)
        if self._fetcher is not None:
            self._fetcher.cancel()
            await asyncio.gather(self._fetcher, return_exceptions=True)

        tasks = [task for _, task in self.running.values()]
        if tasks and wait:
            await asyncio.wait(tasks, timeout=timeout)
        for _, task in list(self.running.values()):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._batcher.drain()

        if self._maintainer is not None:
            self._maintainer.cancel()
            await asyncio.gather(self._maintainer, return_exceptions=True)
        try:
            released = await functions.call(
                self.client,
                "release",
                [self.keys.log, self.keys.stats, *self.keys.ready_all],
                [self.name, self.keys.task_prefix, "shutdown"],
            )
            await functions.guarded(self.client.delete(self.keys.worker(self.name)))
        except (KewError, rex.RedisError, OSError) as exc:
            logger.warning(
                "consumer %s could not hand back its entries (%s); they will be "
                "reclaimed after the lease",
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

    # -- fetching --------------------------------------------------------

    async def _fetch_loop(self) -> None:
        backoff = 0.05
        while not self._stopping:
            try:
                await self._fetch_once()
                backoff = 0.05
            except (KewError, rex.RedisError, OSError) as exc:
                logger.warning(
                    "consumer %s cannot fetch from queue %s (%s); retrying in %.1fs",
                    self.name,
                    self.keys.queue,
                    exc,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _fetch_once(self) -> None:
        await self.permits.acquire()
        n = 1 + self.permits.take_free()
        try:
            reply = await functions.call(
                self.client,
                "fetch",
                [self.keys.log, self.keys.stats, *self.keys.ready_all],
                [self.name, n, self.keys.task_prefix],
            )
        except BaseException:
            self.permits.release(n)
            raise
        rows = functions.rows(reply)
        self.permits.release(n - self._dispatch(rows))
        if rows or self._stopping:
            return

        entries = await self._blocking_read()
        if not entries:
            return
        for stream, entry, _ in entries:
            self.waiting[entry] = stream
        try:
            await self.permits.acquire(len(entries))
            keys = [self.keys.log, self.keys.stats]
            args: list[str] = [self.name]
            for stream, entry, task_id in entries:
                keys += [stream, self.keys.task(task_id)]
                args += [entry, task_id]
            try:
                reply = await functions.call(self.client, "start", keys, args)
            except BaseException:
                self.permits.release(len(entries))
                raise
        finally:
            for _, entry, _ in entries:
                self.waiting.pop(entry, None)
        self.permits.release(len(entries) - self._dispatch(functions.rows(reply)))

    async def _blocking_read(self) -> list[tuple[str, str, str]]:
        """Wait for a new entry on any ready stream; return (stream, entry id,
        task id) of each entry delivered."""
        self._read = asyncio.ensure_future(
            self.blocking_client.xreadgroup(
                GROUP,
                self.name,
                dict.fromkeys(self.keys.ready_all, ">"),
                count=1,
                block=BLOCK_MS,
            )
        )
        try:
            reply = cast(list[Any], await self._read)
        except asyncio.CancelledError:
            if self._stopping:
                return []
            raise
        finally:
            self._read = None
        entries: list[tuple[str, str, str]] = []
        for stream, stream_entries in reply or []:
            for entry_id, fields in stream_entries:
                entries.append((stream, entry_id, fields.get("task_id", "")))
        return entries

    def _dispatch(self, rows: list[list[str]]) -> int:
        """Start a local run for each started attempt; return how many."""
        started = 0
        for row in rows:
            if row[0] != "started":
                logger.warning(
                    "consumer %s skipped entry %s of task %r: %s",
                    self.name,
                    row[2],
                    row[1],
                    row[3],
                )
                continue
            attempt = Attempt.from_row(row)
            task = asyncio.create_task(
                self._run(attempt), name=f"kew task {attempt.task_id}"
            )
            self.running[attempt.task_id] = (attempt, task)
            started += 1
        return started

    # -- running ---------------------------------------------------------

    async def _run(self, attempt: Attempt) -> None:
        try:
            outcome = await self._execute(attempt)
            self.finishing.add(attempt.entry)
            row = await self._batcher.finish(outcome)
            if row[0] == "ok":
                self.on_finished(self.keys.queue, attempt.task_id)
                if not self.hooks.empty:
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
                "reclaimed after the lease",
                self.name,
                attempt.task_id,
                attempt.attempt,
            )
        finally:
            self.finishing.discard(attempt.entry)
            current = self.running.get(attempt.task_id)
            if current is not None and current[0] is attempt:
                del self.running[attempt.task_id]
            self.permits.release()

    async def _execute(self, attempt: Attempt) -> Outcome:
        started = time.perf_counter()
        function = self.registry.get(attempt.name)
        if function is None:
            return _failure(
                attempt,
                f"Task function {attempt.name!r} is not registered in this process "
                f"({self.name}): import the module that defines it (kew worker "
                "--import MODULE) or submit the task from a process that has it.",
                "TaskFunctionError",
            )
        if self.hooks.on_task_start is not None:
            await self.hooks.before(attempt)
        try:
            arguments = json.loads(attempt.args)
            async with asyncio.timeout(self.config.task_timeout):
                result = await function.run(arguments["args"], arguments["kwargs"])
        except TimeoutError as exc:
            if self.config.task_timeout is not None and not str(exc):
                return _failure(
                    attempt,
                    f"Task timed out after {self.config.task_timeout}s",
                    "TimeoutError",
                    exc,
                )
            return _failure(attempt, _describe(exc), _type_name(exc), exc)
        except Exception as exc:
            return _failure(attempt, _describe(exc), _type_name(exc), exc)
        try:
            value = pydantic_core.to_json(result).decode()
        except pydantic_core.PydanticSerializationError as exc:
            return _failure(
                attempt,
                f"The result of task {attempt.task_id!r} is not JSON-serialisable "
                f"({exc}); return JSON types, or a pydantic model.",
                "SerializationError",
            )
        logger.info(
            "task %r (%s) attempt %s on queue %s succeeded in %.3fs",
            attempt.task_id,
            attempt.name,
            attempt.attempt,
            self.keys.queue,
            time.perf_counter() - started,
        )
        return Outcome(attempt, True, value, '{"result":' + value + "}")

    async def _record(self, outcomes: list[Outcome]) -> list[list[str]]:
        keys = [self.keys.log, self.keys.stats]
        args: list[str | int] = [
            self.name,
            self.expiry_seconds,
            self.keys.finished_channel,
        ]
        for o in outcomes:
            a = o.attempt
            keys += [a.ready, self.keys.task(a.task_id)]
            args += [
                a.task_id,
                a.entry,
                str(a.attempt),
                str(a.version),
                "succeeded" if o.succeeded else "failed",
                o.value,
                o.data,
            ]
        return functions.rows(await functions.call(self.client, "finish", keys, args))

    # -- leases ----------------------------------------------------------

    async def _maintain_loop(self) -> None:
        interval = self.config.lease_seconds / 3
        while not self._stopping:
            try:
                await self._maintain_once()
            except (KewError, rex.RedisError, OSError) as exc:
                logger.warning(
                    "consumer %s cannot renew its leases on queue %s (%s)",
                    self.name,
                    self.keys.queue,
                    exc,
                )
            # A little jitter keeps many consumers from renewing in lockstep.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval * random.uniform(0.9, 1.0)):
                    await self._stopped.wait()

    async def _maintain_once(self) -> None:
        held: dict[str, list[str]] = {stream: [] for stream in self.keys.ready_all}
        for attempt, _ in self.running.values():
            held[attempt.ready].append(attempt.entry)
        for entry, stream in self.waiting.items():
            held[stream].append(entry)
        room = 0 if self._stopping else self.permits.take_free()
        lease_ms = int(self.config.lease_seconds * 1000)
        args: list[str | int] = [
            self.name,
            lease_ms,
            lease_ms,
            json.dumps({"queue": self.keys.queue, "max_workers": self.permits.total}),
            self.keys.task_prefix,
            room,
        ]
        for level in LEVELS:
            ids = held[self.keys.ready(level)]
            args += [len(ids), *ids]
        try:
            reply = await functions.call(
                self.client,
                "maintain",
                [
                    self.keys.log,
                    self.keys.stats,
                    self.keys.worker(self.name),
                    *self.keys.ready_all,
                ],
                args,
            )
        except BaseException:
            self.permits.release(room)
            raise
        lost, rows = cast(tuple[list[str], list[list[str]]], reply)
        self.permits.release(room - self._dispatch(rows))
        if lost:
            self._forget(set(lost))

    def _forget(self, lost: set[str]) -> None:
        for attempt, task in list(self.running.values()):
            # An entry whose outcome is being recorded is gone from the server
            # because `finish` acknowledged it first: not lost.
            if attempt.entry in lost and attempt.entry not in self.finishing:
                logger.warning(
                    "consumer %s lost its lease on task %r attempt %s (another "
                    "consumer took it over); cancelling the local run",
                    self.name,
                    attempt.task_id,
                    attempt.attempt,
                )
                task.cancel()

    # -- status ----------------------------------------------------------

    @property
    def busy(self) -> int:
        return len(self.running)


def _type_name(exc: BaseException) -> str:
    return type(exc).__qualname__


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text if text else _type_name(exc)


def _failure(
    attempt: Attempt, error: str, error_type: str, exc: BaseException | None = None
) -> Outcome:
    logger.warning(
        "task %r (%s) attempt %s failed: %s",
        attempt.task_id,
        attempt.name,
        attempt.attempt,
        error,
    )
    if exc is not None:
        logger.debug("task %r failed with", attempt.task_id, exc_info=exc)
    data = pydantic_core.to_json({"error": error, "error_type": error_type}).decode()
    return Outcome(attempt, False, error, data, error_type)
