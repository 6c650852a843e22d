"""Redis round trips and commands per task.

Runs N no-op tasks through one manager on a private embedded server (so no other
client's commands are counted). Round trips are counted in the client (each
command or pipeline kew sends); commands are what the server executed, from
INFO commandstats, including those run inside kew's functions.

    .venv/bin/python bench/commands_per_task.py [N] [--url redis://...]

With --url (a server nobody else uses: `bench/run.py` passes its private
Redis) the counts come from that server instead of an embedded one.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from typing import Any

import redis.asyncio as aioredis

from kew import QueueConfig, TaskQueueManager
from kew.server import EmbeddedServer

SENT: Counter[str] = Counter()


def count_round_trips() -> None:
    """Count what the asyncio client sends, by command name."""
    execute = aioredis.Redis.execute_command
    pipeline = aioredis.client.Pipeline.execute

    async def counted(self: Any, *args: Any, **options: Any) -> Any:
        SENT[str(args[0]).lower()] += 1
        return await execute(self, *args, **options)

    async def counted_pipeline(self: Any, *args: Any, **options: Any) -> Any:
        SENT["pipeline"] += 1
        return await pipeline(self, *args, **options)

    aioredis.Redis.execute_command = counted  # type: ignore[method-assign]
    aioredis.client.Pipeline.execute = counted_pipeline  # type: ignore[method-assign]


async def noop() -> None:
    return None


async def counts(client: aioredis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = await client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


async def measure(url: str, n: int) -> tuple[dict[str, int], dict[str, int]]:
    """Round trips sent by kew and commands run by the server, by name, for N
    tasks submitted one at a time and then awaited."""
    count_round_trips()
    probe = aioredis.Redis.from_url(url, decode_responses=True)
    async with TaskQueueManager(redis_url=url, key_prefix="bench") as m:
        await m.create_queue(QueueConfig(name="q", max_workers=50, max_size=n))
        before = await counts(probe)
        SENT.clear()
        for i in range(n):
            await m.submit_task(f"t{i}", "q", noop)
        for i in range(n):
            await m.wait_for_task(f"t{i}", timeout=60)
        after = await counts(probe)
        sent = dict(SENT)
    await probe.aclose()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta = {k: v for k, v in delta.items() if v and k != "info"}
    sent.pop("info", None)
    return sent, delta


async def main(n: int, url: str | None) -> None:
    if url is None:
        with EmbeddedServer() as server:
            assert server.url is not None
            sent, delta = await measure(server.url, n)
    else:
        sent, delta = await measure(url, n)
    print(f"{n} tasks, submitted one at a time, then wait_for_task for each")
    print(f"round trips per task: {sum(sent.values()) / n:.2f}")
    for name, calls in sorted(sent.items(), key=lambda kv: -kv[1]):
        print(f"  {name:12} {calls / n:6.2f}")
    print(
        f"all commands (including inside functions) per task: "
        f"{sum(delta.values()) / n:.2f}"
    )
    for name, calls in sorted(delta.items(), key=lambda kv: -kv[1]):
        print(f"  {name:12} {calls / n:6.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("n", nargs="?", type=int, default=1000)
    parser.add_argument("--url")
    cli = parser.parse_args()
    asyncio.run(main(cli.n, cli.url))
