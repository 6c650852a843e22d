"""kew's connections: never resent by the client, never waited on for ever.

A retried FCALL whose reply was lost would run twice, and a blocking read
resent blindly would claim entries no one sees (see kew/connection.py). These
tests pin redis-py's retries being off on both of kew's clients, and show that
a server that accepts and then never answers (a half-open connection) turns
into ConnectionFailedError within the consumer's deadlines, on a fresh
connection each time, instead of a hang. The "server" is a tiny asyncio
listener in the test that records what it receives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.exceptions as rex

from kew import QueueConfig, TaskQueueManager
from kew import consumer as consumer_module
from kew import leases as leases_module
from kew.connection import make_client
from kew.consumer import Consumer
from kew.errors import ConnectionFailedError
from kew.hooks import Hooks
from kew.keys import QueueKeys
from kew.permits import Permits, Slots
from kew.registry import Registry

from .conftest import DEADLINE, eventually


class Listener:
    """Accepts connections and records the commands it receives. It answers
    only redis-py's connection handshake (CLIENT SETINFO), never a command;
    with `hang_up` it drops each connection after its first command."""

    def __init__(self, *, hang_up: bool) -> None:
        self.hang_up = hang_up
        self.connections = 0
        self.commands: list[str] = []
        self._writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"redis://{host}:{port}/0"

    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            while True:
                name = await _read_command(reader)
                if name == "CLIENT":
                    writer.write(b"+OK\r\n")
                    continue
                self.commands.append(name)
                if self.hang_up:
                    break
        except asyncio.IncompleteReadError:
            pass  # the client hung up
        writer.close()

    async def close(self) -> None:
        assert self.server is not None
        for writer in self._writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()


async def _read_command(reader: asyncio.StreamReader) -> str:
    """Read one RESP command (an array of bulk strings); return its name."""
    count = int((await reader.readuntil(b"\r\n"))[1:-2])
    words: list[bytes] = []
    for _ in range(count):
        size = int((await reader.readuntil(b"\r\n"))[1:-2])
        words.append((await reader.readexactly(size + 2))[:-2])
    return words[0].decode().upper()


@pytest.fixture
async def silent() -> AsyncIterator[Listener]:
    listener = Listener(hang_up=False)
    listener.server = await asyncio.start_server(listener.serve, "127.0.0.1", 0)
    yield listener
    await listener.close()


@pytest.fixture
async def hanging_up() -> AsyncIterator[Listener]:
    listener = Listener(hang_up=True)
    listener.server = await asyncio.start_server(listener.serve, "127.0.0.1", 0)
    yield listener
    await listener.close()


async def test_a_managers_clients_retry_nothing(manager: TaskQueueManager) -> None:
    """Both clients of a consuming manager (commands, and blocking reads) have
    redis-py's retries at 0 on their connections."""
    await manager.create_queue(QueueConfig(name="q"))
    consumer = manager._queues["q"].consumer
    assert consumer is not None
    for client in (manager.client, consumer.blocking_client):
        # A connection as the pool makes each one (the blocking client's one
        # connection is busy in its read).
        connection = client.connection_pool.make_connection()
        assert connection.retry.get_retries() == 0


@pytest.mark.parametrize("blocking", [False, True], ids=["commands", "blocking"])
async def test_a_command_whose_connection_drops_is_not_sent_again(
    hanging_up: Listener, blocking: bool
) -> None:
    """A connection dropped under a command fails it once: the client sends it
    once (redis-py's default policy would have sent it again)."""
    client = make_client(hanging_up.url, blocking=blocking)
    try:
        with pytest.raises(rex.ConnectionError):
            await asyncio.wait_for(client.execute_command("PING"), DEADLINE)
    finally:
        await client.aclose()
    assert hanging_up.commands == ["PING"]
    assert hanging_up.connections == 1


def _consumer(url: str, lease: float) -> Consumer:
    config = QueueConfig(name="q", lease_seconds=lease)
    return Consumer(
        client=make_client(url),
        blocking_client=make_client(url, blocking=True),
        keys=QueueKeys("kewtest-silent", "q"),
        config=config,
        name="silent-test",
        registry=Registry(),
        slots=Slots(Permits(1), None, config.priority),
        expiry_seconds=60,
        hooks=Hooks(),
        on_finished=lambda queue, task_id: None,
    )


async def test_a_blocking_read_that_is_never_answered_fails_and_reconnects(
    silent: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait for new entries on a connection that never answers ends with
    ConnectionFailedError at its deadline (BLOCK plus READ_MARGIN), without
    sending the read again; the next wait opens a new connection."""
    monkeypatch.setattr(consumer_module, "READ_MARGIN", 0.1)
    consumer = _consumer(silent.url, lease=2.0)
    try:
        for _ in range(2):
            with pytest.raises(ConnectionFailedError, match="blocking read"):
                await asyncio.wait_for(
                    consumer._wait_for_entries(50, ["0-0"] * 3), DEADLINE
                )
    finally:
        await consumer.client.aclose()
        await consumer.blocking_client.aclose()
    assert silent.commands == ["XREAD", "XREAD"]
    assert silent.connections == 2


async def test_maintain_waits_one_lease_for_a_silent_server(
    silent: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A maintain call on a connection that never answers fails after about a
    lease (here 0.2 s), not the 30 s general command deadline: renewals are
    not stalled while other consumers take over."""
    monkeypatch.setattr(leases_module, "MIN_CALL_TIMEOUT", 0.1)
    consumer = _consumer(silent.url, lease=0.2)
    try:
        with pytest.raises(ConnectionFailedError, match=r"within 0\.2s"):
            await asyncio.wait_for(consumer.leases._maintain_once(), DEADLINE)
        await eventually(lambda: silent.commands == ["FCALL"], what="the FCALL")
    finally:
        await consumer.client.aclose()
        await consumer.blocking_client.aclose()
    assert consumer.slots.take_free() == 1  # the room it took was given back
