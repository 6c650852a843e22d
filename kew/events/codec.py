"""Reading and writing events as stream fields, and upgrading old versions.

The Lua library writes most events; this module is the one place that turns a
log entry back into a model. A reader never fails on what it does not know: an
unknown type is read as a plain `Event`, unknown fields are ignored, and an
event written under an older schema version is upcast, step by step, before it
is validated. The log itself is never rewritten.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from kew.events.models import ENVELOPE, EVENT_TYPES, Event

__all__ = ["UPCASTERS", "decode", "encode"]

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

UPCASTERS: dict[tuple[str, int], Upcaster] = {}
"""(type, version) -> a function turning that version's fields into the next
version's. Every event type is at version 1 so far, so the table is empty; a
change to an event's fields adds an entry here and bumps the model's VERSION."""

_INTS = ("v", "attempt")


def decode(entry_id: str, fields: Mapping[str, str]) -> Event:
    """Turn one log entry into its event model."""
    raw: dict[str, Any] = {"id": entry_id}
    for name in ENVELOPE:
        value = fields.get(name)
        if value is not None and value != "":
            raw[name] = int(value) if name in _INTS else value
    data = fields.get("data")
    if data:
        payload = json.loads(data)
        if isinstance(payload, dict):
            for key, value in payload.items():  # pyright: ignore[reportUnknownVariableType]
                raw.setdefault(str(key), value)  # pyright: ignore[reportUnknownArgumentType]
    model = EVENT_TYPES.get(str(raw.get("type", "")), Event)
    raw = _upcast(raw, model)
    return model.model_validate(raw)


def _upcast(raw: dict[str, Any], model: type[Event]) -> dict[str, Any]:
    version = int(raw.get("v", 1))
    while version < model.VERSION:
        step = UPCASTERS.get((str(raw["type"]), version))
        if step is None:
            break
        raw = step(raw)
        version += 1
        raw["v"] = version
    return raw


def encode(event: Event) -> dict[str, str]:
    """The stream fields of an event, as the Lua library would write them."""
    dumped = event.model_dump(mode="json", by_alias=True)
    fields: dict[str, str] = {}
    for name in ENVELOPE:
        value = dumped.get(name)
        if value is not None and value != "":
            fields[name] = str(value)
    data = {k: v for k, v in dumped.items() if k not in ENVELOPE and k != "id"}
    if data:
        fields["data"] = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return fields
