"""``guestmem demo``: the main job in one command, on the built-in backend by default.

Runs a built-in scenario (``lifecycle``: one VM's guest_memfd life from launch to
teardown) on the backends asked for (``sw`` unless told otherwise) with the invariant
checker on, and shows what ``guestmem run`` shows: a progress display, the side-by-side
table of outcomes, the costs per backend and the final memory map; then writes the
self-contained HTML report and prints its path.  On ``snp`` the launch is the real one
(``KVM_SEV_INIT2``, ``SNP_LAUNCH_START``/``UPDATE``/``FINISH``), on ``pkvm`` the
protected VM's setup, so the RMP updates and hypervisor calls show in the costs.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Sequence
from typing import IO

from rich.console import Console
from rich.table import Table

import guestmem
from guestmem.invariants import InvariantChecker
from guestmem.scenario import builtins
from guestmem.scenario.memmap import LAYERS, MemoryMap
from guestmem.scenario.run import Run, run_scenario
from guestmem.scenario.table import render
from guestmem.serialize import write_trace

__all__ = ["DEFAULT_REPORT", "memory_map_table", "run_demo"]

#: Where the report goes unless ``--report`` says otherwise.
DEFAULT_REPORT = os.path.join(tempfile.gettempdir(), "guestmem-demo.html")


def memory_map_table(shot: MemoryMap, title: str) -> Table:
    """*shot* as a table: one row per gpa range over which no layer changes."""
    table = Table(title=title, title_justify="left")
    table.add_column("gpa range")
    table.add_column("pages", justify="right")
    layers = [layer for layer in LAYERS if layer in shot.layers]
    for layer in layers:
        table.add_column(layer)
    edges = {shot.start, shot.end} | {
        e for layer in layers for b in shot.layers[layer] for e in (b.start, b.end)
    }
    for start, end in itertools.pairwise(sorted(edges)):
        values = []
        for layer in layers:
            found = next((b.value for b in shot.layers[layer] if b.start <= start < b.end), "-")
            values.append(found)
        table.add_row(f"{start << 12:#x}-{end << 12:#x}", str(end - start), *values)
    return table


def run_demo(
    backends: Sequence[str] = ("sw",),
    *,
    scenario: str = "lifecycle",
    report: str | None = DEFAULT_REPORT,
    trace: IO[str] | None = None,
    console: Console | None = None,
) -> int:
    """Run the demo; returns the exit status (1 if an asserted outcome was not met).

    *trace* receives the first backend's trace as JSON lines.
    """
    from guestmem.scenario.cli import ProgressRows, progress_display

    out = console or Console()
    loaded = builtins.load(scenario)
    registry = guestmem.get_registry()
    known = guestmem.backends()
    for name in backends:
        if name not in known:
            raise LookupError(f"no guestmem backend named {name!r} (installed: {', '.join(sorted(known))})")
    checker = InvariantChecker()
    registry.add_plugin(checker, name="guestmem.demo.invariants", distribution="guestmem")
    events: dict[str, list[object]] = {}
    try:
        with progress_display(Console(stderr=True)) as progress:
            result = run_scenario(
                loaded,
                list(backends),
                maps=True,
                record=trace is not None,
                on_step=ProgressRows(progress, loaded.name),
                events=events if trace is not None else None,
            )
    finally:
        registry.remove_plugin(checker)
    out.print(render(result))
    for backend in result.backends:
        final = [shots for shots in backend.maps if shots]
        if final:
            out.print(
                memory_map_table(
                    final[-1][0], f"memory map of the VM on {backend.backend} after the last step"
                )
            )
            break
    checks = "mmu-balanced, leaf-backed, leaf-privateness, gmem-leaf"
    out.print(f"[bold]invariants[/] ({checks}) held after all {checker.checked} events")
    if trace is not None and backends:
        n = write_trace(events.get(backends[0], []), trace)  # type: ignore[arg-type]
        out.print(f"{n} trace events written")
    if report is not None:
        from guestmem.report import write_report

        write_report(Run(scenarios=[result]), report, f"guestmem demo: {loaded.name}")
        out.print(f"report: {report} (open it in a browser)")
    return 1 if result.failed else 0
