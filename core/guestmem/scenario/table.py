"""The side-by-side table of a scenario run (Rich): outcomes per step, costs per backend."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from guestmem.intents import COST_CATEGORIES
from guestmem.scenario.run import Outcome, ScenarioRun

__all__ = ["cost_table", "outcome_table", "render"]

_STYLE = {
    "ok": "green",
    "error": "yellow",
    "exit": "cyan",
    "sigbus": "magenta",
    "crash": "bold red",
    "raised": "red",
    "n/a": "dim",
    "skipped": "dim",
}


def cell(outcome: Outcome, width: int = 48) -> Text:
    """One outcome: its text in its status colour, a mark for a checked expectation."""
    text = outcome.text if len(outcome.text) <= width else outcome.text[: width - 1] + "…"
    shown = Text(text, style=_STYLE.get(outcome.status, ""))
    if outcome.check == "pass":
        shown = Text("✓ ", style="green") + shown
    elif outcome.check == "fail":
        shown = Text("✗ ", style="bold red") + shown
        for failure in outcome.failures:
            shown += Text(f"\n  {failure}", style="red")
    return shown


def outcome_table(run: ScenarioRun) -> Table:
    """Per step (rows), the outcome on each backend (columns)."""
    title = f"{run.name}: {run.title}" if run.title else run.name
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("#", justify="right", style="dim")
    table.add_column("step", overflow="fold", max_width=44)
    for backend in run.backends:
        if backend.ran:
            header = (
                backend.backend if not backend.vm_type else f"{backend.backend}\n[dim]{backend.vm_type}[/]"
            )
        else:
            header = f"{backend.backend}\n[dim]n/a: {backend.reason}[/]"
        table.add_column(header, overflow="fold")
    for row, label in enumerate(run.rows):
        cells = [cell(b.outcomes[row]) if b.ran else Text("n/a", style="dim") for b in run.backends]
        table.add_row(str(row), label, *cells)
    return table


def _amount(name: str, value: int) -> str:
    if name.endswith("_bytes"):
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value >= size:
                return f"{value / size:.4g} {unit}"
        return f"{value} B"
    return f"{value:,}"


def cost_table(run: ScenarioRun) -> Table:
    """Per backend (columns), the cost categories the whole run moved (rows)."""
    table = Table(title=f"{run.name}: costs", title_justify="left")
    table.add_column("cost")
    for backend in run.backends:
        table.add_column(backend.backend, justify="right")
    for name in COST_CATEGORIES:
        values = []
        for backend in run.backends:
            if backend.costs is None:
                values.append(Text("—", style="dim"))
            else:
                values.append(Text(_amount(name, backend.costs.get(name, 0))))
        table.add_row(Text(name, style="bold"), *values)
    for name in detail_names(run):
        values = [
            Text(_amount(name, b.details[name])) if name in b.details else Text("—", style="dim")
            for b in run.backends
        ]
        table.add_row(Text(name, style="italic"), *values)
    return table


def detail_names(run: ScenarioRun) -> list[str]:
    """Every backend-specific cost row of *run*, in the order backends gave them."""
    return list(dict.fromkeys(name for b in run.backends for name in b.details))


def render(run: ScenarioRun) -> Group:
    """Both tables and a summary line."""
    checks = [o.check for b in run.backends for o in b.outcomes if o.check]
    failed = checks.count("fail")
    summary = Text(
        f"{len(checks) - failed} of {len(checks)} asserted outcomes met", style="red" if failed else "green"
    )
    return Group(outcome_table(run), cost_table(run), summary)
