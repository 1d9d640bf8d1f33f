"""Invariant checking: an observer plugin that re-checks the model after every event.

Register it with :meth:`guestmem.registry.Registry.add_plugin`; it raises
:class:`InvariantViolation` at the first event after which one of these holds no more:

- ``mmu-balanced``: no MMU invalidation is left in progress between operations (3.1);
- ``leaf-backed``: every stage-2 leaf maps a host pfn that is still allocated (no
  use-after-free of a punched or evicted folio);
- ``leaf-privateness``: on a VM whose attributes decide privateness, every private leaf
  lies on a private gfn and every shared leaf on a shared one (A-10, G-2);
- ``gmem-leaf``: a private leaf maps exactly the pfn guest_memfd holds for that gfn.

The checks walk the stored ranges, so they cost O(ranges), not O(pages).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guestmem.hookspecs import hookimpl

if TYPE_CHECKING:
    from guestmem.model.events import TraceEvent
    from guestmem.model.vm import ModelVm


class InvariantViolation(AssertionError):
    """A model invariant no longer holds (names the invariant and the event)."""


class InvariantChecker:
    """The observer; ``checked`` counts the events it verified."""

    def __init__(self) -> None:
        self.checked = 0

    @hookimpl(trylast=True)
    def guestmem_trace(self, vm: ModelVm | None, event: TraceEvent) -> None:
        if vm is None or vm.destroyed:
            return
        check_vm(vm, event.kind)
        self.checked += 1


def check_vm(vm: ModelVm, after: str = "") -> None:
    """Check every invariant of *vm*; raise :class:`InvariantViolation` naming the first broken one."""
    where = f" after {after}" if after else ""
    mmu = vm.mmu
    # fault and attribute events are emitted inside their invalidation window
    if mmu.invalidate_in_progress and after not in ("set_memory_attributes",):
        raise InvariantViolation(f"mmu-balanced{where}: {mmu.invalidate_in_progress} invalidation(s) open")
    for start, end, spte in mmu.sptes.items():
        first_pfn = start + spte.delta
        for s, e in vm.host._allocated.gaps(first_pfn, end + spte.delta):
            raise InvariantViolation(
                f"leaf-backed{where}: gfns [{s - spte.delta:#x}, {e - spte.delta:#x}) map freed pfns"
            )
        if vm.has_private_mem:
            want = spte.private
            for a_start, a_end in _attr_runs(vm, start, end, want):
                raise InvariantViolation(
                    f"leaf-privateness{where}: {'private' if want else 'shared'} leaf over "
                    f"gfns [{a_start:#x}, {a_end:#x}) whose attribute differs"
                )
        if spte.private:
            for gfn in (start, end - 1):
                pfn = vm.gmem_pfn(gfn)
                if pfn != gfn + spte.delta:
                    raise InvariantViolation(
                        f"gmem-leaf{where}: private leaf at gfn {gfn:#x} is not gmem's pfn"
                    )


def _attr_runs(vm: ModelVm, start: int, end: int, private: bool) -> list[tuple[int, int]]:
    """Sub-ranges of ``[start, end)`` whose privateness is not *private*."""
    from guestmem import uapi

    bad = []
    pos = start
    for s, e, value in vm.attributes.items(start, end):
        if s > pos and private:
            bad.append((pos, s))
        if bool(value & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE) != private:
            bad.append((s, e))
        pos = e
    if pos < end and private:
        bad.append((pos, end))
    return bad
