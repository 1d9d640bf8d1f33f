"""Minimising a disagreement: ops are deleted while the rest still disagrees on the same kind of op.

Deleting an op never re-targets another (objects are named by the id of the op that
created them), so any subsequence is a program both backends can run.
"""

from __future__ import annotations

from guestmem.diff.interpreter import Opener, compare
from guestmem.diff.program import Disagreement


def shrink(left: Opener, right: Opener, found: Disagreement) -> Disagreement:
    """Delete ops while a disagreement on the same kind of op remains (greedy, one pass per size)."""
    program = list(found.program[: found.index + 1])
    best = Disagreement(tuple(program), found.index, found.left, found.right)
    name = found.op.name
    chunk = max(1, len(program) // 2)
    while chunk >= 1:
        start = len(program) - 1 - chunk
        while start >= 0:
            candidate = program[:start] + program[start + chunk :]
            result = compare(left, right, candidate)
            if result is not None and result.op.name == name:
                program = list(result.program[: result.index + 1])
                best = result
                start = min(start, len(program) - 1) - chunk
            else:
                start -= 1
        chunk //= 2
    return best
