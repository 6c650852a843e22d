"""Priority: of tasks within a queue (strict or weighted), and of queues that
share one manager's capacity."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from kew import (
    ConfigurationError,
    QueueConfig,
    QueuePriority,
    TaskQueueManager,
    TaskStatus,
)
from kew.events import TaskStarted
from kew.events.log import read
from kew.keys import QueueKeys

from .conftest import DEADLINE, eventually

MakeManager = Callable[..., Awaitable[TaskQueueManager]]

HIGH, MEDIUM, LOW = QueuePriority.HIGH, QueuePriority.MEDIUM, QueuePriority.LOW


_LANES = itertools.count()


class Lane:
    """One queue's single worker, held busy by a blocker until released, and
    the order in which the tasks behind it then ran. Its task functions are
    closures over the lane, registered under the lane's own `name` (closures
    of one factory cannot share a name)."""

    def __init__(self) -> None:
        self.name = f"lane-{next(_LANES)}"
        self.order: list[str] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def block(self) -> None:
        self.entered.set()
        await self.release.wait()

    async def note(self, label: str) -> None:
        self.order.append(label)


async def _held_queue(manager: TaskQueueManager, config: QueueConfig) -> Lane:
    """Create the queue and occupy its only worker with a blocker."""
    lane = Lane()

    async def blocker() -> None:
        await lane.block()

    await manager.create_queue(config)
    await manager.submit_task(
        "blocker", config.name, blocker, task_name=f"{lane.name}.block"
    )
    await asyncio.wait_for(lane.entered.wait(), DEADLINE)
    return lane


async def _wait_all(manager: TaskQueueManager, task_ids: list[str]) -> None:
    for task_id in task_ids:
        info = await manager.wait_for_task(task_id, timeout=DEADLINE)
        assert info.status is TaskStatus.COMPLETED, info


async def test_due_high_tasks_start_before_medium_and_low(
    manager: TaskQueueManager,
) -> None:
    """Behind a busy worker, HIGH tasks run first, then MEDIUM, then LOW, each
    level in submit order, whichever spelling of the priority was used."""
    lane = await _held_queue(manager, QueueConfig(name="q", max_workers=1))

    async def note(label: str) -> None:
        await lane.note(label)

    plan: list[tuple[str, Any, QueuePriority]] = [
        ("l1", LOW, LOW),
        ("m1", None, MEDIUM),
        ("h1", HIGH, HIGH),
        ("l2", 3, LOW),
        ("h2", "high", HIGH),
        ("m2", 2, MEDIUM),
        ("h3", 1, HIGH),
        ("l3", "low", LOW),
        ("m3", MEDIUM, MEDIUM),
    ]
    for task_id, priority, level in plan:
        info = await manager.submit_task(task_id, "q", note, task_id, priority=priority)
        assert info.priority is level
        assert info.status is TaskStatus.QUEUED
    assert (await manager.get_task_status("h2")).priority is HIGH

    lane.release.set()
    await _wait_all(manager, ["blocker", *(task_id for task_id, _, _ in plan)])
    assert lane.order == ["h1", "h2", "h3", "m1", "m2", "m3", "l1", "l2", "l3"]
    assert await manager.verify_projections("q") == []


async def test_submit_without_priority_is_medium(manager: TaskQueueManager) -> None:
    """The default task priority is MEDIUM, stored and reported as such."""

    async def job() -> None:
        return None

    await manager.create_queue(QueueConfig(name="q", priority=QueuePriority.HIGH))
    info = await manager.submit_task("t", "q", job)
    assert info.priority is MEDIUM
    done = await manager.wait_for_task("t", timeout=DEADLINE)
    assert done.priority is MEDIUM
    assert await manager.verify_projections("q") == []


@pytest.mark.parametrize("priority", [0, 4, "urgent", 1.0, True])
async def test_bad_task_priority_is_rejected(
    manager: TaskQueueManager, priority: object
) -> None:
    """A priority that is not HIGH/MEDIUM/LOW, 1-3 or their names is refused
    with a ConfigurationError naming it; nothing is submitted."""

    async def job() -> None:
        return None

    await manager.create_queue(QueueConfig(name="q"))
    with pytest.raises(ConfigurationError, match=re.escape(f"Priority {priority!r}")):
        await manager.submit_task("t", "q", job, priority=priority)
    assert (await manager.get_queue_status("q"))["queued_tasks"] == 0
    assert await manager.verify_projections("q") == []


async def _saturate(
    manager: TaskQueueManager, config: QueueConfig, highs: int, lows: int
) -> tuple[list[str], list[str], Lane]:
    """Hold the single worker, submit `highs` HIGH then `lows` LOW tasks,
    release the worker and wait until every task has run."""
    lane = await _held_queue(manager, config)

    async def note(label: str) -> None:
        await lane.note(label)

    high_ids = [f"h{i:02}" for i in range(highs)]
    low_ids = [f"l{i:02}" for i in range(lows)]
    name = f"{lane.name}.note"
    for task_id in high_ids:
        await manager.submit_task(
            task_id, config.name, note, task_id, priority=HIGH, task_name=name
        )
    for task_id in low_ids:
        await manager.submit_task(
            task_id, config.name, note, task_id, priority=LOW, task_name=name
        )
    lane.release.set()
    await _wait_all(manager, ["blocker", *high_ids, *low_ids])
    return high_ids, low_ids, lane


async def test_weighted_order_lets_low_progress_while_high_is_saturated(
    manager: TaskQueueManager,
) -> None:
    """With priority_weights=(3, 1, 1), LOW tasks run while HIGH ones still
    wait: one among the first ten runs, and before the last HIGH."""
    config = QueueConfig(name="q", max_workers=1, priority_weights=(3, 1, 1))
    high_ids, low_ids, lane = await _saturate(manager, config, highs=20, lows=5)

    order = lane.order
    assert sorted(order) == sorted(high_ids + low_ids)
    assert any(label in low_ids for label in order[:10]), order
    assert order.index(low_ids[0]) < order.index(high_ids[-1]), order
    # Each level stays first in, first out.
    assert [label for label in order if label in high_ids] == high_ids
    assert [label for label in order if label in low_ids] == low_ids
    assert await manager.verify_projections("q") == []


async def test_strict_order_runs_every_high_before_any_low(
    manager: TaskQueueManager,
) -> None:
    """Without weights, under the same load, LOW waits until HIGH is empty."""
    config = QueueConfig(name="q", max_workers=1)
    high_ids, low_ids, lane = await _saturate(manager, config, highs=20, lows=5)
    assert lane.order == high_ids + low_ids
    assert await manager.verify_projections("q") == []


async def test_weights_share_among_all_three_levels(manager: TaskQueueManager) -> None:
    """priority_weights=(1, 1, 1) serves HIGH, MEDIUM and LOW in turn while all
    three have work, instead of draining HIGH first."""
    lane = await _held_queue(
        manager, QueueConfig(name="q", max_workers=1, priority_weights=(1, 1, 1))
    )

    async def note(label: str) -> None:
        await lane.note(label)

    ids = {
        level: [f"{level.name[0].lower()}{i}" for i in range(6)]
        for level in (HIGH, MEDIUM, LOW)
    }
    for level, task_ids in ids.items():
        for task_id in task_ids:
            await manager.submit_task(task_id, "q", note, task_id, priority=level)
    lane.release.set()
    await _wait_all(manager, ["blocker", *(i for t in ids.values() for i in t)])

    first_six = lane.order[:6]
    for task_ids in ids.values():
        assert sum(label in task_ids for label in first_six) == 2, lane.order
    assert await manager.verify_projections("q") == []


@pytest.mark.parametrize(
    "weights",
    [(1, 2), (0, 0, 0), (-1, 1, 1), (1, 1, 1, 1), (1.5, 1, 1), ("3", 1, 1)],
)
def test_bad_priority_weights_are_rejected(weights: Any) -> None:
    """QueueConfig refuses weights that are not three whole numbers >= 0, not
    all 0, and names the bad value."""
    expected = re.escape(f"priority_weights={weights!r}")
    with pytest.raises(ConfigurationError, match=expected):
        QueueConfig(name="q", priority_weights=weights)


def test_priority_weights_are_opt_in() -> None:
    """A queue has strict priority unless weights are given; a list is kept
    as a tuple."""
    assert QueueConfig(name="q").priority_weights is None
    weights: Any = [6, 3, 1]
    assert QueueConfig(name="q", priority_weights=weights).priority_weights == (6, 3, 1)


def _waiting_for_capacity(manager: TaskQueueManager) -> list[int]:
    """The priorities of the queues now waiting for the manager's shared
    capacity. No public API shows this, so the test reads it from the
    SharedCapacity the manager's consumers share."""
    shared = manager._shared  # pyright: ignore[reportPrivateUsage]
    assert shared is not None
    waiters = shared._waiters  # pyright: ignore[reportPrivateUsage]
    return sorted(priority for priority, _, future in waiters if not future.done())


