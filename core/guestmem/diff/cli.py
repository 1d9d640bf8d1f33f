"""The ``guestmem diff`` subcommand: a campaign between a model backend and another backend."""

from __future__ import annotations

import argparse
from typing import Any

import guestmem
from guestmem.diff.campaign import run_campaign
from guestmem.diff.interpreter import host_profile, opener


def add_cli(subparsers: Any) -> None:
    """Add ``guestmem diff`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "diff", help="run random uAPI programs on two backends and report every disagreement"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--steps", type=int, default=500, help="operations in total (default 500)")
    p.add_argument("--length", type=int, default=40, help="operations per program (default 40)")
    p.add_argument("--against", default="linux", help="backend to compare with (default: linux)")
    p.add_argument("--base", default="sw", help="model backend (default: sw)")
    p.add_argument("--profile", default=None, help="kernel profile of the model (default: this host's)")
    p.add_argument("--no-shrink", action="store_true", help="report disagreements without minimising")
    p.set_defaults(func=_cmd_diff)


def backend_vm_types(name: str) -> tuple[int, ...]:
    """The VM types programs for backend *name* use: its default type first (what most
    programs create), then the others it declares, so that an arm64 backend gets arm64
    VMs."""
    backend = guestmem.get_registry().backend(name)
    default = backend.default_vm_type.type
    return (default, *(t.type for t in backend.vm_types if t.type != default))


def _cmd_diff(args: argparse.Namespace) -> int:
    profile = args.profile or host_profile()
    left = f"{args.base}[{profile}]"
    try:
        guestmem.open(args.against).close()
    except OSError as exc:
        print(f"guestmem diff: backend {args.against!r} is unavailable: {exc}")
        return 2
    summary = run_campaign(
        opener(args.base, profile),
        opener(args.against),
        seed=args.seed,
        steps=args.steps,
        length=args.length,
        labels=(left, args.against),
        minimise=not args.no_shrink,
        vm_types=backend_vm_types(args.base),
    )
    print(summary.render())
    return 1 if summary.disagreements else 0
