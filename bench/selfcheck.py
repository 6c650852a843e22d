"""The suite's own logic, checked on made-up rows and throwaway processes.

No server and no library is involved: what is checked is that the suite
reports what happened. A hung phase is killed with what it started and
becomes a failed row; a runner leaves once its result is out even if a task
ignores its cancellation; a worker that never says "ready" is killed; a task
run twice or an outcome not recorded fails the checks; the summary survives
failed kew-only rows and a crashed first rep; a peer's failed rep is not the
best peer; ratios are judged as printed; the library order rotates per rep.

    .venv/bin/python bench/selfcheck.py

`bench/run.py --smoke` runs it first (a few seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from report import best_peer, print_tables, summarize, verdict
from scenarios import Failed, Scenarios, Sizes, failed_row, work_checks
from venvs import BENCH

sys.path.insert(0, str(BENCH / "peers"))
import common


def check_hung_phase_is_killed() -> None:
    """A phase that outlives its timeout, and the process it started, are
    killed; the caller gets Failed, not TimeoutExpired."""
    with tempfile.TemporaryDirectory() as tmp:
        pid_file = Path(tmp) / "child.pid"
        script = textwrap.dedent(
            f"""\
            import subprocess, sys, time
            sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
            child = subprocess.Popen(sleep)
            open({str(pid_file)!r}, "w").write(str(child.pid))
            time.sleep(60)
            """
        )
        runner = Scenarios(_NoServer(), Sizes(timeout=2.0), Path(tmp))  # type: ignore[arg-type]
        t0 = time.monotonic()
        message = _raises(
            Failed, lambda: runner.run([sys.executable, "-c", script], "s", "hang")
        )
        assert "did not finish within 2s" in message, message
        assert time.monotonic() - t0 < 30
        child = int(pid_file.read_text())
        _eventually_gone(child)


def check_runner_leaves_despite_stuck_task() -> None:
    """emit() leaves the process even when a task swallows its cancellation
    (asyncio.run would wait for it forever at exit)."""
    script = textwrap.dedent(
        f"""\
        import asyncio, sys
        sys.path.insert(0, {str(BENCH / "peers")!r})
        import common

        async def stubborn():
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    pass

        async def submit(args):
            asyncio.get_running_loop().create_task(stubborn())
            await asyncio.sleep(0)
            return {{"ok": True}}

        common.run({{"submit": submit}}, None)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "submit", "--url", "redis://x:1/0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '{"ok": true}', done.stdout


def check_silent_worker_is_killed() -> None:
    command = [sys.executable, "-c", "import time; time.sleep(60)"]
    t0 = time.monotonic()
    message = _raises(RuntimeError, lambda: common.start_server(command, timeout=1.0))
    assert "said nothing within 1.0s" in message, message
    assert time.monotonic() - t0 < 10


def check_recorder() -> None:
    """Done fires when every index has ended, not when the last one entered;
    a task run twice is counted."""

    async def scenario() -> None:
        rec = common.Recorder()
        rec.reset(3)
        assert rec.done is not None
        for i in (0, 1, 2):
            rec.enter(i)
        rec.leave(0)
        rec.leave(1)
        assert not rec.done.is_set(), "done before task 2 ended"
        rec.enter(1)  # a duplicate run of task 1
        rec.leave(1)
        assert not rec.done.is_set()
        rec.leave(2)
        assert rec.done.is_set()
        assert (len(rec.finished), rec.ended, rec.duplicates) == (3, 4, 1)

    asyncio.run(scenario())


def check_work_checks() -> None:
    good = {
        "completed": 10,
        "ended": 10,
        "timed_out": False,
        "duplicates": 0,
        "max_concurrency": 5,
        "stop_hung": False,
        "left_unrecorded": 0,
    }
    assert all(work_checks(good, 10, 5).values())
    assert not work_checks({**good, "ended": 11, "duplicates": 1}, 10, 5)[
        "no duplicates"
    ]
    assert not work_checks({**good, "completed": 9, "ended": 9}, 10, 5)["all completed"]
    assert not work_checks({**good, "left_unrecorded": 2}, 10, 5)["outcomes recorded"]
    unknown = work_checks({**good, "left_unrecorded": None}, 10, 5)
    assert "outcomes recorded" not in unknown


