"""A campaign: random programs from one seed, run on two backends and compared op by op.

Each distinct disagreement (the op's name and both outcome kinds) is reported once, shrunk
to a minimal reproducer unless asked not to.  This is what ``guestmem diff`` runs.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import attrs

from guestmem import uapi
from guestmem.diff.generator import generate
from guestmem.diff.interpreter import Opener, compare
from guestmem.diff.program import Disagreement
from guestmem.diff.shrink import shrink


@attrs.define
class Summary:
    """What a campaign did."""

    left: str
    right: str
    seed: int
    sequences: int = 0
    operations: int = 0
    disagreements: list[Disagreement] = attrs.Factory(list)
    seconds: float = 0.0

    def render(self) -> str:
        """Human-readable report."""
        lines = [
            f"guestmem diff: {self.left} vs {self.right} (seed {self.seed})",
            f"  sequences:     {self.sequences}",
            f"  operations:    {self.operations}",
            f"  disagreements: {len(self.disagreements)}",
            f"  time:          {self.seconds:.2f}s",
        ]
        for n, found in enumerate(self.disagreements, 1):
            lines.append(f"disagreement {n} at {found.op.name} (minimal reproducer):")
            lines.append(found.render(self.left, self.right))
        return "\n".join(lines)


def run_campaign(
    left: Opener,
    right: Opener,
    *,
    seed: int,
    steps: int,
    length: int = 40,
    labels: tuple[str, str] = ("left", "right"),
    minimise: bool = True,
    vm_types: Sequence[int] = (uapi.KVM_X86_DEFAULT_VM,),
) -> Summary:
    """Random programs totalling *steps* ops; one shrunk reproducer per distinct op kind."""
    started = time.perf_counter()
    summary = Summary(labels[0], labels[1], seed)
    rng = random.Random(seed)
    seen: set[tuple[str, str, str]] = set()
    while summary.operations < steps:
        program = generate(rng, min(length, steps - summary.operations), vm_types)
        summary.sequences += 1
        summary.operations += len(program)
        found = compare(left, right, program)
        if found is None:
            continue
        key = (found.op.name, str(found.left[0]), str(found.right[0]))
        if key in seen:
            continue
        seen.add(key)
        summary.disagreements.append(shrink(left, right, found) if minimise else found)
    summary.seconds = time.perf_counter() - started
    return summary
