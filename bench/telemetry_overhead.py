"""What tracing and metrics cost per task.

Runs N no-op tasks (submitted one at a time, max_workers 100, producer and
consumer in one process) three ways, interleaved over several rounds:

    off   kew's telemetry calls replaced by do-nothing stubs, and no metrics
          sampler: the cost of kew without this feature
    api   the default: opentelemetry-api only, no SDK (no-op tracer and meter)
    sdk   an SDK TracerProvider (BatchSpanProcessor into an in-memory
          exporter) and MeterProvider (an in-memory metric reader)

and reports the wall time per task of the best and the median round, the
overhead over `off` in µs per task, and the ratio. End to end, the no-SDK
difference is far below the noise of a busy machine, so it also times kew's
telemetry calls for one task (send, received, process) alone, without Redis,
which isolates the overhead.

    .venv/bin/python bench/telemetry_overhead.py [N] [--rounds R] [--url redis://...]

Without --url it starts a private embedded server.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import secrets
import statistics
import time
from typing import Any

import redis.asyncio as aioredis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

import kew.manager
from kew import QueueConfig, QueuePriority, TaskQueueManager
from kew.attempts import Attempt, Outcome
from kew.server import EmbeddedServer
from kew.submission import Options, Submission
from kew.telemetry import Telemetry

MODES = ("off", "api", "sdk")


class _Nothing:
    """Stands in for a span: does nothing, carries no context."""

    def __init__(self, batch: list[Submission] | None = None) -> None:
        self.batch = batch

    def __enter__(self) -> _Nothing:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def stamp(self) -> list[Submission] | None:
        return self.batch

    def submitted(self, entry_ids: object) -> None:
        pass

    def ended(self, outcome: object) -> None:
        pass


class NoTelemetry(Telemetry):
    """kew as if it had no telemetry: every hook does nothing."""

    def send(self, queue: str, batch: list[Submission]) -> Any:
        return _Nothing(batch)

    def received(self, *args: Any, **kwargs: Any) -> None:
        pass

    def process(self, *args: Any, **kwargs: Any) -> Any:
        return _Nothing()

    def breaker_moved(self, *args: Any, **kwargs: Any) -> None:
        pass

    def dead_letters(self, *args: Any, **kwargs: Any) -> None:
        pass


async def no_sampler(*args: Any, **kwargs: Any) -> None:
    """Stands in for kew.sampler.sample_forever, which the manager starts."""
    await asyncio.Event().wait()


class Sdk:
    """SDK providers keeping spans and metric points in memory."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(BatchSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


