"""The built-in scenarios: each cites what it shows, and runs fully asserted on sw.

The plugins' test suites run them on their own backends (``test_scenarios.py`` there).
"""

from __future__ import annotations

import pytest

import guestmem
from guestmem.scenario import builtins
from guestmem.scenario.run import run_scenario

NAMES = builtins.names()


def test_the_issue_list_is_shipped() -> None:
    assert set(NAMES) >= {
        "restricted-memslot",
        "early-boot-acceptance",
        "preboot-population",
        "destructive-conversion",
        "gmem-closed-while-bound",
        "gmem-closed-while-bound-pinned",
        "pkvm-inplace-sharing",
        "one-inode-several-vms",
        "large-guest-lazy",
        "large-guest-eager",
    }


@pytest.mark.parametrize("name", NAMES)
def test_each_file_cites_what_it_shows(name: str) -> None:
    text = builtins._folder().joinpath(f"{name}.toml").read_text()
    comment = [line for line in text.splitlines() if line.startswith("#")]
    assert text.startswith("# ") and len(comment) >= 5
    scenario = builtins.load(name)
    assert scenario.scenario.title and scenario.scenario.shows and scenario.scenario.cites
    assert {"tdx", "gunyah"} <= set(scenario.scenario.backends or [])


@pytest.mark.parametrize("name", NAMES)
def test_runs_fully_asserted_on_sw(name: str) -> None:
    """On sw, and on tdx and gunyah where their plugins are installed (the core's tox env
    has neither: their columns are then "backend not installed", which is no failure)."""
    run = run_scenario(builtins.load(name), ["sw", "tdx", "gunyah"])
    assert run.unasserted() == []
    sw, *others = run.backends
    assert sw.ran
    installed = guestmem.backends()
    for column in others:
        assert column.ran == (column.backend in installed)
        assert column.ran or column.reason == "backend not installed"
