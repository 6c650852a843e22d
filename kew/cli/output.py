"""How the commands print.

Where stdout is a terminal: tables and colour (rich). Anywhere else (a pipe, a
file) plain text for scripts: a table is a line of column names, then one line
per row, its cells separated by tabs, never padded, wrapped or cut; inside a
cell a backslash, tab, newline or carriage return is written as \\\\, \\t, \\n
or \\r, so every row is one line. A key-value table (`kew status`, `kew
replay`) has no line of column names. Messages are printed as they are, one
per line. `--json` is the third form, for programs: each command says what it
prints.

Times are shown in local time with their UTC offset: on a terminal as
20:05:28.189+01:00 (the day in the title when the rows share one), in plain
text as ISO 8601 (2026-12-03T20:05:28.189+01:00). JSON gives ISO 8601 in UTC.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from rich import box
from rich.console import Console, JustifyMethod
from rich.table import Table
from rich.text import Text

from kew.events.models import EVENT_TYPES, Event

__all__ = [
    "Column",
    "Output",
    "RowStream",
    "clock",
    "event_json",
    "print_json",
    "timeline",
    "timeline_columns",
    "timeline_row",
]

Cell = str | Text


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    wrap: bool = True
    """On a terminal, fold a long value over several lines; if False, never."""
    justify: JustifyMethod = "left"
    width: int = 0
    """The widest value it can hold, if known: RowStream keeps room for it."""
    fill: bool = False
    """In a RowStream, take the width the other columns leave."""


_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _plain(cell: Cell) -> str:
    text = cell.plain if isinstance(cell, Text) else cell
    return text.translate(_ESCAPES)


class Output:
    """Tables and messages for a terminal, or plain lines (module docstring)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.terminal = self.console.is_terminal
        if not self.terminal:
            self.console.soft_wrap = True  # what it prints, it never wraps

    def table(
        self,
        columns: Sequence[Column],
        rows: Iterable[Sequence[Cell]],
        *,
        title: str = "",
        header: bool = True,
        caption: str = "",
        plain_title: bool = False,
    ) -> None:
        """Print a table; in plain output its title only if `plain_title`
        (for output read by people, as the demo's), on a line of its own."""
        if not self.terminal:
            if plain_title and title:
                self.line(title)
            lines = [[c.name for c in columns]] if header else []
            self.plain_rows([*lines, *rows])
            return
        table = _rich_table(columns, title=title, header=header)
        table.caption = caption or None
        for row in rows:
            table.add_row(*row)
        self.console.print(table)

    def plain_rows(self, rows: Iterable[Sequence[Cell]]) -> None:
        text = "".join("\t".join(map(_plain, row)) + "\n" for row in rows)
        sys.stdout.write(text)
        sys.stdout.flush()

    def line(self, text: str, style: str = "") -> None:
        """A message: on a terminal in `style`, else as it is."""
        if self.terminal:
            self.console.print(Text(text, style=style))
        else:
            print(text, flush=True)


def _rich_table(columns: Sequence[Column], *, title: str, header: bool) -> Table:
    table = Table(title=title or None, box=box.SIMPLE_HEAD, show_header=header)
    for column in columns:
        table.add_column(
            column.name,
            justify=column.justify,
            overflow="fold",
            no_wrap=not column.wrap,
        )
    return table


class RowStream:
    """Rows printed as they arrive (`kew tail --follow`), under one header.

    On a terminal, the first batch fixes the width of every column but the
    one that fills the rest (at least its name's, its `width`, and its
    widest value so far; a longer value later is folded), and later batches
    are printed with those widths and no header, so they line up under it.
    Plain output prints the line of column names once, then rows.
    """

    def __init__(self, output: Output, columns: Sequence[Column]) -> None:
        self.output = output
        self.columns = list(columns)
        self.widths: list[int | None] | None = None

    def add(self, rows: Sequence[Sequence[Cell]]) -> None:
        first = self.widths is None
        if not self.output.terminal:
            names = [[c.name for c in self.columns]] if first else []
            self.widths = []
            self.output.plain_rows([*names, *rows])
            return
        if self.widths is None:
            self.widths = [
                None
                if column.fill
                else max(
                    [len(column.name), column.width, *(len(_plain(r[i])) for r in rows)]
                )
                for i, column in enumerate(self.columns)
            ]
        table = _rich_table(self.columns, title="", header=first)
        table.show_edge = False
        for column, width in zip(table.columns, self.widths, strict=True):
            column.width = width
        for row in rows:
            table.add_row(*row)
        self.output.console.print(table)


