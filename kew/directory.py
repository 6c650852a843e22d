"""Creating a queue, and finding it again from another process.

A queue is created (or its stored configuration updated) by the `create_queue`
function (kew/lua/50_admin.lua), and then listed in the directory: one hash
per key prefix (`kew.keys.queue_directory`), mapping each queue's name to its
configuration as JSON. The directory is how a process attaches to a queue it
did not create, and how the queues under a prefix are listed.

The directory is one key for all queues, outside every queue's hash tag (and
Cluster slot), so no function can write it; it only lists names, and every
`create_queue` writes it again.
"""

from __future__ import annotations

import json
from typing import cast

import redis.asyncio as aioredis

from kew import functions
from kew.errors import QueueNotFoundError
from kew.functions import guarded
from kew.keys import QueueKeys, queue_directory
from kew.models import QueueConfig

__all__ = ["create_queue", "listed_queues", "stored_config"]


async def create_queue(
    client: aioredis.Redis, keys: QueueKeys, config: QueueConfig, actor: str
) -> str:
    """Create the queue of `keys` with `config`, or update its stored
    configuration, and list it in the directory; returns what the function
    did ('created', 'updated' or 'unchanged')."""
    stored = config.to_stored()
    encoded = json.dumps(stored, sort_keys=True)
    fields: list[str] = []
    for name, value in stored.items():
        fields += [name, "" if value is None else str(value)]
    outcome = await functions.call(
        client,
        "create_queue",
        keys.queue_keys,
        [actor, encoded, *fields],
    )
    await guarded(client.hset(queue_directory(keys.prefix), keys.queue, encoded))

    return str(outcome)


async def stored_config(client: aioredis.Redis, keys: QueueKeys) -> QueueConfig:
    """The configuration stored for the queue of `keys` when it was created
    (by any process); raises QueueNotFoundError if there is no such queue."""
    stored = await guarded(client.hget(queue_directory(keys.prefix), keys.queue))
    if stored is None:
        raise QueueNotFoundError(
            f"Queue {keys.queue!r} does not exist under prefix {keys.prefix!r}: "
            "create it first with create_queue(QueueConfig(name=...))."
        )

    return QueueConfig.from_stored(json.loads(cast(str, stored)))


async def listed_queues(client: aioredis.Redis, prefix: str) -> list[str]:
    """The names of the queues created under `prefix`, unordered."""
    names = await guarded(client.hkeys(queue_directory(prefix)))
    return cast(list[str], names)
