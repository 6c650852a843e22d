"""kew-only rows, each run in a fresh process by `bench/run.py`; JSON on stdout.

recovery --runs R       seconds from SIGKILL to the takeover (recovery.py)
commands --n N          round trips and server commands per task
                        (commands_per_task.py)
rebuild --events E --reps R [--log submitted|drain] [--profile FILE]
                        write a log of E events (task.submitted only, with
                        submit_tasks; or a drained queue's: submitted,
                        started, succeeded), then time rebuild_projections
                        R times; also the log's MEMORY USAGE per entry
inproc --n N            submit-and-await latency with the consumer in the
                        same process (what the floor measures)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import statistics
import time
from typing import Any

import commands_per_task
import recovery

import kew
from kew import QueueConfig, TaskQueueManager
from kew.keys import QueueKeys


@kew.task(name="bench.noop")
async def noop(i: int) -> int:
    return i


async def run_recovery(args: argparse.Namespace) -> dict[str, Any]:
    times = await recovery.measure(args.url, args.runs)
    return {"runs": times, "median_s": statistics.median(times), "max_s": max(times)}


async def run_commands(args: argparse.Namespace) -> dict[str, Any]:
    sent, server = await commands_per_task.measure(args.url, args.n)
    n = args.n
    return {
        "n": n,
        "round_trips_per_task": sum(sent.values()) / n,
        "round_trips": {
            k: v / n for k, v in sorted(sent.items(), key=lambda kv: -kv[1])
        },
        "commands_per_task": sum(server.values()) / n,
        "commands": {
            k: v / n for k, v in sorted(server.items(), key=lambda kv: -kv[1])
        },
    }


async def memory_per_entry(client: Any, key: str) -> dict[str, float]:
    length = int(await client.xlen(key))
    used = int(await client.memory_usage(key, samples=0) or 0)
    return {"entries": length, "bytes": used, "bytes_per_entry": used / max(length, 1)}


async def write_log(m: TaskQueueManager, events: int, kind: str) -> None:
    """A log of about `events` events on queue "rebuild": task.submitted only
    (`submitted`, the most task hashes per event, the worst case for a
    rebuild), or a drained queue's (`drain`: submitted, started, succeeded)."""
    tasks = events if kind == "submitted" else events // 3
    for lo in range(0, tasks, 1000):
        batch = [
            {"task_id": f"t{i}", "task_func": "bench.noop", "args": [i]}
            for i in range(lo, min(lo + 1000, tasks))
        ]
        await m.submit_tasks("rebuild", batch)
    if kind == "drain":
        await m.attach_queue("rebuild")
        # About 25,000 tasks/s here; a tenth of that is a drain gone wrong.
        limit = 60 + tasks / 2_500
        deadline = time.monotonic() + limit
        while (status := await m.get_queue_status("rebuild"))[
            "completed_tasks"
        ] < tasks:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the rebuild's drain completed {status['completed_tasks']} of "
                    f"{tasks} tasks in {limit:.0f}s (failed: "
                    f"{status['failed_tasks']}); see the consumer's log above"
                )
            await asyncio.sleep(0.1)


async def run_rebuild(args: argparse.Namespace) -> dict[str, Any]:
    events = args.events
    config = QueueConfig(name="rebuild", max_workers=100, max_size=events + 1)
    t0 = time.perf_counter()
    async with TaskQueueManager(args.url, consume=False, key_prefix="rb") as m:
        await m.create_queue(config)
    async with TaskQueueManager(args.url, key_prefix="rb") as m:
        await write_log(m, events, args.log)
    write_s = time.perf_counter() - t0
    async with TaskQueueManager(args.url, consume=False, key_prefix="rb") as m:
        keys = QueueKeys("rb", "rebuild")
        memory = await memory_per_entry(m.client, keys.log)
        times: list[float] = []
        cpu: list[float] = []
        folded = 0
        for rep in range(args.reps):
            profile = cProfile.Profile() if args.profile and rep == 0 else None
            t0, c0 = time.perf_counter(), time.process_time()
            if profile is not None:
                profile.enable()
            fold = await m.rebuild_projections("rebuild")
            if profile is not None:
                profile.disable()
                profile.dump_stats(args.profile)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            folded = fold
        differences = await m.verify_projections("rebuild")
    median = statistics.median(times)
    return {
        "log": args.log,
        "events": memory["entries"],
        "folded": folded,
        "write_s": write_s,
        "write_events_per_s": memory["entries"] / write_s,
        "rebuild_s": times,
        "rebuild_cpu_s": cpu,
        "median_s": median,
        "events_per_s": memory["entries"] / median,
        "verify_differences": len(differences),
        "memory": memory,
    }


async def run_inproc(args: argparse.Namespace) -> dict[str, Any]:
    config = QueueConfig(name="inproc", max_workers=100, max_size=1_000_000)
    async with TaskQueueManager(args.url, key_prefix="ip") as m:
        await m.create_queue(config)
        times: list[float] = []
        for i in range(args.n + 20):
            t0 = time.perf_counter()
            await m.submit_task(f"l{i}", "inproc", "bench.noop", i)
            info = await m.wait_for_task(f"l{i}", timeout=30)
            assert info.result == i
            if i >= 20:
                times.append((time.perf_counter() - t0) * 1000)
    return {
        "n": args.n,
        "p50_ms": statistics.median(times),
        "p99_ms": statistics.quantiles(times, n=100)[98],
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "command", choices=["recovery", "commands", "rebuild", "inproc"]
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--profile", default="")
    parser.add_argument("--log", choices=["submitted", "drain"], default="submitted")
    args = parser.parse_args()
    commands = {
        "recovery": run_recovery,
        "commands": run_commands,
        "rebuild": run_rebuild,
        "inproc": run_inproc,
    }
    print(json.dumps(await commands[args.command](args)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
