"""Reading and writing events as stream fields, and upgrading old versions.

The Lua library writes most events; this module is the one place that turns a
log entry back into a model. A reader never fails on what it does not know: an
unknown type is read as a plain `Event`, unknown fields are ignored, and an
event written under an older schema version is upcast, step by step, before it
is validated. The log itself is never rewritten.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import pydantic_core

from kew.events.models import ENVELOPE, EVENT_TYPES, KNOWN_EVENT, Event

__all__ = ["UPCASTERS", "decode", "decode_for_fold", "encode"]

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


class _Shape:
    """What `decode_for_fold` needs to know of one event model."""

    def __init__(self, model: type[Event]) -> None:
        self.model = model
        self.version = model.VERSION
        fields = model.model_fields
        self.names = frozenset(fields)
        self.required = frozenset(n for n, f in fields.items() if f.is_required())
        self.defaults = {
            n: f.get_default(call_default_factory=True)
            for n, f in fields.items()
            if not f.is_required()
        }
        self.aliases = tuple(
            (f.alias, n) for n, f in fields.items() if f.alias and f.alias != n
        )


_SHAPES = {name: _Shape(model) for name, model in EVENT_TYPES.items()}
_new = object.__new__
_set = object.__setattr__


def decode_for_fold(entry_id: str, flat: Sequence[str]) -> Event:
    """`decode` for the hot loop of a fold (a rebuild reads millions of
    events): the same model from a log entry's flat field list, built without
    running pydantic's validation, which is most of `decode`'s cost.

    The log is written by kew's own functions, and an import checks every line
    before it writes, so an entry of a known type at its current version has
    the right fields with JSON values of the right types; only the envelope's
    integers arrive as strings. Anything else (an unknown type, an older
    version to upcast, a missing required field, a field the model does not
    have, a value that is not an integer where one must be) goes through
    `decode`, which validates. The events share their default values (`[]`,
    `{}`): they are for folding, which never changes an event.
    """
    # kew's functions write `type` first and `data` last: read the rest of
    # the envelope straight into the event's fields.
    if len(flat) < 2 or flat[0] != "type" or len(flat) % 2:
        return _checked(entry_id, flat)
    shape = _SHAPES.get(flat[1])
    if shape is None:
        return _checked(entry_id, flat)
    raw = shape.defaults.copy()
    envelope = flat
    if flat[-2] == "data":
        envelope = flat[:-2]
        if flat[-1]:
            parsed = pydantic_core.from_json(flat[-1])
            if not isinstance(parsed, dict):
                return _checked(entry_id, flat)
            raw.update(cast(dict[str, Any], parsed))
            for alias, name in shape.aliases:
                if alias in raw:
                    raw[name] = raw.pop(alias)
    it = iter(envelope)
    raw.update(zip(it, it, strict=True))
    raw["id"] = entry_id
    try:
        if int(raw["v"]) != shape.version:
            return _checked(entry_id, flat)
        raw["v"] = shape.version
        raw["attempt"] = int(raw["attempt"])
    except ValueError:
        return _checked(entry_id, flat)
    if not shape.required <= raw.keys() or not raw.keys() <= shape.names:
        return _checked(entry_id, flat)
    # What pydantic's model_construct does, without its per-field loop.
    event = _new(shape.model)
    _set(event, "__dict__", raw)
    _set(event, "__pydantic_fields_set__", set())
    _set(event, "__pydantic_extra__", None)
    _set(event, "__pydantic_private__", None)
    return event


def _checked(entry_id: str, flat: Sequence[str]) -> Event:
    return decode(entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))


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
