"""Choosing the server and opening connections to it.

The URL is, in order: the `redis_url` argument, `KEW_REDIS_URL`, or else the
embedded server (kew.server).

Three redis-py settings are deliberate:

* Its own retries are off: a retried FCALL whose first reply was lost would run
  twice, and kew's write paths decide for themselves what is safe to repeat.
* Commands are packed by hiredis when it is installed (it is a dependency):
  redis-py's asyncio client packs them in Python, which costs microseconds
  per argument on kew's hot paths.
* Its socket timeout is off. With redis-py 8 on Python 3.11, cancelling a
  task while a command waits under that timeout is sometimes swallowed (the
  task goes on running, and `asyncio.run` then never finishes at exit).
  Commands are bounded instead by `asyncio.timeout` in `kew.functions.guarded`.

Every connection carries a client name, `kew:<key prefix>:<manager identity>`
(CLIENT SETNAME, sent again on each reconnection), so an operator's CLIENT
LIST shows whose connections they are, and CLIENT KILL can pick them.

Losing the server is survived by the loops that use these clients (fetching,
renewing leases, listening for ends) with `Reconnect`: capped exponential
backoff with jitter, one warning when an outage starts and one line when it
ends, never a warning per retry.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from kew.errors import ConfigurationError, KewError, ServerVersionError
from kew.functions import guarded

_Packer = Callable[[tuple[Any, ...]], bytes]
hiredis_pack: _Packer | None
try:
    import hiredis
except ImportError:  # pragma: no cover - hiredis comes with redis[hiredis]
    hiredis_pack = None
else:
    hiredis_pack = cast(_Packer, hiredis.pack_command)

__all__ = [
    "URL_ENV",
    "Reconnect",
    "check_server",
    "client_name",
    "make_client",
    "resolve_url",
    "safe_url",
]

URL_ENV = "KEW_REDIS_URL"
_SCHEMES = ("redis", "rediss", "unix")
MIN_VERSION = (7, 0)


def resolve_url(redis_url: str | None) -> str | None:
    """The URL to use, or None for the embedded server."""
    url = redis_url if redis_url is not None else os.environ.get(URL_ENV) or None
    if url is None:
        return None
    scheme = urlsplit(url).scheme
    if scheme not in _SCHEMES:
        where = "redis_url" if redis_url is not None else URL_ENV
        raise ConfigurationError(
            f"{where}={url!r} is not a Redis URL: use redis://host:6379/0, "
            "rediss://... for TLS, or unix:///path/to/socket."
        )
    return url


def safe_url(url: str) -> str:
    """The URL with its password (in the user part or the query) masked, for
    logs and messages."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        url = url.replace(parts.netloc, f"{parts.username or ''}:***@{host}", 1)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)


def _fast_packing(pool: aioredis.ConnectionPool) -> None:
    """Make the pool's connections pack commands with hiredis."""
    pack = hiredis_pack
    if pack is None:
        return
    base = pool.connection_class
    fast = _FAST_CLASSES.get(base)
    if fast is None:

        def pack_command(self: Any, *args: Any) -> list[bytes]:
            # Like redis-py's packer: "FUNCTION LOAD" is two words.
            if isinstance(args[0], str) and " " in args[0]:
                args = (*args[0].split(), *args[1:])
            return [pack(args)]

        fast = type(f"Packed{base.__name__}", (base,), {"pack_command": pack_command})
        _FAST_CLASSES[base] = fast
    pool.connection_class = fast


_FAST_CLASSES: dict[type[Any], type[Any]] = {}


def client_name(prefix: str, identity: str) -> str:
    """The CLIENT SETNAME of a manager's connections: `kew:<prefix>:<identity>`,
    with anything a client name may not hold (spaces, control characters)
    replaced by `_`."""
    return re.sub(r"[^!-~]", "_", f"kew:{prefix}:{identity}")


def make_client(
    url: str,
    *,
    max_connections: int = 100,
    blocking: bool = False,
    name: str | None = None,
) -> aioredis.Redis:
    """A client with text replies and RESP2 reply shapes, its connections
    named `name` (see `client_name`) if given.

    A blocking client (for XREAD BLOCK) has one connection and no socket
    timeout, so a long block is not mistaken for a dead server; its caller
    bounds each read with a deadline of its own. Otherwise the pool is capped
    and callers beyond the cap wait for a connection instead of failing, as
    the earlier release's did.
    """
    options: dict[str, Any] = {
        "decode_responses": True,
        "protocol": 2,
        "retry": Retry(NoBackoff(), 0),
        "socket_timeout": None,
        "socket_connect_timeout": 10,
    }
    if name is not None:
        options["client_name"] = name
    if blocking:
        options |= {"max_connections": 1}
        client = aioredis.Redis.from_url(url, **options)
        _fast_packing(client.connection_pool)
        return client
    pool = CappedPool.from_url(url, **options)
    pool.cap(max_connections)
    _fast_packing(pool)
    return aioredis.Redis.from_pool(pool)


