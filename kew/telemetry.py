"""Tracing and metrics through the OpenTelemetry API.

kew depends on `opentelemetry-api` only; the application picks the SDK and the
exporter, and hands its providers to `TaskQueueManager(tracer_provider=...,
meter_provider=...)` or sets the global ones. bench/telemetry_overhead.py
measures what this module costs per task, with an SDK and without one.

Spans follow the messaging conventions, which upstream still marks
"Development":

* `send <queue>` (PRODUCER) around each submit call, one span for a batch.
  Its context is the creation context of every task the call submits: its
  W3C traceparent becomes the task's `tp`, which the `submit` function writes
  into the ready entry, the `task.submitted` event and the task hash. It is
  written once, so retries, takeovers and requeued dead letters reuse it, and
  every later event of the task carries it too (`Event.trace_id`).
* `process <queue>` (CONSUMER) around each attempt; the task function runs
  inside it, so its own spans are children. Its parent is the creation
  context, and it also links to it: Jaeger shows one tree per submission.
  A manager made with `trace_links_only=True` appends `;link` to the `tp` it
  writes; attempts of those tasks start a trace of their own that only links
  to the send span, which keeps a request that fans out thousands of tasks
  from becoming one enormous trace. The mark travels with the task, so
  whichever process runs it follows the submitter's choice; `tp` is opaque to
  the functions and the projections. `kew.delivery_count` counts the
  deliveries of the attempt's entry: 1 for one a fetch read, more for one
  taken over from a consumer that stopped renewing it (each takeover is a
  delivery; past `max_deliveries` the task is dead-lettered). A retry is a
  new entry, whose count starts again.
* Nothing for polls, waits or lease renewals. Their Redis commands run in a
  context with OpenTelemetry's suppression key set (`internal`), so an
  application that instruments redis-py gets no span for them either. So do
  the other calls of kew's own bookkeeping that no span of the task encloses:
  recording outcomes (`finish` runs after the process span ended, batched
  for many attempts, so it has no one parent) and the reads of
  `wait_for_task`; else each would be a root span of its own. The `submit`
  call is not suppressed: it is the child of its send span.

Metrics are listed in `Telemetry.__init__`. Counts are taken where things
happen: breaker transitions and dead letters are reported in the replies of
the functions that make them (fetch, maintain and finish; refuse, whose
dead letters the breaker does not count) and counted by the process that
made the call, so each is counted once however many processes share the
queue. The gauges (depth by state, breaker state) are sampled from
the server by the manager (kew.sampler): when a queue is created or
attached, every `SAMPLE_SECONDS` after that, and once more at shutdown; only
while a meter provider of an SDK is in place (else the sampler reads
nothing). A transition also sets the breaker gauge of the process that made
it at once.

While the providers are the API's own (no SDK), kew skips spans and metric
calls altogether and only passes on a context the caller holds. Whether they
are is decided when the manager is made and again at every sample, so a
global provider set after the manager started is used within
`SAMPLE_SECONDS`.

Known limits:

* Only the traceparent travels with a task; tracestate and baggage do not
  (the functions store one opaque `tp` string, and baggage would need a size
  cap), so vendor state in tracestate and baggage entries set by the
  submitter are not seen by the task function.
* The log joins a task to its creation context only. With
  `trace_links_only` the events carry the submitter's trace id; the traces
  the attempts start appear in no event (the process span is made after the
  `fetch` that wrote `task.started`); reach them from the log through the
  span link, or by `kew.task.id`. Likewise a task submitted with no SDK and
  no context of the caller has no `tp`: a traced consumer's process span for
  it roots a trace of its own that no event names.
* Events that concern no task carry no trace id: `queue.configured`,
  `breaker.half_opened` (which the clock causes) and a `task.lost` whose task
  is unknown. `breaker.opened` and `breaker.closed` carry the `tp` of the
  attempt whose outcome caused them.
* Queue wait is measured from the ready entry's id, the server time at which
  the task entered its ready stream (for a deferred task or a retry, when it
  became due), to the server time of the fetch that started it; both come
  from the server's clock. The fetch row does not carry the submit time, and
  the entry id needs no change to the functions. Taken-over attempts are not
  measured: their entry dates from the previous attempt.
* The gauges are sampled by every manager that has a meter provider: with
  several processes each reports the same queue, so aggregate them with max
  or last value, not sum. A breaker transition or dead letter is not counted
  when the process that made it has no meter provider, or when the reply of
  its call was lost (the connection dropped after the server ran it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Generator, Sequence
from contextvars import Token
from importlib import metadata
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from kew.events.models import entry_ms
from kew.keys import GROUP

if TYPE_CHECKING:
    from kew.attempts import Attempt, Outcome
    from kew.submission import Submission

__all__ = ["SAMPLE_SECONDS", "Telemetry", "internal", "split_tp"]

logger = logging.getLogger(__name__)

# -- names -----------------------------------------------------------------

MESSAGING_SYSTEM = "messaging.system"
MESSAGING_DESTINATION = "messaging.destination.name"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_MESSAGE_ID = "messaging.message.id"
MESSAGING_BATCH_COUNT = "messaging.batch.message_count"
MESSAGING_CONSUMER_GROUP = "messaging.consumer.group.name"
MESSAGING_CLIENT_ID = "messaging.client.id"
ERROR_TYPE = "error.type"
EXCEPTION_TYPE = "exception.type"
EXCEPTION_MESSAGE = "exception.message"
KEW_TASK_ID = "kew.task.id"
KEW_TASK_NAME = "kew.task.name"
KEW_TASK_ATTEMPT = "kew.task.attempt"
KEW_TASK_OUTCOME = "kew.task.outcome"
"""succeeded, failed, cancelled, or interrupted (its consumer stopped)."""
KEW_DELIVERY_COUNT = "kew.delivery_count"
KEW_PRIORITY = "kew.priority"
"""high, medium or low: the task's ready stream (send spans of one task)."""
KEW_QUEUE_STATE = "kew.queue.state"
KEW_BREAKER_STATE = "kew.breaker.state"

