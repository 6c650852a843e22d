"""Tracing and metrics: the span tree, links, errors, metric points, and what
an OTLP/HTTP collector such as Jaeger receives."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as WireSpan
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanContext, SpanKind, StatusCode, TraceFlags

from kew import (
    ConfigurationError,
    QueueConfig,
    TaskAlreadyExistsError,
    TaskQueueManager,
    TaskStatus,
    functions,
    telemetry,
)
from kew.attempts import Attempt, Outcome
from kew.cli import demo
from kew.events.models import TaskStarted, TaskSubmitted
from kew.keys import QueueKeys
from kew.registry import Registry

from .conftest import eventually

MakeManager = Callable[..., Awaitable[TaskQueueManager]]


class Traced:
    """An SDK tracer provider and meter provider that keep everything in memory."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    @property
    def providers(self) -> dict[str, Any]:
        return {
            "tracer_provider": self.tracer_provider,
            "meter_provider": self.meter_provider,
        }

    def finished(self, name: str | None = None) -> list[ReadableSpan]:
        spans = self.spans.get_finished_spans()
        return [s for s in spans if name is None or s.name == name]

    def points(self, metric: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, data point) of every point of one metric."""
        found: list[tuple[dict[str, Any], Any]] = []
        for name, point in self.all_points():
            if name == metric:
                found.append((dict(point.attributes or {}), point))
        return found

    def all_points(self) -> list[tuple[str, Any]]:
        """(metric name, data point) of every point collected now."""
        data = self.reader.get_metrics_data()
        if data is None:
            return []
        return [
            (metric.name, point)
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            for point in metric.data.data_points
        ]

    def value(self, metric: str, **match: Any) -> Any:
        """The value of the one point of `metric` whose attributes include
        `match` (dots written as underscores), or None."""
        wanted = {k.replace("_", "."): v for k, v in match.items()}
        for attributes, point in self.points(metric):
            if wanted.items() <= attributes.items():
                return point.value
        return None


@pytest.fixture
def traced() -> Iterator[Traced]:
    """In-memory tracing and metrics, shut down after the test."""
    t = Traced()
    yield t
    t.tracer_provider.shutdown()
    t.meter_provider.shutdown()


async def ok(n: int) -> int:
    return n


async def broken() -> None:
    raise ValueError("broken on purpose")


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def ctx(span: ReadableSpan) -> SpanContext:
    assert span.context is not None
    return span.context


async def test_process_span_is_a_child_of_send_and_linked_to_it(
    make_manager: MakeManager, traced: Traced
) -> None:
    """An attempt's process span is a child of its send span and links to it."""
    manager = await make_manager(**traced.providers)
    await manager.create_queue(QueueConfig(name="q"))
    info = await manager.submit_task("t", "q", ok, 1)
    assert (await manager.wait_for_task("t", 10)).status is TaskStatus.COMPLETED
    await eventually(lambda: bool(traced.finished("process q")), what="the span")

    (send,) = traced.finished("send q")
    (process,) = traced.finished("process q")
    assert send.kind is SpanKind.PRODUCER
    assert process.kind is SpanKind.CONSUMER
    assert send.parent is None
    assert process.parent is not None
    assert process.parent.span_id == ctx(send).span_id
    assert ctx(process).trace_id == ctx(send).trace_id
    (link,) = process.links
    assert link.context.span_id == ctx(send).span_id
    assert link.context.trace_id == ctx(send).trace_id

    entry = attrs(send)["messaging.message.id"]
    assert info.queued_time is not None
    assert attrs(send) == {
        "messaging.system": "redis",
        "messaging.destination.name": "q",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.message.id": entry,
        "kew.task.id": "t",
        "kew.task.name": ok.__module__ + ":ok",
        "kew.priority": "medium",
    }
    assert attrs(process) == {
        "messaging.system": "redis",
        "messaging.destination.name": "q",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.consumer.group.name": "workers",
        "messaging.client.id": manager.identity,
        "messaging.message.id": entry,
        "kew.task.id": "t",
        "kew.task.name": ok.__module__ + ":ok",
        "kew.task.attempt": 1,
        "kew.delivery_count": 1,
        "kew.task.outcome": "succeeded",
    }
    assert process.status.status_code is StatusCode.UNSET


async def test_a_failed_attempt_has_status_error_and_an_exception_event(
    make_manager: MakeManager, traced: Traced
) -> None:
    """A failing task's process span has status ERROR, error.type and the exception."""
    manager = await make_manager(**traced.providers)
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("t", "q", broken)
    assert (await manager.wait_for_task("t", 10)).status is TaskStatus.FAILED
    await eventually(lambda: bool(traced.finished("process q")), what="the span")

    (process,) = traced.finished("process q")
    assert process.status.status_code is StatusCode.ERROR
    assert attrs(process)["error.type"] == "ValueError"
    assert attrs(process)["kew.task.outcome"] == "failed"
    (event,) = process.events
    assert event.name == "exception"
    event_attributes = dict(event.attributes or {})
    assert event_attributes["exception.type"] == "ValueError"
    assert event_attributes["exception.message"] == "broken on purpose"
    assert "broken" in str(event_attributes["exception.stacktrace"])


