"""A fuzz campaign: backends x profiles x chunks of steps, sharded and merged.

:func:`campaign_units` cuts a campaign into :class:`~guestmem.fuzz.run.FuzzConfig` units:
for each backend and profile, ``steps`` in chunks of ``chunk`` steps, chunk *i* from seed
``seed + SEED_STRIDE * i`` (the first chunk is the plain ``guestmem fuzz --seed``).
:func:`run_unit` runs one (in a worker: :func:`guestmem.campaign.run_units`) and returns
plain data.  :func:`merge` folds the results in the order of the units, and a hostile
campaign's findings are then minimised once per class (:func:`minimise_unit`, sharded
too), from the first sequence that showed each class.  The merged result is plain data
with no timings in it: the same campaign gives the same result whatever the sharding.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from guestmem.campaign import Failed, run_units
from guestmem.fuzz.run import FuzzConfig

#: Seeds of consecutive chunks are this far apart: a chunk's Hypothesis runs use
#: ``seed + run`` (and hostile sequences ``"seed:n"``), so chunks never share a run.
SEED_STRIDE = 1000


def campaign_units(
    backends: Sequence[str],
    profiles: Sequence[str | None] = (None,),
    *,
    steps: int,
    chunk: int,
    seed: int = 0,
    **options: Any,
) -> list[FuzzConfig]:
    """The units of a campaign; *options* are the other fields of
    :class:`~guestmem.fuzz.run.FuzzConfig` (``hostile``, ``run_length``, ...)."""
    chunk = max(1, chunk)
    units = []
    for backend in backends:
        for profile in profiles:
            for i in range(-(-steps // chunk)):
                units.append(
                    FuzzConfig(
                        backend,
                        steps=min(chunk, steps - i * chunk),
                        seed=seed + SEED_STRIDE * i,
                        profile=profile,
                        **options,
                    )
                )
    return units


def run_unit(config: FuzzConfig) -> dict[str, Any]:
    """Run one unit; its result as plain data (what travels back from a worker)."""
    if not config.hostile:
        from guestmem.fuzz.run import run_fuzz

        result = run_fuzz(config)
        return {**result.to_json(), "seconds": result.seconds}
    from guestmem.conformance.hostile import to_plain
    from guestmem.fuzz.hostile import run_hostile

    hostile = run_hostile(config)
    return {
        "vm_type": hostile.vm_type_name,
        "sequences": hostile.sequences,
        "steps": hostile.steps,
        "seconds": hostile.seconds,
        "tally": hostile.tally,
        "ended": hostile.ended,
        "findings": {
            key: {
                "count": found.count,
                "message": found.message,
                "first": list(found.first),
                "steps": [[name, to_plain(kwargs)] for name, kwargs in found.steps],
            }
            for key, found in hostile.findings.items()
        },
    }


@attrs.frozen
class MinimiseUnit:
    """Minimising one finding class: the unit's config and the first program (JSON)."""

    config: FuzzConfig
    key: str
    steps: str

    def to_json(self) -> dict[str, Any]:
        """As plain data."""
        return {"config": self.config.to_json(), "class": self.key}


def minimise_unit(unit: MinimiseUnit) -> list[Any]:
    """The minimised program of *unit*, as plain data."""
    from guestmem.conformance.hostile import from_plain, to_plain
    from guestmem.fuzz.hostile import hostile_machine, minimise

    steps = [(str(name), from_plain(kwargs)) for name, kwargs in json.loads(unit.steps)]
    machine = hostile_machine(unit.config)
    small = minimise(machine, steps, unit.key, timeout=unit.config.call_timeout)
    return [[name, to_plain(kwargs)] for name, kwargs in small]


def _group(config: FuzzConfig) -> tuple[str, str | None, int | None]:
    return (config.backend, config.profile, config.vm_type)


def _add(into: dict[str, int], key: str, n: int) -> None:
    into[key] = into.get(key, 0) + n


def _summary(tally: dict[str, int]) -> dict[str, Any]:
    """Outcome counts by kind, and by errno and rule, parameter, exit, verdict, accepted call."""
    kinds: dict[str, int] = {}
    by: dict[str, dict[str, int]] = {
        k: {} for k in ("errno", "type_error", "exit", "signal", "verdict", "accepted")
    }
    for key, n in sorted(tally.items()):
        kind, _, rest = key.partition(": ")
        _add(kinds, kind, n)
        if kind in by:
            op, _, detail = rest.partition(": ")
            _add(by[kind], detail if kind in ("errno", "exit", "signal", "verdict") else f"{op}: {detail}", n)
    return {
        "outcomes": dict(sorted(kinds.items())),
        **{f"{k}s": dict(sorted(v.items())) for k, v in by.items()},
    }


