"""The queue statistics projection: how many tasks stand in each state.

The stats hash counts tasks by their current state; each function moves a task
from one counter to another in the same call that appends its event. Folded
from the log, the same numbers are the count of the folded task states, plus
the tasks whose id was submitted again after their record expired (the fold
keeps one state per id; the stats hash keeps counting the earlier task in the
state it was left in; see `Folder` in kew/projections/rebuild.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from kew.projections.task import TaskState

__all__ = ["STATES", "count_states", "same_stats"]

STATES = (
    "queued",
    "scheduled",
    "retry",
    "processing",
    "completed",
    "failed",
    "cancelled",
)


def count_states(tasks: Iterable[TaskState]) -> dict[str, int]:
    counts = Counter(task.state for task in tasks)
    return {state: counts[state] for state in STATES if counts[state]}


def same_stats(stored: Mapping[str, str], folded: Mapping[str, int]) -> list[str]:
    """The states whose stored count differs from the folded one (a missing
    counter and a zero are the same)."""
    names = set(stored) | set(folded)
    return sorted(n for n in names if int(stored.get(n, 0)) != folded.get(n, 0))
