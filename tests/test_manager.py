"""The contract API: submit, status, wait, queue status, errors and bad input."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

import kew
import kew.errors
from kew import (
    ConfigurationError,
    ConnectionFailedError,
    KewError,
    QueueAlreadyExistsError,
    QueueConfig,
    QueueFullError,
    QueueNotFoundError,
    QueuePriority,
    QueueProcessorError,
    SerializationError,
    TaskAlreadyExistsError,
    TaskFunctionError,
    TaskInfo,
    TaskNotFoundError,
    TaskQueueError,
    TaskQueueManager,
    TaskStatus,
    WaitTimeoutError,
)
from kew.keys import QueueKeys

from .conftest import eventually

MakeManager = Callable[..., Awaitable[TaskQueueManager]]


async def double(x: int) -> int:
    return 2 * x


async def explode(message: str) -> None:
    raise ValueError(message)


async def test_submit_runs_the_task_and_records_its_result(
    manager: TaskQueueManager,
) -> None:
    """A submitted task runs in this process and its result is stored."""
    await manager.create_queue(QueueConfig(name="q", max_workers=2))
    info = await manager.submit_task(
        task_id="t1", queue_name="q", task_func=double, x=21
    )
    assert isinstance(info, TaskInfo)
    assert info.status is TaskStatus.QUEUED
    assert info.task_type == "double"
    assert info.priority is QueuePriority.MEDIUM

    done = await manager.wait_for_task("t1", timeout=10)
    assert done.status is TaskStatus.COMPLETED
    assert done.result == 42
    assert done.error is None
    assert done.attempt == 1
    assert done.retry_count == 0
    assert done.queued_time <= done.started_time <= done.completed_time  # type: ignore[operator]
    assert done.queued_time.tzinfo is dt.UTC


async def test_failure_is_recorded_with_its_error(manager: TaskQueueManager) -> None:
    """A task that raises ends `failed`, with the exception's message as error."""
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("bad", "q", explode, "no stock")
    info = await manager.wait_for_task("bad", timeout=10)
    assert info.status is TaskStatus.FAILED
    assert info.error == "no stock"
    assert info.result is None


async def test_status_moves_queued_processing_completed(
    manager: TaskQueueManager,
) -> None:
    """get_task_status shows each state the task passes through."""
    release = asyncio.Event()
    entered = asyncio.Event()

    async def gated() -> str:
        entered.set()
        await release.wait()
        return "done"

    await manager.create_queue(QueueConfig(name="q", max_workers=1))
    await manager.submit_task("blocker", "q", gated)
    await asyncio.wait_for(entered.wait(), 10)
    entered.clear()
    await manager.submit_task("second", "q", gated)

    assert (await manager.get_task_status("blocker")).status is TaskStatus.PROCESSING
    assert (await manager.get_task_status("second")).status is TaskStatus.QUEUED
    release.set()
    assert (await manager.wait_for_task("second", 10)).status is TaskStatus.COMPLETED
    assert (await manager.get_task_status("blocker")).result == "done"


async def test_wait_for_task_wakes_on_another_process_finishing(
    make_manager: MakeManager,
) -> None:
    """A manager that does not consume is woken by the consumer's notification."""
    worker = await make_manager()
    web = await make_manager(consume=False)
    await worker.create_queue(QueueConfig(name="q"))
    gate = asyncio.Event()

    async def slow() -> str:
        await gate.wait()
        return "ok"

    await web.submit_task("remote", "q", slow)
    waiting = asyncio.create_task(web.wait_for_task("remote", timeout=10))
    await eventually(
        lambda: _has_status(web, "remote", TaskStatus.PROCESSING),
        what="the task to start on the worker",
    )
    assert not waiting.done()
    gate.set()
    info = await waiting
    assert info.status is TaskStatus.COMPLETED
    assert info.result == "ok"


async def _has_status(
    manager: TaskQueueManager, task_id: str, status: TaskStatus
) -> bool:
    return (await manager.get_task_status(task_id)).status is status


async def test_wait_for_task_times_out(manager: TaskQueueManager) -> None:
    """wait_for_task raises WaitTimeoutError (a TimeoutError) when time is up."""
    gate = asyncio.Event()

    async def stuck() -> None:
        await gate.wait()

    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("stuck", "q", stuck)
    with pytest.raises(WaitTimeoutError, match="'stuck'") as caught:
        await manager.wait_for_task("stuck", timeout=0.2)
    assert isinstance(caught.value, TimeoutError)
    gate.set()
    assert (await manager.wait_for_task("stuck", 10)).status is TaskStatus.COMPLETED


