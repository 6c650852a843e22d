"""Running one scenario of one library: fresh processes against the private
Redis (flushed first), and one result row.

A row: {"lib", "scenario", "rep", "value", "unit", "ok", "checks", "raw"}.
`ok` is False when a verification failed (or the scenario crashed); the row
then says why in `checks`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis_server import PrivateRedis, delta
from venvs import BENCH, Lib

sys.path.insert(0, str(BENCH / "peers"))
import common


@dataclass(frozen=True)
class Sizes:
    drain: int = 20_000
    sleep: int = 2_000
    latency: int = 500
    submits: int = 20_000
    batch: int = 1_000
    concurrency: int = 100
    idle_seconds: float = 5.0
    rebuild_events: int = 1_000_000
    commands_n: int = 1_000
    timeout: float = 900.0
    """Seconds one phase (one process) may take before it is killed."""

    @property
    def sleep_ideal_s(self) -> float:
        """The sleep row's ideal: every slot busy all the time."""
        return self.sleep * common.SLEEP_SECONDS["sleep"] / self.concurrency

    def scaled(self, factor: float) -> Sizes:
        """Every task count times `factor`, for a quick look, but never so few
        that the limit cannot be reached or a percentile means nothing;
        concurrency, batch size, idle time and timeout stay."""
        least = {
            "drain": 2 * self.concurrency,
            "sleep": 2 * self.concurrency,
            "submits": 2 * self.concurrency,
            "latency": 20,
            "rebuild_events": 3_000,
            "commands_n": 100,
        }
        changed = {
            name: max(low, round(getattr(self, name) * factor))
            for name, low in least.items()
        }
        return dataclasses.replace(self, **changed)


FULL = Sizes()
SMOKE = Sizes(
    drain=500,
    sleep=300,
    latency=100,
    submits=500,
    batch=100,
    idle_seconds=1.0,
    rebuild_events=5_000,
    commands_n=200,
    timeout=120.0,
)


class Failed(Exception):
    pass


