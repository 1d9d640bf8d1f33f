"""Invariant checking: an observer plugin that re-checks every VM after every event.

Register it with :meth:`guestmem.registry.Registry.add_plugin`.  After each trace event
it checks the VM the event is about, and after each operation of the uAPI face every VM
of the host; a broken invariant is reported as :class:`InvariantViolation` once that
operation has finished (the model is consistent again by then):

- ``mmu-balanced``: no MMU invalidation is left in progress between operations (3.1);
- ``leaf-backed``: every stage-2 leaf maps a host pfn that is still allocated (no
  use-after-free of a punched or evicted folio);
- ``leaf-privateness``: on a VM whose attributes decide privateness, every private leaf
  lies on a private gfn and every shared leaf on a shared one (A-10, G-2);
- ``gmem-leaf``: a private leaf maps exactly the pfn guest_memfd holds for that gfn; not
  checked at the events inside an MMU invalidation, whose ranges are being torn down one
  by one after what they map changed (``kvm_gmem_release`` unbinds every memslot of the
  file before it zaps them), only once it ended.

The checks walk the stored ranges through the public views of
:mod:`guestmem.backend` (a backend's own checker can do the same), so they cost
O(ranges), not O(pages).
"""

from __future__ import annotations

from typing import Any

from guestmem import uapi
from guestmem.backend import HostView, Leaf, TraceEvent, VmView, hookimpl, view


class InvariantViolation(AssertionError):
    """A model invariant no longer holds (names the invariant and the event)."""


class InvariantChecker:
    """The observer; ``checked`` counts the checks it ran."""

    def __init__(self) -> None:
        self.checked = 0

    @hookimpl
    def guestmem_trace(self, vm: VmView | None, event: TraceEvent) -> None:
        if vm is None or vm.destroyed or event.kind == "ownership_update":
            return  # ownership updates come while a backend is changing its table
        check_vm(vm, event.kind, between_operations=False)
        self.checked += 1

    @hookimpl
    def guestmem_operation_done(self, host: HostView, operation: str) -> None:
        for vm in host.vms():
            check_vm(vm, operation)
            self.checked += 1


def check_vm(vm: Any, after: str = "", *, between_operations: bool = True) -> None:
    """Check every invariant of *vm* (a model ``Vm`` or its view); raise
    :class:`InvariantViolation` naming the first broken one.

    *between_operations* adds ``mmu-balanced``, which holds only once an operation ended.
    """
    vm = view(vm)
    where = f" after {after}" if after else ""
    if between_operations and vm.mmu_invalidate_in_progress:
        raise InvariantViolation(f"mmu-balanced{where}: {vm.mmu_invalidate_in_progress} invalidation(s) open")
    host = vm.host
    for leaf in vm.leaves():
        delta = leaf.pfn - leaf.gfn
        for s, e in host.unallocated(leaf.pfn, leaf.pfn + leaf.npages):
            raise InvariantViolation(
                f"leaf-backed{where}: gfns [{s - delta:#x}, {e - delta:#x}) map freed pfns"
            )
        if vm.has_private_mem:
            for s, e, value in vm.attribute_runs(leaf.gfn, leaf.end_gfn):
                if bool(value & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE) != leaf.private:
                    raise InvariantViolation(
                        f"leaf-privateness{where}: {'private' if leaf.private else 'shared'} leaf over "
                        f"gfns [{s:#x}, {e:#x}) whose attribute differs"
                    )
        if leaf.private and (between_operations or not vm.mmu_invalidate_in_progress):
            _check_gmem_leaf(vm, leaf, where)


def _check_gmem_leaf(vm: VmView, leaf: Leaf, where: str) -> None:
    """``gmem-leaf`` for one leaf run: every gfn of it maps the pfn guest_memfd holds for it.

    Walks the folio runs under the leaf (a 2 MiB leaf over a split folio must meet one run
    whose pfns follow the leaf's, not just agree at both ends).
    """
    loc = vm.gfn_to_gmem(leaf.gfn)
    if loc is None:
        raise InvariantViolation(f"gmem-leaf{where}: private leaf at gfn {leaf.gfn:#x} has no guest_memfd")
    delta = leaf.pfn - loc.index  # the pfn of gmem index i is i + delta along the leaf
    pos, end = loc.index, loc.index + leaf.npages
    for folio in loc.gmem.folios(pos, end):
        if folio.start > pos or folio.pfn != folio.start + delta:
            gfn = leaf.gfn + (pos if folio.start > pos else folio.start) - loc.index
            raise InvariantViolation(f"gmem-leaf{where}: private leaf at gfn {gfn:#x} is not gmem's pfn")
        pos = folio.end
    if pos < end:
        raise InvariantViolation(
            f"gmem-leaf{where}: private leaf at gfn {leaf.gfn + pos - loc.index:#x} maps a guest_memfd hole"
        )
