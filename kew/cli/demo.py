"""`kew demo`: a short workload that shows what kew does and what happened."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, cast

import redis.asyncio as aioredis
from opentelemetry import trace
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress
from rich.text import Text

from kew.connection import make_client, resolve_url, safe_url
from kew.errors import ConfigurationError, KewError
from kew.functions import guarded
from kew.keys import DEFAULT_PREFIX, PREFIX_ENV, QueueKeys, check_prefix
from kew.manager import TaskQueueManager
from kew.models import QueueConfig, TaskInfo, TaskStatus
from kew.registry import task

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    from kew.cli.otlp import OtlpExport

from kew.cli.base import AddParser, positive_int
from kew.cli.output import Column, Output, show_value, timeline

__all__ = ["add_demo", "demo"]

# -- kew demo -------------------------------------------------------------

DEMO_QUEUE = "demo"
FAIL_EVERY = 7


class DemoTaskError(Exception):
    """The failure the demo provokes on purpose."""


@task(name="kew.demo")
async def demo_task(number: int) -> dict[str, Any]:
    """Sleep a moment and return a small result; every 7th task fails."""
    delay = random.uniform(0.05, 0.3)
    await asyncio.sleep(delay)
    if number % FAIL_EVERY == 0:
        raise DemoTaskError(
            f"Demo task {number} failed on purpose (every {FAIL_EVERY}th one does)."
        )
    return {"square": number * number, "slept": round(delay, 3)}


def add_demo(add_parser: AddParser) -> None:
    parser = add_parser(
        "demo",
        help="run a short workload and show what happened",
        description="Run tasks on a queue 'demo' and show what happened. On a "
        "server given by URL it works under a fresh prefix (kew-demo-<hex>, unless "
        "--prefix is given) and deletes its keys at the end.",
    )
    parser.add_argument(
        "--tasks", type=positive_int, default=40, help="tasks to run (default 40)"
    )
    parser.add_argument(
        "--workers", type=positive_int, default=8, help="tasks at once (default 8)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="leave the demo's keys on the server"
    )
    parser.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="export the demo's traces and metrics over OTLP/HTTP to this base "
        "URL, e.g. http://localhost:4318 (Jaeger); needs kew[otel]",
    )
    parser.set_defaults(run=demo)


async def demo(args: argparse.Namespace) -> int:
    console = Output().console
    if not args.otlp_endpoint:
        return await _demo(console, args, None)
    export = _otlp_export(args.otlp_endpoint)
    try:
        code = await _demo(
            console, args, (export.tracer_provider, export.meter_provider)
        )
    finally:
        # Blocking HTTP: the last batches of spans and metric points.
        failed = await asyncio.to_thread(export.close)
        _say_what_was_sent(console, export.endpoint, failed)
    return 1 if failed else code


def _say_what_was_sent(console: Console, endpoint: str, failed: set[str]) -> None:
    if not failed:
        console.print(f"Sent traces and metrics to {endpoint}.")
        return
    what = " and ".join(signal for signal in ("traces", "metrics") if signal in failed)
    Console(stderr=True).print(
        f"Could not send the demo's {what} to {endpoint!r}: the OTLP exporter "
        "gave up (its log lines above say why). Check that an OTLP/HTTP "
        "collector listens there, e.g. Jaeger on port 4318.",
        style="bold red",
    )


async def _demo(
    console: Console, args: argparse.Namespace, providers: _Providers | None
) -> int:
    url = resolve_url(args.redis_url)
    if url is None:
        prefix = check_prefix(
            args.prefix or os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX
        )
        console.print(
            "Server: embedded (no --redis-url or KEW_REDIS_URL given); it stops, "
            f"data and all, when the demo ends.\nKey prefix: {prefix!r}"
        )
        if args.keep:
            console.print("--keep is moot: the embedded server's data goes with it.")
        await _run_demo(console, None, prefix, args.tasks, args.workers, providers)
        return 0

    # Deliberately not $KEW_KEY_PREFIX: that is where the user's real queues live.
    prefix = check_prefix(args.prefix or f"kew-demo-{secrets.token_hex(4)}")
    client = make_client(url, max_connections=2)
    try:
        await _check_unused(client, url, prefix)
        console.print(f"Server: {safe_url(url)}\nKey prefix: {prefix!r}")
        try:
            await _run_demo(console, url, prefix, args.tasks, args.workers, providers)
        finally:
            if args.keep:
                console.print(
                    f"Kept the keys under {prefix + ':*'!r} (--keep); read the log "
                    f"with XRANGE {QueueKeys(prefix, DEMO_QUEUE).log} - +"
                )
            else:
                deleted = await _delete_prefix(client, prefix)
                console.print(f"Deleted the demo's {deleted} keys under {prefix!r}.")
    finally:
        await client.aclose()
    return 0


async def _run_demo(
    console: Console,
    url: str | None,
    prefix: str,
    tasks: int,
    workers: int,
    providers: _Providers | None = None,
) -> None:
    tracer_provider, meter_provider = providers or (None, None)
    async with TaskQueueManager(
        redis_url=url,
        key_prefix=prefix,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    ) as manager:
        # The failures are deliberate: a breaker opened by them would hold the
        # rest of the demo back for its reset timeout.
        config = QueueConfig(
            name=DEMO_QUEUE,
            max_workers=workers,
            max_size=max(tasks, 1000),
            circuit_breaker_max_failures=tasks,
        )
        await manager.create_queue(config)

        started = time.perf_counter()
        width = len(str(tasks))
        task_ids = [f"demo-{n:0{width}d}" for n in range(1, tasks + 1)]
        # One span around the submissions: the whole demo is one trace.
        tracer = trace.get_tracer("kew.cli", tracer_provider=tracer_provider)
        with tracer.start_as_current_span("kew demo") as span:
            for number, task_id in enumerate(task_ids, start=1):
                await manager.submit_task(task_id, DEMO_QUEUE, demo_task, number)
        if providers is not None:
            trace_id = span.get_span_context().trace_id
            console.print(f"Trace id of the demo: {trace_id:032x}")
        # Generous: the tasks need about tasks / workers * 0.175 s.
        timeout = 30.0 + tasks / workers * 0.3
        infos = await _wait_with_progress(console, manager, task_ids, timeout)
        elapsed = time.perf_counter() - started

        console.print(f"{tasks} tasks on {workers} worker slots in {elapsed:.2f} s.")
        await _report(console, manager, infos)


_Providers = tuple["TracerProvider", "MeterProvider"]


def _otlp_export(endpoint: str) -> OtlpExport:
    """SDK providers exporting over OTLP/HTTP to the base URL `endpoint`."""
    try:
        from kew.cli.otlp import OtlpExport
    except ImportError as exc:
        raise ConfigurationError(
            f"--otlp-endpoint needs the OpenTelemetry SDK and its OTLP exporter "
            f"({exc.name} is missing): pip install 'kew[otel]'."
        ) from None
    return OtlpExport(endpoint, "kew-demo")


async def _report(
    console: Console, manager: TaskQueueManager, infos: list[TaskInfo]
) -> None:
    """Outcomes, queue status, a failed task's log, and a check of the projections."""
    output = Output(console)
    failed = [info for info in infos if info.status is TaskStatus.FAILED]
    _print_outcomes(output, infos)
    status = await manager.get_queue_status(DEMO_QUEUE)
    rows = [(name, show_value(value)) for name, value in status.items()]
    columns = (Column("field", wrap=False), Column("value", justify="right"))
    output.table(columns, rows, title=f"get_queue_status({DEMO_QUEUE!r})", header=False)

    if failed:
        task_id = failed[0].task_id
        events = await manager.get_task_history(task_id)
        title = f"The history of failed task {task_id!r}"
        timeline(output, title, events, plain_title=True)
        note = f"(the same with `kew history {task_id}` against a shared server"
        if any(event.trace_id for event in events):
            note += "; each event's trace id leads to the task's trace"
        output.line(note + ")")

    differences = await manager.verify_projections(DEMO_QUEUE)
    if differences:
        output.line("Projections differ from the log:", style="bold red")
        for difference in differences:
            output.line(f"  {difference}")
    else:
        output.line("Verified: projections agree with the log.", style="green")