async def test_duplicate_task_id_is_rejected_even_after_it_finished(
    manager: TaskQueueManager,
) -> None:
    """An id stays taken while its record lives; the error names the id."""
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("dup", "q", double, 1)
    with pytest.raises(TaskAlreadyExistsError, match="'dup'") as caught:
        await manager.submit_task("dup", "q", double, 2)
    assert caught.value.task_ids == ["dup"]
    await manager.wait_for_task("dup", 10)
    with pytest.raises(TaskAlreadyExistsError):
        await manager.submit_task("dup", "q", double, 3)
    assert (await manager.get_task_status("dup")).result == 2


async def test_unknown_task_raises_task_not_found(manager: TaskQueueManager) -> None:
    """Status of an id nobody submitted raises TaskNotFoundError naming it and
    what to check."""
    await manager.create_queue(QueueConfig(name="q"))
    with pytest.raises(TaskNotFoundError, match=r"'ghost'.*Check the id and the key"):
        await manager.get_task_status("ghost")
    with pytest.raises(TaskNotFoundError, match=r"'ghost'.*Check the id and the queue"):
        await manager.get_task_status("ghost", queue_name="q")
    with pytest.raises(TaskNotFoundError):
        await manager.wait_for_task("ghost", timeout=1)


async def test_unknown_queue_raises_queue_not_found(manager: TaskQueueManager) -> None:
    """Submitting to, or asking about, a queue nobody created fails clearly."""
    with pytest.raises(QueueNotFoundError, match="'nowhere'"):
        await manager.submit_task("t", "nowhere", double, 1)
    with pytest.raises(QueueNotFoundError, match="create_queue"):
        await manager.get_queue_status("nowhere")


async def test_full_queue_raises_queue_processor_error(
    manager: TaskQueueManager,
) -> None:
    """max_size bounds unfinished tasks (queued and running), checked at submit."""
    gate = asyncio.Event()

    async def held() -> None:
        await gate.wait()

    await manager.create_queue(QueueConfig(name="q", max_workers=1, max_size=2))
    await manager.submit_task("a", "q", held)
    await manager.submit_task("b", "q", held)
    with pytest.raises(QueueFullError, match="max_size=2") as caught:
        await manager.submit_task("c", "q", held)
    assert isinstance(caught.value, QueueProcessorError)
    with pytest.raises(TaskNotFoundError):
        await manager.get_task_status("c")
    gate.set()
    await manager.wait_for_task("a", 10)
    await manager.wait_for_task("b", 10)
    await manager.submit_task("c", "q", held)


async def test_errors_share_one_root(manager: TaskQueueManager) -> None:
    """Every error kew raises is a KewError; the old root name still works."""
    assert TaskQueueError is KewError
    for error in (
        TaskAlreadyExistsError,
        TaskNotFoundError,
        QueueNotFoundError,
        QueueProcessorError,
        ConfigurationError,
        WaitTimeoutError,
    ):
        assert issubclass(error, KewError)


def test_every_exported_error_is_in_the_tree_and_raised_somewhere() -> None:
    """The public errors are the ones drawn in kew.errors' docstring, and each
    is raised by kew (itself or through a subclass): none is exported for
    show."""
    tree = kew.errors.__doc__ or ""
    package = Path(kew.__file__).parent
    source = "\n".join(
        path.read_text() for path in package.rglob("*.py") if path.name != "errors.py"
    )
    names = [name for name in kew.errors.__all__ if name != "TaskQueueError"]
    raised = {name for name in names if re.search(rf"\b{name}\(", source)}
    for name in names:
        assert re.search(rf"(── |^    ){name} ", tree, re.MULTILINE), name
        assert name in kew.__all__, name
        error = getattr(kew.errors, name)
        assert any(issubclass(getattr(kew.errors, r), error) for r in raised), name


async def test_create_queue_twice_in_one_manager_is_an_error(
    manager: TaskQueueManager,
) -> None:
    """A second create_queue of the same name in one manager raises."""
    await manager.create_queue(QueueConfig(name="q"))
    with pytest.raises(QueueAlreadyExistsError, match="'q'"):
        await manager.create_queue(QueueConfig(name="q"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": "bad{name}"}, "Queue name"),
        ({"name": "q", "max_workers": 0}, "max_workers=0"),
        ({"name": "q", "max_size": -1}, "max_size=-1"),
        ({"name": "q", "priority": 7}, "Priority 7"),
        ({"name": "q", "retry_delay": float("nan")}, "retry_delay=nan"),
        ({"name": "q", "circuit_breaker_reset_timeout": 0}, "reset_timeout=0"),
        ({"name": "q", "task_timeout": -1}, "task_timeout=-1"),
    ],
)
def test_bad_queue_config_is_rejected(options: dict[str, Any], message: str) -> None:
    """QueueConfig names the bad value and what would be valid."""
    with pytest.raises(ConfigurationError, match=message):
        QueueConfig(**options)


