"""Reading a queue's log: pages of XRANGE, decoded into events.

Reading is the hot loop of a rebuild (millions of events), so it is lean: the
replies stay flat lists (redis-py's per-entry dict building is skipped), the
next page is requested while the current one is decoded, and the cyclic
garbage collector, which would otherwise rescan every object of a large fold
many times over, is paused while a page is decoded (events hold no cycles).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable, Generator
from typing import Any, cast

import redis.asyncio as aioredis

from kew.events.codec import decode, decode_for_fold
from kew.events.models import Event
from kew.functions import guarded, in_flight

__all__ = ["fold_pages", "gc_paused", "read", "read_entries", "read_pages"]

PAGE = 2000


def _raw_client(client: aioredis.Redis) -> aioredis.Redis:
    """A client on the same pool whose XRANGE replies are left as flat lists."""
    raw = aioredis.Redis(connection_pool=client.connection_pool)
    raw.set_response_callback("XRANGE", cast(Any, _as_is))
    return raw


def _as_is(response: object, **_: object) -> object:
    return response


async def _raw_pages(
    client: aioredis.Redis, log_key: str, start: str, end: str, page: int
) -> AsyncIterator[list[tuple[str, list[str]]]]:
    """The entries from `start` to `end` a page at a time, as XRANGE returns
    them: (entry id, [field, value, ...]). The next page is requested while
    the caller works on this one."""
    raw = _raw_client(client)

    async def fetch(cursor: str) -> list[tuple[str, list[str]]]:
        command = cast(
            Awaitable[Any],
            raw.execute_command("XRANGE", log_key, cursor, end, "COUNT", page),
        )
        reply: Any = await guarded(command)
        return cast(list[tuple[str, list[str]]], reply)

    pending: asyncio.Future[list[tuple[str, list[str]]]] | None = asyncio.ensure_future(
        fetch(start)
    )
    try:
        while pending is not None:
            entries = await pending
            pending = None
            if len(entries) == page:
                pending = await in_flight(fetch("(" + entries[-1][0]))
            yield entries
    finally:
        if pending is not None:
            pending.cancel()


async def read_entries(
    client: aioredis.Redis,
    log_key: str,
    *,
    start: str = "-",
    end: str = "+",
    page: int = PAGE,
) -> AsyncIterator[list[tuple[str, dict[str, str]]]]:
    """Yield the entries of a log from `start` to `end` (entry ids, inclusive;
    an end of `<ms>` means everything up to that millisecond), a page at a
    time, as (entry id, fields) exactly as stored."""
    async for entries in _raw_pages(client, log_key, start, end, page):
        yield [
            (entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))
            for entry_id, flat in entries
        ]


async def read_pages(
    client: aioredis.Redis,
    log_key: str,
    *,
    start: str = "-",
    end: str = "+",
    page: int = PAGE,
) -> AsyncIterator[list[Event]]:
    """Like `read_entries`, decoded into events."""
    async for entries in read_entries(client, log_key, start=start, end=end, page=page):
        with gc_paused():
            events = [decode(entry_id, fields) for entry_id, fields in entries]
        yield events


async def fold_pages(
    client: aioredis.Redis, log_key: str, *, end: str = "+", page: int = PAGE
) -> AsyncIterator[list[Event]]:
    """The whole log up to `end`, decoded for a fold (`decode_for_fold`: the
    same events as `read_pages`, built without validation)."""
    async for entries in _raw_pages(client, log_key, "-", end, page):
        with gc_paused():
            events = [decode_for_fold(entry_id, flat) for entry_id, flat in entries]
        yield events


async def read(
    client: aioredis.Redis,
    log_key: str,
    *,
    start: str = "-",
    end: str = "+",
    page: int = PAGE,
) -> AsyncIterator[Event]:
    """Yield the events of a log from `start` to `end`, one by one."""
    async for events in read_pages(client, log_key, start=start, end=end, page=page):
        for event in events:
            yield event


@contextlib.contextmanager
def gc_paused() -> Generator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
