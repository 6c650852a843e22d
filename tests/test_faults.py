"""Redis faults: dropped connections and a server restart lose nothing.

The faults are real: CLIENT KILL of kew's own connections (picked by the
client name kew gives them, `kew:<prefix>:<identity>`, so the other clients
of a shared server are never touched), and a SIGKILL of a server that the test
launches itself through kew's launcher: the bundled Valkey, and Debian's
Redis 7.0 (`/usr/bin/redis-server`) where it is installed. Nothing waits a
fixed time: every wait is on a condition (a task running, a warning logged, a
task ended) with a deadline.

Each test asserts, from the log: every task ends exactly once; every attempt
is in the log, numbered without gaps; an attempt started again only if the
attempt before it was in flight at a fault; and the projections rebuilt from
the log equal the stored ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from kew import QueueConfig, TaskQueueManager, TaskStatus
from kew.errors import ConnectionFailedError, TaskNotFoundError
from kew.events.log import read
from kew.events.models import Event, TaskFailed
from kew.keys import QueueKeys
from kew.registry import Registry
from kew.server import EmbeddedServer

from .conftest import DEADLINE, eventually

MakeManager = Callable[..., Awaitable[TaskQueueManager]]

RECOVERY = 30.0
"""A generous deadline for waits that span a fault (backoff, a lapsed lease)."""
WORKERS = 4
TERMINAL = {"task.succeeded", "task.cancelled", "task.dead_lettered"}
Marks = tuple[str, str]
"""The log's last entry id just before a fault and just after it."""


class Workload:
    """A task function that holds every attempt until `gate` opens, and
    counts the attempts running and the runs of each task."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.running = 0
        self.runs: Counter[int] = Counter()

    async def work(self, i: int) -> int:
        self.runs[i] += 1
        self.running += 1
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        return 2 * i

    def registry(self) -> Registry:
        registry = Registry()
        registry.register(self.work, "faults.work")
        return registry


def entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def log_tail(client: aioredis.Redis, log: str) -> str:
    """The id of the log's last entry."""
    last = await client.xrevrange(log, count=1)
    return last[0][0] if last else "0-0"


async def kew_clients(client: aioredis.Redis, prefix: str) -> list[dict[str, str]]:
    """The server's connections that kew opened under `prefix`."""
    return [
        c
        for c in await client.client_list()
        if str(c.get("name", "")).startswith(f"kew:{prefix}:")
    ]


async def kill_kew_connections(client: aioredis.Redis, prefix: str, log: str) -> Marks:
    """CLIENT KILL every connection of kew's under `prefix` (by id, so that no
    other client of a shared server is touched); return the log marks. Kew may
    be between connections (backing off after the last kill, with nothing to
    do): then wait until it has one again."""
    marks: list[str] = []

    async def killed_some() -> bool:
        marks[:] = [await log_tail(client, log)]
        killed = 0
        for connection in await kew_clients(client, prefix):
            killed += await client.client_kill_filter(_id=str(connection["id"]))
        return killed > 0

    await eventually(killed_some, timeout=RECOVERY, what="a connection of kew's")
    return marks[0], await log_tail(client, log)


def warnings_of(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and text in r.getMessage()
    ]


def check_log(events: list[Event], tasks: set[str], faults: list[Marks]) -> None:
    """Each of `tasks` ended exactly once, its attempts numbered 1..n; an
    attempt was started again only if the one before it was in flight at a
    fault (started by the fault's end, not ended before its start)."""
    by_task: defaultdict[str, list[Event]] = defaultdict(list)
    for event in events:
        if event.task_id is not None:
            by_task[event.task_id].append(event)
    assert set(by_task) >= tasks

    for task_id in tasks:
        history = by_task[task_id]
        ends = [
            e
            for e in history
            if e.type in TERMINAL or (isinstance(e, TaskFailed) and not e.retry)
        ]
        assert [e.type for e in ends] == ["task.succeeded"], (task_id, history)
        starts = [i for i, e in enumerate(history) if e.type == "task.started"]
        attempts = [history[i].attempt for i in starts]
        assert attempts == list(range(1, len(starts) + 1)), (task_id, history)
        assert ends[0].attempt == attempts[-1]
        for earlier in starts[:-1]:
            started, ended = history[earlier], history[earlier + 1]
            assert any(
                entry_key(started.id) <= entry_key(after)
                and entry_key(ended.id) >= entry_key(before)
                for before, after in faults
            ), f"{task_id} ran again, but attempt {started.attempt} was not in flight"


