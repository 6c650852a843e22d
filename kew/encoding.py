"""JSON as kew stores arguments and results: what pydantic writes, minus the
numbers JSON does not have.

pydantic writes a float NaN or infinity as a bare `NaN` or `Infinity`, which
is not JSON: other readers of the log (`jq`, JavaScript, a strict parser)
refuse the whole event. kew refuses such a value where it enters instead: at
submit for an argument, at the end of the attempt for a result.
"""

from __future__ import annotations

import json

__all__ = ["non_finite"]


def non_finite(encoded: str) -> str | None:
    """The first bare NaN, Infinity or -Infinity in `encoded` (JSON written by
    pydantic), or None if it holds none."""
    if "NaN" not in encoded and "Infinity" not in encoded:
        return None  # the usual case, decided without parsing
    found: list[str] = []

    def constant(name: str) -> float:
        found.append(name)
        return 0.0

    json.loads(encoded, parse_constant=constant)
    return found[0] if found else None