def print_json(value: Any) -> None:
    """One JSON value on a line; datetimes as ISO 8601."""
    print(json.dumps(value, default=_json_default, ensure_ascii=False), flush=True)


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds")
    return str(value)


def event_json(event: Event) -> dict[str, Any]:
    data = event.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["time"] = event.time.isoformat(timespec="milliseconds")
    data["trace_id"] = event.trace_id
    return data


def clock(moment: datetime) -> str:
    """A moment in local time with its offset: 2026-12-03 20:05:28.189+01:00."""
    return moment.astimezone().isoformat(sep=" ", timespec="milliseconds")


def _detail(event: Event) -> str:
    """The one thing worth reading about an event, besides its type."""
    fields = event.model_dump(by_alias=True, exclude_none=True)
    for name in ("error", "reason", "result", "previous", "due_at", "entry"):
        if name in fields and fields[name] not in ("", None):
            value = fields[name]
            if name == "due_at":
                return "due " + clock(datetime.fromtimestamp(value / 1000, UTC))
            if name == "previous":
                return f"from {value}"
            text = value if isinstance(value, str) else json.dumps(value)
            return text if name != "entry" else f"entry {text}"
    return ""


def timeline_columns(*, task: bool, traced: bool) -> list[Column]:
    """The columns of a list of events: `task` where it shows more than one
    task, `traced` for the trace id."""
    columns = [
        Column("time", wrap=False, width=len(clock(datetime.now()))),
        Column("event", wrap=False, width=max(map(len, EVENT_TYPES))),
    ]
    columns += [Column("attempt", wrap=False)]
    columns += [Column("task")] if task else []
    columns += [Column("actor"), Column("detail", fill=True)]
    return [*columns, Column("trace id", wrap=False, width=32)] if traced else columns


def timeline_row(
    event: Event, *, task: bool, traced: bool, plain: bool, with_day: bool
) -> list[Cell]:
    """One event as a row of `timeline_columns`. Its time: ISO 8601 if
    `plain`, else the time of day (with the day if `with_day`), local."""
    local = event.time.astimezone()
    if plain:
        moment = local.isoformat(timespec="milliseconds")
    elif with_day:
        moment = clock(local)
    else:
        moment = local.timetz().isoformat(timespec="milliseconds")
    style = "red" if event.type in ("task.failed", "task.dead_lettered") else ""
    row: list[Cell] = [moment, Text(event.type, style=style)]
    row += [str(event.attempt) if event.task_id else ""]
    row += [Text(event.task_id or "")] if task else []
    row += [Text(event.actor or ""), Text(_detail(event))]
    return [*row, event.trace_id or ""] if traced else row


def timeline(
    output: Output,
    title: str,
    events: Sequence[Event],
    *,
    task: bool = False,
    plain_title: bool = False,
) -> None:
    """Print events as a table: time, type, attempt, the task if `task`, actor,
    detail, and the trace id when an event carries one (in plain output, the
    trace id column is always there, so that its columns never change)."""
    plain = not output.terminal
    traced = plain or any(event.trace_id for event in events)
    days = {event.time.astimezone().date() for event in events}
    with_day = len(days) > 1
    if len(days) == 1 and title:
        title = f"{title}, {days.pop().isoformat()}"
    rows = [
        timeline_row(e, task=task, traced=traced, plain=plain, with_day=with_day)
        for e in events
    ]
    columns = timeline_columns(task=task, traced=traced)
    output.table(columns, rows, title=title, plain_title=plain_title)


def show_value(value: object) -> str:
    """A value of a status dict as a table cell."""
    if isinstance(value, list):
        return ", ".join(str(item) for item in cast(list[object], value))
    if isinstance(value, datetime):
        return clock(value)
    return "" if value is None else str(value)
