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
import logging
import os
import re
import signal
import statistics
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
    TaskReclaimed,
    TaskRequeued,
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


    @kew.task(name="recovery.freeze")
    async def freeze(label: str = "the worker") -> str:
        # The result is computed; the process freezes before the outcome is
        # recorded (as in a long GC pause), until someone sends SIGCONT.
        os.kill(os.getpid(), signal.SIGSTOP)
        return f"from {label}"


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


def stopped(pid: int) -> bool:
    """Is the process stopped by a signal (state T in /proc/<pid>/stat)?"""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] == "T"


def clean(stderr: str) -> bool:
    return not any(bad in stderr for bad in _BAD_STDERR)


TERMINAL = frozenset(
    {"task.succeeded", "task.failed", "task.dead_lettered", "task.cancelled"}
)


async def server_ms(client: aioredis.Redis) -> int:
    """The server's clock (ms), the clock of the log's entry ids."""
    seconds, micros = await client.time()
    return seconds * 1000 + micros // 1000


RecordProperty = Callable[[str, object], None]


def report_recovery(
    record: RecordProperty, what: str, times_ms: list[int], lease_ms: int
) -> None:
    """Print the measured recovery times (shown with `pytest -s`, and kept in
    a junit report as the test's properties). Not asserted: a loaded machine
    may stretch them; what the design guarantees is asserted by each test."""
    median, worst = statistics.median(times_ms), max(times_ms)
    record(f"{what}_ms", times_ms)
    print(
        f"{what} (lease {lease_ms} ms, {len(times_ms)} takeovers): median "
        f"{median:.0f} ms, worst {worst} ms, each {times_ms}"
    )


def check_lapsed(reclaimed: TaskReclaimed, lease_ms: int, alive_until: int) -> None:
    """What a takeover guarantees: the entry was idle at least a lease, and its
    last renewal (or delivery) came from the previous consumer while it was
    still alive (`alive_until`, server ms): a dead process renews nothing."""
    assert reclaimed.idle_ms >= lease_ms, reclaimed
    assert reclaimed.ms - reclaimed.idle_ms <= alive_until, reclaimed


async def test_sigkill_mid_task_loses_nothing_with_default_settings(
    make_manager: MakeManager,
    start_worker: StartWorker,
    client: aioredis.Redis,
    prefix: str,
    record_property: RecordProperty,
) -> None:
    """SIGKILL of a worker running ten tasks loses none: a survivor takes each
    over once its lease lapsed, the log shows every attempt and one end per
    task, and the rebuilt projections equal the stored ones. The time from the
    kill to each takeover is measured and reported."""
    submitter = await make_manager(consume=False)
    await submitter.create_queue(QueueConfig(name="q"))
    lease_ms = int(QueueConfig(name="q").lease_seconds * 1000)
    worker = start_worker("q")
    dead = await worker.ready()
    ids = [f"t{i}" for i in range(10)]
    for task_id in ids:
        await submitter.submit_task(task_id, "q", "recovery.sleep", 3600)

    async def all_started() -> bool:
        return all([await started_by(client, prefix, t, dead) for t in ids])

    await eventually(all_started, what="the worker to start the ten tasks")
    killed_at = await server_ms(client)
    await worker.kill()
    dead_by = await server_ms(client)  # the process has been reaped
    survivor = await survivor_with(make_manager, "recovery.sleep", "from the survivor")
    infos = [await survivor.wait_for_task(t, timeout=TAKEOVER) for t in ids]

    assert [(i.status, i.result, i.attempt) for i in infos] == [
        (TaskStatus.COMPLETED, "from the survivor", 2)
    ] * len(ids)
    log = [e async for e in read(client, QueueKeys(prefix, "q").log)]
    ends = {
        t: [e.type for e in log if e.task_id == t and e.type in TERMINAL] for t in ids
    }
    assert ends == {t: ["task.succeeded"] for t in ids}
    recoveries: list[int] = []
    for task_id in ids:
        events = [e for e in log if e.task_id == task_id]
        assert [(e.type, e.attempt, e.actor) for e in events] == [
            ("task.submitted", 0, submitter.identity),
            ("task.started", 1, dead),
            ("task.reclaimed", 1, survivor.identity),
            ("task.started", 2, survivor.identity),
            ("task.succeeded", 2, survivor.identity),
        ]
        started, reclaimed, restarted = events[1], events[2], events[3]
        assert isinstance(started, TaskStarted)
        assert isinstance(reclaimed, TaskReclaimed)
        assert reclaimed.previous == dead
        assert reclaimed.entry == started.entry
        check_lapsed(reclaimed, lease_ms, dead_by)
        # The survivor's clock of the takeover and of its second start: the
        # attempt is started in the same call that takes the entry over.
        assert restarted.ms == reclaimed.ms
        recoveries.append(restarted.ms - killed_at)
    assert await survivor.verify_projections("q") == []
    report_recovery(record_property, "recovery after SIGKILL", recoveries, lease_ms)


