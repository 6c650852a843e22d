"""The consumer: permits, leases, hand-back, fencing, idle traffic."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from kew import QueueConfig, TaskQueueManager, TaskStatus, functions
from kew.events.log import read
from kew.keys import QueueKeys
from kew.server import EmbeddedServer

from .conftest import eventually, hang

MakeManager = Callable[..., Awaitable[TaskQueueManager]]


class Gauge:
    """Counts task functions running at once, and the most ever seen."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.release = asyncio.Event()

    async def run(self) -> None:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await self.release.wait()
        finally:
            self.now -= 1


async def test_concurrency_limit_is_reached_and_never_exceeded(
    manager: TaskQueueManager,
) -> None:
    """max_workers tasks run at once, never more, however many are queued."""
    gauge = Gauge()

    async def job() -> None:
        await gauge.run()

    await manager.create_queue(QueueConfig(name="q", max_workers=3))
    for i in range(20):
        await manager.submit_task(f"t{i}", "q", job)
    await eventually(lambda: gauge.now == 3, what="three tasks running")
    status = await manager.get_queue_status("q")
    assert status["current_workers"] == 3
    assert status["processing_tasks"] == 3
    assert status["queued_tasks"] == 17
    gauge.release.set()
    for i in range(20):
        assert (await manager.wait_for_task(f"t{i}", 10)).status is TaskStatus.COMPLETED
    assert gauge.most == 3


async def test_two_consumers_share_a_queue_each_within_its_limit(
    make_manager: MakeManager,
) -> None:
    """Two processes' consumers split the work; each keeps its own limit."""
    first, second = Gauge(), Gauge()
    a = await make_manager()
    b = await make_manager()

    async def on_a() -> None:
        await first.run()

    async def on_b() -> None:
        await second.run()

    # Both managers register the same name, each bound to its own gauge, the
    # way two processes would each import the same function.
    a.registry = type(a.registry)()
    b.registry = type(b.registry)()
    a.registry.register(on_a, "job")
    b.registry.register(on_b, "job")
    await a.create_queue(QueueConfig(name="q", max_workers=2))
    await b.create_queue(QueueConfig(name="q", max_workers=3))
    for i in range(12):
        await a.submit_task(f"t{i}", "q", "job")
    await eventually(
        lambda: first.now == 2 and second.now == 3, what="both consumers full"
    )
    first.release.set()
    second.release.set()
    for i in range(12):
        await a.wait_for_task(f"t{i}", 10)
    assert (first.most, second.most) == (2, 3)


