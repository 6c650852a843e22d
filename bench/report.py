"""Medians, ratios to the best peer, the issue's targets, and the tables.

Ratios are always measured in the same run: kew against the best peer of that
run (kew 0.2.1 counts as a peer, as in the issue's table). For the batch row
the best peer is the best library with a batch API; rows made by gathering
single submits are shown but are not that API. A peer's rep that failed a
check (a task lost or run twice, a limit exceeded, a crash) does not count
towards the best peer: its median is of its verified reps only, and a peer
with none is left out (its cell is still shown, marked `!`).

Ratios are rounded to 3 decimals, and a target is judged on the rounded
figure, so what is printed and the verdict always agree.
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
    rows: list[dict[str, Any]], scenario: str, higher: bool
) -> dict[str, Any] | None:
    """The best peer's median over its verified reps: {"lib", "value",
    "verified", "reps"}; None if no peer has a verified rep."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["scenario"] == scenario and r["lib"] != "kew":
            grouped[r["lib"]].append(r)
    candidates: list[dict[str, Any]] = []
    for lib, group in grouped.items():
        if scenario == "batch submit" and any(
            "gather" in r["raw"].get("batch_api", "") for r in group
        ):
            continue
        values = [r["value"] for r in group if r["ok"] and r["value"] is not None]
        if values:
            median = statistics.median(values)
            candidates.append(
                {
                    "lib": lib,
                    "value": median,
                    "verified": len(values),
                    "reps": len(group),
                }
            )
    if not candidates:
        return None
    pick = max if higher else min
    return pick(candidates, key=lambda c: c["value"])


def verdict(
    scenario: str, target: str, kew: float, against: str, value: float, bound: float
) -> dict[str, Any]:
    """One target: kew / `value`, rounded to 3 decimals, against `bound`
    (a lower bound if the target text says >=, else an upper one)."""
    ratio = round(kew / value, 3)
    met = ratio >= bound if ">=" in target else ratio <= bound
    return {
        "scenario": scenario,
        "target": target,
        "kew": kew,
        "best_peer": against,
        "best_value": value,
        "ratio": ratio,
        "met": met,
    }


def summarize(
    rows: list[dict[str, Any]], extras: dict[str, Any], sleep_ideal_s: float
) -> dict[str, Any]:
    """The target verdicts, as data (saved with the raw rows). A kew-only
    measure that failed (an "error" key) has no verdict; `problems` in run.py
    reports it."""
    med = medians(rows)
    verdicts: list[dict[str, Any]] = []
    for t in TARGETS:
        kew = med.get(("kew", t.scenario))
        best = best_peer(rows, t.scenario, t.higher_is_better)
        if kew is None or kew["median"] is None or best is None:
            continue
        against = best["lib"]
        if best["verified"] < best["reps"]:
            against += f" ({best['verified']} of {best['reps']} reps verified)"
        v = verdict(t.scenario, t.text, kew["median"], against, best["value"], t.bound)
        v["met"] = v["met"] and kew["ok"]
        verdicts.append(v)
    sleep = med.get(("kew", "sleep"))
    if sleep is not None and sleep["median"] is not None:
        ideal = next(
            (r["ideal_s"] for r in sleep["raw"] if "ideal_s" in r), sleep_ideal_s
        )
        v = verdict("sleep", "<= 1.15x ideal", sleep["median"], "ideal", ideal, 1.15)
        v["met"] = v["met"] and sleep["ok"]
        verdicts.append(v)
    good = {name: e for name, e in extras.items() if "error" not in e}
    if "recovery" in good:
        value = good["recovery"]["median_s"]
        v = verdict("recovery after SIGKILL", "< 3 s median", value, "", 3.0, 1.0)
        v["met"] = value < 3.0
        verdicts.append(v)
    for name, what in REBUILDS:
        if "events_per_s" not in good.get(name, {}):
            continue
        value = good[name]["events_per_s"]
        target = ">= 100,000 events/s"
        v = verdict(f"rebuild projections ({what})", target, value, "", 1e5, 1.0)
        v["met"] = v["met"] and good[name]["verify_differences"] == 0
        verdicts.append(v)
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


def describe(source: dict[str, Any]) -> str:
    """The commit a run measured, in words (see `commit` in run.py)."""
    if source.get("head") is None:
        return f"an unknown commit ({source.get('error')})"
    if not source["dirty"]:
        return f"commit {source['head'][:12]} (clean tree)"
    n = len(source["changed"])
    return f"commit {source['head'][:12]} + {n} uncommitted changes (dirty tree)"


def print_tables(
    rows: list[dict[str, Any]],
    extras: dict[str, Any],
    summary: dict[str, Any],
    header: dict[str, Any],
) -> None:
    console = Console(width=160)
    med = medians(rows)
    libs = [name for name in LIBS if any(lib == name for lib, _ in med)]
    reps = max((r["rep"] for r in rows), default=0) + 1

    console.print(f"kew: {describe(header['commit'])}")
    console.print(f"server: {header['redis']} ({header['redis_binary']})")
    if header["smoke"] or header["scale"] != 1.0:
        how = "--smoke" if header["smoke"] else f"--scale {header['scale']:g}"
        console.print(f"[yellow]reduced sizes ({how}): not for quoting[/]")

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
        if scenario == "latency":
            table.add_row(
                "latency (ms p99)", *_raw_medians(med, libs, "latency", "p99_ms")
            )
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
        eff.add_row(label, *_raw_medians(med, libs, scenario, key))
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
            f"{v['ratio']:.3f}x",
            "[green]met[/]" if v["met"] else "[red]not met[/]",
        )
    console.print(verdicts)
    console.print(
        "A peer's rep that failed a check is left out of the best peer; ratios "
        "are rounded to 3 decimals and judged as printed."
    )

    if extras:
        console.print(_extras_table(extras, med))


def _raw_medians(
    med: dict[tuple[str, str], dict[str, Any]], libs: list[str], scenario: str, key: str
) -> list[str]:
    """Per library, the median over reps of one raw measure ("" if none)."""
    cells: list[str] = []
    for lib in libs:
        cell = med.get((lib, scenario))
        values = [r[key] for r in cell["raw"] if key in r] if cell else []
        cells.append(_fmt(statistics.median(values)) if values else "")
    return cells


def _extras_table(all_extras: dict[str, Any], med: dict[tuple[str, str], Any]) -> Table:
    table = Table(title="kew only")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, e in all_extras.items():
        if "error" in e:
            table.add_row(f"{name}", f"[red]failed[/]: {e['error']}")
    extras = {name: e for name, e in all_extras.items() if "error" not in e}
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
    logs = [r["log"] for r in drain["raw"] if "log" in r] if drain else []
    if logs:
        per = logs[0]["bytes_per_entry"]
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
        table.add_row("kew drain / floor", f"{drain['median'] / floor:.3f}x")
    if "floor_latency" in extras:
        floor = extras["floor_latency"]["p50_ms"]
        table.add_row("floor submit-and-await", _fmt(floor, "ms p50"))
        if "inproc" in extras:
            ratio = extras["inproc"]["p50_ms"] / floor
            table.add_row("kew same-process latency / floor", f"{ratio:.3f}x")
    return table
