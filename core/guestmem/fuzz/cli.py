"""The ``guestmem fuzz`` subcommand: the stateful machine against one backend, with a
progress bar and a minimal reproducer on failure."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_cli(subparsers: Any) -> None:
    """Add ``guestmem fuzz`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "fuzz", help="run the conformance kit's stateful machine against a backend for a budget of steps"
    )
    p.add_argument("--backend", default="sw", help="backend to fuzz (default: sw)")
    p.add_argument(
        "--vm-type",
        type=lambda v: int(v, 0),
        default=None,
        help="KVM_CREATE_VM type (default: the kit's choice)",
    )
    p.add_argument("--steps", type=int, default=1000, help="steps in total (default 1000)")
    p.add_argument("--run-length", type=int, default=25, help="steps per run of the machine (default 25)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first run (default 0)")
    p.add_argument("--no-shrink", action="store_true", help="report a failure without minimising it")
    p.add_argument(
        "--reproducer", metavar="FILE", help="write the failing program as a Python script to FILE"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON (no progress bar)")
    p.set_defaults(func=_cmd_fuzz)


def _cmd_fuzz(args: argparse.Namespace) -> int:
    try:
        from guestmem.fuzz.run import FuzzConfig, run_fuzz
    except ImportError as exc:  # pragma: no cover - hypothesis is in the test extra
        print(
            f"guestmem fuzz needs Hypothesis and pytest (pip install 'guestmem[test]'): {exc}",
            file=sys.stderr,
        )
        return 2
    config = FuzzConfig(
        backend=args.backend,
        vm_type=args.vm_type,
        steps=args.steps,
        run_length=args.run_length,
        seed=args.seed,
        shrink=not args.no_shrink,
    )
    if args.json:
        result = run_fuzz(config)
        print(json.dumps(result.to_json(), indent=2))
    else:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        with Progress(
            TextColumn(f"fuzz {config.backend}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("steps", total=config.steps)
            seen = [0]

            def step() -> None:
                # Shrinking a failure runs steps past the budget: the bar stops at its end.
                seen[0] += 1
                if seen[0] <= config.steps:
                    progress.advance(task)

            result = run_fuzz(config, on_step=step)
        print(
            f"guestmem fuzz: {config.backend} {result.vm_type_name}: {result.steps} steps in {result.runs} "
            f"run(s), {result.seconds:.2f}s, seed {config.seed}"
        )
        if result.failure is not None:
            print(f"FAILED: {result.failure}")
            print("minimal reproducer:")
            print(result.reproducer)
    if args.reproducer and result.failure is not None:
        with open(args.reproducer, "w", encoding="utf-8") as out:
            out.write(result.reproducer)
    return 1 if result.failure is not None else 0
