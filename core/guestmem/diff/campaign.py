"""A campaign: random programs from one seed, run on two backends and compared op by op.

Each distinct disagreement (the op's name and both outcome kinds) is reported once, shrunk
to a minimal reproducer unless asked not to.  :func:`run_campaign` runs one in this
process; a larger campaign is cut into :class:`DiffUnit` values (against each backend,
with each profile, ``steps`` in chunks from seeds ``seed + SEED_STRIDE * i``:
:func:`diff_units`) that :func:`guestmem.campaign.run_units` shards over worker processes
or a Dask cluster, each run by :func:`run_unit`, and :func:`merge` folds them, in the
order of the units, into one result whatever the sharding.  This is what ``guestmem diff``
runs.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import attrs

from guestmem import uapi
from guestmem.campaign import Failed
from guestmem.diff.generator import generate
from guestmem.diff.interpreter import Opener, compare, opener
from guestmem.diff.program import Disagreement
from guestmem.diff.shrink import shrink

#: Seeds of consecutive chunks of a campaign are this far apart.
SEED_STRIDE = 1000


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

    def to_json(self) -> dict[str, Any]:
        """The summary as plain data (no timing: the same seed gives the same data)."""
        return {
            "left": self.left,
            "right": self.right,
            "seed": self.seed,
            "sequences": self.sequences,
            "operations": self.operations,
            "disagreements": [
                {
                    "key": _key(found),
                    "op": found.op.name,
                    "program": [str(op) for op in found.program[: found.index + 1]],
                    "left": list(found.left),
                    "right": list(found.right),
                    "reproducer": found.render(self.left, self.right),
                }
                for found in self.disagreements
            ],
        }

    def render(self) -> str:
        """Human-readable report."""
        return render(self.to_json()) + f"\n  time:          {self.seconds:.2f}s"


def render(summary: dict[str, Any]) -> str:
    """A summary's plain data (:meth:`Summary.to_json`, or a group of :func:`merge`) as text."""
    lines = [
        f"guestmem diff: {summary['left']} vs {summary['right']} (seed {summary['seed']})",
        f"  sequences:     {summary['sequences']}",
        f"  operations:    {summary['operations']}",
        f"  disagreements: {len(summary['disagreements'])}",
    ]
    for n, found in enumerate(summary["disagreements"], 1):
        lines.append(f"disagreement {n} at {found['op']} (minimal reproducer):")
        lines.append(found["reproducer"])
    return "\n".join(lines)


def _key(found: Disagreement) -> list[str]:
    return [found.op.name, str(found.left[0]), str(found.right[0])]


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
    seen: set[tuple[str, ...]] = set()
    while summary.operations < steps:
        program = generate(rng, min(length, steps - summary.operations), vm_types)
        summary.sequences += 1
        summary.operations += len(program)
        found = compare(left, right, program)
        if found is None:
            continue
        key = tuple(_key(found))
        if key in seen:
            continue
        seen.add(key)
        summary.disagreements.append(shrink(left, right, found) if minimise else found)
    summary.seconds = time.perf_counter() - started
    return summary


@attrs.frozen
class DiffUnit:
    """One unit of a sharded campaign: everything a worker needs, by name."""

    base: str
    against: str
    #: The base's kernel profile (None: its default).
    profile: str | None
    seed: int
    steps: int
    length: int = 40
    minimise: bool = True
    vm_types: tuple[int, ...] = (uapi.KVM_X86_DEFAULT_VM,)

    @property
    def labels(self) -> tuple[str, str]:
        """How the two sides are shown."""
        return (self.base + (f"[{self.profile}]" if self.profile else ""), self.against)

    def to_json(self) -> dict[str, Any]:
        """As plain data."""
        return attrs.asdict(self)


def diff_units(
    base: str,
    against: Sequence[str],
    profiles: Sequence[str | None],
    *,
    seed: int,
    steps: int,
    chunk: int,
    **options: Any,
) -> list[DiffUnit]:
    """The units of a campaign of *base* against each of *against*, with each profile;
    *options* are the other fields of :class:`DiffUnit`."""
    chunk = max(1, chunk)
    return [
        DiffUnit(base, right, profile, seed + SEED_STRIDE * i, min(chunk, steps - i * chunk), **options)
        for right in against
        for profile in profiles
        for i in range(-(-steps // chunk))
    ]


def run_unit(unit: DiffUnit) -> dict[str, Any]:
    """Run one unit in this process; its summary as plain data."""
    summary = run_campaign(
        opener(unit.base, unit.profile),
        opener(unit.against),
        seed=unit.seed,
        steps=unit.steps,
        length=unit.length,
        labels=unit.labels,
        minimise=unit.minimise,
        vm_types=unit.vm_types,
    )
    return {**summary.to_json(), "seconds": summary.seconds}


def merge(units: Sequence[DiffUnit], results: Sequence[dict[str, Any] | Failed[DiffUnit]]) -> dict[str, Any]:
    """One result per pair and profile: counts summed, each distinct disagreement once (the
    first unit's), and the units whose worker failed."""
    groups: dict[tuple[str, str, str | None], dict[str, Any]] = {}
    failures = []
    for unit, result in zip(units, results, strict=True):
        left, right = unit.labels
        group = groups.setdefault(
            (unit.base, unit.against, unit.profile),
            {"left": left, "right": right, "seed": unit.seed, "units": 0, "sequences": 0, "operations": 0},
        )
        group["units"] += 1
        if isinstance(result, Failed):
            failures.append(result.to_json())
            continue
        group["sequences"] += result["sequences"]
        group["operations"] += result["operations"]
        found = group.setdefault("disagreements", [])
        seen = {tuple(d["key"]) for d in found}
        found.extend(d for d in result["disagreements"] if tuple(d["key"]) not in seen)
    for group in groups.values():
        group.setdefault("disagreements", [])
    return {"results": list(groups.values()), "worker_failures": failures}
