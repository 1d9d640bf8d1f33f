"""What a program of the differential harness is, and how it is shown.

A program is a sequence of :class:`Op`: plain data, an operation name and its arguments.
Objects a program creates (VMs, guest_memfds, host mappings, vCPUs) are named by the id of
the op that created them, so deleting ops while shrinking never re-targets another op.
Running an op on a backend gives an :data:`Outcome`; a :class:`Disagreement` is the first
op whose outcomes differ between two backends, rendered as a reproducer.
"""

from __future__ import annotations

from typing import Any

import attrs

#: Outcome of one op: a tuple whose first item is its kind ("ok", "errno", "sigbus", ...).
Outcome = tuple[Any, ...]


@attrs.frozen
class Op:
    """One uAPI operation; ``id`` names the object it creates (if any)."""

    id: int
    name: str
    args: tuple[Any, ...] = ()

    def __str__(self) -> str:
        shown = ", ".join(_show(a) for a in self.args)
        return f"#{self.id} {self.name}({shown})"


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return hex(value) if abs(value) >= 10 else str(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    return repr(value)


@attrs.frozen
class Disagreement:
    """The first op of *program* whose outcomes differ between the two backends."""

    program: tuple[Op, ...]
    index: int
    left: Outcome
    right: Outcome

    @property
    def op(self) -> Op:
        """The op that disagreed."""
        return self.program[self.index]

    def render(self, left: str = "left", right: str = "right") -> str:
        """A reproducer: the program and both outcomes of its disagreeing op."""
        lines = [f"  {op}" for op in self.program[: self.index + 1]]
        lines.append(f"  -> {left}: {self.left}")
        lines.append(f"  -> {right}: {self.right}")
        return "\n".join(lines)
