"""cleanup_on_start: it forgets consumers that are gone, never their work.

Two consumer processes are SIGKILLed, one holding a running task and one idle.
Once their liveness keys have expired, a manager started with
`cleanup_on_start=True` removes the idle one from the consumer group and keeps
the one that holds an entry (deleting it would delete its pending entry, the
task's only link to a consumer); with `cleanup_on_start=False` both stay.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from kew import QueueConfig, TaskQueueManager
from kew.connection import URL_ENV
from kew.keys import GROUP, PREFIX_ENV, QueueKeys

from .conftest import DEADLINE, eventually

MakeManager = Callable[..., Awaitable[TaskQueueManager]]

CONSUMER = textwrap.dedent(
    """\
    import asyncio, sys
    import kew
    from kew import TaskQueueManager

    @kew.task(name="cleanup.quick")
    async def quick() -> str:
        return "quick"

    @kew.task(name="cleanup.forever")
    async def forever() -> None:
        await asyncio.Event().wait()

    async def main() -> None:
        manager = TaskQueueManager()
        await manager.initialize()
        await manager.attach_queue("q")
        print(manager.identity, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


@pytest.fixture
def spawn(
    redis_url: str, prefix: str, client: aioredis.Redis, tmp_path: Path
) -> Iterator[Callable[[], subprocess.Popen[str]]]:
    """Start consumer processes of queue "q"; each is killed at the end."""
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    env = {k: v for k, v in os.environ.items() if k not in (URL_ENV, PREFIX_ENV)}
    env |= {URL_ENV: redis_url, PREFIX_ENV: prefix}
    started: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, str(script)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


async def _name(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), DEADLINE)
    assert line.strip(), "the consumer process printed no name"
    return line.strip()


async def _kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    await asyncio.to_thread(process.wait, DEADLINE)


async def _consumers(client: aioredis.Redis, keys: QueueKeys) -> dict[str, int]:
    """Consumer name -> entries it holds, over the queue's ready streams."""
    held: dict[str, int] = {}
    for stream in keys.ready_all:
        for row in await client.xinfo_consumers(stream, GROUP):
            held[row["name"]] = held.get(row["name"], 0) + int(row["pending"])
    return held


async def test_cleanup_on_start_removes_dead_idle_consumers_and_keeps_held_work(
    make_manager: MakeManager,
    spawn: Callable[[], subprocess.Popen[str]],
    client: aioredis.Redis,
    prefix: str,
) -> None:
    """A dead consumer holding an entry survives cleanup_on_start; an idle one
    does not; cleanup_on_start=False removes neither."""
    keys = QueueKeys(prefix, "q")
    submitter = await make_manager(consume=False)
    # A long lease, so that nobody takes the held task over during the test.
    await submitter.create_queue(QueueConfig(name="q", lease_seconds=600))

    # The idle one first: it runs a task (so it is a member of the group) and
    # is killed holding nothing.
    idling = spawn()
    idler = await _name(idling)
    await submitter.submit_task("done", "q", "cleanup.quick")
    assert (await submitter.wait_for_task("done", DEADLINE)).result == "quick"
    await _kill(idling)

    holding = spawn()
    holder = await _name(holding)
    await submitter.submit_task("held", "q", "cleanup.forever")

    async def running() -> bool:
        return (await submitter.get_task_status("held")).status.value == "processing"

    await eventually(running, what="the second consumer to start the task")
    await _kill(holding)

    # Their liveness keys live as long as a lease: delete them, as their expiry
    # would, instead of waiting ten minutes.
    await client.delete(keys.worker(holder), keys.worker(idler))

    await make_manager(consume=False, cleanup_on_start=False)
    assert await _consumers(client, keys) == {holder: 1, idler: 0}

    await make_manager(consume=False, cleanup_on_start=True)
    assert await _consumers(client, keys) == {holder: 1}
    pending = await client.xpending_range(keys.ready("medium"), GROUP, "-", "+", 10)
    assert [p["consumer"] for p in pending] == [holder]
    assert (await submitter.get_task_status("held")).status.value == "processing"