SYSTEM = "redis"
"""The conventions' registry has no value for Redis; a custom one is allowed."""

SENT = "messaging.client.sent.messages"
CONSUMED = "messaging.client.consumed.messages"
PROCESS_DURATION = "messaging.process.duration"
QUEUE_WAIT = "kew.task.queue_wait"
REDELIVERIES = "kew.task.redeliveries"
DEAD_LETTERED = "kew.task.dead_lettered"
QUEUE_DEPTH = "kew.queue.depth"
BREAKER_STATE = "kew.breaker.state"
BREAKER_TRANSITIONS = "kew.breaker.transitions"

BREAKER_LEVELS = {"closed": 0, "half_open": 1, "open": 2}
"""The value of the breaker state gauge for each state."""
LINK_MARK = ";link"
"""Appended to `tp` by a manager with `trace_links_only=True`."""
SAMPLE_SECONDS = 5.0
"""How often the queue-level gauges are sampled."""

# The conventions' advice for messaging durations, stretched for queue waits.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
_WAIT_BUCKETS = (0.001, *_BUCKETS, 30, 60, 300, 900, 3600)
_SCHEMA_URL = "https://opentelemetry.io/schemas/1.27.0"
_W3C = TraceContextTextMapPropagator()


def _version() -> str:
    try:
        return metadata.version("kew")
    except metadata.PackageNotFoundError:  # a source tree that is not installed
        return ""


_VERSION = _version()


def _quiet_context() -> Context:
    # Instrumentations check either the API's (private) key or the plain
    # string older ones used; set both. The key is read with getattr so that
    # an API without it costs the string key only.
    quiet = otel_context.set_value("suppress_instrumentation", True, Context())
    key = cast(str | None, getattr(otel_context, "_SUPPRESS_INSTRUMENTATION_KEY", None))
    if key is not None:
        quiet = otel_context.set_value(key, True, quiet)
    return quiet


_QUIET = _quiet_context()


@contextlib.contextmanager
def internal() -> Generator[None, None, None]:
    """Run kew's own polling with instrumentations suppressed, outside any
    span of the caller."""
    token = otel_context.attach(_QUIET)
    try:
        yield
    finally:
        otel_context.detach(token)


def split_tp(tp: str) -> tuple[str, bool]:
    """A stored `tp`: the W3C traceparent, and whether attempts only link to
    the creation context (`;link`)."""
    traceparent, _, mode = tp.partition(";")
    return traceparent, mode == "link"