async def test_each_retry_gets_a_process_span_under_the_same_send(
    make_manager: MakeManager, traced: Traced
) -> None:
    """A retried task has one process span per attempt, all under one send span."""
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RuntimeError(f"attempt {calls} fails")
        return "third time"

    manager = await make_manager(**traced.providers)
    await manager.create_queue(QueueConfig(name="q", max_retries=2, retry_delay=0.01))
    await manager.submit_task("t", "q", flaky)
    assert (await manager.wait_for_task("t", 10)).status is TaskStatus.COMPLETED
    await eventually(
        lambda: len(traced.finished("process q")) == 3, what="three process spans"
    )

    (send,) = traced.finished("send q")
    processes = sorted(
        traced.finished("process q"), key=lambda s: attrs(s)["kew.task.attempt"]
    )
    assert [attrs(s)["kew.task.attempt"] for s in processes] == [1, 2, 3]
    assert [s.status.status_code for s in processes] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    for process in processes:
        assert process.parent is not None
        assert process.parent.span_id == ctx(send).span_id
        assert ctx(process).trace_id == ctx(send).trace_id
        assert [link.context.span_id for link in process.links] == [ctx(send).span_id]
    # A retry is a new entry of the ready stream; the context is the stored one.
    assert len({attrs(s)["messaging.message.id"] for s in processes}) == 3


async def test_a_taken_over_attempt_reuses_the_creation_context(
    make_manager: MakeManager,
    traced: Traced,
    client: aioredis.Redis,
    prefix: str,
) -> None:
    """An attempt taken over from a silent consumer is another child of the
    send span, counted as a redelivery, with its entry's delivery count (2:
    the silent consumer's fetch, then the takeover)."""
    submitter = await make_manager(consume=False, **traced.providers)
    await submitter.create_queue(QueueConfig(name="q", lease_seconds=0.3))
    await submitter.submit_task("t", "q", ok, 7)
    keys = QueueKeys(prefix, "q")
    # A consumer that starts the attempt and then never renews its lease.
    await functions.call(
        client,
        "fetch",
        keys.queue_keys,
        ["ghost", 1, keys.task_prefix, 60, keys.finished_channel],
    )

    survivor = await make_manager(**traced.providers)
    await survivor.attach_queue("q")
    info = await survivor.wait_for_task("t", 10)
    assert (info.status, info.attempt) == (TaskStatus.COMPLETED, 2)
    await eventually(lambda: bool(traced.finished("process q")), what="the span")

    (send,) = traced.finished("send q")
    (process,) = traced.finished("process q")
    assert process.parent is not None
    assert process.parent.span_id == ctx(send).span_id
    assert attrs(process)["kew.task.attempt"] == 2
    assert attrs(process)["kew.delivery_count"] == 2
    assert traced.value("kew.task.redeliveries", messaging_destination_name="q") == 1


async def test_links_only_starts_a_new_trace_with_one_link(
    make_manager: MakeManager, traced: Traced
) -> None:
    """With trace_links_only, the process span roots a new trace that links to send."""
    manager = await make_manager(trace_links_only=True, **traced.providers)
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("t", "q", ok, 1)
    assert (await manager.wait_for_task("t", 10)).status is TaskStatus.COMPLETED
    await eventually(lambda: bool(traced.finished("process q")), what="the span")

    (send,) = traced.finished("send q")
    (process,) = traced.finished("process q")
    assert process.parent is None
    assert ctx(process).trace_id != ctx(send).trace_id
    (link,) = process.links
    assert link.context.trace_id == ctx(send).trace_id
    assert link.context.span_id == ctx(send).span_id
    # The mark is stored with the task; the trace id still reads plainly.
    (submitted, *_) = await manager.get_task_history("t")
    assert submitted.tp is not None
    assert submitted.tp.endswith(";link")
    assert submitted.trace_id == format(ctx(send).trace_id, "032x")


async def test_a_batch_has_one_send_span_that_every_task_carries(
    make_manager: MakeManager, traced: Traced
) -> None:
    """submit_tasks makes one send span; every task's process span is its child."""
    manager = await make_manager(**traced.providers)
    await manager.create_queue(QueueConfig(name="q"))
    batch = [{"task_id": f"t{i}", "task_func": ok, "args": [i]} for i in range(3)]
    await manager.submit_tasks("q", batch)
    for i in range(3):
        assert (await manager.wait_for_task(f"t{i}", 10)).status.finished
    await eventually(
        lambda: len(traced.finished("process q")) == 3, what="three process spans"
    )

    (send,) = traced.finished("send q")
    assert attrs(send)["messaging.batch.message_count"] == 3
    assert "kew.task.id" not in attrs(send)
    assert "messaging.message.id" not in attrs(send)
    parents = {s.parent.span_id for s in traced.finished("process q") if s.parent}
    assert parents == {ctx(send).span_id}
    assert traced.value("messaging.client.sent.messages") == 3


