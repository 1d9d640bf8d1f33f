"""The ``guestmem fuzz`` subcommand: the stateful machine against backends for a budget of
steps, sharded over worker processes (or a Dask cluster), with a progress bar, a merged
result and a minimal reproducer per failure."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from guestmem.campaign import add_cli_options

#: Steps per unit of a campaign by default.
DEFAULT_CHUNK = 1000


def add_cli(subparsers: Any) -> None:
    """Add ``guestmem fuzz`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "fuzz", help="run the conformance kit's stateful machine against backends for a budget of steps"
    )
    p.add_argument("--backend", action="append", help="backend to fuzz; repeat for several (default: sw)")
    p.add_argument("--profile", action="append", help="kernel profile of a model backend; repeat for several")
    p.add_argument(
        "--vm-type",
        type=lambda v: int(v, 0),
        default=None,
        help="KVM_CREATE_VM type (default: the kit's choice)",
    )
    p.add_argument("--steps", type=int, default=1000, help="steps per backend and profile (default 1000)")
    p.add_argument("--run-length", type=int, default=25, help="steps per run of the machine (default 25)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first run (default 0)")
    p.add_argument(
        "--hostile",
        action="store_true",
        help="mix in hostile calls (wrong types, edge integers, closed and foreign objects, reentrant "
        "hooks, the arch face) and count outcome classes",
    )
    p.add_argument("--no-shrink", action="store_true", help="report failures without minimising them")
    add_cli_options(p, unit="steps", chunk=DEFAULT_CHUNK)
    p.add_argument(
        "--call-timeout",
        type=float,
        default=1.0,
        help="seconds a hostile step may run before it counts as a hang (default 1; 0: no limit)",
    )
    p.add_argument(
        "--crashes",
        metavar="DIR",
        default="guestmem-fuzz-crashes",
        help="where --hostile writes one reproducer per finding class (default ./guestmem-fuzz-crashes)",
    )
    p.add_argument("--replay", metavar="FILE", help="replay a --hostile reproducer; exit 1 if it still fails")
    p.add_argument(
        "--reproducer", metavar="FILE", help="write the first failing program as a Python script to FILE"
    )
    p.set_defaults(func=_cmd_fuzz)


def _cmd_fuzz(args: argparse.Namespace) -> int:
    try:
        from guestmem.fuzz.campaign import campaign_units, run_campaign
    except ImportError as exc:  # pragma: no cover - hypothesis is in the test extra
        print(
            f"guestmem fuzz needs Hypothesis and pytest (pip install 'guestmem[test]'): {exc}",
            file=sys.stderr,
        )
        return 2
    if args.replay:
        return _replay(args)
    backends = args.backend or ["sw"]
    profiles = args.profile or [None]
    from guestmem.registry import get_registry

    for name in backends:
        get_registry().backend(name)  # LookupError: the CLI's "unknown backend"
    units = campaign_units(
        backends,
        profiles,
        steps=args.steps,
        chunk=args.chunk,
        seed=args.seed,
        vm_type=args.vm_type,
        run_length=args.run_length,
        shrink=not args.no_shrink,
        hostile=args.hostile,
        call_timeout=args.call_timeout,
    )
    crashes = Path(args.crashes) if args.hostile else None
    started = time.perf_counter()
    if args.json:
        merged = run_campaign(
            units, jobs=args.jobs, scheduler=args.scheduler, crashes=crashes, minimise=not args.no_shrink
        )
    else:
        merged = _with_progress(args, units, crashes)
    seconds = time.perf_counter() - started
    steps = sum(group["steps"] for group in merged["results"])
    if args.output:
        Path(args.output).write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(merged, indent=2))
    else:
        _render(args, merged, seconds)
    print(
        f"guestmem fuzz: {steps} steps in {seconds:.2f}s ({steps / max(seconds, 1e-9):.0f} steps/s), "
        f"{len(units)} unit(s)",
        file=sys.stderr,
    )
    failing = merged["worker_failures"] or any(
        group.get("failures") or group.get("findings") for group in merged["results"]
    )
    if args.reproducer and not args.hostile:
        _write_reproducer(args, units, merged)
    return 1 if failing else 0


def _with_progress(args: argparse.Namespace, units: list[Any], crashes: Path | None) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from guestmem.fuzz.campaign import run_campaign

    names = ", ".join(dict.fromkeys(u.backend for u in units))
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as progress:
        steps = progress.add_task(f"fuzz {names}: steps", total=sum(u.steps for u in units))
        classes: list[Any] = []

        def unit_done(unit: Any, result: Any) -> None:
            progress.advance(steps, unit.steps)

        def minimised(_: Any) -> None:
            if not classes:
                classes.append(progress.add_task("minimising finding classes", total=None))
            progress.advance(classes[0])

        return run_campaign(
            units,
            jobs=args.jobs,
            scheduler=args.scheduler,
            crashes=crashes,
            minimise=not args.no_shrink,
            on_unit=unit_done,
            on_minimised=minimised,
        )


def _render(args: argparse.Namespace, merged: dict[str, Any], seconds: float) -> None:
    for group in merged["results"]:
        where = group["backend"] + (f"[{group['profile']}]" if group["profile"] else "")
        if not args.hostile:
            print(
                f"guestmem fuzz: {where} {group['vm_type']}: {group['steps']} steps in "
                f"{group['units']} unit(s), seed {args.seed}"
            )
            for failure in group.get("failures", []):
                print(f"FAILED: {failure['failure']}")
                print("minimal reproducer:")
                print("\n".join(failure["program"]))
            continue
        print(
            f"guestmem fuzz --hostile: {where} {group['vm_type']}: {group['steps']} steps, "
            f"{group.get('sequences', 0)} sequences, seed {args.seed}"
        )
        print("  outcomes: " + ", ".join(f"{k} {v}" for k, v in group.get("outcomes", {}).items()))
        findings = group.get("findings", {})
        typed_classes = group.get("well_typed_crash_classes", 0)
        print(f"  finding classes: {len(findings)} ({typed_classes} with well-typed input)")
        for cls, entry in findings.items():
            typed = "well-typed" if entry.get("well_typed") else "wrong types"
            shown = f"{typed}, {entry.get('steps')} steps: {entry.get('reproducer')}"
            print(f"  {entry['count']:5d}  {cls}  [{shown}]")
    if args.hostile and merged.get("crash_classes"):
        print(f"reproducers in {args.crashes}/ (guestmem fuzz --replay FILE)")
    for failure in merged["worker_failures"]:
        print(f"WORKER FAILED: {failure['error']} ({failure['unit']})")


def _write_reproducer(args: argparse.Namespace, units: list[Any], merged: dict[str, Any]) -> None:
    from guestmem.fuzz.run import FuzzConfig, FuzzResult

    for group in merged["results"]:
        for failure in group.get("failures", []):
            config = FuzzConfig(group["backend"], args.vm_type, profile=group["profile"])
            result = FuzzResult(config, failure=failure["failure"], program=failure["program"])
            Path(args.reproducer).write_text(result.reproducer, encoding="utf-8")
            return


def _replay(args: argparse.Namespace) -> int:
    from guestmem.fuzz.hostile import replay

    replayed = replay(args.replay, timeout=args.call_timeout)
    if args.json:
        print(json.dumps(replayed.to_json(), indent=2))
    elif replayed.reproduced:
        first = replayed.message.splitlines()[0] if replayed.message else ""
        print(f"reproduced: {replayed.expected}\n  {first}")
    else:
        print(f"not reproduced: {replayed.expected} (the replay ended with {replayed.got or 'no finding'})")
    return 1 if replayed.reproduced else 0