def test_queue_config_accepts_the_earlier_spellings() -> None:
    """max_circuit_breaker_failures and positional fields still work."""
    config = QueueConfig("q", 3, QueuePriority.HIGH, 50, max_circuit_breaker_failures=7)
    assert config.max_workers == 3
    assert config.max_size == 50
    assert config.priority is QueuePriority.HIGH
    assert config.circuit_breaker_max_failures == 7


async def test_sync_task_function_is_rejected_at_submit(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """A plain def is refused before anything is written; it never runs."""
    calls: list[int] = []

    def sync_job() -> None:
        calls.append(1)

    await manager.create_queue(QueueConfig(name="q"))
    with pytest.raises(TaskFunctionError, match="async def"):
        await manager.submit_task("s", "q", sync_job)  # type: ignore[arg-type]
    assert calls == []
    assert await client.exists(QueueKeys(prefix, "q").task("s")) == 0
    log = await client.xrange(QueueKeys(prefix, "q").log)
    assert [f["type"] for _, f in log] == ["queue.configured"]


async def test_non_json_argument_is_rejected_at_submit(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """An argument that is not JSON is named in the error; nothing is queued."""

    async def takes(thing: Any) -> None:
        return None

    await manager.create_queue(QueueConfig(name="q"))
    with pytest.raises(SerializationError, match=r"'thing'.*object"):
        await manager.submit_task("j", "q", takes, thing=object())
    assert await client.exists(QueueKeys(prefix, "q").task("j")) == 0


async def test_arguments_that_do_not_fit_the_signature_are_rejected(
    manager: TaskQueueManager,
) -> None:
    """A call that cannot bind to the function fails at submit, not at run."""
    await manager.create_queue(QueueConfig(name="q"))
    with pytest.raises(TaskFunctionError, match="missing a required argument"):
        await manager.submit_task("x", "q", double, y=1)


async def test_non_json_result_fails_the_task_clearly(
    manager: TaskQueueManager,
) -> None:
    """A result that is not JSON fails the task (never leaves it processing)."""

    async def returns_object() -> object:
        return object()

    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("r", "q", returns_object)
    info = await manager.wait_for_task("r", timeout=10)
    assert info.status is TaskStatus.FAILED
    assert info.error is not None
    assert "not JSON-serialisable" in info.error


async def test_non_finite_numbers_are_refused_as_arguments(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """NaN and infinities are not JSON: an argument holding one is named in the
    error at submit and nothing is queued; a string "NaN" is fine."""

    async def takes(*values: Any, **named: Any) -> None:
        return None

    await manager.create_queue(QueueConfig(name="q"))
    with pytest.raises(SerializationError, match=r"argument 1 .* holds NaN"):
        await manager.submit_task("n", "q", takes, 1.5, float("nan"))
    with pytest.raises(SerializationError, match=r"'limits' .* holds -Infinity"):
        await manager.submit_task("n", "q", takes, limits={"low": -float("inf")})
    with pytest.raises(SerializationError, match=r"'n' of the batch.*Infinity"):
        await manager.submit_tasks(
            "q", [{"task_id": "n", "task_func": takes, "args": [[float("inf")]]}]
        )
    assert await client.exists(QueueKeys(prefix, "q").task("n")) == 0
    await manager.submit_task("s", "q", takes, "NaN", label="Infinity")
    assert (await manager.wait_for_task("s", 10)).status is TaskStatus.COMPLETED


async def test_a_non_finite_result_fails_the_attempt_clearly(
    manager: TaskQueueManager, client: aioredis.Redis, prefix: str
) -> None:
    """A task function returning NaN fails its attempt with an error that says
    why; the log stays JSON that a strict parser reads."""

    async def ratio() -> dict[str, float]:
        return {"ratio": float("nan")}

    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("r", "q", ratio)
    info = await manager.wait_for_task("r", timeout=10)
    assert info.status is TaskStatus.FAILED
    assert info.error is not None
    assert "holds NaN" in info.error

    def strict(name: str) -> None:
        raise AssertionError(f"{name} in the log")

    for _, fields in await client.xrange(QueueKeys(prefix, "q").log):
        if "data" in fields:
            json.loads(fields["data"], parse_constant=strict)


async def test_arguments_come_back_as_their_annotated_types(
    manager: TaskQueueManager,
) -> None:
    """JSON arguments are converted back using the function's annotations."""
    seen: list[object] = []

    async def stamp(when: dt.datetime, tags: tuple[str, ...]) -> str:
        seen.extend([when, tags])
        return when.isoformat()

    moment = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("d", "q", stamp, moment, tags=("a", "b"))
    info = await manager.wait_for_task("d", timeout=10)
    assert info.status is TaskStatus.COMPLETED, info.error
    assert seen == [moment, ("a", "b")]


async def test_bad_task_id_and_priority_are_rejected(manager: TaskQueueManager) -> None:
    """Task ids must be non-empty strings; priorities one of the three levels."""
    await manager.create_queue(QueueConfig(name="q"))
    with pytest.raises(ConfigurationError, match="Task id ''"):
        await manager.submit_task("", "q", double, 1)
    with pytest.raises(ConfigurationError, match="Priority 'urgent'"):
        await manager.submit_task("p", "q", double, 1, priority="urgent")


async def test_queue_status_reports_counts_and_breaker(
    manager: TaskQueueManager,
) -> None:
    """get_queue_status has the contract's keys, with counts across processes."""
    gate = asyncio.Event()

    async def held() -> None:
        await gate.wait()

    await manager.create_queue(QueueConfig(name="q", max_workers=2))
    for i in range(5):
        await manager.submit_task(f"t{i}", "q", held)
    await eventually(
        lambda: _status_is(manager, current_workers=2, queued_tasks=3),
        what="two running and three queued",
    )
    status = await manager.get_queue_status("q")
    assert status["circuit_breaker_status"] == "closed"
    assert status["processing_tasks"] == 2
    assert status["max_workers"] == 2
    gate.set()
    for i in range(5):
        await manager.wait_for_task(f"t{i}", 10)
    status = await manager.get_queue_status("q")
    assert status["completed_tasks"] == 5
    assert status["queued_tasks"] == status["processing_tasks"] == 0


async def _status_is(manager: TaskQueueManager, **expected: int) -> bool:
    status = await manager.get_queue_status("q")
    return all(status[k] == v for k, v in expected.items())


async def test_async_with_initializes_and_shuts_down(
    redis_url: str, prefix: str, client: aioredis.Redis
) -> None:
    """`async with` connects on entry and shuts down (handing back) on exit."""
    async with TaskQueueManager(redis_url=redis_url, key_prefix=prefix) as manager:
        await manager.create_queue(QueueConfig(name="q"))
        await manager.submit_task("w", "q", double, 4)
        assert (await manager.wait_for_task("w", 10)).result == 8
    with pytest.raises(KewError, match="initialize"):
        _ = manager.client


async def test_status_is_visible_from_another_manager(
    make_manager: MakeManager,
) -> None:
    """A manager that never saw the queue finds the task by id alone."""
    worker = await make_manager()
    await worker.create_queue(QueueConfig(name="q"))
    await worker.submit_task("seen", "q", double, 5)
    await worker.wait_for_task("seen", 10)
    other = await make_manager(consume=False)
    info = await other.get_task_status("seen")
    assert info.queue_name == "q"
    assert info.result == 10


async def test_bad_expiry_and_url_are_rejected() -> None:
    """Constructor arguments are checked at once, with the fix in the message."""
    with pytest.raises(ConfigurationError, match="task_expiry_seconds=0"):
        TaskQueueManager(task_expiry_seconds=0)
    with pytest.raises(ConfigurationError, match="not a Redis URL"):
        TaskQueueManager(redis_url="http://localhost:6379")


async def test_credentials_the_server_refuses_are_named_as_such(
    redis_url: str, prefix: str
) -> None:
    """A user the server does not know gives the credentials error, not the
    "cannot reach" one (redis-py's AuthenticationError is a ConnectionError)."""
    scheme, rest = redis_url.split("://", 1)
    bad_url = f"{scheme}://kewtest-nobody:wrong@{rest.rpartition('@')[2]}"
    manager = TaskQueueManager(redis_url=bad_url, key_prefix=prefix)
    with pytest.raises(ConnectionFailedError, match="refused kew's credentials"):
        await manager.initialize()
    await manager.shutdown(wait=False)