async def test_the_entry_event_and_hash_carry_the_send_spans_context(
    make_manager: MakeManager, traced: Traced, client: aioredis.Redis, prefix: str
) -> None:
    """The entry, the hash and task.submitted (trace_id too) carry send's context."""
    manager = await make_manager(consume=False, **traced.providers)
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("t", "q", ok, 1)

    (send,) = traced.finished("send q")
    context = ctx(send)
    traceparent = (
        f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    )
    (submitted,) = await manager.get_task_history("t")
    assert isinstance(submitted, TaskSubmitted)
    assert submitted.tp == traceparent
    assert submitted.trace_id == format(context.trace_id, "032x")
    keys = QueueKeys(prefix, "q")
    assert await client.hget(keys.task("t"), "tp") == traceparent
    entry = attrs(send)["messaging.message.id"]
    entries = await client.xrange(keys.ready("medium"), entry, entry)
    assert cast(list[Any], entries) == [(entry, {"task_id": "t", "tp": traceparent})]


async def test_without_an_sdk_tasks_carry_no_trace_context(
    manager: TaskQueueManager,
) -> None:
    """With the API's no-op providers, tp stays empty and trace_id is None."""
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("t", "q", ok, 1)
    assert (await manager.wait_for_task("t", 10)).status is TaskStatus.COMPLETED
    events = await manager.get_task_history("t")
    assert [e.trace_id for e in events] == [None] * len(events)


