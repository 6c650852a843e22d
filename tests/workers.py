"""A `kew worker` child process, for tests that kill one with a real signal.

The worker imports a small task module written into the test's directory and
consumes one queue that the test created (with its stored configuration).
Tests in this process register functions of the same names that end at once,
so that a surviving consumer can take a dead worker's tasks over.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncGenerator
from pathlib import Path

import redis.asyncio as aioredis

from kew.connection import URL_ENV
from kew.events.log import read
from kew.keys import PREFIX_ENV, QueueKeys
from kew.registry import Registry

from .conftest import DEADLINE

MODULE = "edge_tasks"
TASKS = textwrap.dedent(
    '''\
    """Task functions of the worker process."""

    import asyncio

    import kew


    @kew.task(name="edge.hang")
    async def hang() -> str:
        await asyncio.Event().wait()  # until killed or cancelled
        return "never"


    @kew.task(name="edge.fail")
    async def fail() -> str:
        raise RuntimeError("the service is down")
    '''
)


class WorkerProcess:
    """One `kew worker --queue QUEUE` process running edge_tasks."""

    def __init__(self, process: subprocess.Popen[str], stderr: Path) -> None:
        self.process = process
        self.stderr_path = stderr
        self.name = ""

    async def ready(self) -> str:
        """Wait for the line it prints once it consumes; return its consumer name."""
        assert self.process.stdout is not None
        line = await asyncio.wait_for(
            asyncio.to_thread(self.process.stdout.readline), DEADLINE
        )
        found = re.match(r"kew worker (\S+) consuming ", line)
        assert found, f"no ready line: {line!r}; stderr: {self.stderr_path.read_text()}"
        self.name = found[1]
        return self.name

    async def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        code = await asyncio.to_thread(self.process.wait, DEADLINE)
        assert code == -signal.SIGKILL


@contextlib.asynccontextmanager
async def worker_process(
    directory: Path, redis_url: str, prefix: str, queue: str = "q"
) -> AsyncGenerator[WorkerProcess, None]:
    """Start a worker on `queue` and wait until it consumes; it is killed on
    exit if it still runs."""
    (directory / f"{MODULE}.py").write_text(TASKS)
    env = {k: v for k, v in os.environ.items() if k not in (URL_ENV, PREFIX_ENV)}
    env[URL_ENV] = redis_url
    args = [sys.executable, "-m", "kew", "--prefix", prefix, "worker"]
    args += ["--queue", queue, "--import", MODULE]
    stderr = directory / "worker.err"
    with stderr.open("w") as errors:
        process = subprocess.Popen(
            args,
            cwd=directory,
            env=env,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    worker = WorkerProcess(process, stderr)
    try:
        await worker.ready()
        yield worker
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


async def started_by(
    client: aioredis.Redis, prefix: str, task_id: str, consumer: str, queue: str = "q"
) -> bool:
    """Has `consumer` started an attempt of the task (per the log)?"""
    events = [e async for e in read(client, QueueKeys(prefix, queue).log)]
    return any(
        e.type == "task.started" and e.task_id == task_id and e.actor == consumer
        for e in events
    )


def survivor_registry() -> Registry:
    """A registry whose edge.* functions end at once: edge.hang returns
    "taken over", edge.fail still fails."""

    async def hang() -> str:
        return "taken over"

    async def fail() -> str:
        raise RuntimeError("the service is still down")

    registry = Registry()
    registry.register(hang, "edge.hang")
    registry.register(fail, "edge.fail")
    return registry
