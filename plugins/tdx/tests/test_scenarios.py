"""The built-in scenarios on this plugin's backend (``guestmem run --all``'s acceptance,
one backend at a time): every applicable step runs and meets what it asserts."""

from __future__ import annotations

import json

import pytest

from guestmem.cli import main
from guestmem.conformance import ScenarioConformance


class TestBuiltinScenarios(ScenarioConformance):
    backends = ("tdx",)


def test_a_td_killed_in_a_run_leaves_its_json_clean(capsys: pytest.CaptureFixture[str]) -> None:
    """The kernel's warning for a killed TD ("Guest access before accepting") is logged only
    where the application configured structlog: ``guestmem run --json -`` stays JSON."""
    assert main(["run", "--backend", "tdx", "early-boot-acceptance", "--json", "-"]) == 0
    run = json.loads(capsys.readouterr().out)
    (column,) = run["scenarios"][0]["backends"]
    assert [o["errno"] for o in column["outcomes"] if o["status"] == "error"] == ["EIO"]
