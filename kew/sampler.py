"""The sampler of queue-level metrics: depth by state, the breaker, dead
letters, read from each queue's status every few seconds while a meter
provider is set (see kew.telemetry)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import redis.asyncio as aioredis

from kew.errors import KewError
from kew.functions import guarded
from kew.status import queue_status
from kew.telemetry import (
    BREAKER_LEVELS,
    KEW_BREAKER_STATE,
    KEW_QUEUE_STATE,
    SAMPLE_SECONDS,
    Telemetry,
    internal,
)

if TYPE_CHECKING:
    from kew.reads import QueueHandle

__all__ = ["sample_forever"]

logger = logging.getLogger(__name__)


async def sample_forever(
    telemetry: Telemetry,
    client: aioredis.Redis,
    queues: Callable[[], list[QueueHandle]],
) -> None:
    """Set the queue-level gauges every `SAMPLE_SECONDS`, while metering."""
    sampler = _Sampler(telemetry, client)
    while True:
        telemetry.refresh()
        if telemetry.metering:
            for queue in queues():
                try:
                    with internal():
                        await sampler.sample(queue)
                except (KewError, OSError) as exc:
                    logger.debug(
                        "could not sample queue %s for metrics: %s",
                        queue.keys.queue,
                        exc,
                    )
                except Exception:
                    # A bug: log it, and keep sampling the other queues.
                    logger.exception(
                        "failed to sample queue %s for metrics", queue.keys.queue
                    )
        await asyncio.sleep(SAMPLE_SECONDS)


class _Sampler:
    def __init__(self, telemetry: Telemetry, client: aioredis.Redis) -> None:
        self.telemetry = telemetry
        self.client = client
        self.breakers: dict[str, str] = {}
        self.dead_letters_seen: dict[str, str] = {}
        """Per queue, the newest dead-letter entry id already counted."""

    async def sample(self, queue: QueueHandle) -> None:
        t, keys, client = self.telemetry, queue.keys, self.client
        status = await queue_status(client, keys, queue.config, 0)
        base = t.attributes(keys.queue)
        depth = {
            "ready": status["queued_tasks"] - status["scheduled_tasks"],
            "running": status["processing_tasks"],
            "deferred": status["scheduled_tasks"],
            "retry": status["retry_tasks"],
            "dead_lettered": status["dead_letters"],
        }
        for state, count in depth.items():
            t.depth.set(count, {**base, KEW_QUEUE_STATE: state})

        breaker = str(status["circuit_breaker_status"])
        t.breaker_state.set(BREAKER_LEVELS.get(breaker, 0), base)
        before = self.breakers.get(keys.queue)
        if before is not None and before != breaker:
            t.breaker_transitions.add(1, {**base, KEW_BREAKER_STATE: breaker})
        self.breakers[keys.queue] = breaker

        seen = self.dead_letters_seen.get(keys.queue)
        if seen is None:
            newest = cast(
                list[tuple[str, Any]],
                await guarded(client.xrevrange(keys.dlq, count=1)),
            )
            self.dead_letters_seen[keys.queue] = newest[0][0] if newest else "0-0"
            return
        new = cast(
            list[tuple[str, Any]],
            await guarded(client.xrange(keys.dlq, f"({seen}", "+", count=10_000)),
        )
        if new:
            t.dead_lettered.add(len(new), base)
            self.dead_letters_seen[keys.queue] = new[-1][0]
