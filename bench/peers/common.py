"""What every library's runner shares: the task body, the measurements, the CLI.

Standard library only: it is imported by runners that execute in each library's
own virtual environment, and by `bench/run.py`.

A runner (`bench/peers/run_<lib>.py`) answers four subcommands, one scenario
phase per process, and prints one JSON object on its last stdout line, then
leaves at once (`emit`: a library's task stuck at teardown cannot hold it):

    submit  --n N --mode single|batch|prepare [--batch B] [--fn noop|sleep]
    work    --n N --fn noop|sleep --concurrency C   (consumes N pre-submitted)
    serve   --concurrency C                         (prints "ready", runs until
                                                     stdin closes)
    latency --n N                                   (starts its own `serve`)

Every task runs `run_task(i, seconds)`: it counts itself in and out, so the
worker process knows how many of its tasks overlapped (the loop is single
threaded, so a counter is the exact overlap of start/end times), which indices
ran, and when the last one ended. A drain task sleeps 0 seconds: one yield to
the event loop, so that tasks in flight overlap and the limit can be observed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

QUEUE = "bench"
SLEEP_SECONDS = {"noop": 0.0, "sleep": 0.05}


@dataclass
class Recorder:
    """Counts tasks in and out in the worker process.

    `done` is set once every one of the `expected` indices has ended (run to
    its end), so the time taken is the time of the last of them; a task run
    twice counts once there and in `duplicates`."""

    expected: int = 0
    current: int = 0
    max_current: int = 0
    ended: int = 0
    seen: set[int] = field(default_factory=set[int])
    finished: set[int] = field(default_factory=set[int])
    duplicates: int = 0
    first_start: float = 0.0
    last_end: float = 0.0
    done: asyncio.Event | None = None

    def reset(self, expected: int) -> None:
        self.expected = expected
        self.current = self.max_current = self.ended = self.duplicates = 0
        self.first_start = self.last_end = 0.0
        self.seen = set()
        self.finished = set()
        self.done = asyncio.Event()

    def enter(self, i: int) -> None:
        if not self.seen:
            self.first_start = time.perf_counter()
        self.current += 1
        self.max_current = max(self.max_current, self.current)
        if i in self.seen:
            self.duplicates += 1
        self.seen.add(i)

    def leave(self, i: int) -> None:
        self.current -= 1
        self.ended += 1
        self.finished.add(i)
        if self.done is None or self.done.is_set():
            return
        self.last_end = time.perf_counter()
        if len(self.finished) >= self.expected:
            self.done.set()


RECORDER = Recorder()


async def run_task(i: int, seconds: float) -> int:
    """The body of every benchmark task."""
    RECORDER.enter(i)
    try:
        await asyncio.sleep(seconds)
    finally:
        RECORDER.leave(i)
    return i


# kew 0.2.1 pickles its task function: it must be importable by reference
# (a function of a script's __main__ would be pickled by value, with a copy of
# the recorder). These two live here for that reason.
async def plain_noop(i: int) -> int:
    return await run_task(i, 0.0)


async def plain_sleep(i: int) -> int:
    return await run_task(i, 0.05)


async def plain_echo(i: int) -> int:
    return i


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["submit", "work", "serve", "latency"])
    parser.add_argument("--url", default=os.environ.get("BENCH_REDIS_URL", ""))
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--fn", choices=sorted(SLEEP_SECONDS), default="noop")
    parser.add_argument("--mode", choices=["single", "batch", "prepare"])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--profile", default="", help="cProfile output (work)")
    parser.add_argument(
        "--tight",
        action="store_true",
        help="serve: poll at 1 ms where the library polls (for latency)",
    )
    args = parser.parse_args(argv)
    if not args.url:
        parser.error("--url (or BENCH_REDIS_URL) is required")
    return args


def host_port(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    return host, int(port)


def emit(result: dict[str, Any]) -> None:
    """Print the phase's result and leave at once. A library's task that
    ignores its cancellation would make asyncio.run wait for it forever at
    exit (taskiq's receiver once did, for 15 minutes); the result is out, the
    library's own shutdown has had its chance (`_bounded`), so nothing that
    could still run is worth waiting for."""
    print(json.dumps(result), flush=True)
    leave_now()


def leave_now(code: int = 0) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def work(
    n: int,
    fn: str,
    concurrency: int,
    start: Callable[[], Awaitable[Any]],
    stop: Callable[[Any], Awaitable[None]],
    left: Callable[[], Awaitable[int]] | None = None,
) -> dict[str, Any]:
    """Start a worker on N pre-submitted tasks; time it from the call that
    starts it to the end of the last of the N tasks. `completed` counts the
    distinct tasks that ran to their end, `ended` every run (a task run twice
    counts twice). `left` asks the library how many tasks it does not yet hold
    as finished (0 once every outcome is recorded); None if not asked."""
    RECORDER.reset(n)
    deadline = 30 + n * (SLEEP_SECONDS[fn] + 0.01)
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    handle = await start()
    assert RECORDER.done is not None
    timed_out = False
    try:
        await asyncio.wait_for(RECORDER.done.wait(), deadline)
    except TimeoutError:
        timed_out = True
    cpu = cpu_seconds() - cpu0
    seconds = RECORDER.last_end - t0
    remaining: int | None = None
    if left is not None and not timed_out:
        remaining = await _settle(left)
    stop_hung = not await _bounded(stop(handle))
    completed = len(RECORDER.finished)
    return {
        "n": n,
        "seconds": seconds,
        "tasks_per_s": n / seconds if seconds > 0 else 0.0,
        "first_task_after_s": RECORDER.first_start - t0,
        "completed": completed,
        "ended": RECORDER.ended,
        "duplicates": RECORDER.duplicates,
        "max_concurrency": RECORDER.max_current,
        "concurrency": concurrency,
        "cpu_s": cpu,
        "cpu_s_per_1000": cpu / max(completed, 1) * 1000,
        "left_unrecorded": remaining,
        "timed_out": timed_out,
        "stop_hung": stop_hung,
    }


async def _bounded(stopping: Awaitable[None], seconds: float = 15) -> bool:
    """Give a library's shutdown `seconds`; False if it did not return (the
    process exits anyway: the measurement is taken). `asyncio.wait`, not
    `wait_for`: a shutdown that ignores cancellation would hang `wait_for`."""
    task = asyncio.ensure_future(stopping)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        print(f"the worker did not stop within {seconds}s", file=sys.stderr)
        return False
    if task.exception() is not None:
        print(f"the worker's shutdown failed: {task.exception()!r}", file=sys.stderr)
    return True


async def _settle(left: Callable[[], Awaitable[int]]) -> int:
    """Wait (briefly) until the library has recorded every outcome."""
    remaining = await left()
    for _ in range(500):
        if remaining == 0:
            break
        await asyncio.sleep(0.01)
        remaining = await left()
    return remaining


async def submits(
    args: argparse.Namespace,
    single: Callable[[int], Awaitable[Any]],
    batch: Callable[[list[int]], Awaitable[Any]] | None,
    batch_api: str,
    queued: Callable[[], Awaitable[int]] | None = None,
) -> dict[str, Any]:
    """Submit N tasks one at a time (each awaited) or in batches; `prepare`
    submits the fastest way available and is not a measurement. `queued`
    asks the library how many tasks it holds as waiting, after the timing
    (the scenario requires N: nothing was lost)."""
    n = args.n
    mode = args.mode
    t0 = time.perf_counter()
    if mode == "single":
        for i in range(n):
            await single(i)
    else:
        size = args.batch
        for lo in range(0, n, size):
            ids = list(range(lo, min(lo + size, n)))
            if batch is not None:
                await batch(ids)
            else:
                await asyncio.gather(*(single(i) for i in ids))
    seconds = time.perf_counter() - t0
    return {
        "n": n,
        "mode": mode,
        "seconds": seconds,
        "submits_per_s": n / seconds,
        "batch_api": batch_api if mode != "single" else "",
        "queued": None if queued is None else await queued(),
    }


async def latency(
    n: int, one: Callable[[int], Awaitable[Any]], warmup: int = 20
) -> dict[str, Any]:
    """Submit one task and await its result, N times in sequence."""
    for i in range(warmup):
        assert await one(-1 - i) == -1 - i
    times: list[float] = []
    wrong = 0
    for i in range(n):
        t0 = time.perf_counter()
        value = await one(i)
        times.append((time.perf_counter() - t0) * 1000)
        wrong += value != i
    cuts = statistics.quantiles(times, n=100)
    return {
        "n": n,
        "p50_ms": statistics.median(times),
        "p99_ms": cuts[98],
        "mean_ms": statistics.fmean(times),
        "max_ms": max(times),
        "wrong_results": wrong,
    }


def start_server(
    command: list[str], log: Any = None, timeout: float = 60
) -> subprocess.Popen[str]:
    """Run a `serve` subcommand; return once it printed "ready". A worker
    that has not said so within `timeout` seconds is killed: RuntimeError."""
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    stdout = proc.stdout
    assert stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()))
    reader.start()
    reader.join(timeout)
    line = lines[0] if lines else ""
    if line.strip() != "ready":
        why = f"printed {line!r}" if lines else f"said nothing within {timeout}s"
        proc.kill()
        proc.wait()
        reader.join()
        raise RuntimeError(
            f"worker {command} did not start: it {why} instead of 'ready'; "
            "its stderr is in the scenario's log"
        )
    return proc


def stop_server(proc: subprocess.Popen[str], timeout: float = 15) -> None:
    """Close the worker's stdin (it stops gracefully), kill it if it hangs."""
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve_command(args: argparse.Namespace) -> list[str]:
    """The command that runs this runner's `serve` for a latency client."""
    script = sys.argv[0]
    return [sys.executable, script, "serve", "--url", args.url, "--tight"]


async def serve(
    start: Callable[[], Awaitable[Any]], stop: Callable[[Any], Awaitable[None]]
) -> None:
    """Run a worker until stdin closes."""
    handle = await start()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await _bounded(stop(handle))
    leave_now()  # as emit(): nothing left to wait for


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


Command = Callable[[argparse.Namespace], Awaitable[dict[str, Any]]]


def run(
    commands: dict[str, Command],
    serve_forever: Callable[[argparse.Namespace], Awaitable[None]],
) -> None:
    """A runner's entry point: `serve` runs the worker until stopped; the other
    commands run one scenario step and print its JSON result."""

    async def main() -> None:
        args = parse_args()
        if args.command == "serve":
            await serve_forever(args)
            return
        emit(await commands[args.command](args))

    asyncio.run(main())
