"""Trace events and cost counters of the model.

Every modelled event goes three ways: a structlog event (``guestmem.<kind>``, never
configured by the library), the ``guestmem_trace`` hook (observers), and, for the VM's
own record, an optional in-memory trace list.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import attrs
import structlog

log = structlog.get_logger("guestmem")

_seq = itertools.count()


@attrs.frozen
class TraceEvent:
    """One modelled event: ``kind`` (e.g. ``"fault"``, ``"punch_hole"``) and its fields."""

    seq: int
    kind: str
    vm: int | None
    fields: dict[str, Any] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (``seq``, ``kind``, ``vm`` and the fields)."""
        return {"seq": self.seq, "kind": self.kind, "vm": self.vm, **self.fields}


def make_event(kind: str, vm: int | None, fields: dict[str, Any]) -> TraceEvent:
    """A new event with the next global sequence number."""
    return TraceEvent(next(_seq), kind, vm, fields)


class Counters(Counter[str]):
    """Cost counters: a ``Counter`` whose missing keys read as 0."""

    def snapshot(self) -> dict[str, int]:
        """Non-zero counters, sorted by name."""
        return {k: v for k, v in sorted(self.items()) if v}
