"""The sampler of queue-level metrics: depth by state and the breaker, read
from each queue's status every `kew.telemetry.SAMPLE_SECONDS` while a meter
provider is set, and the dead letters this process's consumers caused (see
kew.telemetry).

Dead letters are counted once, by the process whose consumer dead-lettered
the task: the `maintain` reply does not say which entries it dead-lettered,
so the sampler reads the dead-letter entries added since its last look and,
for each, the `task.dead_lettered` event the task's record points to, whose
actor names the consumer. A task requeued (or dead-lettered again) before the
sampler looked is not counted: its record points to a later event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import redis.asyncio as aioredis

from kew import telemetry as otel
from kew.errors import KewError
from kew.functions import guarded
from kew.status import queue_status
from kew.telemetry import (
    BREAKER_LEVELS,
    KEW_BREAKER_STATE,
    KEW_QUEUE_STATE,
    Telemetry,
    internal,
)

if TYPE_CHECKING:
    from kew.keys import QueueKeys
    from kew.reads import QueueHandle

__all__ = ["sample_forever"]

logger = logging.getLogger(__name__)

LOOK_BACK_MS = 60_000
"""How far before its first look at a queue the sampler reads dead letters:
its consumer may have caused some since it started (at most one sampling
interval earlier). Only this process's own can match, so a wide window
cannot count one twice."""


async def sample_forever(
    telemetry: Telemetry,
    client: aioredis.Redis,
    queues: Callable[[], list[QueueHandle]],
) -> None:
    """Look again at the global providers, and set the queue-level gauges
    while metering, every `SAMPLE_SECONDS`."""
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
        # Read at each turn, not imported: tests and applications may change it.
        await asyncio.sleep(otel.SAMPLE_SECONDS)


class _Sampler:
    def __init__(self, telemetry: Telemetry, client: aioredis.Redis) -> None:
        self.telemetry = telemetry
        self.client = client
        self.breakers: dict[str, str] = {}
        self.dead_letters_seen: dict[str, str] = {}
        """Per queue, the newest dead-letter entry id already looked at."""

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

        if queue.consumer is not None:
            caused = await self._dead_lettered_by(keys, queue.consumer.name)
            if caused:
                t.dead_lettered.add(caused, base)

    async def _dead_lettered_by(self, keys: QueueKeys, consumer: str) -> int:
        """How many of the dead letters added since the last look `consumer`
        caused."""
        client = self.client
        seen = self.dead_letters_seen.get(keys.queue)
        if seen is None:
            seconds, microseconds = await guarded(client.time())
            now_ms = seconds * 1000 + microseconds // 1000
            seen = f"{max(now_ms - LOOK_BACK_MS, 0)}-0"
        new = cast(
            list[tuple[str, dict[str, str]]],
            await guarded(client.xrange(keys.dlq, f"({seen}", "+", count=10_000)),
        )
        self.dead_letters_seen[keys.queue] = new[-1][0] if new else seen
        if not new:
            return 0

        async with client.pipeline(transaction=False) as pipe:
            for _, fields in new:
                pipe.hmget(
                    keys.task(fields.get("task_id", "")), "dead_letter", "last_event"
                )
            records = cast(list[list[str | None]], await guarded(pipe.execute()))
        events = [
            last_event
            for (entry_id, _), (dead_letter, last_event) in zip(
                new, records, strict=True
            )
            if dead_letter == entry_id and last_event
        ]
        if not events:
            return 0
        async with client.pipeline(transaction=False) as pipe:
            for event_id in events:
                pipe.xrange(keys.log, event_id, event_id)
            replies = cast(
                list[list[tuple[str, dict[str, Any]]]], await guarded(pipe.execute())
            )
        return sum(
            1
            for reply in replies
            if reply
            and reply[0][1].get("type") == "task.dead_lettered"
            and reply[0][1].get("actor") == consumer
        )
