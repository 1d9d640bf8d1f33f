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

One module per job, each depending only on those above it:

- ``program``: what a program is (:class:`Op`), what an op came to (:data:`Outcome`) and
  how a :class:`Disagreement` is shown;
- ``interpreter``: running a program on one ``guestmem.api.Kvm`` (:func:`opener`,
  :func:`host_profile`, :func:`run_program`) and comparing two (:func:`compare`);
- ``shrink``: minimising a disagreement;
- ``generator``: random programs (:class:`Generator`, :func:`generate`; it needs only
  ``program``);
- ``campaign``: :func:`run_campaign` and its :class:`Summary`;
- ``cli``: the ``guestmem diff`` subcommand (:func:`add_cli`).
"""

from __future__ import annotations

from guestmem.diff.campaign import Summary, run_campaign
from guestmem.diff.cli import add_cli, backend_vm_types
from guestmem.diff.generator import CAPS, Generator, generate, vm_type_choices
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
    "backend_vm_types",
    "compare",
    "generate",
    "host_profile",
    "opener",
    "run_campaign",
    "run_program",
    "shrink",
    "vm_type_choices",
]
