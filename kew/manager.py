"""TaskQueueManager: the public entry point.

A manager connects to one server, creates or attaches to queues, submits
tasks, answers status questions and, unless told not to (`consume=False`),
runs tasks of its queues in this event loop through one consumer per queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, Self, cast

import redis.asyncio as aioredis
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from kew import directory, functions
from kew.attempts import Attempt
from kew.audit import Archive, RetentionReport, apply_retention, import_lines
from kew.closing import LoopGuard
from kew.connection import (
    check_server,
    client_name,
    make_client,
    resolve_url,
    safe_url,
)
from kew.consumer import Consumer
from kew.errors import (
    ConfigurationError,
    KewError,
    QueueAlreadyExistsError,
    TaskNotFoundError,
)
from kew.events.models import entry_time
from kew.hooks import Hook, Hooks
from kew.keys import (
    DEFAULT_PREFIX,
    PREFIX_ENV,
    QueueKeys,
    check_prefix,
)
from kew.models import QueueConfig, TaskInfo, TaskStatus
from kew.permits import Permits, SharedCapacity, Slots
from kew.reads import NOT_CONNECTED, QueueHandle, Reads
from kew.registry import Registry
from kew.registry import registry as default_registry
from kew.sampler import sample, sample_forever, sample_last
from kew.server import EmbeddedServer
from kew.status import (
    prune_consumers,
)
from kew.submission import (
    Submission,
    check_submit_reply,
    options,
    prepare,
    prepare_batch,
)
from kew.telemetry import Telemetry
from kew.waiters import Waiters

__all__ = ["TaskQueueManager"]

logger = logging.getLogger(__name__)

_REMEMBERED_TASKS = 100_000


class TaskQueueManager(Reads):
    """Submit tasks to queues and run them in this process.

        async with TaskQueueManager() as manager:
            await manager.create_queue(QueueConfig(name="orders", max_workers=4))
            await manager.submit_task("order-1", "orders", process_order, order_id=1)
            info = await manager.wait_for_task("order-1", timeout=10)

    `redis_url` defaults to `KEW_REDIS_URL`, else an embedded server private to
    this process. `cleanup_on_start` removes consumers that are gone and hold
    nothing; it never deletes tasks. `consume=False` makes a manager that
    submits and reads status but runs no tasks (e.g. a web process).
    `max_concurrency` caps the tasks this process runs across all its queues;
    when queues wait for that shared capacity, the one with the most urgent
    `QueueConfig.priority` is served first.

    Tracing and metrics go to `tracer_provider` and `meter_provider` (of the
    OpenTelemetry SDK), else to the global ones; with no SDK they cost next to
    nothing. `trace_links_only=True` makes the attempts of the tasks this
    manager submits start traces of their own that link to the submitter's,
    instead of joining it (for producers that fan out many tasks at once);
    see kew/telemetry.py.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        cleanup_on_start: bool = True,
        task_expiry_seconds: int = 86_400,
        *,
        key_prefix: str | None = None,
        consume: bool = True,
        max_concurrency: int | None = None,
        max_connections: int = 100,
        registry: Registry | None = None,
        on_task_start: Hook | None = None,
        on_task_complete: Hook | None = None,
        on_task_fail: Hook | None = None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        trace_links_only: bool = False,
    ) -> None:
        if (
            not isinstance(task_expiry_seconds, int)
            or isinstance(task_expiry_seconds, bool)
            or task_expiry_seconds < 1
        ):
            raise ConfigurationError(
                f"task_expiry_seconds={task_expiry_seconds!r} is not valid: give a "
                "whole number of seconds, 1 or more (the default is 86400, a day)."
            )
        self.redis_url = resolve_url(redis_url)
        self.cleanup_on_start = cleanup_on_start
        self.task_expiry_seconds = task_expiry_seconds
        self.key_prefix = check_prefix(
            key_prefix or os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX
        )
        self.consume = consume
        if max_concurrency is not None and (
            not isinstance(max_concurrency, int)
            or isinstance(max_concurrency, bool)
            or max_concurrency < 1
        ):
            raise ConfigurationError(
                f"max_concurrency={max_concurrency!r} is not valid: give a whole "
                "number of 1 or more, or None for no limit across queues."
            )
        self.max_concurrency = max_concurrency
        self._shared = (
            SharedCapacity(max_concurrency) if max_concurrency is not None else None
        )
        self.max_connections = max_connections
        self.registry = registry or default_registry
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._hooks = Hooks(
            on_task_start=on_task_start,
            on_task_complete=on_task_complete,
            on_task_fail=on_task_fail,
            describe=self._describe,
        )
        self._telemetry = Telemetry(
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            links_only=trace_links_only,
        )
        self._sampler: asyncio.Task[None] | None = None
        self._guard: LoopGuard | None = None
        """Shuts down when the event loop ends without `shutdown` (kew.closing)."""
        self._server: EmbeddedServer | None = None
        self._client: aioredis.Redis | None = None
        self._waiters: Waiters | None = None
        self._queues: dict[str, QueueHandle] = {}
        self._task_queue: dict[str, str] = {}
        self._submitted: dict[str, float] = {}
        """Task id -> time.monotonic() when this manager began submitting it."""
        self._closed = False

    # -- lifecycle -------------------------------------------------------

    async def initialize(self) -> None:
        """Connect, check the server and load kew's functions into it."""
        if self._client is not None:
            return
        if self._closed:
            raise KewError(
                "This TaskQueueManager was shut down; create a new one instead."
            )
        url = self.redis_url
        if url is None:
            self._server = EmbeddedServer()
            url = self._server.start()
        client = make_client(
            url,
            max_connections=self.max_connections,
            name=client_name(self.key_prefix, self.identity),
        )
        try:
            version = await check_server(client)
            await functions.load(client)
        except BaseException:
            await client.aclose()
            if self._server is not None:
                self._server.stop()
                self._server = None
            raise
        self._client = client
        self._waiters = Waiters(client)
        self._sampler = asyncio.create_task(
            sample_forever(
                self._telemetry, client, lambda: list(self._queues.values())
            ),
            name="kew metrics sampler",
        )
        self._guard = LoopGuard(lambda: self.shutdown(wait=False))
        logger.info(
            "kew manager %s connected to %s (server %s, prefix %r)",
            self.identity,
            safe_url(url),
            version,
            self.key_prefix,
        )
        if self.cleanup_on_start:
            names = await self._queue_names()
            await prune_consumers(
                client, [QueueKeys(self.key_prefix, name) for name in names]
            )

    async def __aenter__(self) -> Self:
        await self.initialize()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    async def shutdown(self, wait: bool = True, timeout: float | None = 5.0) -> None:
        """Stop consuming: running tasks get `timeout` seconds to finish (when
        `wait`), the rest are cancelled and handed back to other consumers.
        Then close the connections (and the embedded server, if any)."""
        if self._closed:
            return
        self._closed = True
        if self._guard is not None:
            self._guard.disarm()
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        consumers = [q.consumer for q in self._queues.values() if q.consumer]
        await asyncio.gather(
            *(c.stop(wait=wait, timeout=timeout) for c in consumers),
            return_exceptions=True,
        )
        if self._client is not None:
            await sample_last(
                self._telemetry, self._client, list(self._queues.values())
            )
        if self._waiters is not None:
            await self._waiters.close()
            self._waiters = None
        for queue in self._queues.values():
            if queue.blocking_client is not None:
                await queue.blocking_client.aclose()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        logger.info("kew manager %s shut down", self.identity)

    @property
    def client(self) -> aioredis.Redis:
        """The manager's Redis client (after `initialize`)."""
        if self._client is None:
            raise KewError(NOT_CONNECTED)
        return self._client

    # -- queues ----------------------------------------------------------

    async def create_queue(self, config: QueueConfig) -> None:
        """Create the queue (or update its stored configuration) and, unless this
        manager does not consume, start running its tasks here."""
        if not isinstance(config, QueueConfig):
            raise ConfigurationError(
                f"create_queue expects a QueueConfig, not {config!r}."
            )
        if config.name in self._queues:
            raise QueueAlreadyExistsError(
                f"Queue {config.name!r} already exists in this manager; create it "
                "once, or use another name."
            )
        client = self.client
        keys = QueueKeys(self.key_prefix, config.name)
        outcome = await directory.create_queue(client, keys, config, self.identity)
        queue = QueueHandle(config, keys)
        self._queues[config.name] = queue
        logger.info("queue %s %s", config.name, outcome)
        if self.consume:
            await self._consume(queue)
        await sample(self._telemetry, client, [queue])

    async def attach_queue(self, name: str) -> QueueConfig:
        """Run the tasks of a queue created elsewhere (by another process), with
        the configuration stored when it was created; returns that config.
        Works also for a manager made with `consume=False`, which consumes only
        the queues it attaches to this way."""
        queue = await self._queue(name)
        if queue.consumer is None:
            await self._consume(queue)
            await sample(self._telemetry, self.client, [queue])
        return queue.config

    async def _consume(self, queue: QueueHandle) -> None:
        self._start_consumer(queue)
        consumer = queue.consumer
        assert consumer is not None
        waiters = cast(Waiters, self._waiters)
        await waiters.listen(queue.keys.cancel_channel, consumer.cancel)

    def _start_consumer(self, queue: QueueHandle) -> None:
        assert self.redis_url is not None or self._server is not None
        url = self.redis_url or cast(EmbeddedServer, self._server).url
        assert url is not None
        queue.blocking_client = make_client(
            url, blocking=True, name=client_name(self.key_prefix, self.identity)
        )
        config = queue.config
        consumer = Consumer(
            client=self.client,
            blocking_client=queue.blocking_client,
            keys=queue.keys,
            config=config,
            name=self.identity,
            registry=self.registry,
            slots=Slots(Permits(config.max_workers), self._shared, config.priority),
            expiry_seconds=self.task_expiry_seconds,
            hooks=self._hooks,
            on_finished=self._task_finished,
            telemetry=self._telemetry,
        )
        queue.consumer = consumer
        consumer.start()

    async def _queue(self, name: str) -> QueueHandle:
        """A queue this manager runs, or one another process created."""
        queue = self._queues.get(name)
        if queue is not None:
            return queue
        keys = QueueKeys(self.key_prefix, name)
        queue = QueueHandle(await directory.stored_config(self.client, keys), keys)
        self._queues[name] = queue
        return queue

    async def queue_names(self) -> list[str]:
        """The names of the queues under this manager's prefix."""
        return await self._queue_names()

    async def _queue_names(self) -> list[str]:
        names = await directory.listed_queues(self.client, self.key_prefix)
        return sorted(set(names) | set(self._queues))

    # -- tasks -----------------------------------------------------------

    async def submit_task(
        self,
        task_id: str,
        queue_name: str,
        task_func: Callable[..., Any] | str,
        *args: Any,
        task_type: str | None = None,
        priority: Any = None,
        task_name: str | None = None,
        max_retries: int | None = None,
        retry_delay: float | timedelta | None = None,
        task_timeout: float | timedelta | None = None,
        _defer_by: float | timedelta | None = None,
        _defer_until: datetime | None = None,
        **kwargs: Any,
    ) -> TaskInfo:
        """Submit one task: `task_func(*args, **kwargs)` will run on the queue.

        `task_func` is an async function (registered on the way) or the name of
        a registered one. `priority` orders it within the queue (default
        MEDIUM). `max_retries`, `retry_delay` and `task_timeout` override the
        queue's policies for this task; `_defer_by` (seconds or a timedelta) or
        `_defer_until` (an aware datetime) make it wait until then. The names
        of these options cannot be used as the task function's own keyword
        arguments (pass such arguments positionally).

        Raises TaskAlreadyExistsError, QueueNotFoundError, QueueFullError, or a
        ConfigurationError for bad input; a task that raised any of these was
        not submitted.
        """
        queue = await self._queue(queue_name)
        submission = prepare(
            self.registry,
            task_id=task_id,
            task_func=task_func,
            args=args,
            kwargs=kwargs,
            policies=options(
                queue.config,
                max_retries=max_retries,
                retry_delay=retry_delay,
                task_timeout=task_timeout,
                defer_by=_defer_by,
                defer_until=_defer_until,
            ),
            task_type=task_type,
            priority=priority,
            task_name=task_name,
        )
        (info,) = await self._submit(queue, [submission])
        return info

    async def submit_tasks(
        self, queue_name: str, tasks: list[dict[str, Any]]
    ) -> list[TaskInfo]:
        """Submit many tasks in one round trip, all or nothing.

        Each dict holds `task_id` and `task_func`, and may hold `args`,
        `kwargs`, `task_type`, `priority`, `task_name`, `max_retries`,
        `retry_delay`, `task_timeout`, `_defer_by` and `_defer_until`. A
        duplicate id (inside the batch or already in the queue), too little
        room under `max_size`, or any bad task rejects the whole batch, and the
        error names the offending ids.
        """
        queue = await self._queue(queue_name)
        submissions = prepare_batch(self.registry, queue.config, tasks)
        if not submissions:
            return []
        return await self._submit(queue, submissions)

    async def _submit(
        self, queue: QueueHandle, batch: list[Submission]
    ) -> list[TaskInfo]:
        keys = queue.keys
        started = time.monotonic()
        with self._telemetry.send(keys.queue, batch) as send:
            argv: list[str] = [self.identity]
            for submission in send.stamp():
                argv += submission.argv()
            reply = cast(
                list[str],
                await functions.call(
                    self.client,
                    "submit",
                    [*keys.queue_keys, *(keys.task(s.task_id) for s in batch)],
                    argv,
                ),
            )
            check_submit_reply(reply, keys.queue)
            send.submitted(reply[2::3])
        deferred = any(s.options.defer_until_ms or s.options.defer_by_ms for s in batch)
        if deferred and queue.consumer is not None:
            queue.consumer.leases.wake()  # so it learns the new due time at once
        infos: list[TaskInfo] = []
        for i, submission in enumerate(batch):
            self._remember(submission.task_id, keys.queue, started)
            event_id, due = reply[1 + 3 * i], reply[3 + 3 * i]
            infos.append(
                TaskInfo(
                    task_id=submission.task_id,
                    queue_name=keys.queue,
                    task_type=submission.task_type,
                    task_name=submission.name,
                    priority=submission.priority,
                    status=TaskStatus.QUEUED,
                    queued_time=entry_time(event_id),
                    due_time=entry_time(f"{due}-0") if due else None,
                    version=1,
                )
            )
        return infos

    def _remember(
        self, task_id: str, queue_name: str, submitted: float | None = None
    ) -> None:
        self._task_queue[task_id] = queue_name
        if len(self._task_queue) > _REMEMBERED_TASKS:
            del self._task_queue[next(iter(self._task_queue))]
        if submitted is not None:
            self._submitted[task_id] = submitted
            if len(self._submitted) > _REMEMBERED_TASKS:
                del self._submitted[next(iter(self._submitted))]

    async def cancel_task(self, task_id: str, *, queue_name: str | None = None) -> bool:
        """Cancel a task. A queued, deferred or retry-waiting task is cancelled
        at once; a running one cooperatively: its attempt's asyncio task is
        cancelled in whichever process runs it, and the task ends `cancelled`
        (use wait_for_task to see it end). Returns False if the task had
        already ended. Raises TaskNotFoundError for an unknown task.
        """
        queue, _ = await self._find(task_id, queue_name)
        keys = self._queues_keys(queue)
        reply = cast(
            list[str],
            await functions.call(
                self.client,
                "cancel",
                [*keys.queue_keys, keys.task(task_id)],
                [
                    task_id,
                    self.identity,
                    self.task_expiry_seconds,
                    keys.finished_channel,
                    keys.cancel_channel,
                ],
            ),
        )
        if reply[0] == "missing":
            raise TaskNotFoundError(
                f"Task {task_id!r} vanished while it was being cancelled: it had "
                "ended and its record expired, so there is nothing to cancel "
                "(get_task_history() still has its events)."
            )
        if reply[0] == "cancelled":
            self._task_finished(queue, task_id)
        elif reply[0] == "requested":
            known = self._queues.get(queue)
            if known is not None and known.consumer is not None:
                known.consumer.cancel(task_id)
        return reply[0] != "finished"

    def _queues_keys(self, queue: str) -> QueueKeys:
        known = self._queues.get(queue)
        return known.keys if known else QueueKeys(self.key_prefix, queue)

    def _task_finished(self, queue: str, task_id: str) -> None:
        if self._waiters is not None:
            self._waiters.notify(queue, task_id)

    async def _describe(self, attempt: Attempt) -> TaskInfo:
        for name, queue in self._queues.items():
            if attempt.ready.startswith(queue.keys.base):
                return await self.get_task_status(attempt.task_id, queue_name=name)
        raise TaskNotFoundError(f"Task {attempt.task_id!r} is in no known queue.")

    # -- dead letters ----------------------------------------------------

    async def apply_retention(
        self, queue_name: str, archive: Archive
    ) -> RetentionReport:
        """Apply the queue's retention policy (QueueConfig.retention_seconds):
        archive the events older than that to `archive` (a JSON Lines file,
        appended to and fsynced, or a callback taking a list of events), then
        trim them from the log. Only whole ended tasks are trimmed, at the
        head of the log; see kew.audit. Returns what was archived and trimmed
        (`archived`), and, if a task holds the trim point, which one, since
        when and why (`held_by`, `held_since`, `held_because`)."""
        queue = await self._queue(queue_name)
        seconds = queue.config.retention_seconds
        if seconds is None:
            raise ConfigurationError(
                f"Queue {queue_name!r} has no retention policy: create it with "
                "QueueConfig(retention_seconds=...) to bound its log."
            )
        return await apply_retention(
            self.client, queue.keys, int(seconds * 1000), archive
        )

    async def import_log(self, lines: Iterable[dict[str, Any]]) -> dict[str, int]:
        """Load exported log lines (kew.audit, `kew export`) into this
        manager's prefix, which must not hold their queues yet, and rebuild
        the projections from them. Returns the events imported per queue."""
        report = await import_lines(self.client, self.key_prefix, lines)
        return report.queues

    async def requeue_dead_letters(self, queue_name: str, limit: int = 1000) -> int:
        """Send dead-lettered tasks back to the queue as new attempts; returns
        how many went back. Run it once the cause of the crash loop is fixed."""
        queue = await self._queue(queue_name)
        requeued, dropped = cast(
            list[int],
            await functions.call(
                self.client,
                "requeue",
                queue.keys.queue_keys,
                [self.identity, queue.keys.task_prefix, limit],
            ),
        )
        if dropped:
            logger.info(
                "dropped %s dead letters of queue %s whose task was gone or "
                "already requeued",
                dropped,
                queue_name,
            )
        return int(requeued)
