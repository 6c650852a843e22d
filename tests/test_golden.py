"""Golden histories: logs written by earlier versions of kew, replayed through
today's folds. A change to a projection (or to an event model) that would
read an old log differently fails here. The files are never regenerated; a new
schema version adds new ones (tests/golden/make_golden.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kew.audit import read_archive
from kew.events.models import EVENT_TYPES, Event
from kew.projections import fold_events
from kew.projections.task import same_hash

GOLDEN = Path(__file__).parent / "golden"
VERSIONS = sorted(p.name.removesuffix(".jsonl") for p in GOLDEN.glob("*.jsonl"))


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_history_folds_to_the_recorded_projections(version: str) -> None:
    """Replaying the golden log gives the projections its functions stored."""
    events = list(read_archive(GOLDEN / f"{version}.jsonl"))
    expected = json.loads((GOLDEN / f"{version}.expected.json").read_text())
    folded = fold_events(events)

    assert sorted(folded.tasks) == sorted(expected["tasks"])
    for task_id, stored in expected["tasks"].items():
        assert same_hash(stored, folded.tasks[task_id].to_hash()) == [], task_id
    assert {k: str(v) for k, v in folded.stats.items()} == expected["stats"]
    breaker = folded.breaker.to_hash() if folded.breaker else {}
    assert breaker == expected["breaker"]
    assert folded.ended == expected["ended"]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_golden_event_is_understood(version: str) -> None:
    """No golden event falls back to the untyped Event: every type it uses is
    still known (or upcast) by this version of kew."""
    events = list(read_archive(GOLDEN / f"{version}.jsonl"))
    assert events
    unknown = {e.type for e in events if type(e) is Event}
    assert unknown == set()
    assert {e.type for e in events} <= set(EVENT_TYPES)
