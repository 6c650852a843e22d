"""taskiq with taskiq-redis's stream broker under the common scenarios.

`RedisStreamBroker` (consumer group on one stream) with a
`RedisAsyncResultBackend`, so results are stored as kew stores them. taskiq
has no batch kick: the batch row gathers `kiq()` per batch (labelled
"gather"). The worker is `run_receiver_task(broker, max_async_tasks=C)` in
this event loop. A result is awaited with `wait_result()`, which polls: the
latency row polls every 1 ms (default 0.2 s), taskiq's best latency.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import common
from redis.asyncio import Redis
from taskiq.api import run_receiver_task
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

GROUP = "taskiq"


def make_broker(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    broker = RedisStreamBroker(args.url, queue_name=common.QUEUE).with_result_backend(
        RedisAsyncResultBackend(args.url)
    )

    async def noop(i: int) -> int:
        return await common.run_task(i, 0.0)

    async def sleep(i: int) -> int:
        return await common.run_task(i, 0.05)

    async def echo(i: int) -> int:
        return i

    tasks = {
        name: broker.task(task_name=name)(fn)
        for name, fn in (("noop", noop), ("sleep", sleep), ("echo", echo))
    }
    return broker, tasks


async def start_worker(args: argparse.Namespace) -> tuple[Any, asyncio.Task[None]]:
    broker, _ = make_broker(args)
    await broker.startup()
    receiver = run_receiver_task(broker, max_async_tasks=args.concurrency)
    return broker, asyncio.create_task(receiver)


async def stop_worker(handle: tuple[Any, asyncio.Task[None]]) -> None:
    broker, task = handle
    await common.cancel(task)
    await broker.shutdown()


async def submit(args: argparse.Namespace) -> dict[str, Any]:
    broker, tasks = make_broker(args)
    await broker.startup()  # declares the consumer group, reading from now on
    task = tasks[args.fn]

    async def single(i: int) -> None:
        await task.kiq(i)

    client = Redis.from_url(args.url)

    async def queued() -> int:
        return int(await client.xlen(common.QUEUE))

    try:
        return await common.submits(args, single, None, "gather (no batch API)", queued)
    finally:
        await client.aclose()
        await broker.shutdown()


async def work(args: argparse.Namespace) -> dict[str, Any]:
    client = Redis.from_url(args.url)

    async def start() -> Any:
        return await start_worker(args)

    async def left() -> int:
        groups = await client.xinfo_groups(common.QUEUE)
        group = next(g for g in groups if g["name"] in (GROUP, GROUP.encode()))
        return int(group["pending"]) + int(group.get("lag") or 0)

    try:
        return await common.work(
            args.n, args.fn, args.concurrency, start, stop_worker, left
        )
    finally:
        await client.aclose()


async def latency(args: argparse.Namespace) -> dict[str, Any]:
    server = common.start_server(common.serve_command(args))
    broker, tasks = make_broker(args)
    await broker.startup()
    try:

        async def one(i: int) -> Any:
            task = await tasks["echo"].kiq(i)
            result = await task.wait_result(check_interval=0.001, timeout=30)
            return result.return_value

        return await common.latency(args.n, one)
    finally:
        await broker.shutdown()
        common.stop_server(server)


if __name__ == "__main__":
    common.run(
        {"submit": submit, "work": work, "latency": latency},
        lambda args: common.serve(lambda: start_worker(args), stop_worker),
    )
