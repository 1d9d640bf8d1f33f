"""``guestmem run`` and ``guestmem scenarios``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["ProgressRows", "add_cli", "progress_display", "run_files"]


def add_cli(subparsers: Any) -> None:
    """Add ``run`` and ``scenarios`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "run",
        help="run scenario files (or built-in scenarios by name) on backends side by side",
        description="Run each scenario on each backend, then print per step the outcome on every "
        "backend and per backend the costs.  Exit status 1 when an asserted outcome is not met, "
        "2 when a scenario file has errors.",
    )
    p.add_argument(
        "files", nargs="*", metavar="FILE", help="scenario files or built-in names (default: every built-in)"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--backend", action="append", metavar="NAME", help="run on NAME (repeatable; NAME,NAME too)"
    )
    which.add_argument(
        "--all", action="store_true", help="every installed backend and every backend a scenario lists"
    )
    p.add_argument(
        "--json", nargs="?", const="-", metavar="FILE", help="write the run as JSON (to stdout: -)"
    )
    p.add_argument("--report", metavar="HTML", help="write a self-contained HTML report")
    p.add_argument("--trace", metavar="DIR", help="write each backend's trace to DIR/SCENARIO.BACKEND.jsonl")
    p.set_defaults(func=_cmd_run)
    p = subparsers.add_parser("scenarios", help="list the built-in scenarios")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_scenarios)


def _cmd_scenarios(args: argparse.Namespace) -> int:
    from guestmem.scenario import builtins

    found = [builtins.load(name) for name in builtins.names()]
    if args.json:
        rows = [
            {"name": s.name, "title": s.scenario.title, "shows": s.scenario.shows, "steps": len(s.steps)}
            for s in found
        ]
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="built-in scenarios (guestmem run NAME)")
    table.add_column("name", style="bold")
    table.add_column("what it shows", overflow="fold")
    table.add_column("steps", justify="right")
    for s in found:
        table.add_row(
            s.name,
            s.scenario.title + (f"\n[dim]{s.scenario.shows}[/]" if s.scenario.shows else ""),
            str(len(s.steps)),
        )
    Console().print(table)
    return 0


def _backends(args: argparse.Namespace) -> list[str] | None:
    if not args.backend:
        return None
    return [name.strip() for value in args.backend for name in value.split(",") if name.strip()]


def _cmd_run(args: argparse.Namespace) -> int:
    return run_files(
        args.files,
        backends=_backends(args),
        all_=args.all,
        json_to=args.json,
        report_to=args.report,
        trace_dir=args.trace,
    )


def run_files(
    files: Sequence[str],
    *,
    backends: list[str] | None = None,
    all_: bool = False,
    json_to: str | None = None,
    report_to: str | None = None,
    trace_dir: str | None = None,
    console: Any = None,
) -> int:
    """Run *files* (paths or built-in names; none: every built-in) and print the tables.

    Returns the exit status: 0, 1 when an asserted outcome is not met, 2 when a file
    cannot be read.
    """
    from rich.console import Console

    from guestmem.scenario import builtins
    from guestmem.scenario.run import Run, run_scenario, select_backends
    from guestmem.serialize import ScenarioError

    out = console or Console()
    err = Console(stderr=True)
    scenarios = []
    status = 0
    for name in files or builtins.names():
        try:
            scenarios.append(builtins.resolve(name))
        except ScenarioError as exc:
            print(exc, file=sys.stderr)
            status = 2
        except (OSError, LookupError) as exc:
            print(f"guestmem: {exc}", file=sys.stderr)
            status = 2
    if status:
        return status
    runs = []
    with progress_display(err) as progress:
        for scenario in scenarios:
            columns = select_backends(scenario, backends, all_=all_)
            events: dict[str, list[Any]] | None = {} if trace_dir else None
            run = run_scenario(
                scenario,
                columns,
                maps=bool(json_to or report_to),
                record=bool(trace_dir),
                on_step=ProgressRows(progress, scenario.name),
                events=events,
            )
            runs.append(run)
            if trace_dir and events is not None:
                _write_traces(trace_dir, run.name, events, err)
    result = Run(scenarios=runs)
    if json_to:
        _write_json(result, json_to)
    if json_to != "-":
        from guestmem.scenario.table import render

        for run in runs:
            out.print(render(run))
    if report_to:
        from guestmem.report import write_report

        write_report(result, report_to)
        err.print(f"report: {report_to}")
    return 1 if result.failed else 0


class ProgressRows:
    """A Rich progress bar per (scenario, backend), advanced row by row."""

    def __init__(self, progress: Any, scenario: str) -> None:
        self.progress = progress
        self.scenario = scenario
        self.tasks: dict[str, Any] = {}

    def __call__(self, backend: str, row: int, rows: int) -> None:
        if backend not in self.tasks:
            self.tasks[backend] = self.progress.add_task(f"{self.scenario} on {backend}", total=rows)
        self.progress.update(self.tasks[backend], completed=row + 1)


def progress_display(console: Any) -> Any:
    """A transient Rich progress display on *console*."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console, transient=True
    )


def _write_json(result: Any, target: str) -> None:
    from guestmem.serialize import unstructure

    text = json.dumps(unstructure(result), indent=1)
    if target == "-":
        sys.stdout.write(text + "\n")
        return
    with open(target, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def _write_traces(folder: str, name: str, events: dict[str, list[Any]], err: Any) -> None:
    import os

    from guestmem.serialize import write_trace

    os.makedirs(folder, exist_ok=True)
    for backend, trace in events.items():
        path = os.path.join(folder, f"{name}.{backend}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            n = write_trace(trace, f)
        err.print(f"trace: {path} ({n} events)")
