"""The built-in scenarios on a realm: every step the intents can express runs and meets
what the scenario asserts (a punched or re-shared private page aborts the realm)."""

from __future__ import annotations

from guestmem.conformance import ScenarioConformance


class TestBuiltinScenarios(ScenarioConformance):
    backends = ("cca",)
