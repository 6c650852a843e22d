"""The `kew` command, run as `python -m kew` in a child process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

from kew import QueueConfig, TaskQueueManager, TaskStatus
from kew.cli import _parser
from kew.connection import URL_ENV
from kew.manager import PREFIX_ENV
from kew.registry import Registry

TIMEOUT = 60.0


def run_kew(*args: str, url: str | None) -> subprocess.CompletedProcess[str]:
    """Run `python -m kew ARGS` with KEW_REDIS_URL set to `url` (unset if None)."""
    env = {k: v for k, v in os.environ.items() if k not in (URL_ENV, PREFIX_ENV)}
    if url is not None:
        env[URL_ENV] = url
    return subprocess.run(
        [sys.executable, "-m", "kew", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


async def keys_under(client: aioredis.Redis, prefix: str) -> list[str]:
    return [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]


def assert_demo_output(stdout: str) -> None:
    """The demo's output through a pipe: plain tab-separated rows, no colour,
    no box drawing."""
    assert re.search(r"^demo-07\tfailed\t", stdout, re.M), stdout
    assert re.search(r"^demo-01\tcompleted\t", stdout, re.M), stdout
    assert "15/15" in stdout
    assert "\x1b[" not in stdout, "colour codes in output that is not a terminal"
    assert "│" not in stdout, "box drawing in output that is not a terminal"
    log_lines = [
        line
        for line in stdout.splitlines()
        if re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d\t", line)
    ]
    types = [line.split("\t")[1] for line in log_lines]
    assert types == ["task.submitted", "task.started", "task.failed"], stdout
    assert "projections agree with the log" in stdout


async def test_demo_runs_and_deletes_its_keys(
    redis_url: str, prefix: str, client: aioredis.Redis
) -> None:
    """The demo shows outcomes, a failed task's log and verify, then cleans up."""
    done = run_kew(
        "--prefix", prefix, "demo", "--tasks", "15", "--workers", "4", url=redis_url
    )

    assert done.returncode == 0, done.stderr
    assert_demo_output(done.stdout)
    assert f"Key prefix: {prefix!r}" in done.stdout
    assert "Traceback" not in done.stderr
    assert await keys_under(client, prefix) == []


async def test_demo_keep_leaves_the_keys(
    redis_url: str, prefix: str, client: aioredis.Redis
) -> None:
    """`--keep` leaves the demo's log and projections on the server."""
    done = run_kew("--prefix", prefix, "demo", "--tasks", "8", "--keep", url=redis_url)

    assert done.returncode == 0, done.stderr
    keys = await keys_under(client, prefix)
    assert f"{prefix}:{{demo}}:log" in keys
    assert await client.xlen(f"{prefix}:{{demo}}:log") > 8


async def test_demo_refuses_a_prefix_that_holds_keys(
    redis_url: str, prefix: str, client: aioredis.Redis
) -> None:
    """A given prefix that already holds keys is refused and left untouched."""
    await client.set(f"{prefix}:someone-else", "precious")

    done = run_kew("--prefix", prefix, "demo", "--tasks", "3", url=redis_url)

    assert done.returncode == 1
    assert "already holds keys" in done.stderr
    assert await keys_under(client, prefix) == [f"{prefix}:someone-else"]


def test_unreachable_server_is_one_line_on_stderr() -> None:
    """An unreachable server gives exit code 1 and one line on stderr."""
    done = run_kew("demo", url="redis://127.0.0.1:1/0")

    assert done.returncode == 1
    assert done.stderr.startswith("kew: error: Cannot reach the Redis server")
    assert done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_bad_argument_names_the_value() -> None:
    """A bad --tasks is an argparse error that shows the value."""
    done = run_kew("demo", "--tasks", "0", url="redis://127.0.0.1:1/0")

    assert done.returncode == 2
    assert "'0' is not valid" in done.stderr


def test_demo_without_a_url_uses_the_embedded_server() -> None:
    """With no URL at all the demo runs on the embedded server (no Redis needed)."""
    done = run_kew("demo", "--tasks", "15", "--workers", "4", url=None)

    assert done.returncode == 0, done.stderr
    assert "Server: embedded" in done.stdout
    assert_demo_output(done.stdout)


WORKER_TASKS = textwrap.dedent(
    """\
    import kew


    @kew.task(name="cli.double")
    async def double(value: int) -> int:
        return 2 * value
    """
)


