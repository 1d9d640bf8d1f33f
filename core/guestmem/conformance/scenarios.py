"""The built-in scenarios as a conformance test: :class:`ScenarioConformance`."""

from __future__ import annotations

from typing import ClassVar

import pytest


def _builtin_names() -> list[str]:
    from guestmem.scenario import builtins

    return builtins.names()


class ScenarioConformance:
    """The built-in scenarios (``guestmem scenarios``) on a backend's rows.

    A backend that registers :class:`~guestmem.backend.Intents` subclasses this and names
    its backends; every applicable step of every built-in scenario must then run and meet
    what the scenario asserts for it (steps the backend cannot express are n/a, which is
    fine)::

        class TestMyScenarios(ScenarioConformance):
            backends = ("mybackend",)
    """

    #: The backends (columns) to run.
    backends: ClassVar[tuple[str, ...]] = ("sw",)

    @pytest.mark.parametrize("name", _builtin_names())
    def test_builtin_scenario(self, name: str) -> None:
        from guestmem.scenario import builtins
        from guestmem.scenario.run import run_scenario

        run = run_scenario(builtins.load(name), self.backends)
        assert [b.reason for b in run.backends if b.reason == "backend not installed"] == []
        assert run.unasserted() == []