async def test_without_an_sdk_a_callers_context_still_travels(
    manager: TaskQueueManager,
) -> None:
    """With no SDK, a context the caller holds (extracted from a request, say)
    is carried by the task, and its function runs inside it."""
    seen: list[int] = []

    async def look() -> None:
        seen.append(trace.get_current_span().get_span_context().trace_id)

    incoming = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    await manager.create_queue(QueueConfig(name="q"))
    token = otel_context.attach(
        trace.set_span_in_context(trace.NonRecordingSpan(incoming))
    )
    try:
        await manager.submit_task("t", "q", look)
    finally:
        otel_context.detach(token)
    assert (await manager.wait_for_task("t", 10)).status is TaskStatus.COMPLETED

    assert seen == [incoming.trace_id]
    (submitted, *_) = await manager.get_task_history("t")
    assert submitted.tp == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class CommandLog:
    """Every Redis command sent, with the OpenTelemetry context it ran in."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, bool, str]] = []

    def record(self, args: tuple[Any, ...]) -> None:
        name = str(args[0]).upper()
        if name in ("FCALL", "FCALL_RO"):
            name = str(args[1]).rpartition("_")[2]
        quiet = bool(otel_context.get_value("suppress_instrumentation"))
        span = trace.get_current_span()
        current = getattr(span, "name", "") if span.is_recording() else ""
        self.commands.append((name, quiet, current))

    def of(self, name: str) -> list[tuple[str, bool, str]]:
        return [c for c in self.commands if c[0] == name]


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> CommandLog:
    """Record the context of each Redis command, as an instrumentation sees it."""
    log = CommandLog()
    original = cast(Callable[..., Awaitable[Any]], aioredis.Redis.execute_command)

    async def execute_command(self: aioredis.Redis, *args: Any, **options: Any) -> Any:
        log.record(args)
        return await original(self, *args, **options)

    monkeypatch.setattr(aioredis.Redis, "execute_command", execute_command)
    return log


async def test_polling_makes_no_spans_and_is_hidden_from_instrumentations(
    make_manager: MakeManager, traced: Traced, commands: CommandLog
) -> None:
    """Empty polls, renewals, recording outcomes and the wait's reads make no
    span and run with instrumentation suppressed; submit does not, inside send."""
    manager = await make_manager(**traced.providers)
    await manager.create_queue(QueueConfig(name="q", lease_seconds=0.3))
    await eventually(
        lambda: len(commands.of("maintain")) >= 3 and bool(commands.of("XREAD")),
        what="three renewals and a wait for entries",
    )
    assert traced.finished() == []

    await manager.submit_task("t", "q", ok, 1)
    assert (await manager.wait_for_task("t", 10)).status is TaskStatus.COMPLETED
    for internal in ("fetch", "maintain", "XREAD", "finish", "HGETALL"):
        assert commands.of(internal), internal
        assert all(quiet for _, quiet, _ in commands.of(internal)), internal
    assert commands.of("submit") == [("submit", False, "send q")]


async def test_reading_back_an_outcome_recorded_before_is_suppressed(
    manager: TaskQueueManager, commands: CommandLog
) -> None:
    """When a repeated `finish` is refused because the first call was
    recorded after all, the consumer finds its outcome in the task's
    history; that read is bookkeeping, hidden from instrumentations."""
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("t", "q", ok, 1)
    assert (await manager.wait_for_task("t", 10)).status is TaskStatus.COMPLETED
    events = await manager.get_task_history("t")
    started = next(e for e in events if isinstance(e, TaskStarted))
    succeeded = events[-1]
    attempt = Attempt("t", started.entry, 1, 2, "ok", "{}", "", "ready", None)
    consumer = manager._queues["q"].consumer  # pyright: ignore[reportPrivateUsage]
    assert consumer is not None

    before = len(commands.of("history"))
    row = await consumer.recorder._recorded_before(  # pyright: ignore[reportPrivateUsage]
        Outcome(attempt, "succeeded", "1", "{}")
    )
    assert row == ["ok", succeeded.id, "completed", ""]
    reads = commands.of("history")[before:]
    assert reads == [("history", True, "")]


async def test_metrics_count_sends_and_attempts_without_task_ids(
    make_manager: MakeManager, traced: Traced
) -> None:
    """Sent, consumed, duration and queue wait have points; none names a task."""
    manager = await make_manager(**traced.providers)
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("good", "q", ok, 1)
    await manager.submit_task("bad", "q", broken)
    for task_id in ("good", "bad"):
        assert (await manager.wait_for_task(task_id, 10)).status.finished
    await eventually(
        lambda: len(traced.finished("process q")) == 2, what="two process spans"
    )

    queue = {"messaging.system": "redis", "messaging.destination.name": "q"}
    sent = traced.points("messaging.client.sent.messages")
    assert [(a, p.value) for a, p in sent] == [
        ({**queue, "messaging.operation.name": "send"}, 2)
    ]
    process = {
        **queue,
        "messaging.operation.name": "process",
        "messaging.consumer.group.name": "workers",
    }
    consumed = traced.points("messaging.client.consumed.messages")
    assert sum(p.value for _, p in consumed) == 2
    for attributes, _ in consumed:
        assert process.items() <= attributes.items()

    durations = {
        a.get("error.type"): p for a, p in traced.points("messaging.process.duration")
    }
    assert set(durations) == {None, "ValueError"}
    assert all(p.count == 1 and p.sum >= 0 for p in durations.values())
    waits = traced.points("kew.task.queue_wait")
    assert sum(p.count for _, p in waits) == 2

    for metric, point in traced.all_points():
        attributes = dict(point.attributes or {})
        assert "kew.task.id" not in attributes, metric
        assert not {"good", "bad"} & set(map(str, attributes.values())), metric


async def test_queue_depth_breaker_and_dead_letters_are_sampled(
    make_manager: MakeManager,
    traced: Traced,
    client: aioredis.Redis,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sampler sets depth by state and the breaker gauge; a dead letter,
    and the breaker transition it causes, are counted once, by the process
    whose consumer dead-lettered the task, not by every process that
    consumes the queue."""
    monkeypatch.setattr(telemetry, "SAMPLE_SECONDS", 0.02)
    manager = await make_manager(consume=False, **traced.providers)
    config = QueueConfig(
        name="q",
        circuit_breaker_max_failures=1,
        lease_seconds=0.3,
        max_deliveries=1,
    )
    await manager.create_queue(config)
    await manager.submit_task("later", "q", ok, 1, _defer_by=60)

    def depth(state: str, of: Traced = traced) -> Any:
        return of.value("kew.queue.depth", kew_queue_state=state)

    await eventually(lambda: depth("deferred") == 1, what="a deferred task sampled")
    assert traced.value("kew.breaker.state") == 0
    assert depth("ready") == depth("running") == depth("retry") == 0

    # A crash loop: a consumer starts the task and vanishes; with
    # max_deliveries=1 the next consumer dead-letters it: the metered
    # manager's, or that of another metered process on the same queue.
    keys = QueueKeys(prefix, "q")
    await manager.submit_task("lost", "q", ok, 2)
    await functions.call(
        client,
        "fetch",
        keys.queue_keys,
        ["ghost", 1, keys.task_prefix, 60, keys.finished_channel],
    )
    other = Traced()
    try:
        second = await make_manager(consume=False, meter_provider=other.meter_provider)
        await second.attach_queue("q")
        await manager.attach_queue("q")

        def counted(metric: str, **match: Any) -> list[int]:
            values = (t.value(metric, **match) for t in (traced, other))
            return [value or 0 for value in values]

        await eventually(
            lambda: sum(counted("kew.task.dead_lettered")) >= 1,
            what="a dead letter counted",
        )
        await eventually(
            lambda: depth("dead_lettered") == depth("dead_lettered", other) == 1,
            what="the dead letter sampled by both processes",
        )
        # Both sampled it; only the one whose consumer caused it counted it,
        # and the transition to open its final failure caused.
        dead_letters = counted("kew.task.dead_lettered")
        assert sorted(dead_letters) == [0, 1]
        opened = counted("kew.breaker.transitions", kew_breaker_state="open")
        assert opened == dead_letters
        for t in (traced, other):
            states = {a["kew.breaker.state"] for a, _ in t.points(BREAKER_MOVES)}
            assert states <= {"open"}
        await eventually(
            lambda: traced.value("kew.breaker.state") == 2, what="open sampled"
        )
    finally:
        other.meter_provider.shutdown()


