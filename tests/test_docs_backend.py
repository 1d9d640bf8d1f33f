"""The backend docs/backends.md builds, taken from the page as written, passes the
conformance kit: a third-party backend written from the public API alone works."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from test_plugin_boundary import violations

import guestmem
from guestmem.conformance import GmemConformance, ScenarioConformance
from guestmem.invariants import InvariantChecker

PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "backends.md"
SOURCE = next(b for b in re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S) if "class ToyPlugin" in b)


def load_example() -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "guestmem_toy"}
    exec(compile(SOURCE, "docs/backends.md#0", "exec"), namespace)
    return namespace


def test_the_example_crosses_no_boundary() -> None:
    assert "class ToyPlugin" in SOURCE
    assert violations(SOURCE, "docs/backends.md") == []


@pytest.fixture(scope="module", autouse=True)
def toy_backend() -> Iterator[None]:
    registry = guestmem.get_registry()
    plugin = load_example()["ToyPlugin"]()
    checker = InvariantChecker()
    registry.add_plugin(plugin, distribution="toy-example")
    registry.add_plugin(checker, distribution="toy-invariants")
    try:
        yield
    finally:
        registry.remove_plugin(checker)
        registry.remove_plugin(plugin)
    assert checker.checked


class TestDocumentedToyBackend(GmemConformance):
    backend = "toy"
    vm_type = 7
    private_access = True
    open_options: ClassVar[dict[str, Any]] = {}


class TestDocumentedToyScenarios(ScenarioConformance):
    """The built-in scenarios on the documented backend: its ToyIntents are enough."""

    backends = ("toy",)
