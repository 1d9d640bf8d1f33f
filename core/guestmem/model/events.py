"""Trace events and cost counters of the model.

Every modelled event goes three ways: the ``guestmem_trace`` hook (observers), a structlog
event (``guestmem.<kind>``, only once the application configured structlog: the library
never configures logging) and, with ``guestmem.open(..., record=True)``, the host's
recorded trace.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from guestmem.backend import TraceEvent


class _Sequence:
    """The process's event sequence numbers."""

    def __init__(self) -> None:
        self.next = 0

    def take(self) -> int:
        value = self.next
        self.next += 1
        return value


_seq = _Sequence()


def next_seq() -> int:
    """The sequence number the next event will get (a call's ``first_seq``)."""
    return _seq.next


def make_event(kind: str, vm: int | None, fields: dict[str, Any]) -> TraceEvent:
    """A new event with the next sequence number of the process and a monotonic timestamp."""
    return TraceEvent(_seq.take(), kind, vm, fields, time.monotonic_ns())


class Counters(Counter[str]):
    """Cost counters: a ``Counter`` whose missing keys read as 0."""

    def snapshot(self) -> dict[str, int]:
        """Non-zero counters, sorted by name."""
        return {k: v for k, v in sorted(self.items()) if v}
