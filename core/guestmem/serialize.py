"""The one cattrs converter behind every JSON form (traces, snapshots)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import IO, Any

import cattrs

from guestmem.backend import TraceEvent

_converter = cattrs.Converter(forbid_extra_keys=True)


def event_to_json(event: TraceEvent) -> str:
    """One JSON line for *event*."""
    data: dict[str, Any] = _converter.unstructure(event)
    fields = data.pop("fields")
    return json.dumps({**data, **fields}, sort_keys=True, default=str)


def event_from_json(line: str) -> TraceEvent:
    """Parse a line written by :func:`event_to_json`."""
    data = json.loads(line)
    head = {k: data.pop(k) for k in ("seq", "kind", "vm", "ts") if k in data}
    try:
        return _converter.structure({**head, "fields": data}, TraceEvent)
    except cattrs.BaseValidationError as exc:
        raise ValueError("; ".join(cattrs.transform_error(exc))) from None


def write_trace(events: Iterable[TraceEvent], out: IO[str]) -> int:
    """Write *events* as JSON lines; returns how many."""
    n = 0
    for event in events:
        out.write(event_to_json(event) + "\n")
        n += 1
    return n