class CappedPool(aioredis.ConnectionPool):
    """A pool of at most `cap` connections where a caller beyond the cap waits
    for one (redis-py's plain pool raises instead, and its blocking pool costs
    a condition and a timeout per command: ~20 µs on kew's hot paths)."""

    _slots: asyncio.Semaphore | None = None
    _lent: set[int]

    def cap(self, connections: int) -> None:
        self._slots = asyncio.Semaphore(connections)
        self._lent = set()

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self._slots is None:
            return await super().get_connection(*args, **kwargs)
        await self._slots.acquire()
        try:
            connection = await super().get_connection(*args, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        self._lent.add(id(connection))
        return connection

    async def release(self, connection: Any) -> None:
        await super().release(connection)
        # Only connections this pool lent count: redis-py also releases one
        # whose connect failed, before get_connection raises.
        if self._slots is not None and id(connection) in self._lent:
            self._lent.discard(id(connection))
            self._slots.release()


async def check_server(client: aioredis.Redis) -> str:
    """Ping the server and return its version; raise if it is too old."""
    info: dict[str, Any] = await guarded(client.info("server"))
    version = str(info.get("valkey_version") or info.get("redis_version") or "0")
    redis_version = str(info.get("redis_version", "0"))
    numbers = tuple(int(p) for p in redis_version.split(".")[:2] if p.isdigit())
    if numbers < MIN_VERSION:
        raise ServerVersionError(
            f"The server runs Redis {redis_version}; kew needs Redis 7.0+ or Valkey "
            "7.2+ (for Redis Functions). Upgrade it, or leave KEW_REDIS_URL unset "
            "to use the embedded server."
        )
    return version


_SILENT = logging.getLogger(__name__ + ".silent")
_SILENT.disabled = True


class Reconnect:
    """When a loop that talks to the server should try again, and what it logs.

    `failed()` returns a capped exponential delay with jitter (half to all of
    `first * 2**n`, at most `cap` seconds), logs a warning for the first
    failure of an outage and only a debug line for the next ones; `succeeded()`
    ends the outage, with one info line saying how long it lasted.
    """

    def __init__(
        self,
        log: logging.Logger | None,
        what: str,
        *,
        first: float = 0.05,
        cap: float = 2.0,
    ) -> None:
        self._log = log or _SILENT
        self.what = what
        """Who does what, e.g. "consumer X: fetch from queue q"."""
        self._first = first
        self._cap = cap
        self._failures = 0
        self._since: float | None = None

    @classmethod
    def silent(cls) -> Reconnect:
        """Backoff that logs nothing, for a caller whose outage something else
        reports."""
        return cls(None, "")

    @property
    def failing(self) -> bool:
        """Whether an outage is going on (a failure not yet followed by a
        success)."""
        return self._since is not None

    def failed(self, exc: BaseException, *, logged: bool = False) -> float:
        """Note a failed round; return the seconds to wait before the next.
        `logged`: the caller has logged this failure already (a bug, with its
        traceback), so only the outage is noted."""
        if self._since is None:
            self._since = time.monotonic()
            if not logged:
                self._log.warning(
                    "%s failed (%s); retrying with backoff", self.what, exc
                )
        elif not logged:
            self._log.debug("%s failed again (%s)", self.what, exc)
        delay = min(self._cap, self._first * 2**self._failures)
        self._failures = min(self._failures + 1, 32)
        return delay * random.uniform(0.5, 1.0)

    def round_failed(self, exc: Exception) -> float:
        """Note a failed round of a loop that carries on whatever went wrong;
        return the seconds to wait before the next. A lost server is one
        warning per outage (`failed`); anything else is a bug, logged with its
        traceback each time, that still must not stop the loop for good."""
        if isinstance(exc, KewError | rex.RedisError | OSError):
            return self.failed(exc)
        self._log.error("%s failed; retrying", self.what, exc_info=exc)
        return self.failed(exc, logged=True)

    def succeeded(self) -> None:
        """Note a successful round, which ends an outage if there was one."""
        if self._since is None:
            return
        self._log.info(
            "%s works again, after %.1f s and %d failed attempts",
            self.what,
            time.monotonic() - self._since,
            self._failures,
        )
        self._since = None
        self._failures = 0
