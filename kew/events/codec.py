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
from typing import Any, cast

import pydantic_core

from kew.events.models import ENVELOPE, EVENT_TYPES, KNOWN_EVENT, Event

__all__ = ["UPCASTERS", "decode", "encode"]

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

UPCASTERS: dict[tuple[str, int], Upcaster] = {}
"""(type, version) -> a function turning that version's fields into the next
version's. Every event type is at version 1 so far, so the table is empty; a
change to an event's fields adds an entry here and bumps the model's VERSION."""


def decode(entry_id: str, fields: Mapping[str, str]) -> Event:
    """Turn one log entry into its event model."""
    data = fields.get("data")
    parsed: object = pydantic_core.from_json(data) if data else None
    raw: dict[str, Any] = (
        cast(dict[str, Any], parsed) if isinstance(parsed, dict) else {}
    )
    raw.update(fields)  # the envelope's fields win over data's; "data" is ignored
    raw["id"] = entry_id
    model = EVENT_TYPES.get(str(raw.get("type", "")))
    if model is None:
        return Event.model_validate(raw)
    if int(raw.get("v", 1)) < model.VERSION:
        raw = _upcast(raw, model)
    return KNOWN_EVENT.validate_python(raw)


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