# -- spans -------------------------------------------------------------------


class Send:
    """The `send <queue>` span of one submit call: a context manager, inside
    which the span is current, so that the client's own spans (an
    instrumented redis-py) are its children."""

    __slots__ = ("_batch", "_queue", "_telemetry", "_token", "span", "tp")

    def __init__(self, telemetry: Telemetry, queue: str, batch: list[Submission]):
        self._telemetry = telemetry
        self._queue = queue
        self._batch = batch
        self._token: Token[Context] | None = None
        self.span: Span = trace.INVALID_SPAN
        self.tp = ""
        """The traceparent (and mark) every task of the call carries, or ""."""

    def __enter__(self) -> Send:
        t, batch = self._telemetry, self._batch
        if not t.tracing:
            # No SDK, no span: only pass on a context the caller may hold.
            self.tp = t.traceparent(trace.get_current_span())
            return self
        attributes = {
            **t.attributes(self._queue),
            MESSAGING_OPERATION_TYPE: "send",
            MESSAGING_OPERATION_NAME: "send",
        }
        if len(batch) == 1:
            attributes[KEW_TASK_ID] = batch[0].task_id
            attributes[KEW_TASK_NAME] = batch[0].name
            attributes[KEW_PRIORITY] = batch[0].priority.level
        else:
            attributes[MESSAGING_BATCH_COUNT] = len(batch)
        self.span = t.tracer.start_span(
            f"send {self._queue}",
            kind=SpanKind.PRODUCER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        )
        self._token = otel_context.attach(trace.set_span_in_context(self.span))
        self.tp = t.traceparent(self.span)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        t = self._telemetry
        if self._token is not None:
            otel_context.detach(self._token)
        if isinstance(exc, Exception):
            _failed(self.span, exc)
        if t.metering and (exc is None or isinstance(exc, Exception)):
            attributes = t.attributes(self._queue, "send")
            if exc is not None:
                attributes = {**attributes, ERROR_TYPE: _name(exc)}
            t.sent.add(len(self._batch), attributes)
        self.span.end()

    def stamp(self) -> list[Submission]:
        """The batch, each submission carrying this span's context."""
        if not self.tp:
            return self._batch
        return [dataclasses.replace(s, tp=self.tp) for s in self._batch]

    def submitted(self, entry_ids: Sequence[str]) -> None:
        """Note the ready entry ids the server gave (known after its reply);
        "" for a deferred task, which has no entry yet."""
        if len(entry_ids) == 1 and entry_ids[0] and self.span.is_recording():
            self.span.set_attribute(MESSAGING_MESSAGE_ID, entry_ids[0])