def _row(lib: str, scenario: str, rep: int, value: float, ok: bool = True) -> Any:
    return {
        "lib": lib,
        "scenario": scenario,
        "rep": rep,
        "value": value,
        "unit": "tasks/s",
        "ok": ok,
        "checks": {"all completed": ok},
        "raw": {"tasks_per_s": value, "ideal_s": 1.0, "p99_ms": 1.0},
    }


def check_summary_survives_failures() -> None:
    """A failed recovery and a crashed first sleep rep of kew: no KeyError,
    no verdict for the failed measure, the ideal from the sizes."""
    rows = [
        failed_row("kew", "sleep", 0, "Failed: sleep exited 1"),
        {**_row("kew", "sleep", 1, 1.152), "raw": {"seconds": 1.152}},
        _row("kew", "drain", 0, 100.0),
        _row("saq", "drain", 0, 10.0),
    ]
    extras = {"recovery": {"error": "Failed: recovery exited 1"}}
    summary = summarize(rows, extras, sleep_ideal_s=1.0)
    by = {v["scenario"]: v for v in summary["verdicts"]}
    assert "recovery after SIGKILL" not in by
    assert by["sleep"]["ratio"] == 1.152
    assert not by["sleep"]["met"]
    header = {
        "commit": {"head": "0" * 40, "dirty": True, "changed": [" M x"]},
        "redis": "Redis 7.0.15",
        "redis_binary": "/usr/bin/redis-server",
        "smoke": True,
        "scale": 1.0,
    }
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_tables(rows, extras, summary, header)
    text = out.getvalue()
    assert "failed" in text, text
    assert "dirty tree" in text, text


def check_best_peer_skips_failed_reps() -> None:
    rows = [
        _row("saq", "drain", 0, 3000.0, ok=False),  # ran a task twice
        _row("saq", "drain", 1, 1800.0),
        _row("saq", "drain", 2, 1900.0),
        _row("taskiq", "drain", 0, 2000.0, ok=False),
        _row("arq", "drain", 0, 1000.0),
    ]
    best = best_peer(rows, "drain", higher=True)
    assert best == {"lib": "saq", "value": 1850.0, "verified": 2, "reps": 3}, best
    assert best_peer(rows[3:4], "drain", higher=True) is None


def check_ratio_judged_as_printed() -> None:
    assert verdict("s", "<= 1.15x", 1.1515, "", 1.0, 1.15)["met"] is False
    assert verdict("s", "<= 1.15x", 1.1504, "", 1.0, 1.15)["met"] is True
    assert verdict("d", ">= 5x", 4.9996, "", 1.0, 5.0)["met"] is True


def check_rotation() -> None:
    from run import rotated

    libs = ["kew", "arq", "saq"]
    orders = [rotated(libs, rep) for rep in range(3)]
    assert orders == [libs, ["arq", "saq", "kew"], ["saq", "kew", "arq"]], orders


def _raises(kind: type[Exception], call: Any) -> str:
    """The message of the `kind` exception `call()` raises."""
    try:
        call()
    except kind as exc:
        return str(exc)
    raise AssertionError(f"{call} raised no {kind.__name__}")


class _NoServer:
    url = "redis://127.0.0.1:1/0"


def _eventually_gone(pid: int, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if _zombie(pid):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} outlived its killed phase")


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


CHECKS = [
    check_hung_phase_is_killed,
    check_runner_leaves_despite_stuck_task,
    check_silent_worker_is_killed,
    check_recorder,
    check_work_checks,
    check_summary_survives_failures,
    check_best_peer_skips_failed_reps,
    check_ratio_judged_as_printed,
    check_rotation,
]


def main() -> int:
    for check in CHECKS:
        check()
    print(f"bench self-check: {len(CHECKS)} checks passed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
