"""The floor: a bare loop of three Redis functions per task, no library.

What kew does per task with nothing else around it: `submit` appends the
task.submitted event, writes the task hash and adds the ready entry;
`fetch` reads up to `free` entries for the consumer group and, for each, logs
task.started and marks the hash; `complete` logs task.succeeded, marks the
hash and XACK/XDELs the entry, for every task that ended in one turn of the
event loop. One asyncio process, redis-py with hiredis, no validation, no
telemetry, no leases. When nothing is ready the fetcher waits with a plain
blocking XREAD after the newest entry, as kew does.

    .venv/bin/python bench/floor.py drain --url URL [--n 20000]
    .venv/bin/python bench/floor.py latency --url URL [--n 500]

A drain that has not finished within `drain_limit(n)` seconds, or a task not
done within `LATENCY_LIMIT`, stops the loop and exits with status 1 and a
message: the floor is a measurement, it must not hang the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

import redis.asyncio as aioredis

LIBRARY = """#!lua name=kewfloor
local function submit(keys, args)
  local eid = redis.call('XADD', keys[1], '*', 'type', 'task.submitted',
    'task_id', args[1], 'data', args[2])
  redis.call('HSET', keys[3], 'state', 'queued', 'last_event', eid,
    'args', args[2])
  redis.call('XADD', keys[2], '*', 'task_id', args[1])
  return eid
end