class Process:
    """The `process <queue>` span of one attempt: a context manager, inside
    which the span is current (the task function runs there). The caller
    reports the outcome with `ended`; without one the attempt was
    interrupted."""

    __slots__ = (
        "_attempt",
        "_consumer",
        "_queue",
        "_started",
        "_telemetry",
        "_token",
        "outcome",
        "span",
    )

    def __init__(
        self,
        telemetry: Telemetry,
        queue: str,
        consumer: str,
        attempt: Attempt,
    ) -> None:
        self._telemetry = telemetry
        self._queue = queue
        self._consumer = consumer
        self._attempt = attempt
        self._token: Token[Context] | None = None
        self._started = 0.0
        self.span: Span = trace.INVALID_SPAN
        self.outcome: Outcome | None = None

    def __enter__(self) -> Process:
        t, attempt = self._telemetry, self._attempt
        if t.metering:
            t.consumed.add(1, t.attributes(self._queue, "process", attempt.name))
        self._started = time.perf_counter()
        if not t.tracing:
            # No SDK, no span; the task function still runs in the task's
            # creation context, which it may pass on.
            if attempt.tp:
                parent, _ = _creation(attempt.tp)
                self._token = otel_context.attach(parent)
            return self
        attributes = {
            **t.attributes(self._queue),
            MESSAGING_OPERATION_TYPE: "process",
            MESSAGING_OPERATION_NAME: "process",
            MESSAGING_CONSUMER_GROUP: GROUP,
            MESSAGING_CLIENT_ID: self._consumer,
            MESSAGING_MESSAGE_ID: attempt.entry,
            KEW_TASK_ID: attempt.task_id,
            KEW_TASK_NAME: attempt.name,
            KEW_TASK_ATTEMPT: attempt.attempt,
            KEW_DELIVERY_COUNT: attempt.deliveries,
        }
        parent, links = _creation(attempt.tp)
        self.span = t.tracer.start_span(
            f"process {self._queue}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
            record_exception=False,
            set_status_on_exception=False,
        )
        # On an empty context: the consumer's own (e.g. the suppression of
        # instrumentations) is not the task function's business.
        context = trace.set_span_in_context(self.span, Context())
        self._token = otel_context.attach(context)
        return self

    def ended(self, outcome: Outcome) -> None:
        self.outcome = outcome

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        t, span, outcome = self._telemetry, self.span, self.outcome
        if self._token is not None:
            otel_context.detach(self._token)
        if isinstance(exc, Exception):
            _failed(span, exc)
        if outcome is None:
            if span.is_recording() and not isinstance(exc, Exception):
                span.set_attribute(KEW_TASK_OUTCOME, "interrupted")
            span.end()
            return
        failed = outcome.kind == "failed"
        error_type = (outcome.error_type or "_OTHER") if failed else ""
        if t.metering:
            attributes = t.attributes(self._queue, "process", self._attempt.name)
            if failed:
                attributes = {**attributes, ERROR_TYPE: error_type}
            t.duration.record(time.perf_counter() - self._started, attributes)
        if span.is_recording():
            span.set_attribute(KEW_TASK_OUTCOME, outcome.kind)
            if failed:
                span.set_attribute(ERROR_TYPE, error_type)
                span.set_status(Status(StatusCode.ERROR, outcome.value))
                if outcome.exception is not None:
                    span.record_exception(outcome.exception)
                else:
                    span.add_event(
                        "exception",
                        {EXCEPTION_TYPE: error_type, EXCEPTION_MESSAGE: outcome.value},
                    )
        span.end()