async def test_max_deliveries_1_dead_letters_a_task_whose_worker_was_killed(
    make_manager: MakeManager,
    start_worker: StartWorker,
    client: aioredis.Redis,
    prefix: str,
) -> None:
    """With max_deliveries=1, a task whose worker was SIGKILLed mid-run is
    dead-lettered by the next consumer, never started again."""
    creator = await make_manager(consume=False)
    await creator.create_queue(
        QueueConfig(name="q", max_deliveries=1, lease_seconds=0.5)
    )
    worker = start_worker("q")
    dead = await worker.ready()
    await creator.submit_task("once", "q", "recovery.sleep", 3600)
    await eventually(
        lambda: started_by(client, prefix, "once", dead), what="the worker to start"
    )

    await worker.kill()
    survivor = await survivor_with(make_manager, "recovery.sleep", "never runs")
    info = await survivor.wait_for_task("once", timeout=TAKEOVER)

    assert info.status is TaskStatus.FAILED
    assert info.error is not None
    assert "max_deliveries=1" in info.error
    events = await task_events(client, prefix, "once")
    assert [(e.type, e.attempt, e.actor) for e in events] == [
        ("task.submitted", 0, creator.identity),
        ("task.started", 1, dead),
        ("task.dead_lettered", 1, survivor.identity),
    ]
    (letter,) = await survivor.dead_letters("q")
    assert (letter["task_id"], letter["previous"]) == ("once", dead)
    dead_lettered = events[-1]
    assert isinstance(dead_lettered, TaskDeadLettered)
    assert dead_lettered.previous == dead
    assert await survivor.verify_projections("q") == []