class Gauge:
    """Counts task functions running at once, across queues, and the most."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0

    async def run(self, during: Awaitable[Any]) -> None:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await during
        finally:
            self.now -= 1


async def test_shared_capacity_serves_the_most_urgent_queue_first(
    make_manager: MakeManager, client: aioredis.Redis
) -> None:
    """With max_concurrency=1, when a LOW and a HIGH queue both wait for the
    one slot, every task of the HIGH queue runs before the LOW queue's; never
    more than one task runs at a time."""
    manager = await make_manager(max_concurrency=1)
    gauge = Gauge()
    order: list[str] = []
    entered, release = asyncio.Event(), asyncio.Event()

    async def blocker() -> None:
        entered.set()
        await gauge.run(release.wait())

    async def note(label: str) -> None:
        # A round trip to the server while counted, so that overlapping runs
        # would show in the gauge.
        await gauge.run(client.ping())
        order.append(label)

    await manager.create_queue(QueueConfig(name="low", priority=LOW, max_workers=5))
    await manager.create_queue(QueueConfig(name="high", priority=HIGH, max_workers=5))
    await manager.submit_task("blocker", "low", blocker)
    await asyncio.wait_for(entered.wait(), DEADLINE)

    low_ids = [f"low-{i}" for i in range(4)]
    high_ids = [f"high-{i}" for i in range(4)]
    for low_id, high_id in zip(low_ids, high_ids, strict=True):
        await manager.submit_task(low_id, "low", note, low_id)
        await manager.submit_task(high_id, "high", note, high_id)
    await eventually(
        lambda: _waiting_for_capacity(manager) == [HIGH, LOW],
        what="both queues to wait for the shared slot",
    )
    assert order == []

    release.set()
    await _wait_all(manager, ["blocker", *high_ids, *low_ids])
    assert order == high_ids + low_ids
    assert gauge.most == 1
    assert await manager.verify_projections("low") == []
    assert await manager.verify_projections("high") == []


async def test_max_concurrency_caps_running_tasks_across_queues(
    make_manager: MakeManager,
) -> None:
    """max_concurrency=3 over three queues of five workers each: three tasks
    run at once, never more, and all of them finish."""
    manager = await make_manager(max_concurrency=3)
    gauge = Gauge()
    release = asyncio.Event()

    async def held() -> None:
        await gauge.run(release.wait())

    names = {"a": HIGH, "b": MEDIUM, "c": LOW}
    task_ids: list[str] = []
    for name, priority in names.items():
        await manager.create_queue(
            QueueConfig(name=name, priority=priority, max_workers=5)
        )
    for i in range(8):
        for name in names:
            await manager.submit_task(f"{name}{i}", name, held)
            task_ids.append(f"{name}{i}")

    await eventually(lambda: gauge.now == 3, what="three tasks running")
    processing = [
        (await manager.get_queue_status(name))["processing_tasks"] for name in names
    ]
    assert sum(processing) == 3
    release.set()
    await _wait_all(manager, task_ids)
    assert gauge.most == 3
    for name in names:
        assert await manager.verify_projections(name) == []


@pytest.mark.parametrize("value", [0, -1, "x", 1.5, True])
def test_bad_max_concurrency_is_rejected(redis_url: str, value: object) -> None:
    """TaskQueueManager refuses a max_concurrency that is not a whole number
    of 1 or more, naming the value."""
    with pytest.raises(
        ConfigurationError, match=re.escape(f"max_concurrency={value!r}")
    ):
        TaskQueueManager(redis_url=redis_url, max_concurrency=value)  # type: ignore[arg-type]


async def test_a_half_open_trial_follows_the_weighted_order(
    manager: TaskQueueManager, client: aioredis.Redis
) -> None:
    """With priority_weights=(1, 0, 3) the weighted order picks LOW first from
    a fresh credit (then HIGH, LOW, LOW). When the half-open breaker lets one
    trial start, that one pick decides it: the LOW task is the trial, even
    though a fetch with four free slots would also have taken a HIGH task."""

    async def job(kind: str) -> str:
        if kind == "fail":
            raise RuntimeError("down")
        return kind

    await manager.create_queue(
        QueueConfig(
            name="q",
            max_workers=4,
            priority_weights=(1, 0, 3),
            circuit_breaker_max_failures=1,
            circuit_breaker_reset_timeout=1.0,
        )
    )
    await manager.submit_task("bad", "q", job, "fail")
    assert (await manager.wait_for_task("bad", DEADLINE)).status is TaskStatus.FAILED
    assert (await manager.get_queue_status("q"))["circuit_breaker_status"] == "open"
    await manager.submit_task("h", "q", job, "h", priority=HIGH)
    await manager.submit_task("l", "q", job, "l", priority=LOW)
    # The credit carries over between fetches; start the half-open period
    # from a fresh one, so that the weighted order's next pick is known.
    queue = manager._queues["q"]  # pyright: ignore[reportPrivateUsage]
    assert queue.consumer is not None
    queue.consumer._credit = [0, 0, 0]  # pyright: ignore[reportPrivateUsage]

    await _wait_all(manager, ["h", "l"])
    events = [e async for e in read(client, QueueKeys(manager.key_prefix, "q").log)]
    trials = [e.task_id for e in events if isinstance(e, TaskStarted) and e.trial]
    assert trials == ["l"]
    assert (await manager.get_queue_status("q"))["circuit_breaker_status"] == "closed"
    assert await manager.verify_projections("q") == []
