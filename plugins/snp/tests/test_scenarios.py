"""The built-in scenarios on this plugin's backends (``guestmem run --all``'s acceptance,
one backend at a time): every applicable step runs and meets what it asserts."""

from __future__ import annotations

from guestmem.conformance import ScenarioConformance


class TestBuiltinScenarios(ScenarioConformance):
    backends = ("snp", "snp-hugepage")