async def test_a_stopped_worker_is_fenced_when_it_resumes(
    make_manager: MakeManager,
    start_worker: StartWorker,
    client: aioredis.Redis,
    prefix: str,
    record_property: RecordProperty,
) -> None:
    """A worker frozen (SIGSTOP) between computing a result and recording it is
    taken over once its lease lapsed; after SIGCONT `finish` refuses its stale
    outcome. The time from the freeze to the takeover is reported."""
    creator = await make_manager(consume=False)
    await creator.create_queue(QueueConfig(name="q", lease_seconds=0.5))
    a = start_worker("q")
    a_name = await a.ready()
    # recovery.freeze stops its own process once its result is computed.
    await creator.submit_task("t", "q", "recovery.freeze", "A")
    await eventually(
        lambda: started_by(client, prefix, "t", a_name), what="A to start t"
    )
    await eventually(lambda: stopped(a.process.pid), what="A to freeze")
    frozen_by = await server_ms(client)

    try:
        b = await survivor_with(make_manager, "recovery.freeze", "from B")
        info = await b.wait_for_task("t", timeout=TAKEOVER)
    finally:
        a.process.send_signal(signal.SIGCONT)
    await eventually(
        lambda: "dropped the outcome" in a.stderr(),
        what="A's stale outcome to be refused",
    )

    assert info.status is TaskStatus.COMPLETED
    assert info.result == "from B"
    assert "lost its lease" not in a.stderr()
    assert "dropped the outcome of task 't' attempt 1: " in a.stderr()
    assert (await b.get_task_status("t")).result == "from B"
    events = await task_events(client, prefix, "t")
    assert [(e.type, e.attempt, e.actor) for e in events] == [
        ("task.submitted", 0, creator.identity),
        ("task.started", 1, a_name),
        ("task.reclaimed", 1, b.identity),
        ("task.started", 2, b.identity),
        ("task.succeeded", 2, b.identity),
    ]
    reclaimed = events[2]
    assert isinstance(reclaimed, TaskReclaimed)
    assert reclaimed.previous == a_name
    check_lapsed(reclaimed, 500, frozen_by)
    # A freezes itself as soon as its attempt starts: measured from that start.
    report_recovery(
        record_property, "takeover after SIGSTOP", [reclaimed.ms - events[1].ms], 500
    )
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
    record_property: RecordProperty,
) -> None:
    """A crash loop is dead-lettered after max_deliveries, then requeued and run.
    The time from each crash to the next consumer's takeover is reported."""
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
    died_by: list[int] = []
    """Server ms by which each crashed worker was seen dead."""
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
            if worker.process.poll() is not None:
                died_by.append(await server_ms(client))
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
    assert [(e.type, e.attempt) for e in events] == [
        ("task.submitted", 0),
        ("task.started", 1),
        ("task.reclaimed", 1),
        ("task.started", 2),
        ("task.dead_lettered", 2),
    ]
    _, first, reclaimed, second, dead = events
    assert isinstance(reclaimed, TaskReclaimed)
    assert isinstance(dead, TaskDeadLettered)
    # Each delivery went to a new worker: the one that died, then the next.
    assert reclaimed.previous == first.actor
    assert reclaimed.actor == second.actor != first.actor
    assert dead.actor not in (first.actor, second.actor)
    assert dead.previous == second.actor
    assert dead.deliveries == 3
    check_lapsed(reclaimed, 500, died_by[0])
    # Each crash comes as its attempt starts (the function kills its process).
    report_recovery(
        record_property,
        "takeover after a crash (then the dead letter)",
        [reclaimed.ms - first.ms, dead.ms - second.ms],
        500,
    )
    assert dead.dead_letter == letters[0]["id"]

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
    rows = listed.stdout.splitlines()[1:]  # piped: column names, then rows
    assert [row.split("\t")[1] for row in rows] == ["crasher"]

    assert await creator.requeue_dead_letters("q") == 1
    # The workers' own task function, in this process: the flag is gone.
    registry = load_tasks(tmp_path / f"{MODULE}.py", monkeypatch)
    consumer = await make_manager(registry=registry)
    await consumer.attach_queue("q")
    info = await consumer.wait_for_task("crasher", timeout=DEADLINE)
    assert info.status is TaskStatus.COMPLETED
    assert info.result == "no crash"
    events = await task_events(client, prefix, "crasher")
    assert [(e.type, e.attempt, e.actor) for e in events[5:]] == [
        ("task.requeued", 2, creator.identity),
        ("task.started", 3, consumer.identity),
        ("task.succeeded", 3, consumer.identity),
    ]
    requeued = events[5]
    assert isinstance(requeued, TaskRequeued)
    assert requeued.dead_letter == dead.dead_letter
    assert await consumer.dead_letters("q") == []
    assert (await consumer.get_queue_status("q"))["dead_letters"] == 0
    assert await consumer.verify_projections("q") == []


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


class EntryWatch:
    """Samples one pending entry (XPENDING): its owner, and when its owner
    renewed it (its idle time dropped)."""

    def __init__(self, client: aioredis.Redis, stream: str, entry: str) -> None:
        self.client, self.stream, self.entry = client, stream, entry
        self.owner = ""
        self.renewals: list[int] = []
        """The idle time (ms) each renewal ended, in order."""
        self._idle = 0

    async def sample(self) -> None:
        (pending,) = await self.client.xpending_range(
            self.stream, GROUP, self.entry, self.entry, 1
        )
        self.owner = pending["consumer"]
        idle = int(pending["time_since_delivered"])
        if idle < self._idle:
            self.renewals.append(self._idle)
        self._idle = idle


