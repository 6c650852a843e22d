"""Reading a queue's log: pages of XRANGE, decoded into events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import redis.asyncio as aioredis

from kew.events.codec import decode
from kew.events.models import Event

__all__ = ["read"]


async def read(
    client: aioredis.Redis,
    log_key: str,
    *,
    start: str = "-",
    end: str = "+",
    page: int = 2000,
) -> AsyncIterator[Event]:
    """Yield the events of a log from `start` to `end` (entry ids, inclusive;
    an end of `<ms>` means everything up to that millisecond)."""
    cursor = start
    while True:
        entries = cast(
            list[tuple[str, dict[str, Any]]],
            await client.xrange(log_key, min=cursor, max=end, count=page),
        )
        for entry_id, fields in entries:
            yield decode(entry_id, fields)
        if len(entries) < page:
            return
        cursor = "(" + entries[-1][0]
