"""TaskQueueManager: the public entry point.

A manager connects to one server, creates or attaches to queues, submits
tasks, answers status questions and, unless told not to (`consume=False`),
runs tasks of its queues in this event loop through one consumer per queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any, Self, cast

import redis.asyncio as aioredis

from kew import functions
from kew.connection import check_server, make_client, resolve_url, safe_url
from kew.consumer import Attempt, Consumer
from kew.errors import (
    ConfigurationError,
    KewError,
    QueueAlreadyExistsError,
    QueueFullError,
    QueueNotFoundError,
    ServerError,
    TaskAlreadyExistsError,
    TaskNotFoundError,
    WaitTimeoutError,
)
from kew.events.models import entry_time
from kew.functions import guarded
from kew.hooks import Hook, Hooks
from kew.keys import (
    DEFAULT_PREFIX,
    GROUP,
    PREFIX_ENV,
    QueueKeys,
    check_prefix,
    queue_directory,
)
from kew.models import QueueConfig, TaskInfo, TaskStatus
from kew.projections import Difference, rebuild, verify
from kew.registry import Registry
from kew.registry import registry as default_registry
from kew.server import EmbeddedServer
from kew.submission import prepare, task_info
from kew.waiters import Waiters

__all__ = ["TaskQueueManager"]

logger = logging.getLogger(__name__)

_REMEMBERED_TASKS = 100_000


class _Queue:
    """What a manager knows of one queue."""

    def __init__(self, config: QueueConfig, keys: QueueKeys) -> None:
        self.config = config
        self.keys = keys
        self.consumer: Consumer | None = None
        self.blocking_client: aioredis.Redis | None = None


class TaskQueueManager:
    """Submit tasks to queues and run them in this process.

        async with TaskQueueManager() as manager:
            await manager.create_queue(QueueConfig(name="orders", max_workers=4))
            await manager.submit_task("order-1", "orders", process_order, order_id=1)
            info = await manager.wait_for_task("order-1", timeout=10)

    `redis_url` defaults to `KEW_REDIS_URL`, else an embedded server private to
    this process. `cleanup_on_start` removes consumers that are gone and hold
    nothing; it never deletes tasks. `consume=False` makes a manager that
    submits and reads status but runs no tasks (e.g. a web process).
    """

    def __init__(
        self,
        redis_url: str | None = None,
        cleanup_on_start: bool = True,
        task_expiry_seconds: int = 86_400,
        *,
        key_prefix: str | None = None,
        consume: bool = True,
        max_connections: int = 100,
        registry: Registry | None = None,
        on_task_start: Hook | None = None,
        on_task_complete: Hook | None = None,
        on_task_fail: Hook | None = None,
    ) -> None:
        if (
            not isinstance(task_expiry_seconds, int)  # pyright: ignore[reportUnnecessaryIsInstance]
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
        self.max_connections = max_connections
        self.registry = registry or default_registry
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._hooks = Hooks(
            on_task_start=on_task_start,
            on_task_complete=on_task_complete,
            on_task_fail=on_task_fail,
            describe=self._describe,
        )
        self._server: EmbeddedServer | None = None
        self._client: aioredis.Redis | None = None
        self._waiters: Waiters | None = None
        self._queues: dict[str, _Queue] = {}
        self._task_queue: dict[str, str] = {}
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
        client = make_client(url, max_connections=self.max_connections)
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
        logger.info(
            "kew manager %s connected to %s (server %s, prefix %r)",
            self.identity,
            safe_url(url),
            version,
            self.key_prefix,
        )
        if self.cleanup_on_start:
            await self._prune_consumers()

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
        consumers = [q.consumer for q in self._queues.values() if q.consumer]
        await asyncio.gather(
            *(c.stop(wait=wait, timeout=timeout) for c in consumers),
            return_exceptions=True,
        )
        if self._waiters is not None:
            await self._waiters.close()
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
            raise KewError(
                "The TaskQueueManager is not connected: await manager.initialize() "
                "first, or use `async with TaskQueueManager() as manager`."
            )
        return self._client

    # -- queues ----------------------------------------------------------

    async def create_queue(self, config: QueueConfig) -> None:
        """Create the queue (or update its stored configuration) and, unless this
        manager does not consume, start running its tasks here."""
        if not isinstance(config, QueueConfig):  # pyright: ignore[reportUnnecessaryIsInstance]
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
        stored = config.to_stored()
        encoded = json.dumps(stored, sort_keys=True)
        fields: list[str] = []
        for name, value in stored.items():
            fields += [name, "" if value is None else str(value)]
        outcome = await functions.call(
            client,
            "create_queue",
            [keys.log, keys.config, *keys.ready_all],
            [self.identity, encoded, *fields],
        )
        await guarded(
            client.hset(queue_directory(self.key_prefix), config.name, encoded)
        )
        queue = _Queue(config, keys)
        self._queues[config.name] = queue
        logger.info("queue %s %s", config.name, outcome)
        if self.consume:
            self._start_consumer(queue)

    def _start_consumer(self, queue: _Queue) -> None:
        assert self.redis_url is not None or self._server is not None
        url = self.redis_url or cast(EmbeddedServer, self._server).url
        assert url is not None
        queue.blocking_client = make_client(url, blocking=True)
        queue.consumer = Consumer(
            client=self.client,
            blocking_client=queue.blocking_client,
            keys=queue.keys,
            config=queue.config,
            name=self.identity,
            registry=self.registry,
            expiry_seconds=self.task_expiry_seconds,
            hooks=self._hooks,
            on_finished=self._task_finished,
        )
        queue.consumer.start()

    async def _queue(self, name: str) -> _Queue:
        """A queue this manager runs, or one another process created."""
        queue = self._queues.get(name)
        if queue is not None:
            return queue
        stored = await guarded(self.client.hget(queue_directory(self.key_prefix), name))
        if stored is None:
            raise QueueNotFoundError(
                f"Queue {name!r} does not exist under prefix {self.key_prefix!r}: "
                "create it first with create_queue(QueueConfig(name=...))."
            )
        queue = _Queue(
            QueueConfig.from_stored(json.loads(cast(str, stored))),
            QueueKeys(self.key_prefix, name),
        )
        self._queues[name] = queue
        return queue

    async def _queue_names(self) -> list[str]:
        names = await guarded(self.client.hkeys(queue_directory(self.key_prefix)))
        return sorted(set(cast(list[str], names)) | set(self._queues))

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
        **kwargs: Any,
    ) -> TaskInfo:
        """Submit one task: `task_func(*args, **kwargs)` will run on the queue.

        `task_func` is an async function (registered on the way) or the name of
        a registered one. Raises TaskAlreadyExistsError, QueueNotFoundError,
        QueueFullError, or a ConfigurationError for bad input; a task that
        raised any of these was not submitted.
        """
        queue = await self._queue(queue_name)
        submission = prepare(
            self.registry,
            task_id=task_id,
            task_func=task_func,
            args=args,
            kwargs=kwargs,
            task_type=task_type,
            priority=priority,
            task_name=task_name,
        )
        keys = queue.keys
        reply = cast(
            list[str],
            await functions.call(
                self.client,
                "submit",
                [
                    keys.log,
                    keys.stats,
                    keys.config,
                    keys.task(task_id),
                    keys.ready(submission.priority.level),
                ],
                [self.identity, *submission.argv()],
            ),
        )
        _check_submitted(reply, queue_name)
        self._remember(task_id, queue_name)
        event_id = reply[1]
        return TaskInfo(
            task_id=task_id,
            queue_name=queue_name,
            task_type=submission.task_type,
            task_name=submission.name,
            priority=submission.priority,
            status=TaskStatus.QUEUED,
            queued_time=entry_time(event_id),
            version=1,
        )

    def _remember(self, task_id: str, queue_name: str) -> None:
        self._task_queue[task_id] = queue_name
        if len(self._task_queue) > _REMEMBERED_TASKS:
            del self._task_queue[next(iter(self._task_queue))]

    async def _find(
        self, task_id: str, queue_name: str | None
    ) -> tuple[str, dict[str, str]]:
        """The queue a task is in, and its hash."""
        client = self.client
        remembered = queue_name or self._task_queue.get(task_id)
        if remembered is not None:
            fields = await guarded(
                client.hgetall(QueueKeys(self.key_prefix, remembered).task(task_id))
            )
            if fields or queue_name is not None:
                if not fields:
                    raise TaskNotFoundError(
                        f"Task {task_id!r} is not in queue {queue_name!r}: it was "
                        "never submitted there, or its record expired."
                    )
                return remembered, cast(dict[str, str], fields)
        names = await self._queue_names()
        async with client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(QueueKeys(self.key_prefix, name).task(task_id))
            replies = cast(list[dict[str, str]], await guarded(pipe.execute()))
        found = [(n, f) for n, f in zip(names, replies, strict=True) if f]
        if not found:
            raise TaskNotFoundError(
                f"No task {task_id!r} under prefix {self.key_prefix!r}: it was never "
                "submitted, or its record expired (task_expiry_seconds after it "
                "ended)."
            )
        if len(found) > 1:
            raise ConfigurationError(
                f"Task id {task_id!r} exists in queues "
                f"{', '.join(n for n, _ in found)}; pass queue_name= to choose one."
            )
        self._remember(task_id, found[0][0])
        return found[0]

    async def get_task_status(
        self, task_id: str, *, queue_name: str | None = None
    ) -> TaskInfo:
        """The task's current status. Raises TaskNotFoundError."""
        queue, fields = await self._find(task_id, queue_name)
        return task_info(queue, task_id, fields)

    async def wait_for_task(
        self,
        task_id: str,
        timeout: float | None = None,
        *,
        queue_name: str | None = None,
    ) -> TaskInfo:
        """Wait until the task has ended and return its final status.

        Blocks on a notification from the server, not a polling loop. Raises
        WaitTimeoutError after `timeout` seconds (None waits for ever) and
        TaskNotFoundError for an unknown task.
        """
        queue, fields = await self._find(task_id, queue_name)
        info = task_info(queue, task_id, fields)
        if info.status.finished:
            return info
        waiters = cast(Waiters, self._waiters)
        try:
            async with asyncio.timeout(timeout):
                await waiters.subscribe(
                    queue, self._queues_keys(queue).finished_channel
                )
                while True:
                    future = waiters.register(queue, task_id)
                    try:
                        info = await self.get_task_status(task_id, queue_name=queue)
                        if info.status.finished:
                            return info
                        await future
                    finally:
                        waiters.discard(queue, task_id, future)
        except TimeoutError:
            raise WaitTimeoutError(
                f"Task {task_id!r} did not end within {timeout}s (it is "
                f"{info.status.value}); wait longer, or check its consumers."
            ) from None

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

    async def get_queue_status(self, queue_name: str) -> dict[str, Any]:
        """Counts by state across all processes, plus this process's view.

        `current_workers` is the number of this queue's tasks running in this
        process; `processing_tasks` counts them in every process.
        """
        queue = await self._queue(queue_name)
        client = self.client
        async with client.pipeline(transaction=False) as pipe:
            pipe.hgetall(queue.keys.stats)
            pipe.hget(queue.keys.breaker, "state")
            stats, breaker = cast(
                tuple[dict[str, str], str | None], await guarded(pipe.execute())
            )
        count = {name: int(value) for name, value in stats.items()}
        config = queue.config
        return {
            "name": queue_name,
            "max_workers": config.max_workers,
            "max_size": config.max_size,
            "priority": config.priority.name.lower(),
            "current_workers": queue.consumer.busy if queue.consumer else 0,
            "queued_tasks": count.get("queued", 0),
            "processing_tasks": count.get("processing", 0),
            "retry_tasks": count.get("retry", 0),
            "completed_tasks": count.get("completed", 0),
            "failed_tasks": count.get("failed", 0),
            "circuit_breaker_status": breaker or "closed",
        }

    async def get_ongoing_tasks(self) -> list[TaskInfo]:
        """Tasks being processed right now, by any process, in any queue."""
        ongoing: list[TaskInfo] = []
        for name in await self._queue_names():
            keys = QueueKeys(self.key_prefix, name)
            ids = await self._pending_task_ids(keys)
            async with self.client.pipeline(transaction=False) as pipe:
                for task_id in ids:
                    pipe.hgetall(keys.task(task_id))
                replies = cast(list[dict[str, str]], await guarded(pipe.execute()))
            ongoing += [
                task_info(name, task_id, fields)
                for task_id, fields in zip(ids, replies, strict=True)
                if fields.get("state") == TaskStatus.PROCESSING
            ]
        return ongoing

    async def _pending_task_ids(self, keys: QueueKeys) -> list[str]:
        client = self.client
        ids: list[str] = []
        for stream in keys.ready_all:
            try:
                pending = cast(
                    list[dict[str, Any]],
                    await guarded(
                        client.xpending_range(stream, GROUP, "-", "+", 100_000)
                    ),
                )
            except ServerError:
                continue  # no such stream or group: nothing pending
            async with client.pipeline(transaction=False) as pipe:
                for p in pending:
                    pipe.xrange(stream, p["message_id"], p["message_id"])
                results: list[Any] = await guarded(pipe.execute())
            for entries in results:
                ids += [fields["task_id"] for _, fields in entries]
        return ids

    # -- projections -----------------------------------------------------

    async def verify_projections(self, queue_name: str) -> list[Difference]:
        """Compare the queue's stored projections with a fold of its log; an
        empty list means they agree."""
        queue = await self._queue(queue_name)
        return await verify(self.client, queue.keys)

    async def rebuild_projections(self, queue_name: str) -> int:
        """Rewrite the queue's projections from its log; returns the number of
        events folded. Run it while the queue is quiet."""
        queue = await self._queue(queue_name)
        folded = await rebuild(
            self.client, queue.keys, expiry_seconds=self.task_expiry_seconds
        )
        return folded.events

    # -- housekeeping ----------------------------------------------------

    async def _prune_consumers(self) -> None:
        client = self.client
        removed = 0
        for name in await self._queue_names():
            keys = QueueKeys(self.key_prefix, name)
            consumers: set[str] = set()
            for stream in keys.ready_all:
                try:
                    infos: list[dict[str, Any]] = await guarded(
                        client.xinfo_consumers(stream, GROUP)
                    )
                except ServerError:
                    continue
                consumers.update(str(info["name"]) for info in infos)
            for consumer in consumers:
                removed += int(
                    await functions.call(
                        client,
                        "prune",
                        [keys.worker(consumer), *keys.ready_all],
                        [consumer],
                    )
                    > 0
                )
        if removed:
            logger.info("removed %s consumers that were gone and held nothing", removed)


def _check_submitted(reply: list[str], queue_name: str) -> None:
    status = reply[0]
    if status == "ok":
        return
    if status in ("exists", "duplicate"):
        ids = reply[1:]
        raise TaskAlreadyExistsError(
            f"Task {', '.join(repr(i) for i in ids)} already exists in queue "
            f"{queue_name!r} (a finished task keeps its id until its record "
            "expires); use another task id.",
            ids,
        )
    if status == "full":
        raise QueueFullError(
            f"Queue {queue_name!r} is full: {reply[1]} unfinished tasks, "
            f"max_size={reply[2]}. Wait for tasks to finish, or raise max_size."
        )
    if status == "noqueue":
        raise QueueNotFoundError(
            f"Queue {queue_name!r} has no ready streams on the server (deleted by "
            "hand?); create it again with create_queue."
        )
    raise KewError(f"Unexpected reply from the submit function: {reply!r}")