async def test_a_dead_letter_of_refusals_is_counted_by_the_refusing_consumer(
    make_manager: MakeManager, traced: Traced
) -> None:
    """A task handed back max_deliveries times by a consumer that lacks its
    function is dead-lettered by that consumer's `refuse` call, which counts
    it, once."""
    submitter = await make_manager(consume=False)
    lacking = await make_manager(registry=Registry(), **traced.providers)
    await lacking.create_queue(
        QueueConfig(name="q", lease_seconds=0.2, max_deliveries=2)
    )
    await submitter.submit_task("orphan", "q", ok, 1)
    assert (await submitter.wait_for_task("orphan", 10)).status is TaskStatus.FAILED

    await eventually(
        lambda: bool(traced.value("kew.task.dead_lettered")), what="the count"
    )
    assert traced.value("kew.task.dead_lettered") == 1


BREAKER_MOVES = "kew.breaker.transitions"


def transitions(*of: Traced) -> Counter[str]:
    """The breaker transitions counted by each of `of`, summed, by the state
    entered."""
    counted: Counter[str] = Counter()
    for t in of:
        for attributes, point in t.points(BREAKER_MOVES):
            counted[attributes["kew.breaker.state"]] += point.value
    return counted


async def test_breaker_transitions_are_counted_once_as_they_happen(
    make_manager: MakeManager, traced: Traced, monkeypatch: pytest.MonkeyPatch
) -> None:
    """closed -> open -> half_open -> closed, on a queue two metered
    processes consume, gives exactly one transition point per state entered
    (each process counts the transitions its own calls made; no sampling is
    involved); breaker.opened and breaker.closed carry the trace id of the
    attempt that caused them."""
    monkeypatch.setattr(telemetry, "SAMPLE_SECONDS", 3600)
    config = QueueConfig(
        name="q", circuit_breaker_max_failures=1, circuit_breaker_reset_timeout=0.2
    )
    first = await make_manager(**traced.providers)
    await first.create_queue(config)
    other = Traced()
    try:
        second = await make_manager(meter_provider=other.meter_provider)
        await second.attach_queue("q")
        await first.submit_task("bad", "q", broken)
        assert (await first.wait_for_task("bad", 10)).status is TaskStatus.FAILED
        await first.submit_task("good", "q", ok, 1)
        assert (await first.wait_for_task("good", 10)).status is TaskStatus.COMPLETED

        await eventually(
            lambda: transitions(traced, other)["closed"] >= 1, what="closed counted"
        )
        assert transitions(traced, other) == {"open": 1, "half_open": 1, "closed": 1}
    finally:
        other.meter_provider.shutdown()

    sends = {attrs(s)["kew.task.id"]: s for s in traced.finished("send q")}
    lines = [line async for line in first.export_log("q")]
    moves = [line for line in lines if line["type"].startswith("breaker.")]
    breaker = {line["type"]: line for line in moves}
    assert [line["type"] for line in moves] == [
        "breaker.opened",
        "breaker.half_opened",
        "breaker.closed",
    ]
    assert breaker["breaker.opened"]["trace_id"] == trace_id(sends["bad"])
    assert breaker["breaker.closed"]["trace_id"] == trace_id(sends["good"])
    assert breaker["breaker.half_opened"].get("trace_id") is None


def trace_id(span: ReadableSpan) -> str:
    return format(ctx(span).trace_id, "032x")