async def _wait_with_progress(
    console: Console, manager: TaskQueueManager, task_ids: list[str], timeout: float
) -> list[TaskInfo]:
    """Wait for every task, advancing a progress bar as each one ends."""
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("tasks ended", total=len(task_ids))

        async def wait(task_id: str) -> TaskInfo:
            info = await manager.wait_for_task(task_id, timeout=timeout)
            progress.advance(bar)
            return info

        try:
            async with asyncio.TaskGroup() as group:
                waits = [group.create_task(wait(task_id)) for task_id in task_ids]
        except* KewError as errors:
            raise errors.exceptions[0] from None

    return [w.result() for w in waits]


_STATUS_STYLE = {TaskStatus.COMPLETED: "green", TaskStatus.FAILED: "red"}
_OUTCOME_COLUMNS = (
    Column("task", wrap=False),
    Column("status", wrap=False),
    Column("attempt", justify="right"),
    Column("result or error"),
    Column("run time", wrap=False, justify="right"),
)


def _print_outcomes(output: Output, infos: list[TaskInfo]) -> None:
    rows: list[list[str | Text]] = []
    for info in infos:
        outcome = info.error or json.dumps(info.result, separators=(",", ":"))
        run_time = ""
        if info.started_time is not None and info.completed_time is not None:
            seconds = (info.completed_time - info.started_time).total_seconds()
            run_time = f"{seconds:.3f} s"
        status = Text(info.status.value, style=_STATUS_STYLE.get(info.status, ""))
        rows.append([info.task_id, status, str(info.attempt), Text(outcome), run_time])
    counts = Counter(info.status.value for info in infos)
    caption = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    output.table(
        _OUTCOME_COLUMNS, rows, title="Outcomes", caption=caption, plain_title=True
    )


async def _check_unused(client: aioredis.Redis, url: str, prefix: str) -> None:
    """Refuse a prefix that already holds keys: the demo deletes everything
    under its prefix at the end, so it must own all of it."""
    cursor, keys = await _scan(client, prefix, 0)
    while not keys and cursor != 0:
        cursor, keys = await _scan(client, prefix, cursor)
    if keys:
        raise KewError(
            f"Key prefix {prefix!r} already holds keys on {safe_url(url)} "
            f"(e.g. {keys[0]!r}), and the demo deletes everything under its "
            "prefix when it ends. Leave out --prefix to get a fresh one, or "
            "pick an unused prefix."
        )


async def _delete_prefix(client: aioredis.Redis, prefix: str) -> int:
    """UNLINK every key under `prefix:` and return how many there were."""
    deleted = 0
    cursor, keys = await _scan(client, prefix, 0)
    while True:
        for i in range(0, len(keys), 500):
            deleted += await guarded(client.unlink(*keys[i : i + 500]))
        if cursor == 0:
            return deleted
        cursor, keys = await _scan(client, prefix, cursor)


async def _scan(
    client: aioredis.Redis, prefix: str, cursor: int
) -> tuple[int, list[str]]:
    """One SCAN page of the keys under `prefix:`. `check_prefix` admits no glob
    characters, so the pattern matches the prefix literally."""
    reply = await guarded(client.scan(cursor, match=f"{prefix}:*", count=1000))
    return cast(tuple[int, list[str]], reply)