async def test_worker_takes_the_server_and_prefix_after_the_command(
    redis_url: str,
    prefix: str,
    tmp_path: Path,
    make_manager: Callable[..., Awaitable[TaskQueueManager]],
) -> None:
    """`kew worker --queue Q --import M --redis-url URL --prefix P` runs Q's tasks."""
    (tmp_path / "cli_tasks.py").write_text(WORKER_TASKS)
    submitter = await make_manager(consume=False, registry=Registry())
    await submitter.create_queue(QueueConfig(name="q"))
    env = {k: v for k, v in os.environ.items() if k not in (URL_ENV, PREFIX_ENV)}
    command = [sys.executable, "-m", "kew", "worker", "--queue", "q"]
    command += ["--import", "cli_tasks", "--redis-url", redis_url, "--prefix", prefix]
    worker = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await submitter.submit_task("d", "q", "cli.double", 21)
        info = await submitter.wait_for_task("d", timeout=TIMEOUT)
    finally:
        worker.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.to_thread(worker.communicate, None, TIMEOUT)

    assert worker.returncode == 0, stderr
    assert (info.status, info.result) == (TaskStatus.COMPLETED, 42)
    assert re.match(r"kew worker \S+ consuming q on ", stdout), stdout


def test_server_options_hold_before_or_after_the_command() -> None:
    """--redis-url/--prefix before the command still hold; after it they win."""
    before = _parser().parse_args(
        ["--redis-url", "redis://a:6379/0", "--prefix", "top", "worker", "-q", "q"]
    )
    after = _parser().parse_args(
        ["--prefix", "top", "worker", "-q", "q", "--prefix", "sub"]
    )
    neither = _parser().parse_args(["dead-letters", "list", "q"])

    assert (before.redis_url, before.prefix) == ("redis://a:6379/0", "top")
    assert (after.redis_url, after.prefix) == (None, "sub")
    assert (neither.redis_url, neither.prefix) == (None, None)


async def test_dead_letters_requeue_sends_them_back(
    redis_url: str,
    prefix: str,
    client: aioredis.Redis,
    make_manager: Callable[..., Awaitable[TaskQueueManager]],
) -> None:
    """`kew dead-letters requeue Q` sends the dead letters back, says how many,
    and the tasks then run; `list` shows them before and none after."""

    async def double(value: int) -> int:
        return 2 * value

    registry = Registry()
    registry.register(double, "cli.twice")
    creator = await make_manager(consume=False, registry=registry)
    await creator.create_queue(
        QueueConfig(name="q", max_deliveries=1, lease_seconds=0.1)
    )
    await creator.submit_task("d", "q", "cli.twice", 21)
    # A consumer that read the entry and died at once, then one that finds it
    # lapsed: delivered twice with max_deliveries=1, it is dead-lettered.
    ready = f"{prefix}:{{q}}:ready:medium"
    assert await client.xreadgroup("workers", "ghost", {ready: ">"}, count=1)
    consumer = await make_manager(registry=registry)
    await consumer.attach_queue("q")
    info = await consumer.wait_for_task("d", timeout=TIMEOUT)
    assert info.status is TaskStatus.FAILED
    listed = await asyncio.to_thread(
        run_kew, "--prefix", prefix, "dead-letters", "list", "q", url=redis_url
    )
    assert listed.returncode == 0, listed.stderr
    # Piped: a line of column names, then one tab-separated line a letter.
    header, *rows = listed.stdout.splitlines()
    assert header.split("\t") == [
        "dead letter",
        "task",
        "deliveries",
        "last consumer",
        "reason",
    ]
    assert [row.split("\t")[1:4] for row in rows] == [["d", "2", "ghost"]]

    done = await asyncio.to_thread(
        run_kew, "dead-letters", "requeue", "q", "--prefix", prefix, url=redis_url
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Requeued 1 dead-lettered tasks of 'q'."
    assert done.stderr == ""
    info = await consumer.wait_for_task("d", timeout=TIMEOUT)
    assert (info.status, info.result) == (TaskStatus.COMPLETED, 42)
    listed = await asyncio.to_thread(
        run_kew, "--prefix", prefix, "dead-letters", "list", "q", url=redis_url
    )
    assert listed.stdout.splitlines()[1:] == []
    assert await consumer.verify_projections("q") == []
