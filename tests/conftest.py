"""Fixtures: a real server, a private key prefix per test, and managers on it.

The server is the embedded Valkey that kew itself launches, started once per
session, unless KEW_TEST_REDIS_URL names another one (CI sets it to the
machine's Redis 7.0). Every test uses a key prefix of its own and removes
exactly the keys under it afterwards, so a shared server is never disturbed.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from kew import TaskQueueManager, functions
from kew.server import EmbeddedServer

DEADLINE = 10.0


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The URL of the server the suite runs against."""
    url = os.environ.get("KEW_TEST_REDIS_URL")
    if url:
        yield url
        _delete_library_if_ours(url)
        return
    with EmbeddedServer() as server:
        assert server.url is not None
        yield server.url


_LIBRARY_WAS_THERE: dict[str, bool] = {}


def _delete_library_if_ours(url: str) -> None:
    """On a shared server, remove the function library the suite loaded, unless
    it was there before the suite started."""
    import redis as sync_redis

    client = sync_redis.Redis.from_url(url)
    try:
        if not _LIBRARY_WAS_THERE.get(url, False):
            client.function_delete(functions.LIBRARY)
    except sync_redis.ResponseError:
        pass
    finally:
        client.close()


@pytest.fixture(scope="session", autouse=True)
def _note_library(redis_url: str) -> None:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_url)
    try:
        _LIBRARY_WAS_THERE[redis_url] = bool(
            client.function_list(library=functions.LIBRARY)
        )
    finally:
        client.close()


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses."""
    return f"kewtest-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def client(redis_url: str, prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the test server; removes the test's keys afterwards."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True, protocol=2)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    for i in range(0, len(keys), 500):
        await client.unlink(*keys[i : i + 500])
    await client.aclose()


@pytest.fixture
async def make_manager(
    redis_url: str, prefix: str, client: aioredis.Redis
) -> AsyncIterator[Callable[..., Awaitable[TaskQueueManager]]]:
    """Build initialized managers on the test server and prefix; each is shut
    down at the end of the test."""
    managers: list[TaskQueueManager] = []

    async def make(**options: Any) -> TaskQueueManager:
        options.setdefault("redis_url", redis_url)
        options.setdefault("key_prefix", prefix)
        manager = TaskQueueManager(**options)
        await manager.initialize()
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        await manager.shutdown(wait=False)


@pytest.fixture
async def manager(
    make_manager: Callable[..., Awaitable[TaskQueueManager]],
) -> TaskQueueManager:
    """An initialized manager on the test server and prefix."""
    return await make_manager()


async def hang() -> None:
    """The body of a task function that runs until it is cancelled (a
    timeout, a cancel request, a shutdown): no sleep to outlast."""
    await asyncio.Event().wait()


async def eventually(
    condition: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float = DEADLINE,
    what: str = "the condition",
) -> None:
    """Wait until `condition()` is true, checking every few milliseconds; fail
    the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
