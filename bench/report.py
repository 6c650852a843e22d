"""Medians, ratios to the best peer, the issue's targets, and the tables.

Ratios are always measured in the same run: kew against the best peer of that
run (kew 0.2.1 counts as a peer, as in the issue's table). For the batch row
the best peer is the best library with a batch API; rows made by gathering
single submits are shown but are not that API.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table
from venvs import LIBS


@dataclass(frozen=True)
class Target:
    scenario: str
    text: str
    higher_is_better: bool
    bound: float
    """The ratio kew / best peer must reach (or stay under)."""


TARGETS = [
    Target("drain", ">= 5x best peer", True, 5.0),
    Target("latency", "<= 0.5x best peer", False, 0.5),
    Target("single submit", ">= 1x best peer", True, 1.0),
    Target("batch submit", ">= 2x best batch API", True, 2.0),
]
REBUILDS = [
    ("rebuild", "task.submitted only"),
    ("rebuild_drain", "a drained queue's log"),
]
"""The rebuild rows: the worst case (a task hash per event) and a common log."""
SCENARIOS = ["drain", "latency", "single submit", "batch submit", "sleep"]


def medians(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (lib, scenario): median value, reps, whether every rep verified."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        grouped[(r["lib"], r["scenario"])].append(r)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for key, group in grouped.items():
        values = [r["value"] for r in group if r["value"] is not None]
        failed = [name for r in group for name, ok in r["checks"].items() if not ok]
        out[key] = {
            "median": statistics.median(values) if values else None,
            "values": values,
            "unit": group[0]["unit"],
            "ok": all(r["ok"] for r in group),
            "failed": sorted(set(failed)),
            "raw": [r["raw"] for r in group],
        }
    return out


def _gathered(cell: dict[str, Any]) -> bool:
    return any("gather" in r.get("batch_api", "") for r in cell["raw"])


def best_peer(
    med: dict[tuple[str, str], dict[str, Any]], scenario: str, higher: bool
) -> tuple[str, float] | None:
    candidates = []
    for (lib, name), cell in med.items():
        if name != scenario or lib == "kew" or cell["median"] is None:
            continue
        if scenario == "batch submit" and _gathered(cell):
            continue
        candidates.append((lib, cell["median"]))
    if not candidates:
        return None
    pick = max if higher else min
    return pick(candidates, key=lambda c: c[1])


def summarize(rows: list[dict[str, Any]], extras: dict[str, Any]) -> dict[str, Any]:
    """The target verdicts, as data (saved with the raw rows)."""
    med = medians(rows)
    verdicts: list[dict[str, Any]] = []
    for t in TARGETS:
        kew = med.get(("kew", t.scenario))
        best = best_peer(med, t.scenario, t.higher_is_better)
        if kew is None or kew["median"] is None or best is None:
            continue
        ratio = kew["median"] / best[1]
        met = ratio >= t.bound if t.higher_is_better else ratio <= t.bound
        verdicts.append(
            {
                "scenario": t.scenario,
                "target": t.text,
                "kew": kew["median"],
                "best_peer": best[0],
                "best_value": best[1],
                "ratio": ratio,
                "met": met and kew["ok"],
            }
        )
    sleep = med.get(("kew", "sleep"))
    if sleep is not None and sleep["median"] is not None:
        ideal = sleep["raw"][0]["ideal_s"]
        ratio = sleep["median"] / ideal
        verdicts.append(
            {
                "scenario": "sleep",
                "target": "<= 1.15x ideal",
                "kew": sleep["median"],
                "best_peer": "ideal",
                "best_value": ideal,
                "ratio": ratio,
                "met": ratio <= 1.15 and sleep["ok"],
            }
        )
    if "recovery" in extras:
        value = extras["recovery"]["median_s"]
        verdicts.append(
            {
                "scenario": "recovery after SIGKILL",
                "target": "< 3 s median",
                "kew": value,
                "best_peer": "",
                "best_value": 3.0,
                "ratio": value / 3.0,
                "met": value < 3.0,
            }
        )
    for name, what in REBUILDS:
        if "events_per_s" not in extras.get(name, {}):
            continue
        value = extras[name]["events_per_s"]
        verdicts.append(
            {
                "scenario": f"rebuild projections ({what})",
                "target": ">= 100,000 events/s",
                "kew": value,
                "best_peer": "",
                "best_value": 100_000.0,
                "ratio": value / 100_000,
                "met": value >= 100_000 and extras[name]["verify_differences"] == 0,
            }
        )
    return {"verdicts": verdicts}


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def print_tables(
    rows: list[dict[str, Any]], extras: dict[str, Any], summary: dict[str, Any]
) -> None:
    console = Console(width=160)
    med = medians(rows)
    libs = [name for name in LIBS if any(lib == name for lib, _ in med)]
    reps = max((r["rep"] for r in rows), default=0) + 1

    table = Table(title=f"Scenarios: median of {reps} reps (! = a check failed)")
    table.add_column("scenario")
    for lib in libs:
        table.add_column(LIBS[lib].label, justify="right")
    for scenario in SCENARIOS:
        cells = []
        for lib in libs:
            cell = med.get((lib, scenario))
            if cell is None:
                cells.append("")
                continue
            text = _fmt(cell["median"])
            if scenario == "batch submit" and _gathered(cell):
                text += " (gather)"
            if not cell["ok"]:
                text += " !"
            cells.append(text)
        unit = next((c["unit"] for (_, s), c in med.items() if s == scenario), "")
        table.add_row(f"{scenario} ({unit})", *cells)
    console.print(table)

    eff = Table(title="Efficiency, in the drain (per task) and idle")
    eff.add_column("")
    for lib in libs:
        eff.add_column(LIBS[lib].label, justify="right")
    measures = [
        ("max concurrency seen (drain)", "drain", "max_concurrency"),
        ("Redis commands / task (drain)", "drain", "commands_per_task"),
        ("worker CPU s / 1,000 tasks", "drain", "cpu_s_per_1000"),
        ("Redis CPU s / 1,000 tasks", "drain", "server_cpu_s_per_1000"),
        ("first task after start (s)", "sleep", "first_task_after_s"),
    ]
    for label, scenario, key in measures:
        cells = []
        for lib in libs:
            cell = med.get((lib, scenario))
            values = [r[key] for r in cell["raw"] if key in r] if cell else []
            cells.append(_fmt(statistics.median(values)) if values else "")
        eff.add_row(label, *cells)
    idle = [med.get((lib, "idle")) for lib in libs]
    eff.add_row(
        "idle commands / s",
        *[_fmt(c["median"]) if c else "" for c in idle],
    )
    console.print(eff)

    verdicts = Table(title="Targets (issue 7): kew / best peer, same run")
    for col in ("scenario", "target", "kew", "best peer", "ratio", "met"):
        verdicts.add_column(
            col, justify="left" if col in ("scenario", "target") else "right"
        )
    for v in summary["verdicts"]:
        verdicts.add_row(
            v["scenario"],
            v["target"],
            _fmt(v["kew"]),
            f"{v['best_peer']} {_fmt(v['best_value'])}".strip(),
            f"{v['ratio']:.2f}x",
            "[green]met[/]" if v["met"] else "[red]not met[/]",
        )
    console.print(verdicts)

    if extras:
        console.print(_extras_table(extras, med))


def _extras_table(extras: dict[str, Any], med: dict[tuple[str, str], Any]) -> Table:
    table = Table(title="kew only")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, what in REBUILDS:
        rb = extras.get(name, {})
        if "events_per_s" not in rb:
            continue
        table.add_row(
            f"rebuild_projections, {rb['events']:,} events ({what})",
            f"{_fmt(rb['events_per_s'])} events/s ({_fmt(rb['median_s'])} s)",
        )
    if "memory" in extras.get("rebuild", {}):
        table.add_row(
            "log memory per event (submitted only)",
            f"{extras['rebuild']['memory']['bytes_per_entry']:.0f} bytes",
        )
    drain = med.get(("kew", "drain"))
    if drain and "log" in drain["raw"][0]:
        per = drain["raw"][0]["log"]["bytes_per_entry"]
        table.add_row("log memory per event (drain's log)", f"{per:.0f} bytes")
    if "recovery" in extras:
        runs = ", ".join(f"{t:.2f}" for t in extras["recovery"]["runs"])
        table.add_row("recovery after SIGKILL (s)", runs)
    if "commands" in extras:
        c = extras["commands"]
        table.add_row(
            "round trips / task (submit + wait)", _fmt(c["round_trips_per_task"])
        )
        table.add_row(
            "Redis commands / task (submit + wait)", _fmt(c["commands_per_task"])
        )
    if "inproc" in extras:
        table.add_row(
            "latency, consumer in the same process",
            _fmt(extras["inproc"]["p50_ms"], "ms p50"),
        )
    if "floor_drain" in extras and drain and drain["median"]:
        floor = extras["floor_drain"]["tasks_per_s"]
        table.add_row("floor drain (bare loop)", _fmt(floor, "tasks/s"))
        table.add_row("kew drain / floor", f"{drain['median'] / floor:.2f}x")
    if "floor_latency" in extras:
        floor = extras["floor_latency"]["p50_ms"]
        table.add_row("floor submit-and-await", _fmt(floor, "ms p50"))
        if "inproc" in extras:
            ratio = extras["inproc"]["p50_ms"] / floor
            table.add_row("kew same-process latency / floor", f"{ratio:.2f}x")
    return table
