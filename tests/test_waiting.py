"""wait_for_task at its edges: a task whose end was heard long ago, a timeout
of zero, a manager not connected yet, and a server that cannot be reached."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

import kew.waiters
from kew import (
    ConnectionFailedError,
    KewError,
    QueueConfig,
    TaskQueueManager,
    TaskStatus,
    WaitTimeoutError,
)
from kew.server import EmbeddedServer

from .conftest import eventually

MakeManager = Callable[..., Awaitable[TaskQueueManager]]


async def double(x: int) -> int:
    return 2 * x


async def test_a_task_whose_end_was_forgotten_is_still_found(
    manager: TaskQueueManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memory of ends heard is bounded; a task that ended and was then
    forgotten is read, not waited for (the memory is made small here so that
    a few tasks overflow it, as 10,000 would with the real bound)."""
    monkeypatch.setattr(kew.waiters, "_ENDED_REMEMBERED", 5)
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("first", "q", double, 0)
    await manager.wait_for_task("first", 10)  # the channel is subscribed now
    await manager.submit_task("t0", "q", double, 1)
    await eventually(
        lambda: _ended(manager, "t0"), what="t0 to end, with nobody waiting for it"
    )
    for i in range(1, 10):
        await manager.submit_task(f"t{i}", "q", double, i)
    for i in range(1, 10):
        # Each of these ends after t0, and pushes it out of the memory.
        assert (await manager.wait_for_task(f"t{i}", 10)).status.finished
    info = await manager.wait_for_task("t0", 5)
    assert info.status is TaskStatus.COMPLETED
    assert info.result == 2


async def _ended(manager: TaskQueueManager, task_id: str) -> bool:
    return (await manager.get_task_status(task_id)).status.finished


async def test_timeout_zero_returns_a_task_that_has_ended(
    make_manager: MakeManager,
) -> None:
    """wait_for_task(id, 0) reads once: an ended task is returned, one still
    running times out naming the state it is in."""
    manager = await make_manager()
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("done", "q", double, 4)
    await manager.wait_for_task("done", 10)
    assert (await manager.wait_for_task("done", 0)).result == 8
    other = await make_manager(consume=False)
    assert (await other.wait_for_task("done", 0, queue_name="q")).result == 8

    gate = asyncio.Event()

    async def held() -> None:
        await gate.wait()

    await manager.submit_task("held", "q", held)
    with pytest.raises(WaitTimeoutError, match=r"\(it is (queued|processing)\)"):
        await manager.wait_for_task("held", 0)
    gate.set()
    assert (await manager.wait_for_task("held", 10)).status is TaskStatus.COMPLETED


async def test_wait_before_initialize_is_a_kew_error(redis_url: str) -> None:
    """Waiting on a manager that is not connected says so, whatever the
    arguments (no AttributeError from inside)."""
    manager = TaskQueueManager(redis_url=redis_url)
    with pytest.raises(KewError, match="initialize"):
        await manager.wait_for_task("t", 1, queue_name="q")
    with pytest.raises(KewError, match="initialize"):
        await manager.wait_for_task("t", 1)


@pytest.fixture
async def own_server() -> AsyncIterator[EmbeddedServer]:
    """A server of the test's own, to stop and start again."""
    server = EmbeddedServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_waiting_on_an_unreachable_server_raises_a_kew_error(
    own_server: EmbeddedServer, prefix: str
) -> None:
    """The subscription wait_for_task makes fails as ConnectionFailedError,
    not as redis-py's error; once the server is back, waiting works."""
    url = own_server.url
    assert url is not None
    async with (
        TaskQueueManager(redis_url=url, key_prefix=prefix, consume=False) as web,
        TaskQueueManager(redis_url=url, key_prefix=prefix) as worker,
    ):
        own_server.stop(keep_address=True)
        with pytest.raises(ConnectionFailedError, match="Cannot reach"):
            await web.wait_for_task("t", 5, queue_name="q")
        own_server.start()
        await worker.create_queue(QueueConfig(name="q"))
        await web.submit_task("t", "q", double, 21)
        assert (await web.wait_for_task("t", 10)).result == 42