class Telemetry:
    """kew's tracer, meter and instruments, for one manager."""

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        links_only: bool = False,
    ) -> None:
        self.links_only = links_only
        self._tracer_provider = tracer_provider
        self.tracer = trace.get_tracer(
            "kew", _VERSION, tracer_provider, schema_url=_SCHEMA_URL
        )
        self._meter_provider = meter_provider
        meter = metrics.get_meter("kew", _VERSION, meter_provider, _SCHEMA_URL)
        self.sent = meter.create_counter(
            SENT, "{message}", "Tasks submitted (error.type set if refused)."
        )
        self.consumed = meter.create_counter(
            CONSUMED, "{message}", "Attempts handed to a task function."
        )
        self.duration = meter.create_histogram(
            PROCESS_DURATION,
            "s",
            "How long attempts ran (error.type set if they failed).",
            explicit_bucket_boundaries_advisory=_BUCKETS,
        )
        self.queue_wait = meter.create_histogram(
            QUEUE_WAIT,
            "s",
            "How long a task waited in its ready stream before an attempt began.",
            explicit_bucket_boundaries_advisory=_WAIT_BUCKETS,
        )
        self.redeliveries = meter.create_counter(
            REDELIVERIES,
            "{attempt}",
            "Attempts taken over from a consumer that stopped renewing them.",
        )
        self.dead_lettered = meter.create_counter(
            DEAD_LETTERED, "{task}", "Tasks sent to the dead-letter stream."
        )
        self.depth = meter.create_gauge(
            QUEUE_DEPTH, "{task}", "Tasks of the queue by state (sampled)."
        )
        self.breaker_state = meter.create_gauge(
            BREAKER_STATE, "1", "The breaker: 0 closed, 1 half open, 2 open (sampled)."
        )
        self.breaker_transitions = meter.create_counter(
            BREAKER_TRANSITIONS,
            "{transition}",
            "Breaker state changes, by the state entered (kew.breaker.state).",
        )
        self._attributes: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.tracing = False
        """Whether a tracer provider of an SDK is in place (see `refresh`)."""
        self.metering = False
        """Whether a meter provider of an SDK is in place (see `refresh`)."""
        self.refresh()

    def attributes(
        self, queue: str, operation: str = "", task_name: str = ""
    ) -> dict[str, Any]:
        """The metric attributes of a queue, an operation on it and a task
        function (a few of each, so they are made once; never mutate them)."""
        key = (queue, operation, task_name)
        attributes = self._attributes.get(key)
        if attributes is None:
            attributes = {MESSAGING_SYSTEM: SYSTEM, MESSAGING_DESTINATION: queue}
            if operation:
                attributes[MESSAGING_OPERATION_NAME] = operation
            if operation == "process":
                attributes[MESSAGING_CONSUMER_GROUP] = GROUP
            if task_name:
                attributes[KEW_TASK_NAME] = task_name
            self._attributes[key] = attributes
        return attributes

    def send(self, queue: str, batch: list[Submission]) -> Send:
        """The span of a submit call (use it as a context manager)."""
        return Send(self, queue, batch)

    def traceparent(self, span: Span) -> str:
        """The `tp` of the tasks a span submits ("" for an invalid span)."""
        if not span.get_span_context().is_valid:
            return ""
        carrier: dict[str, str] = {}
        _W3C.inject(carrier, trace.set_span_in_context(span, Context()))
        traceparent = carrier.get("traceparent", "")
        if traceparent and self.links_only:
            return traceparent + LINK_MARK
        return traceparent

    def received(
        self, queue: str, attempt: Attempt, server_now: int, *, taken_over: bool
    ) -> None:
        """Count an attempt a fetch or a takeover started (at `server_now`)."""
        if not self.metering:
            return
        attributes = self.attributes(queue, "", attempt.name)
        if taken_over:
            self.redeliveries.add(1, attributes)
        else:
            waited = max(server_now - entry_ms(attempt.entry), 0) / 1000
            self.queue_wait.record(waited, attributes)

    def process(self, queue: str, consumer: str, attempt: Attempt) -> Process:
        """The span of an attempt (use it as a context manager)."""
        return Process(self, queue, consumer, attempt)

    def breaker_moved(self, queue: str, states: Sequence[str]) -> None:
        """Count the breaker transitions a function call reported (the states
        it entered, in order), and set the state gauge to the last one."""
        if not states or not self.metering:
            return
        base = self.attributes(queue)
        for state in states:
            self.breaker_transitions.add(1, {**base, KEW_BREAKER_STATE: state})
        self.breaker_state.set(BREAKER_LEVELS.get(states[-1], 0), base)

    def dead_letters(self, queue: str, count: int) -> None:
        """Count the tasks a `maintain` call of this process dead-lettered."""
        if count and self.metering:
            self.dead_lettered.add(count, self.attributes(queue))

    # -- sampling the queues -------------------------------------------------

    def refresh(self) -> None:
        """Look again at the global providers, which the application may set
        after the manager was made (the sampler calls this every
        `SAMPLE_SECONDS`). Asking on every use would cost more than the rest
        of the no-op path: the API looks at an environment variable."""
        tracer_provider = self._tracer_provider or trace.get_tracer_provider()
        self.tracing = not _of_the_api(tracer_provider, "opentelemetry.trace")
        meter_provider = self._meter_provider or metrics.get_meter_provider()
        self.metering = not _of_the_api(meter_provider, "opentelemetry.metrics")


def _of_the_api(provider: object, package: str) -> bool:
    """Whether a provider is one of the API's own: the no-op one, or the proxy
    that stands in until the application sets one. They make nothing, so kew
    skips the work of feeding them."""
    return type(provider).__module__.startswith(package)


def _creation(tp: str) -> tuple[Context, list[Link] | None]:
    """The parent context and links of a process span, from a stored `tp`."""
    if not tp:
        return Context(), None
    traceparent, links_only = split_tp(tp)
    creation = _W3C.extract({"traceparent": traceparent})
    span_context = trace.get_current_span(creation).get_span_context()
    if not span_context.is_valid:
        return Context(), None
    return (Context() if links_only else creation), [Link(span_context)]


def _failed(span: Span, exc: BaseException) -> None:
    if span.is_recording():
        span.set_attribute(ERROR_TYPE, _name(exc))
        span.set_status(Status(StatusCode.ERROR, str(exc) or _name(exc)))
        span.record_exception(exc)


def _name(exc: BaseException) -> str:
    return type(exc).__qualname__
