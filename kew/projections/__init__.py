"""Projections: pure folds of the log into task status and queue statistics,
and the rebuild and verify operations built on them."""

from kew.projections.breaker import BreakerState, apply_breaker
from kew.projections.queue import count_states
from kew.projections.rebuild import (
    Difference,
    QueueFold,
    fold_events,
    fold_queue,
    rebuild,
    verify,
)
from kew.projections.task import TaskState, apply, fold

__all__ = [
    "BreakerState",
    "Difference",
    "QueueFold",
    "TaskState",
    "apply",
    "apply_breaker",
    "count_states",
    "fold",
    "fold_events",
    "fold_queue",
    "rebuild",
    "verify",
]
