"""Recovery time after SIGKILL, with default settings.

A worker process (`kew worker`) starts a long task; it is SIGKILLed; a surviving
consumer (this process) takes the task over. Recovery time = the server time of
the second attempt's task.started event minus the server time read just
before the kill (both on the server's clock). Each run checks that the event it
times is attempt 2, written by this process's consumer right after its
task.reclaimed of the killed worker's attempt 1. Repeated N times; prints each
time, the median and the worst. Every wait has a deadline (`DEADLINE`); a run
that misses one, or whose log is not that story, raises RecoveryFailed (exit
status 1).

    .venv/bin/python bench/recovery.py [N] [--url redis://...]

Without --url it runs on kew's embedded server; `bench/run.py` passes its
private Redis. On a shared server each run uses a key prefix of its own
(`recovery-<random>-<n>`) and deletes the keys under it when it ends, so runs
can follow each other, or run side by side, on one server; nothing outside
those prefixes is touched.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis

from kew import QueueConfig, TaskQueueManager
from kew.events.log import read
from kew.events.models import Event, TaskReclaimed
from kew.keys import QueueKeys
from kew.server import EmbeddedServer

DEADLINE = 30.0
"""Seconds any one wait of a run may take (a takeover takes about 2)."""


class RecoveryFailed(Exception):
    pass


TASKS = textwrap.dedent(
    """\
    import asyncio
    import kew

    @kew.task(name="bench.long")
    async def long() -> str:
        await asyncio.sleep(3600)
        return "never"
    """
)


async def quick() -> str:
    return "taken over"


async def one_run(url: str, prefix: str, workdir: Path) -> float:
    env = {**os.environ, "KEW_REDIS_URL": url}
    async with TaskQueueManager(redis_url=url, key_prefix=prefix) as manager:
        manager.registry = type(manager.registry)()
        manager.registry.register(quick, "bench.long")
        await manager.create_queue(QueueConfig(name="q", max_workers=1))  # defaults
        # This process's consumer must not take the task first: fill its slot.
        blocker = asyncio.Event()

        async def hold() -> None:
            await blocker.wait()

        await manager.submit_task("hold", "q", hold)
        await _wait_started(manager, "hold")
        command = [sys.executable, "-m", "kew", "--prefix", prefix, "worker"]
        worker = subprocess.Popen(
            [*command, "-q", "q", "-i", "bench_tasks"],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            await _wait_announced(worker)
            await manager.submit_task("victim", "q", "bench.long")
            await _wait_started(manager, "victim")
            blocker.set()  # free this consumer's slot for the takeover
            seconds, micros = await manager.client.time()  # the log's clock
            killed = seconds + micros / 1e6
            worker.send_signal(signal.SIGKILL)
            await asyncio.to_thread(worker.wait)
            await manager.wait_for_task("victim", timeout=DEADLINE)
        finally:
            worker.kill()
            worker.wait()
        keys = QueueKeys(prefix, "q")
        events = [e async for e in read(manager.client, keys.log)]
        started = _takeover(events, "victim")
        return started.ms / 1000 - killed


def _takeover(events: list[Event], task_id: str) -> Event:
    """The task.started of the takeover: attempt 2, right after the
    task.reclaimed by which its consumer took attempt 1 from that attempt's
    (killed) consumer."""
    mine = [e for e in events if e.task_id == task_id]
    starts = [e for e in mine if e.type == "task.started"]
    story = [(e.type, e.attempt, e.actor) for e in mine]
    if [e.attempt for e in starts] != [1, 2]:
        raise RecoveryFailed(
            f"task {task_id!r} has starts of attempts {[e.attempt for e in starts]}, "
            f"not [1, 2]: its log is {story!r}"
        )
    first, second = starts
    before = mine[mine.index(second) - 1]
    if not (
        isinstance(before, TaskReclaimed)
        and before.attempt == 1
        and before.previous == first.actor
        and before.actor == second.actor != first.actor
    ):
        raise RecoveryFailed(
            f"task {task_id!r}'s attempt 2 is not a takeover of the killed "
            f"worker's attempt 1: its log is {story!r}"
        )
    return second


async def _wait_announced(worker: subprocess.Popen[str]) -> None:
    """Until `kew worker` printed its first line (it consumes from then on)."""
    assert worker.stdout is not None
    try:
        async with asyncio.timeout(DEADLINE):
            line = await asyncio.to_thread(worker.stdout.readline)
    except TimeoutError:
        # The reading thread ends when the worker is killed (finally above).
        raise RecoveryFailed(
            f"kew worker printed nothing within {DEADLINE}s; run it by hand to see why"
        ) from None
    if not line:
        raise RecoveryFailed(
            f"kew worker exited with status {worker.wait()} before it consumed; "
            "its stderr is above"
        )


async def _wait_started(manager: TaskQueueManager, task_id: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while (await manager.get_task_status(task_id)).status.value != "processing":
        if time.monotonic() > deadline:
            raise RecoveryFailed(
                f"task {task_id!r} did not start within {DEADLINE}s (its state: "
                f"{(await manager.get_task_status(task_id)).status.value!r})"
            )
        await asyncio.sleep(0.005)


async def measure(url: str, runs: int, prefix: str = "recovery") -> list[float]:
    """Seconds from SIGKILL to the takeover's task.started, `runs` times."""
    prefix = f"{prefix}-{uuid.uuid4().hex[:8]}"
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "bench_tasks.py").write_text(TASKS)
        for n in range(runs):
            try:
                times.append(await one_run(url, f"{prefix}-{n}", Path(tmp)))
            finally:
                await delete_keys(url, f"{prefix}-{n}")
    return times


async def delete_keys(url: str, prefix: str) -> None:
    """Delete every key under `prefix` (this run's own), and nothing else."""
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i : i + 500])
    finally:
        await client.aclose()


async def main(runs: int, url: str | None) -> None:
    if url is None:
        with EmbeddedServer() as server:
            assert server.url is not None
            times = await measure(server.url, runs)
    else:
        times = await measure(url, runs)
    for n, seconds in enumerate(times):
        print(f"run {n + 1}: recovered {seconds:.3f}s after SIGKILL")
    print(
        f"median {statistics.median(times):.3f}s, worst {max(times):.3f}s over {runs} "
        "runs (default lease 2.0s, renewed and swept every third of it)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="?", type=int, default=5)
    parser.add_argument("--url")
    cli = parser.parse_args()
    asyncio.run(main(cli.runs, cli.url))
