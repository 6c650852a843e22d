"""Recovery: real consumer processes, real signals, nothing lost.

Each test runs `kew worker` (`python -m kew ... worker`) in child processes
that import a task module written into the test's tmp_path, and kills, stops or
terminates them with real signals; the surviving consumers run in the test's
own process. Nothing waits a fixed time: every wait is on a condition (an event
in the log, a line a process printed, a process's exit) with a deadline.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from kew import QueueConfig, TaskQueueManager, TaskStatus
from kew.connection import URL_ENV
from kew.events.log import read
from kew.events.models import (
    Event,
    TaskDeadLettered,
    TaskLost,
    TaskReclaimed,
    TaskStarted,
)
from kew.keys import GROUP, PREFIX_ENV, QueueKeys
from kew.registry import Registry

from .conftest import DEADLINE, eventually

MakeManager = Callable[..., Awaitable[TaskQueueManager]]

TAKEOVER = 20.0
"""A generous deadline for waits that include a lapsed lease (2 s by default)."""

MODULE = "recovery_tasks"
TASKS = textwrap.dedent(
    '''\
    """Task functions of the recovery tests' worker processes."""

    import asyncio
    import os
    import signal

    import kew


    @kew.task(name="recovery.sleep")
    async def sleep(seconds: float, label: str = "the worker") -> str:
        await asyncio.sleep(seconds)
        print(f"task slept {seconds:g}s", flush=True)
        return f"from {label}"


    @kew.task(name="recovery.crash")
    async def crash(flag: str) -> str:
        if os.path.exists(flag):
            os.kill(os.getpid(), signal.SIGKILL)
        return "no crash"


    @kew.task(name="recovery.add")
    async def add(a: int, b: int) -> int:
        return a + b


    @kew.task
    async def shout(text: str) -> str:
        return text.upper() + "!"
    '''
)

_BAD_STDERR = ("Task was destroyed", "Traceback", "never awaited")


class Worker:
    """One `kew worker` child process; its stderr goes to a file."""

    def __init__(self, args: list[str], env: dict[str, str], directory: Path) -> None:
        self.stderr_path = (
            directory / f"worker-{len(list(directory.glob('*.err')))}.err"
        )
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                args,
                cwd=directory,
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )

    async def ready(self) -> str:
        """Wait for the line the worker prints once it consumes; return its
        consumer name."""
        assert self.process.stdout is not None
        line = await asyncio.wait_for(
            asyncio.to_thread(self.process.stdout.readline), DEADLINE
        )
        found = re.match(r"kew worker (\S+) consuming ", line)
        assert found, f"no ready line: {line!r}; stderr: {self.stderr()}"
        return found[1]

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    async def exited(self) -> int:
        """Wait for the process to end; return its exit code."""
        return await asyncio.to_thread(self.process.wait, DEADLINE)

    async def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return await self.exited()

    async def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        assert await self.exited() == -signal.SIGKILL

    def rest_of_stdout(self) -> list[str]:
        """The lines printed after the ready line (once the process has ended)."""
        assert self.process.stdout is not None
        return self.process.stdout.read().splitlines()


StartWorker = Callable[..., Worker]


@pytest.fixture
def start_worker(
    redis_url: str, prefix: str, client: aioredis.Redis, tmp_path: Path
) -> Iterator[StartWorker]:
    """Start `kew worker` processes on the test's server and prefix, importing
    the task module; each is killed at the end of the test. (It depends on
    `client` so that the workers are gone before the test's keys are removed.)"""
    (tmp_path / f"{MODULE}.py").write_text(TASKS)
    env = {k: v for k, v in os.environ.items() if k not in (URL_ENV, PREFIX_ENV)}
    env[URL_ENV] = redis_url
    workers: list[Worker] = []

    def start(queue: str, *options: str, verbose: bool = False) -> Worker:
        args = [sys.executable, "-m", "kew", "--prefix", prefix]
        args += ["-v"] if verbose else []
        args += ["worker", "--queue", queue, "--import", MODULE, *options]
        worker = Worker(args, env, tmp_path)
        workers.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.kill()
            worker.process.wait()
            if worker.process.stdout is not None:
                worker.process.stdout.close()
            # Shown only when the test fails.
            print(f"--- {worker.stderr_path.name}:\n{worker.stderr()}", file=sys.stderr)


def load_tasks(path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    """Run the workers' task module in this process, registering its functions
    in a registry of their own (not the process-wide one), and return it."""
    registry = Registry()
    monkeypatch.setattr("kew.registry.registry", registry)
    spec = importlib.util.spec_from_file_location(MODULE, path)
    assert spec is not None
    assert spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return registry


async def survivor_with(
    make_manager: MakeManager, name: str, result: str, queue: str = "q"
) -> TaskQueueManager:
    """An in-process consumer of `queue` whose task function `name` returns
    `result` at once."""

    async def quick(*args: object, **kwargs: object) -> str:
        return result

    manager = await make_manager()
    manager.registry = Registry()
    manager.registry.register(quick, name)
    await manager.attach_queue(queue)
    return manager


async def task_events(
    client: aioredis.Redis, prefix: str, task_id: str, queue: str = "q"
) -> list[Event]:
    return [
        e
        async for e in read(client, QueueKeys(prefix, queue).log)
        if e.task_id == task_id
    ]


async def started_by(
    client: aioredis.Redis, prefix: str, task_id: str, consumer: str
) -> bool:
    return any(
        e.type == "task.started" and e.actor == consumer
        for e in await task_events(client, prefix, task_id)
    )


def clean(stderr: str) -> bool:
    return not any(bad in stderr for bad in _BAD_STDERR)


async def test_sigkill_mid_task_loses_nothing_with_default_settings(
    make_manager: MakeManager,
    start_worker: StartWorker,
    client: aioredis.Redis,
    prefix: str,
) -> None:
    """SIGKILL of a worker mid-task loses nothing: a survivor takes it over."""
    submitter = await make_manager(consume=False)
    await submitter.create_queue(QueueConfig(name="q"))
    worker = start_worker("q")
    dead = await worker.ready()
    await submitter.submit_task("t", "q", "recovery.sleep", 3600)
    await eventually(
        lambda: started_by(client, prefix, "t", dead), what="the worker to start t"
    )

    await worker.kill()
    survivor = await survivor_with(make_manager, "recovery.sleep", "from the survivor")
    info = await survivor.wait_for_task("t", timeout=TAKEOVER)

    assert info.status is TaskStatus.COMPLETED
    assert info.result == "from the survivor"
    assert info.attempt == 2
    events = await task_events(client, prefix, "t")
    assert [(e.type, e.attempt, e.actor) for e in events] == [
        ("task.submitted", 0, submitter.identity),
        ("task.started", 1, dead),
        ("task.reclaimed", 1, survivor.identity),
        ("task.started", 2, survivor.identity),
        ("task.succeeded", 2, survivor.identity),
    ]
    started, reclaimed = events[1], events[2]
    assert isinstance(started, TaskStarted)
    assert isinstance(reclaimed, TaskReclaimed)
    assert reclaimed.previous == dead
    assert reclaimed.entry == started.entry
    assert reclaimed.idle_ms >= 2000
    assert await survivor.verify_projections("q") == []


async def test_a_stopped_worker_is_fenced_when_it_resumes(
    make_manager: MakeManager,
    start_worker: StartWorker,
    client: aioredis.Redis,
    prefix: str,
) -> None:
    """A SIGSTOPped worker is taken over; after SIGCONT its late outcome is dropped."""
    creator = await make_manager(consume=False)
    await creator.create_queue(QueueConfig(name="q", lease_seconds=0.5))
    a = start_worker("q", verbose=True)
    a_name = await a.ready()
    await creator.submit_task("t", "q", "recovery.sleep", 1.0, "A")
    await eventually(
        lambda: started_by(client, prefix, "t", a_name), what="A to start t"
    )

    a.process.send_signal(signal.SIGSTOP)
    try:
        b = await survivor_with(make_manager, "recovery.sleep", "from B")
        info = await b.wait_for_task("t", timeout=TAKEOVER)
    finally:
        a.process.send_signal(signal.SIGCONT)
    await eventually(
        lambda: "dropped the outcome" in a.stderr() or "lost its lease" in a.stderr(),
        what="A to notice it lost the task",
    )

    assert info.status is TaskStatus.COMPLETED
    assert info.result == "from B"
    assert (await b.get_task_status("t")).result == "from B"
    events = await task_events(client, prefix, "t")
    reclaimed = [e for e in events if isinstance(e, TaskReclaimed)]
    assert [(e.previous, e.actor) for e in reclaimed] == [(a_name, b.identity)]
    assert [(e.type, e.actor) for e in events if e.type == "task.succeeded"] == [
        ("task.succeeded", b.identity)
    ]
    assert await a.terminate() == 0
    assert clean(a.stderr()), a.stderr()
    assert await b.verify_projections("q") == []


async def test_a_crash_loop_is_dead_lettered_and_requeued(
    make_manager: MakeManager,
    start_worker: StartWorker,
    client: aioredis.Redis,
    prefix: str,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crash loop is dead-lettered after max_deliveries, then requeued and run."""
    creator = await make_manager(consume=False)
    await creator.create_queue(
        QueueConfig(name="q", max_deliveries=2, lease_seconds=0.5)
    )
    flag = tmp_path / "crash.flag"
    flag.touch()
    await creator.submit_task("crasher", "q", "recovery.crash", str(flag))

    # Waiting from the start: a dead letter tells waiters, as any end does.
    ended = asyncio.ensure_future(creator.wait_for_task("crasher", timeout=60))
    workers: list[Worker] = []
    try:
        while not ended.done():
            assert len(workers) < 5, "still not dead-lettered after five workers"
            worker = start_worker("q")
            workers.append(worker)
            # Not `ready()`: a worker may take the task and die before it says so.
            await eventually(
                lambda w=worker: w.process.poll() is not None or ended.done(),
                timeout=TAKEOVER,
                what="the worker to die or the task to be dead-lettered",
            )
        info = await ended
    finally:
        ended.cancel()
    *crashed, last = workers
    assert crashed
    assert all(w.process.returncode == -signal.SIGKILL for w in crashed)
    assert last.process.poll() is None  # it dead-lettered the task, never ran it
    flag.unlink()
    assert await last.terminate() == 0

    assert info.status is TaskStatus.FAILED
    assert info.error is not None
    assert "max_deliveries" in info.error
    letters = await creator.dead_letters("q")
    assert [letter["task_id"] for letter in letters] == ["crasher"]
    assert (await creator.get_queue_status("q"))["dead_letters"] == 1
    events = await task_events(client, prefix, "crasher")
    dead = [e for e in events if isinstance(e, TaskDeadLettered)]
    assert len(dead) == 1
    assert dead[0].deliveries == 3
    assert dead[0].dead_letter == letters[0]["id"]

    listed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "kew", "--prefix", prefix, "dead-letters", "list", "q"],
        env={**os.environ, URL_ENV: redis_url, "COLUMNS": "300"},
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert "crasher" in listed.stdout
    assert "1 dead letters in 'q'." in listed.stdout

    assert await creator.requeue_dead_letters("q") == 1
    # The workers' own task function, in this process: the flag is gone.
    registry = load_tasks(tmp_path / f"{MODULE}.py", monkeypatch)
    consumer = await make_manager(registry=registry)
    await consumer.attach_queue("q")
    info = await consumer.wait_for_task("crasher", timeout=DEADLINE)
    assert info.status is TaskStatus.COMPLETED
    assert info.result == "no crash"
    events = await task_events(client, prefix, "crasher")
    assert "task.requeued" in [e.type for e in events]
    assert events[-1].type == "task.succeeded"
    assert events[-1].actor == consumer.identity
    assert await consumer.dead_letters("q") == []
    assert (await consumer.get_queue_status("q"))["dead_letters"] == 0
    assert await consumer.verify_projections("q") == []


async def test_a_pending_entry_deleted_by_hand_is_logged_as_lost(
    make_manager: MakeManager,
    start_worker: StartWorker,
    client: aioredis.Redis,
    prefix: str,
) -> None:
    """An entry deleted by hand under a dead consumer is logged as task.lost."""
    creator = await make_manager(consume=False)
    await creator.create_queue(QueueConfig(name="q", lease_seconds=0.5))
    worker = start_worker("q")
    dead = await worker.ready()
    await creator.submit_task("t", "q", "recovery.sleep", 3600)
    await eventually(
        lambda: started_by(client, prefix, "t", dead), what="the worker to start t"
    )
    keys = QueueKeys(prefix, "q")
    entry = await client.hget(keys.task("t"), "entry")
    assert entry is not None
    await worker.kill()
    assert await client.xdel(keys.ready("medium"), entry) == 1

    survivor = await survivor_with(make_manager, "recovery.sleep", "never runs")
    await eventually(
        lambda: _lost_events(client, keys), timeout=TAKEOVER, what="task.lost"
    )

    (lost,) = await _lost_events(client, keys)
    assert isinstance(lost, TaskLost)
    assert (lost.entry, lost.stream) == (entry, keys.ready("medium"))
    assert lost.actor == survivor.identity
    (_, fields), *_ = await client.xrange(keys.log, lost.id, lost.id)
    assert json.loads(fields["data"])["previous"] == dead
    assert await client.xpending_range(keys.ready("medium"), GROUP, "-", "+", 10) == []
    assert await survivor.verify_projections("q") == []


async def _lost_events(client: aioredis.Redis, keys: QueueKeys) -> list[Event]:
    return [e async for e in read(client, keys.log) if e.type == "task.lost"]


async def test_an_entry_without_a_task_id_is_dropped_with_a_warning(
    manager: TaskQueueManager,
    client: aioredis.Redis,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A ready entry with no task_id is dropped with a warning; the consumer goes on."""

    async def after() -> str:
        return "still working"

    await manager.create_queue(QueueConfig(name="q"))
    ready = QueueKeys(prefix, "q").ready("medium")
    with caplog.at_level(logging.WARNING, logger="kew.consumer"):
        junk = await client.xadd(ready, {"junk": "1"})
        await eventually(
            lambda: _gone(client, ready, junk), what="the junk entry to be dropped"
        )
        await manager.submit_task("after", "q", after)
        info = await manager.wait_for_task("after", DEADLINE)

    assert info.status is TaskStatus.COMPLETED
    assert info.result == "still working"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(junk in message for message in warnings), warnings
    assert await client.xpending_range(ready, GROUP, "-", "+", 10) == []
    assert await manager.verify_projections("q") == []


async def _gone(client: aioredis.Redis, stream: str, entry: str) -> bool:
    return await client.xrange(stream, entry, entry) == []


async def test_arguments_that_are_not_json_fail_the_task(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """Stored arguments that are not JSON fail the task with an error saying so."""
    gate = asyncio.Event()

    async def busy() -> None:
        await gate.wait()

    async def echo(value: int) -> int:
        return value

    await manager.create_queue(QueueConfig(name="q", max_workers=1))
    await manager.submit_task("busy", "q", busy)
    await eventually(
        lambda: _is(manager, "busy", TaskStatus.PROCESSING), what="busy to start"
    )
    await manager.submit_task("poison", "q", echo, 1)
    task = QueueKeys(prefix, "q").task("poison")
    stored = await client.hget(task, "args")
    await client.hset(task, "args", "{not json")
    gate.set()

    info = await manager.wait_for_task("poison", DEADLINE)
    assert info.status is TaskStatus.FAILED
    assert info.error is not None
    assert "cannot be decoded" in info.error
    await manager.submit_task("next", "q", echo, 2)
    assert (await manager.wait_for_task("next", DEADLINE)).result == 2
    # The hand edit is the one disagreement with the log; undo it.
    differences = await manager.verify_projections("q")
    assert [(d.key, d.fields) for d in differences] == [("task poison", ["args"])]
    assert stored is not None
    await client.hset(task, "args", stored)
    assert await manager.verify_projections("q") == []


async def _is(manager: TaskQueueManager, task_id: str, status: TaskStatus) -> bool:
    return (await manager.get_task_status(task_id)).status is status


async def test_a_task_function_unknown_to_the_consumer_fails_the_task(
    make_manager: MakeManager,
) -> None:
    """A task function the consumer lacks fails the task, naming it and the fix."""

    async def elsewhere(value: int) -> int:
        return value

    async def here() -> str:
        return "still working"

    knows = Registry()
    knows.register(elsewhere, "recovery.elsewhere")
    submitter = await make_manager(consume=False, registry=knows)
    consumer = await make_manager(registry=Registry())
    await consumer.create_queue(QueueConfig(name="q"))

    await submitter.submit_task("orphan", "q", "recovery.elsewhere", 1)
    info = await submitter.wait_for_task("orphan", DEADLINE)

    assert info.status is TaskStatus.FAILED
    assert info.error is not None
    assert "'recovery.elsewhere'" in info.error
    assert "import the module that defines it" in info.error
    await consumer.submit_task("next", "q", here)
    assert (await consumer.wait_for_task("next", DEADLINE)).result == "still working"
    assert await consumer.verify_projections("q") == []


async def test_sigterm_lets_a_running_task_finish_within_the_grace(
    make_manager: MakeManager,
    start_worker: StartWorker,
    client: aioredis.Redis,
    prefix: str,
) -> None:
    """SIGTERM lets a running task finish within --grace; the worker exits 0."""
    creator = await make_manager(consume=False)
    await creator.create_queue(QueueConfig(name="q"))
    worker = start_worker("q", "--grace", "5", verbose=True)
    name = await worker.ready()
    await creator.submit_task("t", "q", "recovery.sleep", 0.3)
    await eventually(
        lambda: started_by(client, prefix, "t", name), what="the worker to start t"
    )

    assert await worker.terminate() == 0

    # The task function printed its line after the worker began stopping.
    assert worker.rest_of_stdout() == [
        f"kew worker {name} stopping (grace 5s)",
        "task slept 0.3s",
    ]
    assert clean(worker.stderr()), worker.stderr()
    info = await creator.get_task_status("t")
    assert info.status is TaskStatus.COMPLETED
    assert info.result == "from the worker"
    events = await task_events(client, prefix, "t")
    assert [(e.type, e.attempt, e.actor) for e in events] == [
        ("task.submitted", 0, creator.identity),
        ("task.started", 1, name),
        ("task.succeeded", 1, name),
    ]
    assert await creator.verify_projections("q") == []


async def test_sigterm_hands_back_a_task_running_past_the_grace(
    make_manager: MakeManager,
    start_worker: StartWorker,
    client: aioredis.Redis,
    prefix: str,
) -> None:
    """SIGTERM hands back a task still running after --grace; a survivor runs it."""
    creator = await make_manager(consume=False)
    await creator.create_queue(QueueConfig(name="q", lease_seconds=30))
    worker = start_worker("q", "--grace", "0.2", verbose=True)
    name = await worker.ready()
    await creator.submit_task("t", "q", "recovery.sleep", 3600)
    await eventually(
        lambda: started_by(client, prefix, "t", name), what="the worker to start t"
    )

    assert await worker.terminate() == 0
    assert clean(worker.stderr()), worker.stderr()
    # The 30 s lease shows that the task was handed back, not taken over.
    survivor = await survivor_with(make_manager, "recovery.sleep", "from the survivor")
    info = await survivor.wait_for_task("t", timeout=DEADLINE)

    assert info.status is TaskStatus.COMPLETED
    assert info.result == "from the survivor"
    events = await task_events(client, prefix, "t")
    assert [(e.type, e.attempt, e.actor) for e in events] == [
        ("task.submitted", 0, creator.identity),
        ("task.started", 1, name),
        ("task.interrupted", 1, name),
        ("task.started", 2, survivor.identity),
        ("task.succeeded", 2, survivor.identity),
    ]
    assert await survivor.verify_projections("q") == []


async def test_a_worker_runs_tasks_submitted_by_name_from_another_process(
    make_manager: MakeManager,
    start_worker: StartWorker,
    client: aioredis.Redis,
    prefix: str,
) -> None:
    """A worker runs tasks submitted by name from a process without the functions."""
    submitter = await make_manager(consume=False, registry=Registry())
    await submitter.create_queue(QueueConfig(name="q"))
    worker = start_worker("q")
    name = await worker.ready()

    await submitter.submit_task("shout", "q", f"{MODULE}:shout", "hello")
    await submitter.submit_task("add", "q", "recovery.add", 2, b=3)
    await submitter.submit_task("alias", "q", "ignored", 4, 5, task_name="recovery.add")
    results = {
        task_id: await submitter.wait_for_task(task_id, DEADLINE)
        for task_id in ("shout", "add", "alias")
    }

    assert {k: (v.status, v.result) for k, v in results.items()} == {
        "shout": (TaskStatus.COMPLETED, "HELLO!"),
        "add": (TaskStatus.COMPLETED, 5),
        "alias": (TaskStatus.COMPLETED, 9),
    }
    assert results["shout"].task_name == f"{MODULE}:shout"
    for task_id in results:
        assert await started_by(client, prefix, task_id, name)
    assert await worker.terminate() == 0
    assert await submitter.verify_projections("q") == []
