"""``guestmem fuzz``: the conformance kit's stateful machine against one backend.

:func:`run_fuzz` runs the backend's machine (:func:`fuzz_machine`, configured as its kit
is) for a budget of steps from a seed and returns a :class:`FuzzResult`; a failure comes
shrunk to a minimal program and a reproducer script.  One module per job:

- ``run``: :class:`FuzzConfig`, :class:`FuzzResult`, :func:`fuzz_machine`,
  :func:`run_fuzz` (needs Hypothesis and pytest, imported on first use);
- ``cli``: the ``guestmem fuzz`` subcommand (:func:`add_cli`), with a progress bar.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from guestmem.fuzz.cli import add_cli

if TYPE_CHECKING:
    from guestmem.fuzz.run import FuzzConfig, FuzzResult, fuzz_machine, run_fuzz

__all__ = ["FuzzConfig", "FuzzResult", "add_cli", "fuzz_machine", "run_fuzz"]


def __getattr__(name: str) -> Any:
    if name in ("FuzzConfig", "FuzzResult", "fuzz_machine", "run_fuzz"):
        from guestmem.fuzz import run

        return getattr(run, name)
    raise AttributeError(name)
