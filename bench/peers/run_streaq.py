"""streaq under the common scenarios; see common.py.

Tasks are registered on a `Worker(concurrency=C, handle_signals=False)`, in
the submitting process too (streaq's way). `enqueue_many` (one pipeline) is
the batch API. The worker runs with `run_async()` in this event loop; a
result is awaited with `task.result()`, woken by streaq's pub/sub.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import common
from streaq import Worker


def make_worker(args: argparse.Namespace) -> tuple[Worker[Any], dict[str, Any]]:
    worker: Worker[Any] = Worker(
        redis_url=args.url,
        concurrency=args.concurrency,
        queue_name=common.QUEUE,
        handle_signals=False,
    )

    async def noop(i: int) -> int:
        return await common.run_task(i, 0.0)

    async def sleep(i: int) -> int:
        return await common.run_task(i, 0.05)

    async def echo(i: int) -> int:
        return i

    tasks = {
        name: worker.task(name=name)(fn)
        for name, fn in (("noop", noop), ("sleep", sleep), ("echo", echo))
    }
    return worker, tasks


async def start_worker(args: argparse.Namespace) -> asyncio.Task[None]:
    worker, _ = make_worker(args)
    return asyncio.create_task(worker.run_async())


async def submit(args: argparse.Namespace) -> dict[str, Any]:
    worker, tasks = make_worker(args)
    task = tasks[args.fn]
    async with worker:

        async def single(i: int) -> None:
            await task.enqueue(i)

        async def batch(ids: list[int]) -> None:
            await worker.enqueue_many([task.enqueue(i) for i in ids])

        return await common.submits(
            args, single, batch, "enqueue_many", worker.queue_size
        )


async def work(args: argparse.Namespace) -> dict[str, Any]:
    probe, _ = make_worker(args)
    async with probe:

        async def start() -> Any:
            return await start_worker(args)

        async def left() -> int:
            return await probe.queue_size()

        return await common.work(
            args.n, args.fn, args.concurrency, start, common.cancel, left
        )


async def latency(args: argparse.Namespace) -> dict[str, Any]:
    server = common.start_server(common.serve_command(args))
    worker, tasks = make_worker(args)
    try:
        async with worker:

            async def one(i: int) -> Any:
                task = await tasks["echo"].enqueue(i)
                return (await task.result(timeout=30)).result

            return await common.latency(args.n, one)
    finally:
        common.stop_server(server)


if __name__ == "__main__":
    common.run(
        {"submit": submit, "work": work, "latency": latency},
        lambda args: common.serve(lambda: start_worker(args), common.cancel),
    )