class Countdown:
    """Set `done` once `left` tasks have run (one per round, in `noop`)."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.done = asyncio.Event()


_countdown = Countdown(0)


async def noop() -> None:
    """The task: one module-level function, so every round registers the same
    one (the registry refuses a name taken by another closure)."""
    _countdown.left -= 1
    if _countdown.left == 0:
        _countdown.done.set()


async def run_tasks(url: str, n: int, mode: str) -> float:
    """Seconds from the first submit until all N tasks have run."""
    global _countdown
    _countdown = Countdown(n)
    done = _countdown.done
    sdk = Sdk() if mode == "sdk" else None
    providers: dict[str, Any] = {}
    if sdk is not None:
        providers = {
            "tracer_provider": sdk.tracer_provider,
            "meter_provider": sdk.meter_provider,
        }
    prefix = f"bench-otel-{secrets.token_hex(4)}"
    manager = TaskQueueManager(redis_url=url, key_prefix=prefix, **providers)
    sampler = kew.manager.sample_forever
    if mode == "off":
        manager._telemetry = NoTelemetry()  # pyright: ignore[reportPrivateUsage]
        # The manager starts the name it imported from kew.sampler.
        kew.manager.sample_forever = no_sampler
    try:
        async with manager:
            await manager.create_queue(
                QueueConfig(name="q", max_workers=100, max_size=n)
            )
            started = time.perf_counter()
            for i in range(n):
                await manager.submit_task(f"t{i}", "q", noop)
            await asyncio.wait_for(done.wait(), timeout=120)
            elapsed = time.perf_counter() - started
    finally:
        kew.manager.sample_forever = sampler
    await delete_prefix(url, prefix)
    if sdk is not None:
        sdk.tracer_provider.force_flush()
        spans = len(sdk.spans.get_finished_spans())
        assert spans == 2 * n, f"expected {2 * n} spans, got {spans}"
        sdk.shutdown()
    return elapsed


async def delete_prefix(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    for i in range(0, len(keys), 500):
        await client.unlink(*keys[i : i + 500])
    await client.aclose()


def calls_alone(mode: str, n: int) -> float:
    """µs per task spent in kew's telemetry calls of one task (send, received,
    process), without Redis; `off` times the same loop with the stubs."""
    sdk = Sdk() if mode == "sdk" else None
    telemetry: Telemetry = NoTelemetry() if mode == "off" else Telemetry()
    if sdk is not None:
        telemetry = Telemetry(
            tracer_provider=sdk.tracer_provider, meter_provider=sdk.meter_provider
        )
    submission = Submission(
        "t", "m:noop", "noop", QueuePriority.MEDIUM, "{}", "{}", Options(0, 0, 0)
    )
    batch, entry = [submission], ["1-0"]
    attempt = Attempt("t", "1-0", 1, 2, "m:noop", "{}", "", "ready", None)
    outcome = Outcome(attempt, "succeeded", "null", "{}")
    started = time.perf_counter()
    for i in range(n):
        if sdk is not None and i % 1000 == 0:
            sdk.spans.clear()  # as if exported: keep the heap small
        with telemetry.send("q", batch) as send:
            stamped = send.stamp()
            send.submitted(entry)
        # What the consumer gets back: the stored tp (the stamp) in its row.
        if stamped[0].tp != attempt.tp:
            attempt = dataclasses.replace(attempt, tp=stamped[0].tp)
        telemetry.received("q", attempt, 2, taken_over=False)
        with telemetry.process("q", "consumer", attempt) as process:
            process.ended(outcome)
    elapsed = time.perf_counter() - started
    if sdk is not None:
        sdk.shutdown()
    return elapsed / n * 1e6


async def measure(url: str, n: int, rounds: int) -> None:
    await run_tasks(url, min(n, 500), "api")  # warm up the server and the code
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(rounds):
        for mode in MODES if r % 2 == 0 else reversed(MODES):
            times[mode].append(await run_tasks(url, n, mode))
    # The best round is the least disturbed by anything else on the machine;
    # the median is shown next to it.
    best = {mode: min(times[mode]) / n * 1e6 for mode in MODES}
    median = {mode: statistics.median(times[mode]) / n * 1e6 for mode in MODES}
    print(f"{n} no-op tasks, max_workers 100, {rounds} rounds, µs per task:")
    print(
        f"{'mode':<5} {'best':>7} {'overhead':>9} {'ratio':>6} "
        f"{'median':>7} {'overhead':>9}  rounds"
    )
    for mode in MODES:
        runs = " ".join(f"{t / n * 1e6:.0f}" for t in times[mode])
        print(
            f"{mode:<5} {best[mode]:7.1f} {best[mode] - best['off']:9.1f} "
            f"{best[mode] / best['off']:6.3f} {median[mode]:7.1f} "
            f"{median[mode] - median['off']:9.1f}  {runs}"
        )

    repeat = 20_000
    print(
        "\nkew's telemetry calls for one task alone (send, received, process), "
        f"best of 3 x {repeat}:"
    )
    print(f"{'mode':<5} {'µs/task':>9} {'overhead µs/task':>17}")
    alone = {mode: min(calls_alone(mode, repeat) for _ in range(3)) for mode in MODES}
    for mode in MODES:
        print(f"{mode:<5} {alone[mode]:9.2f} {alone[mode] - alone['off']:17.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, nargs="?", default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--url", help="a Redis server (default: embedded)")
    args = parser.parse_args()
    if args.url:
        asyncio.run(measure(args.url, args.n, args.rounds))
        return
    with EmbeddedServer() as server:
        assert server.url is not None
        asyncio.run(measure(server.url, args.n, args.rounds))


if __name__ == "__main__":
    main()
