"""How the log commands print and read time: on a terminal and through a pipe,
kew tail (with --follow), time arguments (relative, naive, with a zone).

Each test runs `kew` as a child process (tests/terminal.py) and checks what
it printed.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest

from kew import QueueConfig, TaskQueueManager
from kew.events.models import Event

from .terminal import Running, on_terminal, piped

MakeManager = Callable[..., Awaitable[TaskQueueManager]]

LONG_ERROR = "the payment gateway said no: " + "x" * 200
ISO_WITH_OFFSET = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


async def ok(n: int) -> int:
    return n


async def refused(n: int) -> None:
    raise RuntimeError(f"{LONG_ERROR}\tcall {n}\nsecond line")


@pytest.fixture
async def workload(make_manager: MakeManager) -> TaskQueueManager:
    """Three tasks that succeed, then one that fails with a long error that
    holds a tab and a newline; the failure is the last event of the log."""
    manager = await make_manager()
    await manager.create_queue(QueueConfig(name="q"))
    for i in range(3):
        await manager.submit_task(f"ok{i}", "q", ok, i)
        await manager.wait_for_task(f"ok{i}", 10)
    await manager.submit_task("bad", "q", refused, 1)
    await manager.wait_for_task("bad", 10)
    return manager


def rows(stdout: str) -> list[list[str]]:
    return [line.split("\t") for line in stdout.splitlines()]


async def test_piped_output_is_plain_tab_separated_rows(
    workload: TaskQueueManager, redis_url: str, prefix: str
) -> None:
    """Through a pipe, history prints a line of column names and one line per
    event: tabs between cells, no padding, no wrapping, no box drawing, a tab
    or newline inside a value escaped, times in ISO 8601 with their offset."""
    done = await asyncio.to_thread(piped, redis_url, prefix, "history", "bad")

    assert done.returncode == 0, done.stderr
    header, *events = rows(done.stdout)
    assert header == ["time", "event", "attempt", "actor", "detail", "trace id"]
    assert [row[1] for row in events] == [
        "task.submitted",
        "task.started",
        "task.failed",
    ]
    assert all(len(row) == len(header) for row in events)
    assert all(re.fullmatch(ISO_WITH_OFFSET, row[0]) for row in events)
    assert events[-1][4] == f"{LONG_ERROR}\\tcall 1\\nsecond line"
    assert not any(line.endswith(" ") for line in done.stdout.splitlines())
    assert not set("│─━┃") & set(done.stdout)
    assert "\x1b[" not in done.stdout


async def test_terminal_output_is_a_table(
    workload: TaskQueueManager, redis_url: str, prefix: str
) -> None:
    """On a terminal, history prints a table: a title with the day, column
    names over a rule, times of day with their UTC offset, long values
    folded over several lines; the same command piped prints none of that."""
    shown = await on_terminal(redis_url, prefix, "history", "bad")

    first = (await workload.get_task_history("bad"))[0].time.astimezone()
    assert f"task 'bad', {first.date().isoformat()}" in shown
    assert re.search(r"time +event +attempt +actor +detail", shown), shown
    assert "─" * 20 in shown
    assert re.search(r"\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d +task\.failed", shown)
    long_lines = [line for line in shown.splitlines() if "xxxxx" in line]
    assert len(long_lines) > 1, shown  # folded to the terminal's width


async def test_tail_shows_which_task_each_event_is_about(
    workload: TaskQueueManager, redis_url: str, prefix: str
) -> None:
    """kew tail has a task column: the three task.submitted lines of three
    tasks can be told apart."""
    done = await asyncio.to_thread(
        piped, redis_url, prefix, "tail", "q", "--type", "task.submitted"
    )

    assert done.returncode == 0, done.stderr
    header, *events = rows(done.stdout)
    assert header[:5] == ["time", "event", "attempt", "task", "actor"]
    assert [(row[1], row[3]) for row in events] == [
        ("task.submitted", task_id) for task_id in ("ok0", "ok1", "ok2", "bad")
    ]


async def test_tail_filters_by_type_before_taking_the_last_n(
    workload: TaskQueueManager, redis_url: str, prefix: str
) -> None:
    """`kew tail q -n 1 --type task.succ` prints the newest task.succeeded,
    although newer events of other types follow it."""
    done = await asyncio.to_thread(
        piped, redis_url, prefix, "tail", "q", "-n", "1", "--type", "task.succ"
    )
    as_json = await asyncio.to_thread(
        piped, redis_url, prefix, "tail", "q", "-n", "2", "--type", "task.s", "--json"
    )

    assert done.returncode == 0, done.stderr
    assert [(row[1], row[3]) for row in rows(done.stdout)[1:]] == [
        ("task.succeeded", "ok2")
    ]
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(e["type"], e["task_id"]) for e in events] == [
        ("task.submitted", "bad"),
        ("task.started", "bad"),
    ]


@pytest.mark.parametrize("follow", [[], ["--follow"]])
async def test_tail_of_a_queue_that_does_not_exist_is_an_error(
    workload: TaskQueueManager, redis_url: str, prefix: str, follow: list[str]
) -> None:
    """kew tail names the missing queue and the queues there are, and exits 1
    (also with --follow, which would otherwise wait for ever)."""
    done = await asyncio.to_thread(piped, redis_url, prefix, "tail", "qq", *follow)

    assert done.returncode == 1
    assert done.stdout == ""
    assert "Queue 'qq' does not exist" in done.stderr
    assert "the queues under prefix" in done.stderr
    assert "'q'" in done.stderr


async def _submit_and_finish(manager: TaskQueueManager, task_id: str) -> None:
    await manager.submit_task(task_id, "q", ok, 5)
    await manager.wait_for_task(task_id, 10)


def _has_row(event: str, task_id: str) -> Callable[[str], bool]:
    return lambda text: (
        re.search(rf"{re.escape(event)}\s+\S*\s*{task_id}\b", text) is not None
    )


async def test_tail_follow_prints_new_events_under_one_header(
    workload: TaskQueueManager, redis_url: str, prefix: str
) -> None:
    """kew tail --follow, piped: the line of column names once, then a line
    per new event as it is logged, filtered by --type."""
    follow = Running(
        redis_url, prefix, "tail", "q", "-f", "-n", "1", "--type", "task.s"
    )
    try:
        await follow.until(lambda text: "task.started" in text, "the newest event")
        for task_id in ("new1", "new2"):
            await _submit_and_finish(workload, task_id)
            await follow.until(
                lambda text, t=task_id: f"task.succeeded\t1\t{t}" in text,
                f"the end of {task_id}",
            )
    finally:
        printed = follow.stop()

    header, *events = rows(printed)
    assert header[:4] == ["time", "event", "attempt", "task"]
    assert [(row[1], row[3]) for row in events] == [
        ("task.started", "bad"),
        ("task.submitted", "new1"),
        ("task.started", "new1"),
        ("task.succeeded", "new1"),
        ("task.submitted", "new2"),
        ("task.started", "new2"),
        ("task.succeeded", "new2"),
    ]


async def test_tail_follow_on_a_terminal_prints_the_header_once(
    workload: TaskQueueManager, redis_url: str, prefix: str
) -> None:
    """kew tail --follow on a terminal: the table's header once, then each
    new batch of events as rows lined up under it, with no header again."""
    follow = Running(redis_url, prefix, "tail", "q", "-f", "-n", "1", terminal=True)
    try:
        await follow.until(lambda text: "task.failed" in text, "the newest event")
        for task_id in ("new1", "new2"):
            await _submit_and_finish(workload, task_id)
            await follow.until(_has_row("task.succeeded", task_id), task_id)
    finally:
        printed = follow.stop()

    assert len(re.findall(r"\btime +event +attempt +task +actor", printed)) == 1
    lines = [line for line in printed.splitlines() if "task." in line]
    columns = {line.index("task.") for line in lines}
    assert len(columns) == 1, printed  # every event under the event column
    assert len(lines) == 7, printed


async def test_relative_times_are_read_after_the_option(
    workload: TaskQueueManager, redis_url: str, prefix: str
) -> None:
    """`--as-of -15m` and `--since -1h`, as the help shows them (not only
    `--as-of=-15m`): argparse would take -15m for an option."""
    before = await asyncio.to_thread(
        piped, redis_url, prefix, "replay", "q", "--as-of", "-15m", "--json"
    )
    attached = await asyncio.to_thread(
        piped, redis_url, prefix, "replay", "q", "--as-of=-15m", "--json"
    )
    since = await asyncio.to_thread(
        piped, redis_url, prefix, "export", "q", "--since", "-1h"
    )
    until = await asyncio.to_thread(
        piped, redis_url, prefix, "export", "q", "--until", "-1h"
    )

    for done in (before, attached, since, until):
        assert done.returncode == 0, done.stderr
    assert json.loads(before.stdout)["completed_tasks"] == 0
    assert json.loads(attached.stdout)["completed_tasks"] == 0
    exported = [json.loads(line) for line in since.stdout.splitlines()]
    assert len(exported) == len([e async for e in workload.export_log("q")])
    assert until.stdout == ""


async def _log(manager: TaskQueueManager) -> list[Event]:
    events: list[Event] = []
    for task_id in ("ok0", "ok1", "ok2", "bad"):
        events += await manager.get_task_history(task_id)
    return sorted(events, key=lambda e: (e.ms, int(e.id.split("-")[1])))


async def test_export_since_and_until_take_absolute_times(
    workload: TaskQueueManager, redis_url: str, prefix: str
) -> None:
    """--since and --until with ISO times (with a zone, or naive and read as
    local time) export exactly the events of that window, ends included."""
    events = await _log(workload)
    start = next(e for e in events if e.task_id == "ok1")
    end = next(e for e in events if e.task_id == "ok2")
    expected = [e.id for e in events if start.ms <= e.ms <= end.ms]
    naive_local = start.time.astimezone().replace(tzinfo=None).isoformat()
    windows = [
        ("--since", start.time.isoformat(), "--until", end.time.isoformat()),
        ("--since", naive_local, "--until", end.time.isoformat()),
    ]

    for window in windows:
        done = await asyncio.to_thread(piped, redis_url, prefix, "export", "q", *window)
        assert done.returncode == 0, done.stderr
        assert [json.loads(line)["id"] for line in done.stdout.splitlines()] == expected


async def test_times_are_shown_and_read_in_local_time(
    workload: TaskQueueManager, redis_url: str, prefix: str
) -> None:
    """With the zone of the command at UTC+05:30: history shows times at that
    offset, and a naive --as-of is read as a time at that offset, so the
    instant a naive local time and its UTC spelling name is the same."""
    india = {"TZ": "IST-05:30"}  # a POSIX zone: no time zone database needed
    shown = await asyncio.to_thread(piped, redis_url, prefix, "history", "ok0", **india)
    first = (await workload.get_task_history("ok0"))[0]
    local = first.time.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert rows(shown.stdout)[1][0] == local.isoformat(timespec="milliseconds")

    started = (await workload.get_task_history("ok1"))[1]
    naive = started.time.astimezone(local.tzinfo).replace(tzinfo=None).isoformat()
    as_utc = started.time.astimezone(UTC).isoformat()
    answers = [
        json.loads(
            (
                await asyncio.to_thread(
                    piped,
                    redis_url,
                    prefix,
                    "replay",
                    "q",
                    "--as-of",
                    at,
                    "--json",
                    **india,
                )
            ).stdout
        )
        for at in (naive, as_utc)
    ]
    logged = [line["id"] async for line in workload.export_log("q")]
    then = len([entry for entry in logged if int(entry.split("-")[0]) <= started.ms])
    assert answers[0]["events"] == answers[1]["events"] == then
    assert answers[0]["as_of"] == started.time.astimezone(local.tzinfo).isoformat(
        timespec="milliseconds"
    )
    assert datetime.fromisoformat(answers[1]["as_of"]) == started.time
