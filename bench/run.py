"""The benchmark suite of issue 7: kew against its peers, in one run.

    .venv/bin/python bench/run.py [--reps 3] [--smoke] [--only kew,arq,...]
                                  [--scale 0.1] [--no-extras]

Starts a private server (redis-server from PATH, else kew's embedded Valkey
binary; 127.0.0.1, a free port, no persistence), makes one virtual environment
per library under bench/.venvs/ (reused while its pinned package list is
unchanged), runs every scenario of every library in fresh processes,
repetitions interleaved (rep 1 of every library, then rep 2, ..., the order of
the libraries rotated by one each rep), then the kew-only rows and the
bare-loop floor. A phase that outlives its timeout is killed and its row marked
failed; the others go on. Every row is appended to
bench/results/raw/<timestamp>/rows.jsonl as it is made; at the end the tables
are printed and everything is saved to bench/results/<timestamp>.json, with the
commit measured. Exits non-zero if a verification failed (see README.md for
what is verified).

`--smoke`: bench/selfcheck.py, then a few hundred tasks per scenario, kew only,
one rep (CI).
`--scale F`: every task count times F, for a quick look.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from venvs import BENCH, LIBS, ensure, repo_venv_problem, versions

# What follows needs redis-py, rich and this repository's kew: say how to get
# them before an ImportError would.
if __name__ == "__main__" and (problem := repo_venv_problem()):
    sys.exit(problem)

from redis_server import private_redis
from report import describe, print_tables, summarize
from scenarios import FULL, SMOKE, Scenarios, Sizes, failed_row

RESULTS = BENCH / "results"


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated: " + ",".join(LIBS))
    parser.add_argument("--no-extras", action="store_true", help="skip kew-only rows")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every task count by this (e.g. 0.1 for a quick look; "
        "not for quoted results)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.reps = 1
        args.only = args.only or "kew"
    names = [n for n in args.only.split(",") if n] or list(LIBS)
    unknown = sorted(set(names) - set(LIBS))
    if unknown:
        parser.error(f"unknown libraries {unknown}; choose from {list(LIBS)}")
    if args.scale <= 0:
        parser.error(f"--scale must be above 0, not {args.scale!r}")
    args.libs = names
    return args


class Journal:
    """Every row and kew-only result appended to a JSONL file as it is made,
    so a run that dies keeps what it measured."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] = path.open("a")

    def write(self, kind: str, data: dict[str, Any]) -> None:
        self._file.write(json.dumps({"kind": kind, **data}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def rotated(libs: list[str], rep: int) -> list[str]:
    """The libraries in the order of rep `rep`: each rep starts one further
    along, so no library always runs first (or right after the same one)."""
    k = rep % len(libs)
    return libs[k:] + libs[:k]


def common_rows(
    runner: Scenarios, libs: list[str], reps: int, journal: Journal
) -> list[dict[str, Any]]:
    steps: list[tuple[str, Any]] = [
        ("drain", lambda lib, rep: runner.work(lib, rep, "noop")),
        ("sleep", lambda lib, rep: runner.work(lib, rep, "sleep")),
        ("single submit", lambda lib, rep: runner.submits(lib, rep, "single")),
        ("batch submit", lambda lib, rep: runner.submits(lib, rep, "batch")),
        ("latency", lambda lib, rep: runner.latency(lib, rep)),
    ]
    rows: list[dict[str, Any]] = []
    for rep in range(reps):
        for name in rotated(libs, rep):
            for scenario, step in steps:
                try:
                    row = step(LIBS[name], rep)
                except Exception as exc:  # the suite goes on; the row says why
                    row = failed_row(name, scenario, rep, _why(exc))
                rows.append(row)
                journal.write("row", row)
                flag = "" if row["ok"] else f"  FAILED {_failed(row)}"
                value = "-" if row["value"] is None else f"{row['value']:,.2f}"
                say(f"rep {rep + 1} {name:7} {scenario:14} {value} {row['unit']}{flag}")
    for name in libs:
        try:
            row = runner.idle(LIBS[name])
        except Exception as exc:
            row = failed_row(name, "idle", 0, _why(exc))
        rows.append(row)
        journal.write("row", row)
        say(f"idle   {name:7} {row['value']} {row['unit']}")
    return rows


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _failed(row: dict[str, Any]) -> str:
    failed = [name for name, ok in row["checks"].items() if not ok]
    error = row["raw"].get("error")
    return f"{failed} {error}" if error else str(failed)


def kew_extras(
    runner: Scenarios, sizes: Sizes, reps: int, journal: Journal
) -> dict[str, Any]:
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
        except Exception as exc:
            out[name] = {"error": _why(exc)}
            say(f"kew only: {name} FAILED {out[name]['error']}")
        journal.write("extra", {"name": name, "result": out[name]})
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
    if args.smoke:
        import selfcheck  # the suite's own logic, on made-up rows (seconds)

        selfcheck.main()
    sizes = SMOKE if args.smoke else FULL
    if args.scale != 1.0:
        sizes = sizes.scaled(args.scale)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / "raw" / stamp
    logs.mkdir(parents=True, exist_ok=True)
    started = time.time()
    source = commit()
    say(f"kew at {describe(source)}")
    for name in args.libs:
        say(f"venv for {name} ...")
        ensure(LIBS[name], logs / "pip.log")
    journal = Journal(logs / "rows.jsonl")
    say(f"rows are appended to {journal.path.relative_to(BENCH.parent)} as they come")
    with private_redis() as server:
        redis_version = server.version()
        say(f"private server: {server.binary} ({redis_version}) at {server.url}")
        result: dict[str, Any] = {
            "started": stamp,
            "command": " ".join(sys.argv),
            "commit": source,
            "smoke": args.smoke,
            "scale": args.scale,
            "reps": args.reps,
            "sizes": {**sizes.__dict__, "sleep_ideal_s": sizes.sleep_ideal_s},
            "machine": machine(),
            "redis": redis_version,
            "redis_binary": str(server.binary),
            "versions": {name: versions(LIBS[name]) for name in args.libs},
        }
        journal.write("run", result)
        runner = Scenarios(server, sizes, logs)
        rows = common_rows(runner, args.libs, args.reps, journal)
        extras: dict[str, Any] = {}
        if "kew" in args.libs and not args.no_extras:
            extras = kew_extras(runner, sizes, args.reps, journal)
    journal.close()
    result.update(seconds=time.time() - started, extras=extras, rows=rows)
    # Reduced runs are not for quoting: their files are ignored by git.
    reduced = "-smoke" if args.smoke else "-scaled" if args.scale != 1.0 else ""
    path = RESULTS / f"{stamp}{reduced}.json"
    path.write_text(json.dumps(result, indent=1))  # before anything can fail
    summary = summarize(rows, extras, sizes.sleep_ideal_s)
    path.write_text(json.dumps({**result, "summary": summary}, indent=1))
    print_tables(rows, extras, summary, header=result)
    say(f"raw rows saved to {path.relative_to(BENCH.parent)}")
    return 1 if problems(rows, extras) else 0


def commit() -> dict[str, Any]:
    """The commit the run measured, and whether the tree differed from it
    (bench/results/, where runs are written, does not count)."""

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", *argv],
            cwd=BENCH.parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    except (OSError, subprocess.CalledProcessError) as exc:
        return {"head": None, "dirty": None, "error": _why(exc)}
    lines = changed.splitlines()
    return {"head": head, "dirty": bool(lines), "changed": lines}


def problems(rows: list[dict[str, Any]], extras: dict[str, Any]) -> list[str]:
    """What makes the run fail: a kew row that failed any check (reaching the
    limit included, in the drain too), a row of any library that crashed or
    hung past its timeout (the suite is broken for it), a kew-only measure
    that failed, projections that disagree with the log after a rebuild. A
    peer's failed check (a duplicate run, a limit not reached) is that peer's
    result: marked in the table and left out of the best peer."""
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
