"""Write a golden history: a workload run against a real (embedded) server,
exported as JSON Lines, and the projections the functions stored for it.

Each history is named after the schema it was written with, plus a letter for
a later workload on the same schema:

    v1    successes, retries, the breaker's three transitions, deferral,
          cancellation (queued, deferred, running), a batch, an attempt
          interrupted at shutdown, a dead letter requeued
    v1b   what v1 lacks: a takeover after SIGKILL of a `kew worker` process
          (task.reclaimed), an entry deleted under a live consumer (task.lost),
          an entry handed back unstarted at a SIGTERM shutdown (task.released)
          and a consumer without the task's function (task.refused)

Together the histories hold every event type (tests/test_golden.py checks
that). Run the script only to add a history (a new schema version, or a new
event type: add a workload for it here); files written before are never
regenerated: they are what old logs look like, and tests/test_golden.py
replays them after every change to a projection.

    .venv/bin/python tests/golden/make_golden.py v1b
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from kew import QueueConfig, TaskQueueManager
from kew.connection import URL_ENV
from kew.events.log import read
from kew.keys import GROUP, PREFIX_ENV, QueueKeys
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
    consumer.leases.wake()
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


# -- v1b: takeovers and hand-backs ------------------------------------------

WORKER_MODULE = "golden_tasks"
WORKER_TASKS = textwrap.dedent(
    """\
    import asyncio

    import kew


    @kew.task(name="golden.hang")
    async def hang() -> None:
        await asyncio.sleep(3600)
    """
)


class Worker:
    """A `kew worker` process consuming queue q, whose golden.hang hangs."""

    def __init__(self, url: str, directory: str, *options: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in (URL_ENV, PREFIX_ENV)}
        args = [sys.executable, "-m", "kew", "--redis-url", url, "--prefix"]
        args += ["golden", "worker", "--queue", "q", "--import", WORKER_MODULE]
        self.process = subprocess.Popen(
            [*args, *options], cwd=directory, env=env, stdout=subprocess.PIPE, text=True
        )

    def ready(self) -> str:
        """Wait for the line the worker prints once it consumes; its name."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        found = re.match(r"kew worker (\S+) consuming ", line)
        assert found, f"no ready line from the worker: {line!r}"
        return found[1]

    def stop(self, signal_number: int) -> None:
        self.process.send_signal(signal_number)
        self.process.wait(timeout=30)
        assert self.process.stdout is not None
        self.process.stdout.close()


class Once:
    """golden.once: the first attempt runs until cancelled, later ones return."""

    def __init__(self) -> None:
        self.attempts = 0

    async def __call__(self) -> str:
        self.attempts += 1
        if self.attempts == 1:
            await asyncio.sleep(3600)
        return f"attempt {self.attempts}"


def _in_process(*, elsewhere: bool) -> Registry:
    """The functions of this process's consumers: golden.hang and golden.call
    finish, golden.once hangs once, golden.elsewhere only if `elsewhere`."""
    registry = Registry()

    async def done() -> str:
        return "done"

    async def call(n: int) -> int:
        return n

    registry.register(done, "golden.hang")
    registry.register(call, "golden.call")
    registry.register(Once(), "golden.once")
    if elsewhere:
        registry.register(call, "golden.elsewhere")
    return registry


async def workload_v1b(url: str) -> TaskQueueManager:
    keys = QueueKeys("golden", "q")
    submitter = TaskQueueManager(
        redis_url=url, key_prefix="golden", consume=False, registry=Registry()
    )
    await submitter.initialize()
    await submitter.create_queue(
        QueueConfig(name="q", max_workers=2, lease_seconds=0.5, max_deliveries=3)
    )
    client = submitter.client
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / f"{WORKER_MODULE}.py").write_text(WORKER_TASKS)

        # A worker process is killed mid-task; a consumer here takes the
        # task over once its lease has lapsed (task.reclaimed).
        worker = Worker(url, directory)
        await asyncio.to_thread(worker.ready)
        await submitter.submit_task("taken", "q", "golden.hang")
        await _until(submitter, "taken", "processing")
        await asyncio.to_thread(worker.stop, signal.SIGKILL)
        survivor = TaskQueueManager(
            redis_url=url, key_prefix="golden", registry=_in_process(elsewhere=False)
        )
        await survivor.initialize()
        await survivor.attach_queue("q")
        await survivor.wait_for_task("taken", 30)

        # The entry of a running task is deleted by hand: its consumer logs
        # task.lost at its next renewal and the task runs again.
        await submitter.submit_task("vanished", "q", "golden.once")
        await _until(submitter, "vanished", "processing")
        entry = await client.hget(keys.task("vanished"), "entry")
        assert entry is not None
        assert await client.xdel(keys.ready("medium"), entry) == 1
        await survivor.wait_for_task("vanished", 30)
        await survivor.shutdown()

        # A worker with one slot runs "busy"; an entry of "held" is read
        # under its name but never started (as after a read whose reply
        # was lost); SIGTERM: the worker hands both back (task.interrupted,
        # task.released).
        worker = Worker(url, directory, "--concurrency", "1", "--grace", "0")
        name = await asyncio.to_thread(worker.ready)
        await submitter.submit_task("busy", "q", "golden.hang")
        await _until(submitter, "busy", "processing")
        await submitter.submit_task("held", "q", "golden.call", 7)
        read_reply = await client.xreadgroup(
            GROUP, name, {keys.ready("medium"): ">"}, count=1
        )
        assert read_reply, "the entry of 'held' was not there to read"
        await asyncio.to_thread(worker.stop, signal.SIGTERM)

    # A consumer without golden.elsewhere hands its task back (task.refused);
    # one that has it runs it.
    lacking = TaskQueueManager(
        redis_url=url, key_prefix="golden", registry=_in_process(elsewhere=False)
    )
    await lacking.initialize()
    await lacking.attach_queue("q")
    await lacking.submit_task("refused", "q", "golden.elsewhere", 5)
    await _until_event(client, keys, "refused", "task.refused")
    for task_id in ("busy", "held"):
        await lacking.wait_for_task(task_id, 30)
    await lacking.shutdown()
    last = TaskQueueManager(
        redis_url=url, key_prefix="golden", registry=_in_process(elsewhere=True)
    )
    await last.initialize()
    await last.attach_queue("q")
    await last.wait_for_task("refused", 30)
    await submitter.shutdown()
    return last


async def _until_event(
    client: aioredis.Redis, keys: QueueKeys, task_id: str, event_type: str
) -> None:
    async def seen() -> bool:
        async for event in read(client, keys.log):
            if event.task_id == task_id and event.type == event_type:
                return True
        return False

    # A script, not the library: a short poll is the simplest wait here.
    while not await seen():  # noqa: ASYNC110
        await asyncio.sleep(0.01)


async def main(version: str) -> None:
    with EmbeddedServer() as server:
        assert server.url is not None
        manager = await WORKLOADS[version](server.url)
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


WORKLOADS: dict[str, Callable[[str], Awaitable[TaskQueueManager]]] = {
    "v1": workload,
    "v1b": workload_v1b,
}

if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
