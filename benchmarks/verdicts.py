"""The targets a benchmark script reports: rows ``targets.py`` reads, and their verdicts.

A row is ``{"target", "figure", "unit", "limit", ...}``, met iff ``figure <= limit``.
``--json`` prints ``{"targets": [...], ...}``; otherwise one line per target:
``64 GiB accept, 2M entries: 0.04 s (target < 0.1 s): OK``.
"""

from __future__ import annotations

import json
from typing import Any


def row(target: str, figure: float, unit: str, limit: float, **extra: Any) -> dict[str, Any]:
    """One target: *figure* (in *unit*) against *limit*, with any further fields."""
    return {"target": target, "figure": figure, "unit": unit, "limit": limit, **extra}


def verdict(target: dict[str, Any]) -> str:
    """``OK`` or ``MISSED``."""
    return "OK" if target["figure"] <= target["limit"] else "MISSED"


def print_json(targets: list[dict[str, Any]], **figures: Any) -> None:
    """The machine-readable form: the targets and the figures behind them."""
    print(json.dumps({"targets": targets, **figures}, indent=2))


def print_verdicts(targets: list[dict[str, Any]]) -> None:
    """One line per target, its figure, its limit and its verdict."""
    for t in targets:
        unit = t["unit"]
        print(f"{t['target']}: {t['figure']:.3g} {unit} (target < {t['limit']:g} {unit}): {verdict(t)}")