async def test_gauges_are_sampled_when_a_queue_is_created_attached_or_left(
    make_manager: MakeManager, traced: Traced, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Depth gauges reach the metric reader as soon as a queue is created or
    attached, and once more at shutdown, without waiting for the sampling
    interval (a short-lived process would otherwise export none)."""
    monkeypatch.setattr(telemetry, "SAMPLE_SECONDS", 3600)
    manager = await make_manager(consume=False, **traced.providers)
    await manager.create_queue(QueueConfig(name="q"))
    assert traced.value("kew.queue.depth", kew_queue_state="deferred") == 0
    assert traced.value("kew.breaker.state") == 0

    for task_id in ("a", "b"):
        await manager.submit_task(task_id, "q", ok, 1, _defer_by=60)
    other = Traced()
    try:
        attached = await make_manager(meter_provider=other.meter_provider)
        await attached.attach_queue("q")
        assert other.value("kew.queue.depth", kew_queue_state="deferred") == 2
    finally:
        other.meter_provider.shutdown()

    await manager.shutdown()
    assert traced.value("kew.queue.depth", kew_queue_state="deferred") == 2


async def test_a_global_tracer_provider_set_later_is_used(
    make_manager: MakeManager, traced: Traced, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manager made before the application set its global tracer provider
    traces once the sampler looked again (every SAMPLE_SECONDS)."""
    monkeypatch.setattr(telemetry, "SAMPLE_SECONDS", 0.02)
    manager = await make_manager(consume=False)
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("before", "q", ok, 1)

    # What trace.set_tracer_provider does, undone after the test (the real
    # one can be called once per process).
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", traced.tracer_provider)
    submitted = 0

    async def submit_is_traced() -> bool:
        nonlocal submitted
        submitted += 1
        await manager.submit_task(f"after-{submitted}", "q", ok, 1)
        return bool(traced.finished("send q"))

    await eventually(submit_is_traced, what="a send span from the global provider")
    (send,) = traced.finished("send q")
    assert attrs(send)["kew.task.id"] == f"after-{submitted}"


async def test_a_refused_submit_sets_error_on_send_and_the_sent_counter(
    make_manager: MakeManager, traced: Traced
) -> None:
    """A submit the server refuses ends its send span with status ERROR,
    error.type and the exception, and is counted with error.type."""
    manager = await make_manager(consume=False, **traced.providers)
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("t", "q", ok, 1)
    with pytest.raises(TaskAlreadyExistsError):
        await manager.submit_task("t", "q", ok, 2)

    accepted, refused = traced.finished("send q")
    assert accepted.status.status_code is StatusCode.UNSET
    assert "error.type" not in attrs(accepted)
    assert refused.status.status_code is StatusCode.ERROR
    assert attrs(refused)["error.type"] == "TaskAlreadyExistsError"
    (event,) = refused.events
    assert event.name == "exception"
    assert dict(event.attributes or {})["exception.type"].endswith(
        "TaskAlreadyExistsError"
    )
    assert "messaging.message.id" not in attrs(refused)

    queue = {
        "messaging.system": "redis",
        "messaging.destination.name": "q",
        "messaging.operation.name": "send",
    }
    sent = traced.points("messaging.client.sent.messages")
    assert sorted(((a.get("error.type", ""), p.value) for a, p in sent), key=str) == [
        ("", 1),
        ("TaskAlreadyExistsError", 1),
    ]
    for attributes, _ in sent:
        assert queue.items() <= attributes.items()


async def test_an_attempt_cut_short_by_shutdown_is_interrupted(
    make_manager: MakeManager, traced: Traced
) -> None:
    """A running attempt cancelled by shutdown ends its process span as
    interrupted, without an error and without a duration point."""
    running = asyncio.Event()

    async def forever() -> None:
        running.set()
        await asyncio.Event().wait()

    manager = await make_manager(**traced.providers)
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("t", "q", forever)
    await asyncio.wait_for(running.wait(), 10)
    await manager.shutdown(wait=False)

    (process,) = traced.finished("process q")
    assert attrs(process)["kew.task.outcome"] == "interrupted"
    assert process.status.status_code is StatusCode.UNSET
    assert process.events == ()
    assert traced.value("messaging.client.consumed.messages") == 1
    assert traced.points("messaging.process.duration") == []


async def test_with_redis_py_instrumented_a_task_has_no_orphan_redis_spans(
    make_manager: MakeManager, traced: Traced, commands: CommandLog
) -> None:
    """With the real RedisInstrumentor, an idle consumer makes no Redis spans,
    and a task's spans are send, its submit FCALL under it, and process: no
    root span comes from recording the outcome, from wait_for_task, or from
    shutdown (handing back entries, the last sample of the gauges)."""
    manager = await make_manager(**traced.providers)
    await manager.create_queue(QueueConfig(name="q", lease_seconds=0.3))

    def name_the_function(span: Any, instance: Any, args: Any, kwargs: Any) -> None:
        # The statement is sanitized ("FCALL ? ?"): note which function ran.
        if args and args[0] == "FCALL":
            span.set_attribute("test.function", str(args[1]))

    instrumentor = RedisInstrumentor()
    instrumentor.instrument(
        tracer_provider=traced.tracer_provider, request_hook=name_the_function
    )
    try:
        renewals = len(commands.of("maintain"))
        await eventually(
            lambda: len(commands.of("maintain")) >= renewals + 3,
            what="three renewals while instrumented",
        )
        assert traced.finished() == []

        await manager.submit_task("t", "q", ok, 1)
        assert (await manager.wait_for_task("t", 10)).status is TaskStatus.COMPLETED
        await eventually(lambda: bool(traced.finished("process q")), what="process")
        # A renewal after the task ended makes no span either.
        renewals = len(commands.of("maintain"))
        await eventually(
            lambda: len(commands.of("maintain")) > renewals, what="one more renewal"
        )
        await manager.shutdown()
    finally:
        instrumentor.uninstrument()

    assert commands.of("release")

    (send,) = traced.finished("send q")
    (process,) = traced.finished("process q")
    (fcall,) = traced.finished("FCALL")
    assert attrs(fcall)["test.function"] == functions.function_name("submit")
    assert fcall.kind is SpanKind.CLIENT
    assert fcall.parent is not None
    assert fcall.parent.span_id == ctx(send).span_id
    assert ctx(fcall).trace_id == ctx(send).trace_id
    assert process.parent is not None
    assert process.parent.span_id == ctx(send).span_id
    roots = [s.name for s in traced.finished() if s.parent is None]
    assert roots == ["send q"], roots
    assert len(traced.finished()) == 3, [s.name for s in traced.finished()]


def kew_cli(url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the kew command on the test's server and prefix."""
    env = {**os.environ, "KEW_REDIS_URL": url, "COLUMNS": "250"}
    return subprocess.run(
        [sys.executable, "-m", "kew", "--prefix", prefix, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_kew_history_and_export_join_the_log_to_the_trace(
    make_manager: MakeManager, traced: Traced, redis_url: str, prefix: str
) -> None:
    """`kew history` prints a traced task's trace id, every event of the task
    carries it, and every `kew export` line of the task has it as trace_id."""
    manager = await make_manager(**traced.providers)
    await manager.create_queue(QueueConfig(name="q", max_retries=1, retry_delay=0))
    await manager.submit_task("t", "q", broken)
    assert (await manager.wait_for_task("t", 10)).status is TaskStatus.FAILED
    (send,) = traced.finished("send q")
    trace_id = format(ctx(send).trace_id, "032x")

    table = await asyncio.to_thread(kew_cli, redis_url, prefix, "history", "t")
    assert table.returncode == 0, table.stderr
    assert "trace id" in table.stdout
    assert trace_id in table.stdout

    done = await asyncio.to_thread(kew_cli, redis_url, prefix, "history", "t", "--json")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    types = [e["type"] for e in events]
    assert types[0] == "task.submitted"
    assert {"task.started", "task.retry_scheduled", "task.failed"} <= set(types)
    assert [e["trace_id"] for e in events] == [trace_id] * len(events)

    exported = await asyncio.to_thread(kew_cli, redis_url, prefix, "export", "q")
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    of_task = [line for line in lines if line.get("task_id") == "t"]
    assert [line["type"] for line in of_task] == types
    assert [line["trace_id"] for line in of_task] == [trace_id] * len(of_task)


class Collector:
    """An OTLP/HTTP endpoint on 127.0.0.1 that keeps what it is sent, in a
    thread: the path, the content type and the body of each POST."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, str, bytes]] = []
        posts = self.posts

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                posts.append((self.path, self.headers["Content-Type"], body))
                # An empty Export*ServiceResponse encodes as no bytes at all.
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def traces(self) -> list[ExportTraceServiceRequest]:
        requests: list[ExportTraceServiceRequest] = []
        for path, _, body in self.posts:
            if path == "/v1/traces":
                requests.append(ExportTraceServiceRequest.FromString(body))
        return requests

    def metric_names(self) -> set[str]:
        """The names of the metrics of every /v1/metrics request received."""
        names: set[str] = set()
        for path, _, body in self.posts:
            if path == "/v1/metrics":
                request = ExportMetricsServiceRequest.FromString(body)
                for resource_metrics in request.resource_metrics:
                    for scope_metrics in resource_metrics.scope_metrics:
                        names |= {m.name for m in scope_metrics.metrics}
        return names

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    """An in-test OTLP/HTTP collector, reached without any proxy."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    c = Collector()
    yield c
    c.close()


def spans_by_name_and_task(
    requests: list[ExportTraceServiceRequest], service: str
) -> dict[tuple[str, str], WireSpan]:
    """The spans of kew in OTLP requests, by span name and kew.task.id."""
    spans: dict[tuple[str, str], WireSpan] = {}
    for request in requests:
        for resource_spans in request.resource_spans:
            resource = {
                a.key: a.value.string_value for a in resource_spans.resource.attributes
            }
            assert resource["service.name"] == service
            for scope_spans in resource_spans.scope_spans:
                if scope_spans.scope.name != "kew":
                    continue
                for span in scope_spans.spans:
                    task_id = next(
                        a.value.string_value
                        for a in span.attributes
                        if a.key == "kew.task.id"
                    )
                    spans[(span.name, task_id)] = span
    return spans


async def test_spans_arrive_over_otlp_http_as_a_collector_receives_them(
    make_manager: MakeManager, collector: Collector
) -> None:
    """The real OTLP/HTTP exporter delivers the send/process tree: parent span
    id bytes, kinds and trace ids, as Jaeger would receive them."""
    provider = TracerProvider(resource=Resource.create({"service.name": "kew-test"}))
    exporter = OTLPSpanExporter(endpoint=f"{collector.url}/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    try:
        manager = await make_manager(tracer_provider=provider)
        await manager.create_queue(QueueConfig(name="q"))
        await manager.submit_task("good", "q", ok, 1)
        await manager.submit_task("bad", "q", broken)
        for task_id in ("good", "bad"):
            assert (await manager.wait_for_task(task_id, 10)).status.finished
        await manager.shutdown()
        assert await asyncio.to_thread(provider.force_flush)
    finally:
        provider.shutdown()

    assert {(path, kind) for path, kind, _ in collector.posts} == {
        ("/v1/traces", "application/x-protobuf")
    }
    spans = spans_by_name_and_task(collector.traces(), "kew-test")
    assert set(spans) == {
        (name, task_id)
        for name in ("send q", "process q")
        for task_id in ("good", "bad")
    }
    for task_id in ("good", "bad"):
        send, process = spans[("send q", task_id)], spans[("process q", task_id)]
        assert send.kind == WireSpan.SpanKind.SPAN_KIND_PRODUCER
        assert process.kind == WireSpan.SpanKind.SPAN_KIND_CONSUMER
        assert len(send.trace_id) == 16
        assert len(send.span_id) == 8
        assert send.parent_span_id == b""
        assert process.parent_span_id == send.span_id
        assert process.trace_id == send.trace_id
        assert [(link.trace_id, link.span_id) for link in process.links] == [
            (send.trace_id, send.span_id)
        ]
    assert spans[("send q", "good")].trace_id != spans[("send q", "bad")].trace_id
    bad = spans[("process q", "bad")]
    assert bad.status.code == bad.status.STATUS_CODE_ERROR
    assert [event.name for event in bad.events] == ["exception"]


async def test_kew_demo_exports_to_an_otlp_endpoint(
    redis_url: str, collector: Collector
) -> None:
    """`kew demo --otlp-endpoint URL` sends its traces and metrics there: the
    span tree, and kew's metrics by name, the sampled gauges included (the
    demo ends long before the sampling interval)."""
    argv = [sys.executable, "-m", "kew", "--redis-url", redis_url, "demo"]
    argv += ["--tasks", "3", "--workers", "3", "--otlp-endpoint", collector.url]
    done = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"Trace id of the demo: [0-9a-f]{32}", done.stdout), done.stdout
    assert f"Sent traces and metrics to {collector.url}." in done.stdout

    assert {path for path, _, _ in collector.posts} == {"/v1/traces", "/v1/metrics"}
    spans = spans_by_name_and_task(collector.traces(), "kew-demo")
    assert set(spans) == {
        (name, f"demo-{n}") for name in ("send demo", "process demo") for n in (1, 2, 3)
    }
    for n in (1, 2, 3):
        send, process = (
            spans[("send demo", f"demo-{n}")],
            spans[("process demo", f"demo-{n}")],
        )
        assert process.parent_span_id == send.span_id
    assert {
        "messaging.client.sent.messages",
        "messaging.client.consumed.messages",
        "messaging.process.duration",
        "kew.task.queue_wait",
        "kew.queue.depth",
        "kew.breaker.state",
    } <= collector.metric_names()


async def test_kew_demo_says_when_the_endpoint_is_unreachable(redis_url: str) -> None:
    """With nothing listening at --otlp-endpoint, the demo says it could not
    send its traces and metrics there, and exits 1."""
    with socket.socket() as taken:
        # Bound, never listening: connections to it are refused.
        taken.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{taken.getsockname()[1]}"
        argv = [sys.executable, "-m", "kew", "--redis-url", redis_url, "demo"]
        argv += ["--tasks", "2", "--workers", "2", "--otlp-endpoint", url]
        env = {**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
        done = await asyncio.to_thread(
            subprocess.run,
            argv,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=env,
        )
    assert done.returncode == 1, done.stdout
    assert "Sent traces" not in done.stdout
    said = " ".join(done.stderr.split())
    assert f"Could not send the demo's traces and metrics to {url!r}" in said, said


def test_the_demo_names_the_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without kew[otel], --otlp-endpoint fails with a message naming the extra."""
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    monkeypatch.delitem(sys.modules, "kew.cli.otlp", raising=False)
    with pytest.raises(ConfigurationError, match=r"pip install 'kew\[otel\]'"):
        demo._otlp_export("http://127.0.0.1:4318")  # pyright: ignore[reportPrivateUsage]
