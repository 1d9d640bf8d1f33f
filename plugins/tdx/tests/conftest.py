"""Fixtures: the tdx backend on the core model, observers, a standalone TDX module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tdx_helpers import Seam, TdVm, make_td

from guestmem.invariants import InvariantChecker
from guestmem.registry import get_registry
from guestmem_tdx import TdxChecker
from guestmem_tdx import plugin as plugin_module


@pytest.fixture(scope="session", autouse=True)
def _tdx_backend() -> Iterator[None]:
    """The backend comes from the entry point when installed; else register the module."""
    registry = get_registry()
    added = "tdx" not in registry.backends()
    if added:
        registry.add_plugin(plugin_module, name="tdx", distribution="guestmem-tdx")
    yield
    if added:
        registry.remove_plugin(plugin_module)


@pytest.fixture
def checkers() -> Iterator[tuple[InvariantChecker, TdxChecker]]:
    """The core's invariant checker and the TDX one, after every event of the test."""
    registry = get_registry()
    core, tdx = InvariantChecker(), TdxChecker()
    registry.add_plugin(core, name=f"core-checker-{id(core):x}")
    registry.add_plugin(tdx, name=f"tdx-checker-{id(tdx):x}")
    try:
        yield core, tdx
    finally:
        registry.remove_plugin(tdx)
        registry.remove_plugin(core)


@pytest.fixture
def td() -> TdVm:
    """A finalized TD with 8 MiB of private RAM at gpa 0 and one vCPU."""
    return make_td(finalize=True)


@pytest.fixture
def seam() -> Seam:
    """A TDX module on its own, with a TD whose vCPU is initialised (not finalized)."""
    return Seam()