async def test_shutdown_hands_running_tasks_to_another_consumer(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """A consumer that shuts down hands back what it held; another takes it at
    once (no lease to wait out: its lease here is 30 s), and the log records
    the interrupted attempt."""
    started = asyncio.Event()
    calls: list[str] = []

    async def long_job() -> str:
        calls.append("run")
        started.set()
        await hang()
        return "never"

    async def quick_job() -> str:
        return "done elsewhere"

    leaving = await make_manager()
    leaving.registry = type(leaving.registry)()
    leaving.registry.register(long_job, "job")
    await leaving.create_queue(QueueConfig(name="q", lease_seconds=30))
    await leaving.submit_task("t", "q", "job")
    await asyncio.wait_for(started.wait(), 10)

    staying = await make_manager()
    staying.registry = type(staying.registry)()
    staying.registry.register(quick_job, "job")
    await staying.create_queue(QueueConfig(name="q", lease_seconds=30))
    await leaving.shutdown(wait=False)

    info = await staying.wait_for_task("t", timeout=10)
    assert info.status is TaskStatus.COMPLETED
    assert info.result == "done elsewhere"
    assert info.attempt == 2
    events = [e async for e in read(client, QueueKeys(prefix, "q").log)]
    assert [(e.type, e.attempt, e.actor) for e in events if e.task_id == "t"] == [
        ("task.submitted", 0, leaving.identity),
        ("task.started", 1, leaving.identity),
        ("task.interrupted", 1, leaving.identity),
        ("task.started", 2, staying.identity),
        ("task.succeeded", 2, staying.identity),
    ]
    assert await staying.verify_projections("q") == []


async def test_finish_is_fenced_for_a_consumer_that_lost_the_attempt(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """The finish function refuses an outcome from anyone but the attempt's
    owner, and from the owner for another attempt or entry."""
    gate = asyncio.Event()

    async def held() -> None:
        await gate.wait()

    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("t", "q", held)
    await eventually(
        lambda: _status(manager, "t", TaskStatus.PROCESSING), what="the task to start"
    )
    keys = QueueKeys(prefix, "q")
    fields = await client.hgetall(keys.task("t"))

    async def finish(consumer: str, attempt: str, entry: str) -> list[Any]:
        outcome = [attempt, fields["version"], "succeeded", "1", "{}", 0]
        reply = await functions.call(
            client,
            "finish",
            [*keys.queue_keys, keys.task("t")],
            [consumer, 60, keys.finished_channel, "t", entry, 2, *outcome],
        )
        return list(reply[0])

    assert (await finish("intruder", "1", fields["entry"]))[0] == "fenced"
    assert (await finish(manager.identity, "2", fields["entry"]))[0] == "fenced"
    assert (await finish(manager.identity, "1", "1-1"))[0] == "fenced"
    assert await client.hget(keys.task("t"), "state") == "processing"
    gate.set()
    assert (await manager.wait_for_task("t", 10)).status is TaskStatus.COMPLETED


async def _status(manager: TaskQueueManager, task_id: str, status: TaskStatus) -> bool:
    return (await manager.get_task_status(task_id)).status is status


async def test_an_idle_queue_sends_next_to_nothing() -> None:
    """With nothing submitted, a consumer sends one FCALL per lease renewal
    period and keeps one blocking read open; nothing else."""
    with EmbeddedServer() as server:
        assert server.url is not None
        probe = aioredis.Redis.from_url(server.url, decode_responses=True)
        async with TaskQueueManager(redis_url=server.url, key_prefix="idle") as m:
            await m.create_queue(QueueConfig(name="q", lease_seconds=0.3))
            await eventually(
                lambda: _counts_settled(probe), what="the consumer to go idle"
            )
            before = await _command_counts(probe)
            await eventually(
                lambda: _fcalls_since(probe, before, 10), what="ten renewals"
            )
            after = await _command_counts(probe)
        await probe.aclose()
    sent = {
        name: after.get(name, 0) - before.get(name, 0)
        for name in after
        if name not in ("info",) and after.get(name, 0) != before.get(name, 0)
    }
    # Inside each maintain call the server runs SET, XPENDING (per level) and
    # nothing else; the client itself sends only FCALL.
    assert sent["fcall"] >= 10
    top_level = {k: v for k, v in sent.items() if k in _TOP_LEVEL}
    assert top_level == {"fcall": sent["fcall"]}
    assert sent.get("xreadgroup", 0) <= 1


_TOP_LEVEL = {"fcall", "xreadgroup", "hgetall", "hget", "ping", "xrange", "publish"}


async def _command_counts(client: aioredis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = await client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
    }


async def _counts_settled(client: aioredis.Redis) -> bool:
    """True once the consumer has renewed at least twice (it is running)."""
    return (await _command_counts(client)).get("fcall", 0) >= 4


async def _fcalls_since(client: aioredis.Redis, before: dict[str, int], n: int) -> bool:
    return (await _command_counts(client)).get("fcall", 0) - before.get("fcall", 0) >= n


async def test_an_idle_queue_with_a_half_open_breaker_does_not_poll() -> None:
    """A failed trial reopens the breaker; when it half-opens again, with its
    trial slot free and nothing to run, the consumer blocks on its read as on
    any idle queue: no fetch between renewals. A task submitted then wakes it,
    runs as the trial, and closes the breaker."""

    async def bad() -> None:
        raise RuntimeError("down")

    async def good() -> str:
        return "up"

    with EmbeddedServer() as server:
        assert server.url is not None
        probe = aioredis.Redis.from_url(server.url, decode_responses=True)
        async with TaskQueueManager(redis_url=server.url, key_prefix="half") as m:
            await m.create_queue(
                QueueConfig(
                    name="q",
                    lease_seconds=0.3,
                    circuit_breaker_max_failures=1,
                    circuit_breaker_reset_timeout=0.1,
                )
            )
            # The failed trial keeps the consumer fetching through the
            # reopening, so it is the consumer that sees the breaker half-open.
            await m.submit_task("bad", "q", bad)
            await m.wait_for_task("bad", 10)
            await m.submit_task("trial", "q", bad)
            await m.wait_for_task("trial", 10)
            await eventually(
                lambda: _breaker_is(m, "half_open"), what="the breaker to half-open"
            )
            before = await _command_counts(probe)
            await eventually(
                lambda: _calls_since(probe, before, "set", 2), what="two renewals"
            )
            before = await _command_counts(probe)
            await eventually(
                lambda: _calls_since(probe, before, "set", 10), what="ten renewals"
            )
            after = await _command_counts(probe)
            assert await _breaker_is(m, "half_open")

            await m.submit_task("good", "q", good)
            assert (await m.wait_for_task("good", 10)).result == "up"
            assert await _breaker_is(m, "closed")
            assert await m.verify_projections("q") == []
        await probe.aclose()
    # Each fetch reads the three levels (XREADGROUP each); ten renewals take
    # about a second, in which a polling consumer would fetch about 4 times.
    fetched = after.get("xreadgroup", 0) - before.get("xreadgroup", 0)
    assert fetched <= 3, fetched


async def _breaker_is(manager: TaskQueueManager, state: str) -> bool:
    status = await manager.get_queue_status("q")
    return status["circuit_breaker_status"] == state


async def _calls_since(
    client: aioredis.Redis, before: dict[str, int], command: str, n: int
) -> bool:
    return (await _command_counts(client)).get(command, 0) - before.get(command, 0) >= n
