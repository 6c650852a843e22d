"""arq under the common scenarios; see common.py.

arq has no batch enqueue: the batch row enqueues each batch concurrently with
`asyncio.gather` of `enqueue_job` (labelled "gather"). The worker is
`Worker(max_jobs=C, handle_signals=False)` run with `async_run()`; it polls its
sorted set every `poll_delay` (default 0.5 s). For the latency row only, the
worker polls every 1 ms and `job.result(poll_delay=0.001)`: arq's best latency.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import common
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Worker

QUEUE = "arq:queue"


async def noop(ctx: dict[str, Any], i: int) -> int:
    return await common.run_task(i, 0.0)


async def sleep(ctx: dict[str, Any], i: int) -> int:
    return await common.run_task(i, 0.05)


async def echo(ctx: dict[str, Any], i: int) -> int:
    return i


def settings(url: str) -> RedisSettings:
    host, port = common.host_port(url)
    return RedisSettings(host=host, port=port)


def worker(args: argparse.Namespace) -> Worker:
    return Worker(
        functions=[noop, sleep, echo],  # type: ignore[list-item]
        redis_settings=settings(args.url),
        max_jobs=args.concurrency,
        handle_signals=False,
        poll_delay=0.001 if args.tight else 0.5,
    )


async def start_worker(args: argparse.Namespace) -> tuple[Worker, asyncio.Task[None]]:
    w = worker(args)
    return w, asyncio.create_task(w.async_run())


async def stop_worker(handle: tuple[Worker, asyncio.Task[None]]) -> None:
    w, task = handle
    await common.cancel(task)
    await w.close()


async def submit(args: argparse.Namespace) -> dict[str, Any]:
    pool: ArqRedis = await create_pool(settings(args.url))

    async def single(i: int) -> None:
        await pool.enqueue_job(args.fn, i)

    async def queued() -> int:
        return int(await pool.zcard(QUEUE))

    try:
        return await common.submits(args, single, None, "gather (no batch API)", queued)
    finally:
        await pool.aclose()


async def work(args: argparse.Namespace) -> dict[str, Any]:
    pool: ArqRedis = await create_pool(settings(args.url))

    async def start() -> Any:
        return await start_worker(args)

    async def left() -> int:
        return int(await pool.zcard(QUEUE))

    try:
        return await common.work(
            args.n, args.fn, args.concurrency, start, stop_worker, left
        )
    finally:
        await pool.aclose()


async def latency(args: argparse.Namespace) -> dict[str, Any]:
    server = common.start_server(common.serve_command(args))
    pool: ArqRedis = await create_pool(settings(args.url))
    try:

        async def one(i: int) -> Any:
            job = await pool.enqueue_job("echo", i)
            assert job is not None
            return await job.result(timeout=30, poll_delay=0.001)

        return await common.latency(args.n, one)
    finally:
        await pool.aclose()
        common.stop_server(server)


if __name__ == "__main__":
    common.run(
        {"submit": submit, "work": work, "latency": latency},
        lambda args: common.serve(lambda: start_worker(args), stop_worker),
    )
