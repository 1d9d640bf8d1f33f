"""The built-in scenarios on this plugin's backend (``guestmem run --all``'s acceptance,
one backend at a time): every applicable step runs and meets what it asserts."""

from __future__ import annotations

from guestmem.conformance import ScenarioConformance


class TestBuiltinScenarios(ScenarioConformance):
    backends = ("gunyah",)
