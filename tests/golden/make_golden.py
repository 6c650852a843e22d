"""Write a golden history: a workload that produces every event type of the
current schema, exported as JSON Lines, and the projections the functions
stored for it.

Run it only when a schema version is added (name the files after it); the
files it wrote before are never regenerated: they are what old logs look like,
and tests/test_golden.py replays them after every change to a projection.

    .venv/bin/python tests/golden/make_golden.py v1
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from kew import QueueConfig, TaskQueueManager
from kew.keys import QueueKeys
from kew.registry import Registry
from kew.server import EmbeddedServer

HERE = Path(__file__).parent


class Service:
    def __init__(self) -> None:
        self.down = False
        self.calls = 0

    async def call(self, n: int) -> int:
        self.calls += 1
        if self.down:
            raise ConnectionError(f"down at call {self.calls}")
        return n


async def workload(url: str) -> TaskQueueManager:
    service = Service()
    registry = Registry()
    registry.register(service.call, "golden.call")

    async def hang() -> None:
        await asyncio.sleep(3600)

    registry.register(hang, "golden.hang")
    manager = TaskQueueManager(redis_url=url, key_prefix="golden", registry=registry)
    await manager.initialize()
    await manager.create_queue(
        QueueConfig(
            name="q",
            max_workers=2,
            max_retries=1,
            retry_delay=0.01,
            circuit_breaker_max_failures=1,
            circuit_breaker_reset_timeout=0.2,
            lease_seconds=0.3,
            max_deliveries=1,
        )
    )
    # Success; a retry that succeeds; a final failure (opens the breaker); a
    # trial that closes it.
    await manager.submit_task("ok", "q", "golden.call", 1, priority="high")
    await manager.wait_for_task("ok", 10)
    service.down = True
    await manager.submit_task("fails", "q", "golden.call", 2)
    await manager.wait_for_task("fails", 10)
    service.down = False
    await manager.submit_task("trial", "q", "golden.call", 3)
    await manager.wait_for_task("trial", 10)
    # Deferred, then cancelled; queued, then cancelled behind a busy worker.
    await manager.submit_task(
        "later", "q", "golden.call", 4, _defer_by=timedelta(hours=1)
    )
    await manager.cancel_task("later")
    await manager.submit_task("deferred", "q", "golden.call", 5, _defer_by=0.05)
    await manager.wait_for_task("deferred", 10)
    # A running task cancelled cooperatively.
    await manager.submit_task("hung", "q", "golden.hang")
    await _until(manager, "hung", "processing")
    await manager.cancel_task("hung")
    await manager.wait_for_task("hung", 10)
    # A batch.
    await manager.submit_tasks(
        "q",
        [
            {"task_id": f"b{i}", "task_func": "golden.call", "args": [i]}
            for i in range(2)
        ],
    )
    for i in range(2):
        await manager.wait_for_task(f"b{i}", 10)
    # Interrupted at shutdown, then run by another consumer.
    await manager.submit_task("interrupted", "q", "golden.hang")
    await _until(manager, "interrupted", "processing")
    await manager.shutdown(wait=False)
    other = TaskQueueManager(
        redis_url=url, key_prefix="golden", registry=_finishing(freeze=True)
    )
    await other.initialize()
    await other.attach_queue("q")
    await other.wait_for_task("interrupted", 10)
    # A consumer that stops renewing: its task is dead-lettered (max_deliveries
    # 1), requeued, and run.
    await other.submit_task("dead", "q", "golden.freeze")
    await _until(other, "dead", "processing")
    consumer = other._queues["q"].consumer
    assert consumer is not None
    consumer._stopping = True
    consumer._wake.set()
    third = TaskQueueManager(redis_url=url, key_prefix="golden", registry=_finishing())
    await third.initialize()
    await third.attach_queue("q")
    await third.wait_for_task("dead", 10)
    await third.requeue_dead_letters("q")
    await third.wait_for_task("dead", 10)
    await other.shutdown(wait=False)
    return third


def _finishing(*, freeze: bool = False) -> Registry:
    """golden.hang finishes here; golden.freeze hangs (freeze) or finishes."""
    registry = Registry()

    async def done() -> str:
        return "done"

    async def hang() -> None:
        await asyncio.sleep(3600)

    registry.register(done, "golden.hang")
    registry.register(hang if freeze else done, "golden.freeze")
    return registry


async def _until(manager: TaskQueueManager, task_id: str, state: str) -> None:
    # A script, not the library: a short poll is the simplest wait here.
    while (await manager.get_task_status(task_id)).status.value != state:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


async def main(version: str) -> None:
    with EmbeddedServer() as server:
        assert server.url is not None
        manager = await workload(server.url)
        keys = QueueKeys("golden", "q")
        lines = [line async for line in manager.export_log("q")]
        client = manager.client
        tasks: dict[str, Any] = {}
        for task_id in sorted({line["task_id"] for line in lines if "task_id" in line}):
            tasks[task_id] = await client.hgetall(keys.task(task_id))
        expected = {
            "tasks": tasks,
            "stats": {
                k: v for k, v in (await client.hgetall(keys.stats)).items() if v != "0"
            },
            "breaker": await client.hgetall(keys.breaker),
            "ended": await client.hgetall(keys.ended),
        }
        await manager.shutdown()
    (HERE / f"{version}.jsonl").write_text(
        "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    )
    (HERE / f"{version}.expected.json").write_text(
        json.dumps(expected, indent=1, sort_keys=True) + "\n"
    )
    types = sorted({line["type"] for line in lines if "type" in line})
    print(f"wrote {len(lines)} events of {len(types)} types: {', '.join(types)}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "v1"))
