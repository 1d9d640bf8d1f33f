"""Differential testing: the same uAPI program against two backends, outcome by outcome.

A *program* is a list of :class:`Op` (plain data: an operation name and its arguments).
Objects a program creates (VMs, guest_memfds, host mappings, vCPUs) are named by the id of
the op that created them, so deleting ops while shrinking never re-targets another op: an
op whose object is missing is skipped on both sides alike.

:func:`run_program` executes a program on one backend and returns one normalised
:data:`Outcome` per op (return value, errno, SIGBUS, guest exit ...).  :func:`compare`
runs it on two backends and reports the first op whose outcomes differ;
:func:`shrink` cuts a disagreeing program down to a minimal reproducer.  :func:`generate`
makes random programs from a seed; :func:`run_campaign` is what ``guestmem diff`` runs.

The default pair is the ``sw`` model, with the kernel profile of this host
(:func:`host_profile`), against the ``linux`` backend (the running kernel).  Neither side
is privileged: a disagreement is a bug in the model, in the profile, or a documented
difference (docs/profiles.md).
"""

from __future__ import annotations

import argparse
from typing import Any

import guestmem
from guestmem.diff.campaign import Summary, run_campaign
from guestmem.diff.generator import CAPS, Generator, generate
from guestmem.diff.interpreter import Opener, compare, host_profile, opener, run_program
from guestmem.diff.program import Disagreement, Op, Outcome
from guestmem.diff.shrink import shrink

__all__ = [
    "CAPS",
    "Disagreement",
    "Generator",
    "Op",
    "Opener",
    "Outcome",
    "Summary",
    "add_cli",
    "compare",
    "generate",
    "host_profile",
    "opener",
    "run_campaign",
    "run_program",
    "shrink",
]


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
    )
    print(summary.render())
    return 1 if summary.disagreements else 0

