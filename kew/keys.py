"""Every Redis key and channel name kew uses, built in one place.

All of a queue's keys share the hash tag `{<queue>}`, so a queue lives in one
Redis Cluster slot and one function call may touch all of its keys. Everything
sits under a prefix (default `kew`); kew never reads, writes or deletes a key
outside it.

    <prefix>:queues                     hash: queue name -> stored configuration
    <prefix>:{<q>}:log                  stream: the event log, never capped
    <prefix>:{<q>}:ready:<level>        stream + group: one entry per runnable attempt
    <prefix>:{<q>}:task:<id>            hash: inline projection of one task
    <prefix>:{<q>}:sched                zset: deferred tasks and retries by due time
    <prefix>:{<q>}:breaker              hash: inline projection of the breaker
    <prefix>:{<q>}:stats                hash: inline projection of counts by state
    <prefix>:{<q>}:config               hash: the queue's configuration
    <prefix>:{<q>}:dlq                  stream: dead letters
    <prefix>:{<q>}:ended                hash: ended task -> its last event id
    <prefix>:{<q>}:pending              hash: held ready entry -> its task id
    <prefix>:{<q>}:snapshot             hash: the fold of the trimmed head of the log
    <prefix>:{<q>}:worker:<consumer>    string with TTL: liveness of a consumer
    <prefix>:{<q>}:finished             pub/sub channel: ids of tasks that ended
    <prefix>:{<q>}:cancel               pub/sub channel: running tasks to cancel
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kew.errors import ConfigurationError

GROUP = "workers"
"""The consumer group on every ready stream."""

LEVELS = ("high", "medium", "low")
"""Ready stream levels, in the order a strict reader drains them."""

DEFAULT_PREFIX = "kew"
PREFIX_ENV = "KEW_KEY_PREFIX"
"""The environment variable that sets the prefix when none is passed."""

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
_PREFIX = re.compile(r"^[A-Za-z0-9_.\-:]{1,100}$")


def check_queue_name(name: object) -> str:
    """Return `name` if it can name a queue, else raise ConfigurationError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(
            f"Queue name {name!r} is not valid: use 1 to 100 letters, digits, "
            "'_', '-' or '.' (braces and colons would break the key layout)."
        )
    return name


def check_prefix(prefix: object) -> str:
    """Return `prefix` if it can prefix kew's keys, else raise ConfigurationError."""
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise ConfigurationError(
            f"Key prefix {prefix!r} is not valid: use 1 to 100 letters, digits, "
            "'_', '-', '.' or ':' (no braces: they would split a queue's hash slot)."
        )
    return prefix


def queue_directory(prefix: str) -> str:
    """The hash listing every queue created under `prefix`."""
    return f"{prefix}:queues"


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """The names of one queue's keys."""

    prefix: str
    queue: str
    base: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", f"{self.prefix}:{{{self.queue}}}")

    @property
    def log(self) -> str:
        return f"{self.base}:log"

    @property
    def sched(self) -> str:
        return f"{self.base}:sched"

    @property
    def breaker(self) -> str:
        return f"{self.base}:breaker"

    @property
    def stats(self) -> str:
        return f"{self.base}:stats"

    @property
    def config(self) -> str:
        return f"{self.base}:config"

    @property
    def dlq(self) -> str:
        return f"{self.base}:dlq"

    @property
    def snapshot(self) -> str:
        """Hash: the fold of what the retention policy trimmed from the log."""
        return f"{self.base}:snapshot"

    @property
    def ended(self) -> str:
        """Hash: task id -> last event id of each ended task, so that its
        history can be found after its record expired."""
        return f"{self.base}:ended"

    @property
    def pending(self) -> str:
        """Hash: '<level>:<entry id>' -> task id of every ready entry a
        consumer holds (an attempt started on it), so that an entry deleted
        from its stream while pending still names its task."""
        return f"{self.base}:pending"

    @property
    def finished_channel(self) -> str:
        return f"{self.base}:finished"

    @property
    def task_prefix(self) -> str:
        """What a task id is appended to; the Lua library builds task keys with it."""
        return f"{self.base}:task:"

    def ready(self, level: str) -> str:
        return f"{self.base}:ready:{level}"

    @property
    def ready_all(self) -> list[str]:
        return [self.ready(level) for level in LEVELS]

    @property
    def queue_keys(self) -> list[str]:
        """The keys every function of the library takes first, in its order."""
        return [
            self.log,
            self.stats,
            self.config,
            self.breaker,
            self.sched,
            *(self.ready(level) for level in LEVELS),
            self.dlq,
            self.ended,
            self.pending,
        ]

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel: ids of running tasks asked to cancel."""
        return f"{self.base}:cancel"

    def task(self, task_id: str) -> str:
        return f"{self.base}:task:{task_id}"

    def worker(self, consumer: str) -> str:
        return f"{self.base}:worker:{consumer}"

    @property
    def worker_prefix(self) -> str:
        return f"{self.base}:worker:"

    @property
    def pattern(self) -> str:
        """A SCAN pattern matching every key of this queue (braces escaped)."""
        return f"{_glob_escape(self.prefix)}:\\{{{_glob_escape(self.queue)}\\}}:*"


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