local function fetch(keys, args)
  local got = redis.call('XREADGROUP', 'GROUP', 'g', args[1], 'COUNT', args[2],
    'STREAMS', keys[2], '>')
  local out = {}
  if got then
    for _, e in ipairs(got[1][2]) do
      local task_id = e[2][2]
      local eid = redis.call('XADD', keys[1], '*', 'type', 'task.started',
        'task_id', task_id)
      redis.call('HSET', args[3] .. task_id, 'state', 'processing',
        'last_event', eid)
      out[#out + 1] = e[1]
      out[#out + 1] = task_id
    end
  end
  if #out == 0 then
    local newest = redis.call('XREVRANGE', keys[2], '+', '-', 'COUNT', 1)
    return {'', newest[1] and newest[1][1] or '0-0'}
  end
  return out
end

local function complete(keys, args)
  for i = 2, #args, 2 do
    local eid = redis.call('XADD', keys[1], '*', 'type', 'task.succeeded',
      'task_id', args[i + 1], 'data', '{"result":null}')
    redis.call('HSET', args[1] .. args[i + 1], 'state', 'completed',
      'last_event', eid)
    redis.call('XACK', keys[2], 'g', args[i])
    redis.call('XDEL', keys[2], args[i])
  end
  return (#args - 1) / 2
end

redis.register_function('floor_submit', submit)
redis.register_function('floor_fetch', fetch)
redis.register_function('floor_complete', complete)
"""

LOG, READY, TASK = "floor:log", "floor:ready", "floor:task:"
LATENCY_LIMIT = 30.0


def drain_limit(n: int) -> float:
    """Seconds a drain of n tasks may take: it runs at about 55,000/s here."""
    return 30 + n / 1_000


class FloorFailed(Exception):
    pass


class Loop:
    """One consumer: fetch up to the free slots, run, complete in batches."""

    def __init__(self, url: str, concurrency: int) -> None:
        # No socket timeout, as in kew (kew/connection.py): with redis-py 8 on
        # Python 3.11 a cancel that lands while a command is sent under that
        # timeout is sometimes swallowed (asyncio.wait_for), and the loop
        # then never stops.
        options: dict[str, Any] = {"decode_responses": True, "socket_timeout": None}
        self.client = aioredis.Redis.from_url(url, **options)
        self.blocking = aioredis.Redis.from_url(url, **options)
        self.concurrency = concurrency
        self.inflight = 0
        self.max_inflight = 0
        self.completed = 0
        self.freed = asyncio.Event()
        self.ended: list[tuple[str, str]] = []
        self.waiters: dict[str, asyncio.Future[None]] = {}
        self.stopping = False
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def setup(self) -> None:
        await self.client.function_load(LIBRARY, replace=True)
        await self.client.xgroup_create(READY, "g", id="0", mkstream=True)

    async def submit(self, task_id: str) -> None:
        await self.client.fcall(
            "floor_submit", 3, LOG, READY, TASK + task_id, task_id, "[]"
        )

    async def consume(self) -> None:
        while not self.stopping:
            free = self.concurrency - self.inflight
            if free <= 0:
                self.freed.clear()
                await self.freed.wait()
                continue
            rows = await self.client.fcall(
                "floor_fetch", 2, LOG, READY, "c", free, TASK
            )
            if rows[0] == "":
                await self.blocking.xread({READY: rows[1]}, count=1, block=1000)
                continue
            for i in range(0, len(rows), 2):
                self.inflight += 1
                self.max_inflight = max(self.max_inflight, self.inflight)
                self.spawn(self.run(rows[i], rows[i + 1]))

    async def run(self, entry: str, task_id: str) -> None:
        await asyncio.sleep(0)  # the task: one yield, like the drain's no-op
        self.ended.append((entry, task_id))
        if len(self.ended) == 1:
            asyncio.get_running_loop().call_soon(lambda: self.spawn(self.flush()))

    async def flush(self) -> None:
        batch, self.ended = self.ended, []
        args: list[str] = [TASK]
        for entry, task_id in batch:
            args += [entry, task_id]
        await self.client.fcall("floor_complete", 2, LOG, READY, *args)
        self.inflight -= len(batch)
        self.completed += len(batch)
        self.freed.set()
        for _, task_id in batch:
            waiter = self.waiters.pop(task_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def close(self) -> None:
        self.stopping = True
        await self.client.aclose()
        await self.blocking.aclose()


async def drain(url: str, n: int, concurrency: int) -> dict[str, Any]:
    loop = Loop(url, concurrency)
    await loop.setup()
    for lo in range(0, n, 1000):
        async with loop.client.pipeline(transaction=False) as pipe:
            for i in range(lo, min(lo + 1000, n)):
                pipe.fcall("floor_submit", 3, LOG, READY, f"{TASK}t{i}", f"t{i}", "[]")
            await pipe.execute()
    t0 = time.perf_counter()
    consumer = asyncio.create_task(loop.consume())
    try:
        async with asyncio.timeout(drain_limit(n)):
            while loop.completed < n:
                await loop.freed.wait()
                loop.freed.clear()
    except TimeoutError:
        raise FloorFailed(
            f"the drain completed {loop.completed} of {n} tasks in "
            f"{drain_limit(n):.0f}s{_crash(consumer)}"
        ) from None
    finally:
        await stop(loop, consumer)
    seconds = time.perf_counter() - t0
    return {
        "n": n,
        "seconds": seconds,
        "tasks_per_s": n / seconds,
        "max_concurrency": loop.max_inflight,
    }


async def latency(url: str, n: int) -> dict[str, Any]:
    loop = Loop(url, 100)
    await loop.setup()
    consumer = asyncio.create_task(loop.consume())
    times: list[float] = []
    try:
        for i in range(n + 20):
            task_id = f"l{i}"
            t0 = time.perf_counter()
            done = loop.waiters[task_id] = asyncio.get_running_loop().create_future()
            await loop.submit(task_id)
            try:
                await asyncio.wait_for(done, LATENCY_LIMIT)
            except TimeoutError:
                raise FloorFailed(
                    f"task {task_id!r} was not done within {LATENCY_LIMIT}s"
                    f"{_crash(consumer)}"
                ) from None
            if i >= 20:
                times.append((time.perf_counter() - t0) * 1000)
    finally:
        await stop(loop, consumer)
    return {
        "n": n,
        "p50_ms": statistics.median(times),
        "p99_ms": statistics.quantiles(times, n=100)[98],
    }


async def stop(loop: Loop, consumer: asyncio.Task[None]) -> None:
    loop.stopping = True
    consumer.cancel()
    await asyncio.gather(consumer, return_exceptions=True)
    await loop.close()


def _crash(consumer: asyncio.Task[None]) -> str:
    """Why the consumer stopped early, if it did."""
    if consumer.done() and not consumer.cancelled() and consumer.exception():
        return f"; the consumer failed: {consumer.exception()!r}"
    return ""


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["drain", "latency"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    try:
        if args.command == "drain":
            result = await drain(args.url, args.n or 20_000, args.concurrency)
        else:
            result = await latency(args.url, args.n or 500)
    except FloorFailed as exc:
        print(f"floor.py {args.command}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
