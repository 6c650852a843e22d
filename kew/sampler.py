"""The sampler of queue-level gauges: depth by state and the breaker's state,
read from each queue's status while a meter provider is set (see
kew.telemetry).

The manager samples a queue as soon as it creates or attaches it, then every
`kew.telemetry.SAMPLE_SECONDS`, and once more as it shuts down, so that even
a short-lived process (`kew demo`) exports its gauges. Counts (breaker
transitions, dead letters) are not sampled: the functions report them to the
process that caused them (kew.consumer, kew.leases, kew.recording).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from kew import telemetry as otel
from kew.errors import KewError
from kew.status import queue_status
from kew.telemetry import BREAKER_LEVELS, KEW_QUEUE_STATE, Telemetry, internal

if TYPE_CHECKING:
    from kew.reads import QueueHandle

__all__ = ["sample", "sample_forever", "sample_last"]

logger = logging.getLogger(__name__)

LAST_SAMPLE_TIMEOUT = 2.0
"""Seconds the last sample at shutdown may take."""


async def sample_forever(
    telemetry: Telemetry,
    client: aioredis.Redis,
    queues: Callable[[], list[QueueHandle]],
) -> None:
    """Look again at the global providers, and set the queue-level gauges
    while metering, every `SAMPLE_SECONDS`."""
    while True:
        telemetry.refresh()
        await sample(telemetry, client, queues())
        # Read at each turn, not imported: tests and applications may change it.
        await asyncio.sleep(otel.SAMPLE_SECONDS)


async def sample(
    telemetry: Telemetry, client: aioredis.Redis, queues: Iterable[QueueHandle]
) -> None:
    """Set the gauges of `queues` now, if metering. A queue that cannot be
    read is logged and skipped: metrics never fail the caller."""
    if not telemetry.metering:
        return
    for queue in queues:
        try:
            with internal():
                await _sample(telemetry, client, queue)
        except (KewError, OSError) as exc:
            logger.debug(
                "could not sample queue %s for metrics: %s", queue.keys.queue, exc
            )
        except Exception:
            # A bug: log it, and keep sampling the other queues.
            logger.exception("failed to sample queue %s for metrics", queue.keys.queue)


async def sample_last(
    telemetry: Telemetry, client: aioredis.Redis, queues: Iterable[QueueHandle]
) -> None:
    """The sample taken as the manager shuts down: bounded in time, since the
    server may be the reason for the shutdown."""
    try:
        async with asyncio.timeout(LAST_SAMPLE_TIMEOUT):
            await sample(telemetry, client, queues)
    except TimeoutError:
        logger.debug("the last sample of the queue-level metrics timed out")


async def _sample(
    telemetry: Telemetry, client: aioredis.Redis, queue: QueueHandle
) -> None:
    t, keys = telemetry, queue.keys
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
