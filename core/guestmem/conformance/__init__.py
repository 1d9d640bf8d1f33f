"""The conformance kit: what every guestmem backend must pass, shipped as importable pytest
classes (as fsspec, SQLAlchemy's dialect suite and langchain-tests ship theirs).

Run it either way:

* subclass :class:`GmemConformance` in the backend's tests, naming the backend and VM
  type (and flags where the defaults do not fit)::

      from guestmem.conformance import GmemConformance

      class TestMyBackend(GmemConformance):
          backend = "mybackend"
          vm_type = MY_VM_TYPE

* or let :func:`kit_for` / :func:`kits_for` build the classes of an installed backend from
  its declarations (:class:`~guestmem.backend.VmTypeInfo`) and its plugin's
  ``guestmem_conformance_options``; the kit's pytest plugin
  (:mod:`guestmem.conformance.pytest_plugin`) collects them for backends named on the
  command line's environment.

One module per job:

- ``kit``: :class:`GmemConformance` (the uAPI rules and the deep kit) and
  :class:`KitGuest` (one VM with RAM);
- ``scenarios``: :class:`ScenarioConformance`, the built-in scenarios on a backend's
  rows, every applicable step run and meeting what it asserts;
- ``vmm``: :class:`KitVmm`, the kit's VM launched and driven through the backend's
  intents (the launch, guest accesses, conversions), and :class:`Ram`;
- ``ledger``: the leak check, :class:`OwnershipLedger` and :func:`check_released`;
- ``options``: :func:`kit_for`, :func:`kits_for`;
- ``conversions``: :class:`ConversionReference`, what a guest reads back after conversions
  and punches, and :func:`conversion_programs`, random programs for it;
- ``machine``: the stateful Hypothesis machine (imported on demand: it needs Hypothesis);
- ``stress``: :func:`~guestmem.conformance.stress.stress`, vCPU, conversion, punch and
  host-mapping threads against one host for a bounded time (imported on demand);
- ``pytest_plugin``: collecting the kit for named backends.

Requires pytest.
"""

from __future__ import annotations

from guestmem.conformance.conversions import (
    CONVERSION_PAGES,
    CONVERSION_SLOT_PAGES,
    ConversionReference,
    conversion_programs,
)
from guestmem.conformance.kit import BASE_GPA, RAM_PAGES, GmemConformance, KitGuest, expect_errno
from guestmem.conformance.ledger import LeakError, OwnershipLedger, allocated, check_ownership, check_released
from guestmem.conformance.options import declared_flags, kit_for, kits_for
from guestmem.conformance.scenarios import ScenarioConformance
from guestmem.conformance.vmm import KitVmm, Ram

__all__ = [
    "BASE_GPA",
    "CONVERSION_PAGES",
    "CONVERSION_SLOT_PAGES",
    "RAM_PAGES",
    "ConversionReference",
    "GmemConformance",
    "KitGuest",
    "KitVmm",
    "LeakError",
    "OwnershipLedger",
    "Ram",
    "ScenarioConformance",
    "allocated",
    "check_ownership",
    "check_released",
    "conversion_programs",
    "declared_flags",
    "expect_errno",
    "kit_for",
    "kits_for",
]
