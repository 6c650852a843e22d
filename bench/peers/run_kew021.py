"""kew 0.2.1 (the earlier release, from PyPI) under the common scenarios.

Its API needs `task_type` and `priority`, and its worker is the polling loop
that `create_queue` starts in the same process: it cannot submit without
consuming. So that the submit rows measure submission alone, and the drain
and sleep rows start from a full queue, the submitting process holds its loop
with the release's own circuit-breaker key (`kew:circuit:<queue>:open`, which
the loop checks before every pop); the working process deletes the key and
creates the queue. Latency runs in one process (the release's only model),
polling `get_task_status` every 1 ms: it has no way to await a result.
`submit_tasks` (chunks of 50 in Lua) is the batch API. The release logs every
submit and completion at INFO to stderr (it sets that up itself); the runs
keep that, as a user gets it. Task functions live in common.py because the
release cloudpickles them.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import common
from redis.asyncio import Redis

from kew import QueueConfig, QueuePriority, TaskQueueManager, TaskStatus

HOLD = f"kew:circuit:{common.QUEUE}:open"
WAITING = f"queue:{common.QUEUE}:tasks"
"""The release's sorted set of a queue's waiting task ids."""
MEDIUM = QueuePriority.MEDIUM
FUNCTIONS = {"noop": common.plain_noop, "sleep": common.plain_sleep}


def config(concurrency: int) -> QueueConfig:
    return QueueConfig(name=common.QUEUE, max_workers=concurrency, max_size=10_000_000)


async def submit(args: argparse.Namespace) -> dict[str, Any]:
    client = Redis.from_url(args.url)
    await client.set(HOLD, "1", ex=3600)
    manager = TaskQueueManager(args.url, cleanup_on_start=False)
    await manager.initialize()
    await manager.create_queue(config(args.concurrency))
    fn = FUNCTIONS[args.fn]

    async def single(i: int) -> None:
        await manager.submit_task(f"t{i}", common.QUEUE, args.fn, fn, MEDIUM, i)

    async def batch(ids: list[int]) -> None:
        tasks = [
            {
                "task_id": f"t{i}",
                "task_type": args.fn,
                "task_func": fn,
                "priority": MEDIUM,
                "args": (i,),
            }
            for i in ids
        ]
        await manager.submit_tasks(common.QUEUE, tasks)

    async def queued() -> int:
        return int(await client.zcard(WAITING))

    try:
        return await common.submits(args, single, batch, "submit_tasks", queued)
    finally:
        await manager.shutdown(wait=False)
        await client.aclose()


async def start_worker(args: argparse.Namespace) -> TaskQueueManager:
    client = Redis.from_url(args.url)
    await client.delete(HOLD)
    await client.aclose()
    manager = TaskQueueManager(args.url, cleanup_on_start=False)
    await manager.initialize()
    await manager.create_queue(config(args.concurrency))
    return manager


async def stop_worker(manager: TaskQueueManager) -> None:
    await manager.shutdown()


async def work(args: argparse.Namespace) -> dict[str, Any]:
    client = Redis.from_url(args.url)

    async def start() -> Any:
        return await start_worker(args)

    async def left() -> int:
        waiting = await client.zcard(WAITING)
        return int(waiting) + int(await client.scard("kew:active_tasks"))

    try:
        return await common.work(
            args.n, args.fn, args.concurrency, start, stop_worker, left
        )
    finally:
        await client.aclose()


async def latency(args: argparse.Namespace) -> dict[str, Any]:
    manager = await start_worker(args)
    try:

        async def one(i: int) -> Any:
            task_id = f"l{i}"
            await manager.submit_task(
                task_id, common.QUEUE, "echo", common.plain_echo, MEDIUM, i
            )
            async with asyncio.timeout(30):
                while True:
                    info = await manager.get_task_status(task_id)
                    if info.status in (TaskStatus.COMPLETED, TaskStatus.FAILED):
                        return info.result
                    await asyncio.sleep(0.001)

        return await common.latency(args.n, one)
    finally:
        await manager.shutdown()


if __name__ == "__main__":
    common.run(
        {"submit": submit, "work": work, "latency": latency},
        lambda args: common.serve(lambda: start_worker(args), stop_worker),
    )
