"""SNP invariants a VMM's tests can assert (``check_rmp``) or check after every event (``RmpChecker``).

- ``rmp-freed``: no RMP-assigned entry lies on a page guest_memfd (or KVM) gave back to
  the host, including pages freed although their reclaim failed;
- ``rmp-host-mapped``: no RMP-assigned gmem page is faulted into a host mapping.

Both walk stored ranges (freed runs, host PTE runs), never pages.
"""

from __future__ import annotations

from typing import Any

from guestmem.backend import HostView, TraceEvent, VmView, hookimpl, view
from guestmem.invariants import InvariantViolation
from guestmem_snp.sev import SevVm


def check_rmp(vm: Any, after: str = "") -> None:
    """Raise :class:`guestmem.invariants.InvariantViolation` if an SNP invariant of *vm*
    (a ``Vm`` of an snp backend, or its view) fails."""
    vm = view(vm)
    sev = vm.arch
    if not isinstance(sev, SevVm):
        return
    where = f" after {after}" if after else ""
    host = sev.host
    rmp = host.rmp
    for start, end, _ in host.freed_while_assigned.items():
        raise InvariantViolation(f"rmp-freed{where}: pfns [{start:#x}, {end:#x}) were freed while assigned")
    for start, end, _ in host.freed.items():
        if rmp.any_assigned(start, end - start):
            raise InvariantViolation(
                f"rmp-freed{where}: an assigned RMP entry lies in freed [{start:#x}, {end:#x})"
            )
    for gmem in vm.bound_gmem():
        for folio in gmem.host_mapped_folios():
            if rmp.any_assigned(folio.pfn, folio.end - folio.start):
                raise InvariantViolation(
                    f"rmp-host-mapped{where}: private gmem pages [{folio.start:#x}, {folio.end:#x}) "
                    "are host-mapped"
                )


class RmpChecker:
    """An observer: :func:`check_rmp` after every event of every SNP VM and every operation."""

    def __init__(self) -> None:
        self.checked = 0

    @hookimpl
    def guestmem_trace(self, vm: VmView | None, event: TraceEvent) -> None:
        if vm is None or vm.destroyed or event.kind == "ownership_update":
            return  # ownership updates come while a backend is changing its table
        check_rmp(vm, event.kind)
        self.checked += 1

    @hookimpl
    def guestmem_operation_done(self, host: HostView, operation: str) -> None:
        for vm in host.vms():
            check_rmp(vm, operation)
            self.checked += 1
