"""SAQ (Redis backend) under the common scenarios; see common.py.

SAQ has no batch enqueue (its `map` gathers single enqueues, then polls for
results): the batch row gathers `queue.enqueue` per batch (labelled "gather").
The worker is `Worker(queue, functions, concurrency=C)` started with
`worker.start()`: C coroutines, each a blocking BLMOVE dequeue. A result is
awaited with `job.refresh(until_complete=1)`, woken by SAQ's pub/sub (again
after 1 s if its wake-up was lost: see `latency`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any

import common
import redis.asyncio as aioredis
from saq import Queue, Worker
from saq.queue.redis import RedisQueue


async def noop(ctx: Any, *, i: int) -> int:
    return await common.run_task(i, 0.0)


async def sleep(ctx: Any, *, i: int) -> int:
    return await common.run_task(i, 0.05)


async def echo(ctx: Any, *, i: int) -> int:
    return i


def queue(url: str) -> Queue:
    # Each of the C worker coroutines holds a connection while it blocks in
    # BLMOVE; redis-py 8 caps a pool at 100 connections by default, and at
    # concurrency 100 SAQ's coroutines then die of MaxConnectionsError. A
    # user would raise the cap, so the runner does.
    return RedisQueue(aioredis.from_url(url, max_connections=1000), name=common.QUEUE)


async def start_worker(
    args: argparse.Namespace,
) -> tuple[Worker, Queue, asyncio.Task[None]]:
    q = queue(args.url)
    await q.connect()
    w = Worker(q, functions=[noop, sleep, echo], concurrency=args.concurrency)
    return w, q, asyncio.create_task(w.start())


async def stop_worker(handle: tuple[Worker, Queue, asyncio.Task[None]]) -> None:
    w, q, task = handle
    await w.stop()
    await common.cancel(task)
    await q.disconnect()


async def submit(args: argparse.Namespace) -> dict[str, Any]:
    q = queue(args.url)
    await q.connect()

    async def single(i: int) -> None:
        await q.enqueue(args.fn, i=i)

    async def queued() -> int:
        return await q.count("queued")

    try:
        return await common.submits(args, single, None, "gather (no batch API)", queued)
    finally:
        await q.disconnect()


async def work(args: argparse.Namespace) -> dict[str, Any]:
    q = queue(args.url)
    await q.connect()

    async def start() -> Any:
        return await start_worker(args)

    async def left() -> int:
        # SAQ's "incomplete" set: jobs not finished, emptied in the same
        # transaction that stores a job's outcome. (Its "active" list can
        # keep a stale id of a job run twice until its sweeper runs.)
        return await q.count("incomplete")

    try:
        return await common.work(
            args.n, args.fn, args.concurrency, start, stop_worker, left
        )
    finally:
        await q.disconnect()


async def latency(args: argparse.Namespace) -> dict[str, Any]:
    server = common.start_server(common.serve_command(args))
    q = queue(args.url)
    await q.connect()
    try:

        async def one(i: int) -> Any:
            job = await q.enqueue("echo", i=i)
            assert job is not None
            # refresh() reads the job, then subscribes: an outcome published
            # in between is missed and it waits the whole time. Waits of 1 s
            # at a time keep such a lost wake-up visible in p99 without
            # stalling the run for long.
            for _ in range(30):
                with contextlib.suppress(TimeoutError):
                    await job.refresh(until_complete=1)
                if job.completed:
                    break
            return job.result

        return await common.latency(args.n, one)
    finally:
        await q.disconnect()
        common.stop_server(server)


if __name__ == "__main__":
    common.run(
        {"submit": submit, "work": work, "latency": latency},
        lambda args: common.serve(lambda: start_worker(args), stop_worker),
    )
