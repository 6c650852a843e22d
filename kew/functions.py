"""The Redis Functions library: loading it, calling it, and translating errors.

The library's source is the files of kew/lua joined in name order.

The library's name carries a digest of its source (`kew_<digest>`), and so do
its functions' names. Two versions of kew can therefore run against one server
side by side (a rolling deploy) without replacing each other's functions, and
a changed library is never confused with an old one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Sequence
from importlib import resources
from typing import Any, NoReturn, TypeVar, cast

import redis.asyncio as aioredis
import redis.exceptions as rex

from kew.errors import (
    ConnectionFailedError,
    KewError,
    ServerError,
    ServerVersionError,
)
from kew.keys import GROUP

logger = logging.getLogger(__name__)

_TEMPLATE = "\n".join(
    part.read_text("utf-8")
    for part in sorted(resources.files("kew.lua").iterdir(), key=lambda p: p.name)
    if part.name.endswith(".lua")
)
DIGEST = hashlib.sha1(_TEMPLATE.encode()).hexdigest()[:12]
LIBRARY = f"kew_{DIGEST}"
SOURCE = _TEMPLATE.replace("__LIB__", LIBRARY).replace("__GROUP__", GROUP)

Redis = aioredis.Redis


def function_name(short: str) -> str:
    """The server-side name of one of the library's functions."""
    return f"{LIBRARY}_{short}"


async def load(client: Redis) -> None:
    """Load the library (idempotent), or explain why the server cannot."""
    try:
        await guarded(client.function_load(SOURCE, replace=True))
    except ServerError as exc:
        if (
            "unknown command" in str(exc).lower()
            or "unknown subcommand" in str(exc).lower()
        ):
            raise ServerVersionError(
                "The server does not support Redis Functions (FUNCTION LOAD): kew "
                "needs Redis 7.0+ or Valkey 7.2+. Point KEW_REDIS_URL at a newer "
                "server, or leave it unset to use the embedded one."
            ) from exc
        raise
    logger.debug("loaded Redis Functions library %s", LIBRARY)


COMMAND_TIMEOUT = 30.0
"""Seconds to wait for any reply (blocking reads excepted)."""

T = TypeVar("T")


async def guarded(awaitable: Awaitable[T], timeout: float = COMMAND_TIMEOUT) -> T:
    """Await a redis-py call with a deadline, translating its errors."""
    try:
        async with asyncio.timeout(timeout):
            return await awaitable
    except TimeoutError:
        raise ConnectionFailedError(
            f"The Redis server did not answer within {timeout}s; check that it is "
            "running and not overloaded."
        ) from None
    except (rex.RedisError, OSError) as exc:
        raise translate_redis_error(exc) from exc


async def in_flight(awaitable: Awaitable[T]) -> asyncio.Future[T]:
    """Start `awaitable` in a task of its own and let it send its request
    before returning, so the server works on it while the caller goes on (a
    new task sends nothing until its creator yields). Await the future for
    the reply; cancel it if the reply is no longer wanted."""
    future = asyncio.ensure_future(awaitable)
    try:
        await asyncio.sleep(0)
    except BaseException:  # cancelled meanwhile: nobody will await it
        future.cancel()
        raise
    return future


async def call(
    client: Redis,
    short: str,
    keys: Sequence[str],
    args: Sequence[Any],
    *,
    readonly: bool = False,
    timeout: float = COMMAND_TIMEOUT,
) -> Any:
    """FCALL one of the library's functions (FCALL_RO for a `readonly` one),
    waiting at most `timeout` seconds for each reply; load the library and
    retry once if the server has lost it (a restart without persistence, a
    failover)."""
    name = function_name(short)

    def send() -> Awaitable[Any]:
        if readonly:
            return client.fcall_ro(name, len(keys), *keys, *args)
        return client.fcall(name, len(keys), *keys, *args)

    try:
        return await guarded(send(), timeout)
    except ServerError as exc:
        if "function not found" not in str(exc).lower():
            raise
    logger.info("Redis Functions library %s missing; loading it", LIBRARY)
    await load(client)
    return await guarded(send(), timeout)


def translate_redis_error(exc: BaseException) -> KewError:
    """The one place a redis-py error becomes a kew error."""
    if isinstance(exc, KewError):
        return exc
    # redis-py's authentication errors are ConnectionErrors: test them first.
    if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError):
        return ConnectionFailedError(
            f"The Redis server refused kew's credentials ({exc}). Put the user and "
            "password in the URL: redis://user:password@host:6379/0."
        )
    if isinstance(exc, rex.ConnectionError | rex.TimeoutError | OSError):
        return ConnectionFailedError(
            f"Cannot reach the Redis server ({exc}). Check that it is running and "
            "that the URL (redis_url or KEW_REDIS_URL) is right."
        )
    if isinstance(exc, rex.ResponseError) and str(exc).startswith("OOM"):
        return ServerError(
            f"The Redis server is out of memory ({exc}). kew needs "
            "maxmemory-policy noeviction and enough memory for its log."
        )
    return ServerError(f"The Redis server answered with an error: {exc}")


def raise_translated(exc: BaseException) -> NoReturn:
    raise translate_redis_error(exc) from exc


def rows(reply: Any) -> list[list[str]]:
    """A function's reply as a list of rows of strings."""
    return cast(list[list[str]], reply or [])
