"""Fixtures: the snp backends on the core model, and a ready SNP VM."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from snp_helpers import SnpVm, make_snp_vm

from guestmem.registry import get_registry
from guestmem_snp import plugin as plugin_module


@pytest.fixture(scope="session", autouse=True)
def _snp_backend() -> Iterator[None]:
    """The backends come from the entry point when installed; else register the module."""
    registry = get_registry()
    added = "snp" not in registry.backends()
    if added:
        registry.add_plugin(plugin_module, name="snp", distribution="guestmem-snp")
    yield
    if added:
        registry.remove_plugin(plugin_module)


@pytest.fixture
def snp() -> SnpVm:
    """An initialised SNP VM (order-0 gmem, Linux 6.18)."""
    return make_snp_vm()


@pytest.fixture
def snp_huge() -> SnpVm:
    """An initialised SNP VM on the hugepage-gmem backend (order-9 folios)."""
    return make_snp_vm("snp-hugepage")
