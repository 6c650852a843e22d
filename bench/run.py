"""The benchmark suite of issue 7: kew against its peers, in one run.

    .venv/bin/python bench/run.py [--reps 3] [--smoke] [--only kew,arq,...]

Starts a private Redis (Debian's redis-server, 127.0.0.1, a free port, no
persistence), makes one virtual environment per library under bench/.venvs/
(reused when present), runs every scenario of every library in fresh
processes, repetitions interleaved (rep 1 of every library, then rep 2, ...),
then the kew-only rows and the bare-loop floor. Prints the tables, saves every
raw row to bench/results/<timestamp>.json, and exits non-zero if a
verification failed (see README.md for what is verified).

`--smoke`: a few hundred tasks per scenario, kew only, one rep (CI).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from redis_server import private_redis
from report import print_tables, summarize
from scenarios import FULL, SMOKE, Failed, Scenarios, Sizes, failed_row
from venvs import BENCH, LIBS, ensure, versions

RESULTS = BENCH / "results"


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated: " + ",".join(LIBS))
    parser.add_argument("--no-extras", action="store_true", help="skip kew-only rows")
    args = parser.parse_args()
    if args.smoke:
        args.reps = 1
        args.only = args.only or "kew"
    names = [n for n in args.only.split(",") if n] or list(LIBS)
    unknown = sorted(set(names) - set(LIBS))
    if unknown:
        parser.error(f"unknown libraries {unknown}; choose from {list(LIBS)}")
    args.libs = names
    return args


def common_rows(runner: Scenarios, libs: list[str], reps: int) -> list[dict[str, Any]]:
    steps: list[tuple[str, Any]] = [
        ("drain", lambda lib, rep: runner.work(lib, rep, "noop")),
        ("sleep", lambda lib, rep: runner.work(lib, rep, "sleep")),
        ("single submit", lambda lib, rep: runner.submits(lib, rep, "single")),
        ("batch submit", lambda lib, rep: runner.submits(lib, rep, "batch")),
        ("latency", lambda lib, rep: runner.latency(lib, rep)),
    ]
    rows: list[dict[str, Any]] = []
    for rep in range(reps):
        for name in libs:
            for scenario, step in steps:
                try:
                    row = step(LIBS[name], rep)
                except (Failed, OSError, ValueError, KeyError) as exc:
                    row = failed_row(name, scenario, rep, str(exc))
                rows.append(row)
                flag = "" if row["ok"] else f"  FAILED {row['checks']}"
                value = "-" if row["value"] is None else f"{row['value']:,.2f}"
                say(f"rep {rep + 1} {name:7} {scenario:14} {value} {row['unit']}{flag}")
    for name in libs:
        try:
            row = runner.idle(LIBS[name])
        except (Failed, OSError, RuntimeError) as exc:
            row = failed_row(name, "idle", 0, str(exc))
        rows.append(row)
        say(f"idle   {name:7} {row['value']} {row['unit']}")
    return rows


def kew_extras(runner: Scenarios, sizes: Sizes, reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    jobs: list[tuple[str, Any]] = [
        ("recovery", lambda: runner.extra("recovery", ["--runs", str(reps)])),
        ("commands", lambda: runner.extra("commands", ["--n", str(sizes.commands_n)])),
        ("inproc", lambda: runner.extra("inproc", ["--n", str(sizes.latency)])),
        ("rebuild", lambda: _rebuild(runner, sizes, reps, "submitted")),
        ("rebuild_drain", lambda: _rebuild(runner, sizes, reps, "drain")),
        ("floor_drain", lambda: _floor(runner, "drain", sizes.drain, reps)),
        ("floor_latency", lambda: _floor(runner, "latency", sizes.latency, reps)),
    ]
    for name, job in jobs:
        say(f"kew only: {name} ...")
        try:
            out[name] = job()
        except Failed as exc:
            out[name] = {"error": str(exc)}
    return out


def _rebuild(runner: Scenarios, sizes: Sizes, reps: int, log: str) -> dict[str, Any]:
    argv = ["--events", str(sizes.rebuild_events), "--reps", str(reps), "--log", log]
    return runner.extra("rebuild", argv)


def _floor(runner: Scenarios, what: str, n: int, reps: int) -> dict[str, Any]:
    runs = [runner.floor(what, ["--n", str(n)]) for _ in range(reps)]
    key = "tasks_per_s" if what == "drain" else "p50_ms"
    return {key: statistics.median(r[key] for r in runs), "runs": runs}


def main() -> int:
    args = parse()
    sizes = SMOKE if args.smoke else FULL
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / "raw" / stamp
    logs.mkdir(parents=True, exist_ok=True)
    started = time.time()
    for name in args.libs:
        say(f"venv for {name} ...")
        ensure(LIBS[name], logs / "pip.log")
    with private_redis() as server:
        say(f"private Redis {server.version()} at {server.url}")
        runner = Scenarios(server, sizes, logs)
        rows = common_rows(runner, args.libs, args.reps)
        extras = {}
        if "kew" in args.libs and not args.no_extras:
            extras = kew_extras(runner, sizes, args.reps)
        redis_version = server.version()
    summary = summarize(rows, extras)
    result = {
        "started": stamp,
        "seconds": time.time() - started,
        "command": " ".join(sys.argv),
        "smoke": args.smoke,
        "reps": args.reps,
        "sizes": sizes.__dict__,
        "machine": machine(),
        "redis": redis_version,
        "versions": {name: versions(LIBS[name]) for name in args.libs},
        "summary": summary,
        "extras": extras,
        "rows": rows,
    }
    path = RESULTS / f"{stamp}{'-smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    print_tables(rows, extras, summary)
    say(f"raw rows saved to {path.relative_to(BENCH.parent)}")
    return 1 if problems(rows, extras) else 0


def problems(rows: list[dict[str, Any]], extras: dict[str, Any]) -> list[str]:
    """What makes the run fail: a kew row that failed any check (reaching the
    limit included, in the drain too), a row of any library that crashed (the
    suite is broken for it), a kew-only row that crashed, projections that
    disagree with the log after a rebuild. A peer's failed check (a duplicate
    run, a limit not reached) is that peer's result: marked in the table."""
    found: list[str] = []
    for r in rows:
        crashed = not r["checks"].get("ran", True)
        kew_failed = r["lib"] == "kew" and not all(r["checks"].values())
        if crashed or kew_failed:
            why = r["raw"].get("error") or r["checks"]
            found.append(f"{r['lib']} {r['scenario']} rep {r['rep'] + 1}: {why}")
    found += [f"{name}: {e['error']}" for name, e in extras.items() if "error" in e]
    for name in ("rebuild", "rebuild_drain"):
        if extras.get(name, {}).get("verify_differences"):
            found.append(f"{name}: projections differ from the log")
    for text in found:
        say(f"VERIFICATION FAILED: {text}")
    return found


def machine() -> dict[str, Any]:
    cpus = [
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "cpus": len(cpus),
        "cpu": cpus[0] if cpus else "",
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": sys.version.split()[0],
    }


if __name__ == "__main__":
    sys.exit(main())
