"""An observer plugin checking pKVM's isolation invariants while a scenario runs.

Register it like any plugin::

    checker = IsolationChecker()
    guestmem.get_registry().add_plugin(checker, name="pkvm-isolation")
    try:
        ...  # drive pkvm VMs
    finally:
        guestmem.get_registry().remove_plugin(checker)

Invariants (backends.md 3.2, 3.5):

* **I-1**: no page is host-mapped while a protected guest owns it privately.  Checked when
  a page becomes guest-private (``guestmem_ownership_update`` on the host table) and when
  the host maps a gmem page (the core's ``host_map`` trace event).
* **I-2**: a page that leaves a guest's private ownership reaches the host zeroed.

A violation raises :class:`IsolationViolation` (an
:class:`~guestmem.invariants.InvariantViolation`, so an ``AssertionError``: the model
itself is wrong) and is also kept in :attr:`IsolationChecker.violations`.  The core
reports it when the operation that broke the invariant has finished: the uAPI call that
caused it raises it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from guestmem.backend import HostView, OwnershipEvent, TraceEvent, VmView, hookimpl
from guestmem.invariants import InvariantViolation
from guestmem_pkvm.ownership import HOST_TABLE, PAGE_SIZE, Component, HostPage, Hypervisor, PageState
from guestmem_pkvm.policy import PkvmVm

_ZERO_PAGE = bytes(PAGE_SIZE)


class IsolationViolation(InvariantViolation):
    """A pKVM isolation invariant was broken."""


def _guest_private(page: Any) -> bool:
    return isinstance(page, HostPage) and page.state == PageState.NOPAGE and page.owner == Component.GUEST


class IsolationChecker:
    """Observer: I-1 (no host mapping of guest-private pages) and I-2 (zeroed on return)."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.checks: Counter[str] = Counter()

    def _fail(self, message: str) -> None:
        self.violations.append(message)
        raise IsolationViolation(message)

    @hookimpl
    def guestmem_ownership_update(self, vm: VmView | None, event: OwnershipEvent) -> None:
        """I-1 when a page turns guest-private, I-2 when one comes back to the host."""
        if event.table != HOST_TABLE or vm is None or not isinstance(vm.arch, PkvmVm):
            return
        pfn, npages, old, new = event.pfn, event.npages, event.old, event.new
        if _guest_private(new):
            for p in range(pfn, pfn + npages):
                self.checks["I-1"] += 1
                loc = vm.gfn_to_gmem(new.gfn(p))
                if loc is not None and loc.gmem.host_mapped(loc.index):
                    self._fail(f"I-1: pfn {p:#x} (gmem page {loc.index:#x}) is host-mapped but guest-private")
        elif _guest_private(old) and new.state == PageState.OWNED:
            for p in range(pfn, pfn + npages):
                self.checks["I-2"] += 1
                if vm.host.read(p, 0, PAGE_SIZE) != _ZERO_PAGE:
                    self._fail(f"I-2: pfn {p:#x} left guest {old.handle:#x} without being zeroed")

    @hookimpl
    def guestmem_trace(self, host: HostView, event: TraceEvent) -> None:
        """I-1 when the host maps a gmem page; counts the pKVM events seen."""
        if event.kind.startswith("pkvm_"):
            self.checks[event.kind] += 1
        elif event.kind == "host_map" and isinstance(host.arch, Hypervisor):
            self.checks["I-1"] += 1
            pfn, index = event.fields["pfn"], event.fields["index"]
            # The raw table, not the policy's accessors: the checker must not share their bugs.
            if _guest_private(host.arch.host.get(pfn)):
                self._fail(f"I-1: host maps gmem page {index:#x} (pfn {pfn:#x}) that a guest owns privately")