class Scenarios:
    def __init__(self, server: PrivateRedis, sizes: Sizes, logs: Path) -> None:
        self.server = server
        self.sizes = sizes
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)

    def call(self, lib: Lib, what: str, argv: list[str]) -> dict[str, Any]:
        """Run a runner subcommand; its JSON result (stderr goes to a log)."""
        return self.run([str(lib.python), str(lib.runner), *argv], lib.name, what)

    def run(self, command: list[str], name: str, what: str) -> dict[str, Any]:
        """Run one phase in its own process group; its JSON result. A phase
        that outlives `sizes.timeout` is killed with everything it started
        (a latency phase's worker included): Failed, as is a crash."""
        log = self.logs / f"{name}-{what}.log"
        with log.open("a") as err:
            err.write(f"\n$ {' '.join(command)}\n")
            err.flush()
            proc = subprocess.Popen(
                [*command, "--url", self.server.url],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=BENCH.parent,
                start_new_session=True,
            )
            try:
                out, _ = proc.communicate(timeout=self.sizes.timeout)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                proc.communicate()
                raise Failed(
                    f"{what} did not finish within {self.sizes.timeout:.0f}s and "
                    f"was killed; see {log}"
                ) from None
            except BaseException:  # Ctrl-C included: leave nothing running
                kill_group(proc)
                proc.communicate()
                raise
            # A child the phase left behind is not part of any later phase.
            kill_group(proc)
        lines = out.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise Failed(f"{what} exited {proc.returncode}; see {log}")
        try:
            return dict(json.loads(lines[-1]))
        except ValueError:
            raise Failed(f"{what} printed no JSON result; see {log}") from None

    # -- the common scenarios -------------------------------------------

    def work(self, lib: Lib, rep: int, fn: str) -> dict[str, Any]:
        """drain (fn=noop) or sleep: pre-submit, then one worker process."""
        s = self.sizes
        n = s.drain if fn == "noop" else s.sleep
        scenario = "drain" if fn == "noop" else "sleep"
        c = str(s.concurrency)
        self.server.flush()
        argv = ["--n", str(n), "--fn", fn, "--concurrency", c]
        self.call(lib, f"{scenario}-submit", ["submit", "--mode", "prepare", *argv])
        before = self.server.snapshot()
        raw = self.call(lib, scenario, ["work", *argv])
        used = delta(before, self.server.snapshot())
        raw["commands_per_task"] = used["commands"] / n
        raw["server_cpu_s_per_1000"] = used["server_cpu_s"] / n * 1000
        raw["by_command"] = used["by_command"]
        if lib.name == "kew":
            raw["log"] = self.log_memory()
        checks = work_checks(raw, n, s.concurrency)
        if fn == "noop":
            value, unit = raw["tasks_per_s"], "tasks/s"
        else:
            value, unit = raw["seconds"], "s"
            raw["ideal_s"] = s.sleep_ideal_s
        # In the drain, a library that runs tasks one after another honestly
        # never reaches the limit; that is reported, not a failed row. A
        # library's shutdown that hung is shown; it fails kew's rows only.
        required = [
            k
            for k in checks
            if (k != "reached" or fn == "sleep")
            and (k != "stopped" or lib.name == "kew")
        ]
        return row(lib, scenario, rep, value, unit, checks, raw, required)

    def log_memory(self) -> dict[str, float]:
        from kew.keys import QueueKeys

        key = QueueKeys("kew", common.QUEUE).log
        redis = self.server.redis
        length = int(redis.xlen(key))  # type: ignore[arg-type]
        used = int(redis.memory_usage(key, samples=0) or 0)  # type: ignore[arg-type]
        return {"entries": length, "bytes": used, "bytes_per_entry": used / length}

    def submits(self, lib: Lib, rep: int, mode: str) -> dict[str, Any]:
        s = self.sizes
        self.server.flush()
        raw = self.call(
            lib,
            mode,
            ["submit", "--mode", mode, "--n", str(s.submits), "--batch", str(s.batch)],
        )
        name = "single submit" if mode == "single" else "batch submit"
        checks = {}
        if raw.get("queued") is not None:
            checks["all queued"] = raw["queued"] == s.submits
        return row(lib, name, rep, raw["submits_per_s"], "submits/s", checks, raw)

    def latency(self, lib: Lib, rep: int) -> dict[str, Any]:
        self.server.flush()
        raw = self.call(lib, "latency", ["latency", "--n", str(self.sizes.latency)])
        checks = {"results right": raw["wrong_results"] == 0}
        return row(lib, "latency", rep, raw["p50_ms"], "ms p50", checks, raw)

    def idle(self, lib: Lib) -> dict[str, Any]:
        """Commands per second a worker sends to a queue nobody submits to."""
        self.server.flush()
        command = [str(lib.python), str(lib.runner), "serve", "--url", self.server.url]
        with (self.logs / f"{lib.name}-idle.log").open("a") as log:
            proc = common.start_server(command, log)
            try:
                time.sleep(1.0)  # past the start-up commands
                before = self.server.snapshot()
                time.sleep(self.sizes.idle_seconds)
                used = delta(before, self.server.snapshot())
            finally:
                common.stop_server(proc)
        per_s = used["commands"] / self.sizes.idle_seconds
        raw = {"seconds": self.sizes.idle_seconds, **used}
        return row(lib, "idle", 0, per_s, "commands/s", {}, raw)

    # -- kew only ---------------------------------------------------------

    def extra(self, what: str, argv: list[str]) -> dict[str, Any]:
        self.server.flush()
        command = [sys.executable, str(BENCH / "kew_extra.py"), what, *argv]
        return self.run(command, "kew", what)

    def floor(self, what: str, argv: list[str]) -> dict[str, Any]:
        self.server.flush()
        command = [sys.executable, str(BENCH / "floor.py"), what, *argv]
        return self.run(command, "floor", what)


def work_checks(raw: dict[str, Any], n: int, limit: int) -> dict[str, bool]:
    """What a drain or sleep phase must show: each of the N tasks ran to its
    end exactly once (N distinct ends, N ends in all), the library holds
    every outcome as recorded (where its runner can ask: all do), the
    limit was never exceeded and was reached, the worker stopped."""
    checks = {
        "all completed": raw["completed"] == n and not raw["timed_out"],
        "no duplicates": raw["duplicates"] == 0 and raw["ended"] == n,
        "never exceeded": raw["max_concurrency"] <= limit,
        "reached": raw["max_concurrency"] == limit,
        "stopped": not raw["stop_hung"],
    }
    if raw["left_unrecorded"] is not None or raw["timed_out"]:
        checks["outcomes recorded"] = raw["left_unrecorded"] == 0
    return checks


def kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a phase's process group: the phase and what it started."""
    with contextlib.suppress(ProcessLookupError):  # the group is empty
        os.killpg(proc.pid, signal.SIGKILL)


def row(
    lib: Lib,
    scenario: str,
    rep: int,
    value: float,
    unit: str,
    checks: dict[str, bool],
    raw: dict[str, Any],
    required: list[str] | None = None,
) -> dict[str, Any]:
    needed = checks if required is None else {k: checks[k] for k in required}
    return {
        "lib": lib.name,
        "scenario": scenario,
        "rep": rep,
        "value": value,
        "unit": unit,
        "ok": all(needed.values()),
        "checks": checks,
        "raw": raw,
    }


def failed_row(lib: str, scenario: str, rep: int, error: str) -> dict[str, Any]:
    return {
        "lib": lib,
        "scenario": scenario,
        "rep": rep,
        "value": None,
        "unit": "",
        "ok": False,
        "checks": {"ran": False},
        "raw": {"error": error},
    }
