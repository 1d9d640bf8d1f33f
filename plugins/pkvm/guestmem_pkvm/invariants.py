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
  the host is about to map a gmem page (a wrapper around ``guestmem_host_mappable``).
* **I-2**: a page that leaves a guest's private ownership reaches the host zeroed.

A violation raises :class:`IsolationViolation` at once (an ``AssertionError``: the model
itself is wrong) and is also kept in :attr:`IsolationChecker.violations`.  The
``guestmem_trace`` hook only counts what was checked: trace hooks must not raise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from guestmem.hookspecs import hookimpl
from guestmem_pkvm.ownership import HOST_TABLE, PAGE_SIZE, Component, HostPage, PageState
from guestmem_pkvm.policy import PkvmVm

if TYPE_CHECKING:
    from guestmem.model.events import TraceEvent
    from guestmem.model.gmem import GmemInode
    from guestmem.model.vm import ModelVm

_ZERO_PAGE = bytes(PAGE_SIZE)


class IsolationViolation(AssertionError):
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
    def guestmem_ownership_update(
        self, vm: ModelVm, table: str, pfn: int, npages: int, old: Any, new: Any
    ) -> None:
        """I-1 when a page turns guest-private, I-2 when one comes back to the host."""
        if table != HOST_TABLE or not isinstance(vm.arch, PkvmVm):
            return
        if _guest_private(new):
            for p in range(pfn, pfn + npages):
                self.checks["I-1"] += 1
                loc = vm.gfn_to_gmem(new.gfn(p))
                if loc is not None and loc.inode.host_mapped(loc.index):
                    self._fail(f"I-1: pfn {p:#x} (gmem page {loc.index:#x}) is host-mapped but guest-private")
        elif _guest_private(old) and new.state == PageState.OWNED:
            for p in range(pfn, pfn + npages):
                self.checks["I-2"] += 1
                if vm.host.read(p, 0, PAGE_SIZE) != _ZERO_PAGE:
                    self._fail(f"I-2: pfn {p:#x} left guest {old.handle:#x} without being zeroed")

    @hookimpl(wrapper=True)
    def guestmem_host_mappable(self, vm: ModelVm, inode: GmemInode, index: int) -> Generator[None, Any, Any]:
        """I-1 at the moment the host maps a gmem page."""
        result = yield
        owner = inode.owner
        mapped = inode.init_shared if result is None else result
        if mapped and isinstance(owner.arch, PkvmVm):
            self.checks["I-1"] += 1
            pfn = inode.pfn(index)
            # The raw table, not the policy's accessors: the checker must not share their bugs.
            if pfn is not None and _guest_private(owner.arch.hyp.host.get(pfn)):
                self._fail(f"I-1: host maps gmem page {index:#x} (pfn {pfn:#x}) that a guest owns privately")
        return result

    @hookimpl
    def guestmem_trace(self, vm: ModelVm | None, event: TraceEvent) -> None:
        """Count the pKVM events seen (never raises)."""
        if event.kind.startswith("pkvm_"):
            self.checks[event.kind] += 1