async def _start_held(
    owner: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> tuple[EntryWatch, asyncio.Event]:
    """Submit a task that runs until the returned event is set; wait until
    `owner` runs it; return a watch on its entry."""
    gate = asyncio.Event()

    async def held() -> str:
        await gate.wait()
        return "finished by its owner"

    owner.registry.register(held, "recovery.held")
    await owner.submit_task("held", "q", "recovery.held")
    await eventually(
        lambda: started_by(client, prefix, "held", owner.identity),
        what="the long-lease consumer to start the task",
    )
    keys = QueueKeys(prefix, "q")
    entry = await client.hget(keys.task("held"), "entry")
    assert entry is not None
    return EntryWatch(client, keys.ready("medium"), entry), gate


async def _finish_held(
    owner: TaskQueueManager, gate: asyncio.Event, client: aioredis.Redis, prefix: str
) -> None:
    gate.set()
    info = await owner.wait_for_task("held", DEADLINE)
    assert (info.status, info.result, info.attempt) == (
        TaskStatus.COMPLETED,
        "finished by its owner",
        1,
    )
    events = await task_events(client, prefix, "held")
    assert [(e.type, e.actor) for e in events] == [
        ("task.submitted", owner.identity),
        ("task.started", owner.identity),
        ("task.succeeded", owner.identity),
    ]
    assert await owner.verify_projections("q") == []


async def test_a_short_local_lease_does_not_take_over_a_renewed_task(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """A consumer with a 0.5 s lease of its own leaves alone the running task of
    one that renews every 3 s under the queue's stored 9 s lease."""
    short = await make_manager(consume=False, registry=Registry())
    await short.create_queue(QueueConfig(name="q", lease_seconds=0.5))
    long = await make_manager(registry=Registry())
    await long.create_queue(QueueConfig(name="q", lease_seconds=9))  # stored
    watch, gate = await _start_held(long, client, prefix)

    short.registry.register(survivor_function, "recovery.held")
    await short.attach_queue("q")  # consumes with its own 0.5 s lease

    async def renewed_after_a_long_idle() -> bool:
        await watch.sample()
        return watch.owner != long.identity or any(i >= 1500 for i in watch.renewals)

    await eventually(
        renewed_after_a_long_idle,
        timeout=TAKEOVER,
        what="a renewal after three short leases of idle time",
    )
    assert watch.owner == long.identity
    await _finish_held(long, gate, client, prefix)


async def test_a_consumer_renews_within_a_shorter_stored_lease(
    make_manager: MakeManager, client: aioredis.Redis, prefix: str
) -> None:
    """A consumer created with a 9 s lease renews within the 0.5 s lease the
    queue was then stored with, so consumers on that lease leave its task alone."""
    long = await make_manager(registry=Registry())
    await long.create_queue(QueueConfig(name="q", lease_seconds=9))
    creator = await make_manager(consume=False)
    await creator.create_queue(QueueConfig(name="q", lease_seconds=0.5))  # stored
    watch, gate = await _start_held(long, client, prefix)

    async def renews_quickly() -> bool:
        await watch.sample()
        return bool(watch.renewals) and watch.renewals[-1] < 500

    await eventually(
        renews_quickly, timeout=TAKEOVER, what="renewals within the stored lease"
    )
    other = await make_manager(registry=Registry())
    other.registry.register(survivor_function, "recovery.held")
    await other.attach_queue("q")  # the stored 0.5 s lease
    seen = len(watch.renewals)

    async def renewed_often() -> bool:
        await watch.sample()
        return watch.owner != long.identity or len(watch.renewals) >= seen + 10

    await eventually(renewed_often, timeout=TAKEOVER, what="ten more renewals")
    assert watch.owner == long.identity
    await _finish_held(long, gate, client, prefix)


async def survivor_function() -> str:
    return "taken over"
