"""The ``guestmem diff`` subcommand: a campaign between a model backend and other backends,
sharded over worker processes (or a Dask cluster), with a progress bar and a merged result."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import guestmem
from guestmem.campaign import add_cli_options, run_units
from guestmem.diff.campaign import diff_units, merge, render, run_unit
from guestmem.diff.interpreter import host_profile

#: Operations per unit of a campaign by default.
DEFAULT_CHUNK = 2000


def add_cli(subparsers: Any) -> None:
    """Add ``guestmem diff`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "diff", help="run random uAPI programs on two backends and report every disagreement"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--steps", type=int, default=500, help="operations per pair and profile (default 500)")
    p.add_argument("--length", type=int, default=40, help="operations per program (default 40)")
    p.add_argument(
        "--against", action="append", help="backend to compare with; repeat for several (default: linux)"
    )
    p.add_argument("--base", default="sw", help="model backend (default: sw)")
    p.add_argument(
        "--profile",
        action="append",
        help="kernel profile of the model; repeat for several (default: this host's)",
    )
    p.add_argument("--no-shrink", action="store_true", help="report disagreements without minimising")
    add_cli_options(p, unit="operations", chunk=DEFAULT_CHUNK)
    p.set_defaults(func=_cmd_diff)


def backend_vm_types(name: str) -> tuple[int, ...]:
    """The VM types programs for backend *name* use: its default type first (what most
    programs create), then the others it declares, so that an arm64 backend gets arm64
    VMs."""
    backend = guestmem.get_registry().backend(name)
    default = backend.default_vm_type.type
    return (default, *(t.type for t in backend.vm_types if t.type != default))


def _cmd_diff(args: argparse.Namespace) -> int:
    against = args.against or ["linux"]
    for name in against:
        try:
            guestmem.open(name).close()
        except OSError as exc:
            print(f"guestmem diff: backend {name!r} is unavailable: {exc}")
            return 2
    units = diff_units(
        args.base,
        against,
        args.profile or [host_profile()],
        seed=args.seed,
        steps=args.steps,
        chunk=args.chunk,
        length=args.length,
        minimise=not args.no_shrink,
        vm_types=backend_vm_types(args.base),
    )
    started = time.perf_counter()
    if args.json:
        results = run_units(run_unit, units, jobs=args.jobs, scheduler=args.scheduler)
    else:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn(f"diff {args.base} vs {', '.join(against)}: operations"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        ) as progress:
            task = progress.add_task("ops", total=sum(u.steps for u in units))
            results = run_units(
                run_unit,
                units,
                jobs=args.jobs,
                scheduler=args.scheduler,
                on_done=lambda index, _: progress.advance(task, units[index].steps),
            )
    seconds = time.perf_counter() - started
    merged = merge(units, results)
    if args.output:
        Path(args.output).write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(merged, indent=2))
    else:
        for group in merged["results"]:
            print(render(group))
        for failure in merged["worker_failures"]:
            print(f"WORKER FAILED: {failure['error']} ({failure['unit']})")
    ops = sum(group["operations"] for group in merged["results"])
    print(
        f"guestmem diff: {ops} operations in {seconds:.2f}s ({ops / max(seconds, 1e-9):.0f} ops/s), "
        f"{len(units)} unit(s)",
        file=sys.stderr,
    )
    failing = merged["worker_failures"] or any(group["disagreements"] for group in merged["results"])
    return 1 if failing else 0