async def test_killed_connections_lose_nothing(
    make_manager: MakeManager,
    client: aioredis.Redis,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """CLIENT KILL of kew's connections, again and again mid-workload: each
    task ends once, every wait returns, the log and projections agree."""
    caplog.set_level(logging.INFO, logger="kew")
    log = QueueKeys(prefix, "q").log
    workload = Workload()
    a = await make_manager(registry=workload.registry())
    b = await make_manager(registry=workload.registry())
    await a.create_queue(QueueConfig(name="q", max_workers=WORKERS))
    await b.attach_queue("q")
    tasks = {f"t{i}" for i in range(200)}
    for i in range(200):
        await a.submit_task(f"t{i}", "q", "faults.work", i)
    waits = [asyncio.create_task(a.wait_for_task(t, timeout=RECOVERY)) for t in tasks]

    # A kill while every slot runs a task, then kills while tasks finish.
    await eventually(lambda: workload.running == 2 * WORKERS, what="full slots")
    faults = [await kill_kew_connections(client, prefix, log)]
    workload.gate.set()
    for _ in range(4):
        progress = min(sum(workload.runs.values()) + 25, 200)
        await eventually(
            lambda progress=progress: sum(workload.runs.values()) >= progress,
            timeout=RECOVERY,
            what="progress since the last kill",
        )
        faults.append(await kill_kew_connections(client, prefix, log))
    results = await asyncio.gather(*waits)

    # A kill while both consumers are parked in their blocking read.
    async def both_blocked() -> bool:
        found = await kew_clients(client, prefix)
        return sum(c.get("cmd") == "xread" for c in found) == 2

    await eventually(both_blocked, what="both consumers blocked in XREAD")
    faults.append(await kill_kew_connections(client, prefix, log))
    late = {f"late{i}" for i in range(20)}
    for i, task_id in enumerate(sorted(late)):
        await a.submit_task(task_id, "q", "faults.work", 1000 + i)
    results += [await a.wait_for_task(t, timeout=RECOVERY) for t in late]

    assert all(r.status is TaskStatus.COMPLETED for r in results)
    assert {r.task_id for r in results} == tasks | late
    check_log([e async for e in read(client, log)], tasks | late, faults)
    assert all(workload.runs[i] >= 1 for i in range(200))
    assert await a.verify_projections("q") == []
    # The outages were noticed, each once per loop, not once per retry.
    noticed = warnings_of(caplog, "retrying with backoff")
    assert 1 <= len(noticed) <= 8 * len(faults), noticed


DEBIAN_REDIS = Path("/usr/bin/redis-server")


@pytest.fixture(params=["valkey", "redis"])
async def own_server(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[EmbeddedServer]:
    """A server of the test's own, launched by kew, persisting to an AOF in
    tmp_path that is fsynced before every reply: the bundled Valkey, and
    Debian's Redis 7.0 (the server CI's shared instance runs) where installed."""
    binary = None
    if request.param == "redis":
        if not os.access(DEBIAN_REDIS, os.X_OK):
            pytest.skip(f"no {DEBIAN_REDIS} here to restart Redis itself")
        binary = DEBIAN_REDIS
    server = EmbeddedServer(
        binary, persistent_dir=tmp_path / "data", appendfsync="always"
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def server_kind(client: aioredis.Redis) -> str:
    info = await client.info("server")
    return "valkey" if "valkey_version" in info else "redis"


async def test_server_killed_and_restarted_with_aof_loses_nothing(
    own_server: EmbeddedServer,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    """A server SIGKILLed mid-workload and restarted at its address: nothing
    acknowledged is lost, each task ends once, log and projections agree.

    SIGKILL, with `appendfsync always`, because that is what makes "nothing
    acknowledged is lost" deterministic, and the harshest case: the server
    fsyncs the append-only file before it sends a reply, so every write kew
    saw acknowledged is on disk when the signal lands, and a call whose reply
    never came is either wholly in the file or not at all (a function's writes
    are one MULTI block there; a torn tail is dropped on load). A SIGTERM or
    SHUTDOWN would flush the file anyway, and so would not tell `always` from
    `everysec`, under which a crash may lose the last second of acknowledged
    writes.
    """
    caplog.set_level(logging.INFO, logger="kew")
    url = own_server.url
    assert url is not None
    client = aioredis.Redis.from_url(url, decode_responses=True, protocol=2)
    assert await server_kind(client) == request.node.callspec.params["own_server"]
    log = QueueKeys(prefix, "q").log
    workload = Workload()
    managers = [
        TaskQueueManager(redis_url=url, key_prefix=prefix, registry=workload.registry())
        for _ in range(2)
    ]
    a, b = managers
    acknowledged: set[str] = set()
    unacknowledged: set[str] = set()
    restarted = asyncio.Event()

    async def submit_all() -> None:
        """Submit tasks one after the other, through the crash; after a failed
        submission, wait for the restart before the next one."""
        for i in range(300):
            try:
                await a.submit_task(f"t{i}", "q", "faults.work", i)
            except ConnectionFailedError:
                unacknowledged.add(f"t{i}")
                await restarted.wait()
            else:
                acknowledged.add(f"t{i}")

    try:
        for manager in managers:
            await manager.initialize()
        await a.create_queue(QueueConfig(name="q", max_workers=WORKERS))
        await b.attach_queue("q")
        submitter = asyncio.create_task(submit_all())
        await eventually(lambda: workload.running == 2 * WORKERS, what="full slots")
        await eventually(lambda: len(acknowledged) >= 50, what="submissions")

        before = await log_tail(client, log)
        own_server.stop(keep_address=True, kill=True)
        assert own_server.url == url
        # Both consumers notice; the attempts then end while the server is
        # down, so recording their outcomes fails and is retried.
        await eventually(
            lambda: len(warnings_of(caplog, "renew the leases on")) >= 2,
            what="both consumers to notice the outage",
        )
        workload.gate.set()
        await eventually(
            lambda: warnings_of(caplog, "record outcomes on"),
            what="a failed recording of outcomes",
        )
        assert own_server.start() == url
        restarted.set()
        after = await log_tail(client, log)
        assert entry_key(after) >= entry_key(before)

        await asyncio.wait_for(submitter, RECOVERY)
        assert unacknowledged, "no submission failed: the crash came too late"
        results = [await a.wait_for_task(t, timeout=RECOVERY) for t in acknowledged]
        assert all(r.status is TaskStatus.COMPLETED for r in results)
        # A submission whose reply was lost either happened wholly or not at all.
        for task_id in unacknowledged:
            with contextlib.suppress(TaskNotFoundError):
                info = await a.wait_for_task(task_id, timeout=RECOVERY)
                assert info.status is TaskStatus.COMPLETED
                acknowledged.add(task_id)

        check_log([e async for e in read(client, log)], acknowledged, [(before, after)])
        assert await a.verify_projections("q") == []
        assert len(warnings_of(caplog, "retrying with backoff")) <= 8
        assert any("works again" in r.getMessage() for r in caplog.records)
    finally:
        for manager in managers:
            await manager.shutdown(wait=False)
        await client.aclose()


async def test_shutdown_keeps_to_its_timeout_when_a_function_ignores_cancel(
    manager: TaskQueueManager, caplog: pytest.LogCaptureFixture
) -> None:
    """shutdown(timeout) returns soon after the timeout even if a task function
    swallows its cancellation, and says which attempt it left."""
    started, finish = asyncio.Event(), asyncio.Event()

    async def stubborn() -> str:
        started.set()
        while not finish.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await finish.wait()
        return "late"

    manager.registry = Registry()
    manager.registry.register(stubborn, "faults.stubborn")
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("t", "q", "faults.stubborn")
    await asyncio.wait_for(started.wait(), DEADLINE)

    loop = asyncio.get_running_loop()
    began = loop.time()
    await manager.shutdown(timeout=0.2)
    took = loop.time() - began

    assert took < 5.0, f"shutdown(timeout=0.2) took {took:.1f} s"
    left = warnings_of(caplog, "did not stop within")
    assert len(left) == 1
    assert "kew task t" in left[0]
    # Let the stubborn function end, so the test leaves nothing running.
    leftover = [t for t in asyncio.all_tasks() if t.get_name() == "kew task t"]
    finish.set()
    await asyncio.wait(leftover, timeout=DEADLINE)
    assert all(t.done() for t in leftover)