def merge(
    units: Sequence[FuzzConfig], results: Sequence[dict[str, Any] | Failed[FuzzConfig]]
) -> tuple[dict[str, Any], list[MinimiseUnit]]:
    """The merged result of a campaign (before minimisation) and the minimisation units of
    its finding classes (a hostile campaign)."""
    groups: dict[tuple[str, str | None, int | None], dict[str, Any]] = {}
    firsts: dict[tuple[tuple[str, str | None, int | None], str], tuple[FuzzConfig, Any]] = {}
    failures: list[dict[str, Any]] = []
    tallies: dict[tuple[str, str | None, int | None], dict[str, int]] = {}
    for config, result in zip(units, results, strict=True):
        key = _group(config)
        group = groups.setdefault(
            key,
            {"backend": config.backend, "profile": config.profile, "vm_type": "", "units": 0, "steps": 0},
        )
        group["units"] += 1
        if isinstance(result, Failed):
            failures.append(result.to_json())
            continue
        group["vm_type"] = result["vm_type"]
        if not config.hostile:
            # A Hypothesis-driven unit runs at least its budget, give or take a test case
            # Hypothesis adds or drops after other runs in the same process: the budget is
            # what the merged result counts, so that it never depends on the sharding.
            group["steps"] += config.steps
            if result["failure"] is not None:
                group.setdefault("failures", []).append(
                    {"seed": config.seed, "failure": result["failure"], "program": result["program"]}
                )
            continue
        group["steps"] += result["steps"]
        group["sequences"] = group.get("sequences", 0) + result["sequences"]
        tally = tallies.setdefault(key, {})
        for name, n in result["tally"].items():
            _add(tally, name, n)
        ended = group.setdefault("ended", {})
        for name, n in result["ended"].items():
            _add(ended, name, n)
        found = group.setdefault("findings", {})
        for cls, seen in result["findings"].items():
            if cls in found:
                found[cls]["count"] += seen["count"]
                continue
            found[cls] = {"count": seen["count"], "message": seen["message"], "first_seen": seen["first"]}
            firsts[(key, cls)] = (config, seen["steps"])
    for key, tally in tallies.items():
        groups[key].update(_summary(tally))
        groups[key]["ended"] = dict(sorted(groups[key]["ended"].items()))
    to_minimise = [
        MinimiseUnit(config, cls, json.dumps(steps)) for (key, cls), (config, steps) in sorted(firsts.items())
    ]
    merged = {"results": list(groups.values()), "worker_failures": failures}
    return merged, to_minimise


def finish(
    merged: dict[str, Any],
    minimised: Sequence[tuple[MinimiseUnit, list[Any] | Failed[MinimiseUnit]]],
    crashes: Path | None,
) -> dict[str, Any]:
    """Put the minimised programs into *merged*: each class's reproducer (written into
    *crashes*), its number of steps and whether it is well typed; count the classes."""
    from guestmem.conformance.hostile import from_plain
    from guestmem.fuzz.hostile import Found, reproducer_name, well_typed, write_reproducer

    by_group = {(g["backend"], g["profile"]): g for g in merged["results"]}
    for unit, outcome in minimised:
        group = by_group[(unit.config.backend, unit.config.profile)]
        entry = group["findings"][unit.key]
        if isinstance(outcome, Failed):
            merged["worker_failures"].append(outcome.to_json())
        program = json.loads(unit.steps) if isinstance(outcome, Failed) else outcome
        steps = [(str(name), from_plain(kwargs)) for name, kwargs in program]
        first = (int(entry["first_seen"][0]), int(entry["first_seen"][1]))
        found = Found(unit.key, entry["count"], entry["message"], steps, first)
        entry["well_typed"] = well_typed(steps)
        entry["steps"] = len(steps)
        entry["reproducer"] = reproducer_name(unit.config, unit.key)
        if crashes is not None:
            write_reproducer(crashes, unit.config, found)
    total = typed = 0
    for group in merged["results"]:
        if "findings" in group:
            group["findings"] = dict(sorted(group["findings"].items()))
            group["crash_classes"] = len(group["findings"])
            group["well_typed_crash_classes"] = sum(
                1 for f in group["findings"].values() if f.get("well_typed")
            )
            total += group["crash_classes"]
            typed += group["well_typed_crash_classes"]
    merged["crash_classes"] = total
    merged["well_typed_crash_classes"] = typed
    return merged


def run_campaign(
    units: Sequence[FuzzConfig],
    *,
    jobs: int | None = None,
    scheduler: str | None = None,
    crashes: Path | None = None,
    minimise: bool = True,
    on_unit: Callable[[FuzzConfig, dict[str, Any] | Failed[FuzzConfig]], None] | None = None,
    on_minimised: Callable[[MinimiseUnit], None] | None = None,
) -> dict[str, Any]:
    """Run *units* sharded (``jobs`` processes or the Dask cluster at ``scheduler``), merge,
    minimise each finding class once (unless *minimise* is False) and write its reproducer
    into *crashes*.  The callbacks see each unit and each minimised class as it finishes."""

    def unit_done(index: int, result: dict[str, Any] | Failed[FuzzConfig]) -> None:
        if on_unit is not None:
            on_unit(units[index], result)

    results = run_units(run_unit, units, jobs=jobs, scheduler=scheduler, on_done=unit_done)
    merged, to_minimise = merge(units, results)
    if not minimise:
        firsts = [(unit, json.loads(unit.steps)) for unit in to_minimise]
        return finish(merged, firsts, crashes)

    def minimised_done(index: int, _: Any) -> None:
        if on_minimised is not None:
            on_minimised(to_minimise[index])

    small = run_units(minimise_unit, to_minimise, jobs=jobs, scheduler=scheduler, on_done=minimised_done)
    return finish(merged, list(zip(to_minimise, small, strict=True)), crashes)
