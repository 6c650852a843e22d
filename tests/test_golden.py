"""Golden histories: logs written by earlier versions of kew, replayed through
today's folds. A change to a projection (or to an event model) that would
read an old log differently fails here. The files are never regenerated; a new
schema version adds new ones (tests/golden/make_golden.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kew.audit import line_fields, read_archive, read_lines
from kew.events.codec import decode, decode_for_fold
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


def test_every_golden_event_is_understood() -> None:
    """No golden event falls back to the untyped Event: every type each file
    uses is still known (or upcast) by this version of kew; and the files
    together hold every event type kew knows, so each one is replayed."""
    assert VERSIONS
    seen: set[str] = set()
    for version in VERSIONS:
        events = list(read_archive(GOLDEN / f"{version}.jsonl"))
        assert events, version
        unknown = {e.type for e in events if type(e) is Event}
        assert unknown == set(), version
        seen |= {e.type for e in events}
    assert seen == set(EVENT_TYPES), (
        f"no golden history holds {sorted(set(EVENT_TYPES) - seen)}: add a "
        "workload for it to tests/golden/make_golden.py and write a new history"
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_the_folds_decoder_builds_the_same_events_as_decode(version: str) -> None:
    """decode_for_fold (no validation, for rebuilds) gives, for every golden
    entry, an event equal to the validated decode's, with the same fields."""
    with open(GOLDEN / f"{version}.jsonl", encoding="utf-8") as stream:
        lines = [line for line in read_lines(stream) if "id" in line]
    assert lines
    for line in lines:
        fields = line_fields(line)
        flat = [item for pair in fields.items() for item in pair]
        fast, checked = decode_for_fold(line["id"], flat), decode(line["id"], fields)
        assert type(fast) is type(checked), line
        assert fast == checked, line
        assert fast.model_dump() == checked.model_dump(), line


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"type": "task.future_kind", "v": "1", "task_id": "t"}, "unknown type"),
        ({"type": "task.started", "v": "1", "task_id": "t"}, "no entry"),
        (
            {"type": "task.started", "v": "1", "data": '{"entry":"1-0","x":1}'},
            "a field the model lacks",
        ),
        (
            {"type": "task.succeeded", "v": "1", "attempt": "2", "data": "[1]"},
            "data that is not an object",
        ),
    ],
)
def test_the_folds_decoder_leaves_odd_entries_to_decode(
    fields: dict[str, str], why: str
) -> None:
    """An entry the fast path cannot vouch for is decoded (and validated, or
    refused) exactly as decode does it."""
    flat = [item for pair in fields.items() for item in pair]
    try:
        expected: Event | type[Exception] = decode("5-0", fields)
    except ValueError as exc:
        expected = type(exc)
    if isinstance(expected, Event):
        assert decode_for_fold("5-0", flat) == expected, why
    else:
        with pytest.raises(expected):
            decode_for_fold("5-0", flat)
