"""kew (this repository) under the common scenarios; see common.py.

A submitting process is a `TaskQueueManager(consume=False)`; the worker is
another process's `TaskQueueManager()` with the queue created at
max_workers=100 (`consume=True`). Tasks are registered with `@kew.task` in both,
so submissions are checked against the signature, as in an application.
`submit_tasks` is the batch API. Results are awaited with `wait_for_task`
(woken by the server's pub/sub, no polling).
"""

from __future__ import annotations

import argparse
import cProfile
from typing import Any

import common

import kew
from kew import QueueConfig, TaskQueueManager


@kew.task(name="bench.noop")
async def noop(i: int) -> int:
    return await common.run_task(i, 0.0)


@kew.task(name="bench.sleep")
async def sleep(i: int) -> int:
    return await common.run_task(i, 0.05)


@kew.task(name="bench.echo")
async def echo(i: int) -> int:
    return i


def config(concurrency: int) -> QueueConfig:
    return QueueConfig(name=common.QUEUE, max_workers=concurrency, max_size=10_000_000)


async def submit(args: argparse.Namespace) -> dict[str, Any]:
    name = f"bench.{args.fn}"
    async with TaskQueueManager(args.url, consume=False) as manager:
        await manager.create_queue(config(args.concurrency))

        async def single(i: int) -> None:
            await manager.submit_task(f"t{i}", common.QUEUE, name, i)

        async def batch(ids: list[int]) -> None:
            tasks = [{"task_id": f"t{i}", "task_func": name, "args": [i]} for i in ids]
            await manager.submit_tasks(common.QUEUE, tasks)

        async def queued() -> int:
            status = await manager.get_queue_status(common.QUEUE)
            return int(status["queued_tasks"])

        return await common.submits(args, single, batch, "submit_tasks", queued)


async def work(args: argparse.Namespace) -> dict[str, Any]:
    managers: list[TaskQueueManager] = []

    async def start() -> TaskQueueManager:
        manager = TaskQueueManager(args.url)
        await manager.initialize()
        await manager.create_queue(config(args.concurrency))
        managers.append(manager)
        return manager

    async def stop(manager: TaskQueueManager) -> None:
        await manager.shutdown()

    async def left() -> int:
        # Outcomes in the stats projection: all N succeeded, none failed or
        # dead-lettered (queued + processing == 0 would also hold if tasks
        # had been lost on the way).
        status = await managers[0].get_queue_status(common.QUEUE)
        failed = int(status["failed_tasks"]) + int(status["dead_letters"])
        return abs(args.n - int(status["completed_tasks"])) + failed

    profile = cProfile.Profile() if args.profile else None
    if profile is not None:
        profile.enable()
    result = await common.work(args.n, args.fn, args.concurrency, start, stop, left)
    if profile is not None:
        profile.disable()
        profile.dump_stats(args.profile)
    return result


async def serve(args: argparse.Namespace) -> None:
    async def start() -> TaskQueueManager:
        manager = TaskQueueManager(args.url)
        await manager.initialize()
        await manager.create_queue(config(args.concurrency))
        return manager

    async def stop(manager: TaskQueueManager) -> None:
        await manager.shutdown()

    await common.serve(start, stop)


async def latency(args: argparse.Namespace) -> dict[str, Any]:
    server = common.start_server(common.serve_command(args))
    try:
        async with TaskQueueManager(args.url, consume=False) as manager:
            await manager.create_queue(config(100))

            async def one(i: int) -> Any:
                task_id = f"l{i}"
                await manager.submit_task(task_id, common.QUEUE, "bench.echo", i)
                info = await manager.wait_for_task(task_id, timeout=30)
                return info.result

            return await common.latency(args.n, one)
    finally:
        common.stop_server(server)


if __name__ == "__main__":
    common.run(
        {"submit": submit, "work": work, "latency": latency},
        serve,
    )
