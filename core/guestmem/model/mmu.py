"""Simulated stage-2 (TDP) mappings and the MMU invalidation protocol (spec 3.1-3.3).

Mappings are stored as gfn ranges whose value keeps ``pfn - gfn`` constant, so a
contiguous mapping of any size is one entry.  The counters follow ``struct kvm``:
``mmu_invalidate_in_progress``, ``mmu_invalidate_seq`` and the in-progress gfn range; a
fault snapshots the sequence number and retries if an invalidation covering its gfn ran
or is running (``mmu_invalidate_retry_gfn``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from guestmem import uapi
from guestmem.ranges import RangeMap

if TYPE_CHECKING:
    from guestmem.model.memslot import Memslot
    from guestmem.model.vm import ModelVm

INVALID_GFN = -1


@attrs.define(eq=False)
class GfnRange:
    """``struct kvm_gfn_range``: the gfns ``[start, end)`` of *slot* being invalidated."""

    slot: Memslot | None
    start: int
    end: int
    attr_filter: int = uapi.KVM_FILTER_SHARED | uapi.KVM_FILTER_PRIVATE
    #: New attribute value (attribute changes only).
    attributes: int = 0
    may_block: bool = True


@attrs.define(eq=False)
class Fault:
    """``struct kvm_page_fault``: one guest stage-2 fault being resolved."""

    gpa: int
    is_private: bool
    write: bool
    exec: bool = False
    prefetch: bool = False
    slot: Memslot | None = None
    pfn: int | None = None
    #: KVM_MAX_HUGEPAGE_LEVEL until the pfn's source (folio, host mapping) bounds it.
    max_level: int = uapi.PG_LEVEL_1G
    map_writable: bool = True
    mmu_seq: int = 0
    vcpu: Any = None
    #: Pages ``[gfn, gfn + npages)`` this fault maps at once (``ModelVm.fault_range``, for a
    #: backend whose policy sets ``guestmem_range_faults = True``); a ``guestmem_fault`` hook
    #: may lower it.  1 for every fault a vCPU takes.
    npages: int = 1

    @property
    def gfn(self) -> int:
        """The faulting gfn."""
        return self.gpa >> uapi.PAGE_SHIFT


@attrs.frozen
class Spte:
    """A leaf mapping: ``pfn = gfn + delta``; ``private`` says which table holds it."""

    delta: int
    private: bool
    writable: bool
    level: int = uapi.PG_LEVEL_4K


class Mmu:
    """One VM's stage-2 tables and invalidation counters (``kvm->mmu_invalidate_*``)."""

    def __init__(self, vm: ModelVm) -> None:
        self.vm = vm
        self.sptes: RangeMap[Spte] = RangeMap()
        self.invalidate_in_progress = 0
        self.invalidate_seq = 0
        self.range_start = INVALID_GFN
        self.range_end = INVALID_GFN

    # --- invalidation counters (KM kvm_mmu_invalidate_*) ----------------------------------
    def invalidate_begin(self) -> None:
        """``kvm_mmu_invalidate_begin``."""
        self.invalidate_in_progress += 1
        if self.invalidate_in_progress == 1:
            self.range_start = INVALID_GFN
            self.range_end = INVALID_GFN

    def invalidate_range_add(self, start: int, end: int) -> None:
        """``kvm_mmu_invalidate_range_add``: widen the in-progress range to the union."""
        assert self.invalidate_in_progress, "range_add outside an invalidation"
        if self.range_start == INVALID_GFN:
            self.range_start, self.range_end = start, end
        else:
            self.range_start = min(self.range_start, start)
            self.range_end = max(self.range_end, end)

    def invalidate_end(self) -> None:
        """``kvm_mmu_invalidate_end``: bump the sequence, then drop in-progress.

        As the kernel WARNs, every invalidation must have added a range before its end.
        """
        self.invalidate_seq += 1
        self.invalidate_in_progress -= 1
        assert self.invalidate_in_progress >= 0, "unbalanced mmu invalidation"
        assert self.range_start != INVALID_GFN, "mmu invalidation ended without a range"

    def retry_gfn(self, seq: int, gfn: int) -> bool:
        """``mmu_invalidate_retry_gfn``: must a fault that snapshotted *seq* retry?"""
        if self.invalidate_in_progress and self.range_start <= gfn < self.range_end:
            return True
        return self.invalidate_seq != seq

    # --- stage-2 updates -----------------------------------------------------------------
    def unmap_gfn_range(self, rng: GfnRange) -> bool:
        """``kvm_mmu_unmap_gfn_range``: range_add, then :meth:`kvm_unmap_gfn_range`."""
        self.invalidate_range_add(rng.start, rng.end)
        return self.kvm_unmap_gfn_range(rng)

    def kvm_unmap_gfn_range(self, rng: GfnRange) -> bool:
        """The arch ``kvm_unmap_gfn_range``: zap the leaves, then the backend's hook.

        Called inside an MMU invalidation, or (memslot delete/move) under slots_lock alone.
        Returns True if a TLB flush is needed.
        """
        flush = self.zap(rng.start, rng.end)
        results = self.vm.hooks.unmap_gfn_range(vm=self.vm, range=rng)
        return flush or any(results)

    def zap(self, start: int, end: int) -> bool:
        """Drop every leaf overlapping ``[start, end)``; True if something was mapped.

        A huge leaf goes as a whole, as the TDP MMU zaps any leaf SPTE overlapping the range.
        """
        if not self.sptes.overlaps(start, end):
            return False
        for gfn in (start, end - 1):
            spte = self.sptes.get(gfn)
            if spte is not None and spte.level > uapi.PG_LEVEL_4K:
                n = 1 << (9 * (spte.level - 1))
                start, end = min(start, gfn & ~(n - 1)), max(end, (gfn & ~(n - 1)) + n)
        zapped = sum(e - s for s, e, _ in self.sptes.items(start, end))
        self.sptes.erase(start, end)
        self.vm.count("stage2_unmapped_pages", zapped)
        self.vm.count("tlb_flushes")
        return True

    def install(self, gfn: int, npages: int, pfn: int, private: bool, writable: bool, level: int) -> None:
        """Install a leaf for ``[gfn, gfn+npages)`` -> ``pfn``."""
        self.sptes.set(gfn, gfn + npages, Spte(pfn - gfn, private, writable, level))
        self.vm.count("stage2_mapped_pages", npages)

    def lookup(self, gfn: int) -> tuple[int, Spte] | None:
        """``(pfn, spte)`` of the leaf mapping *gfn*, or None."""
        spte = self.sptes.get(gfn)
        if spte is None:
            return None
        return gfn + spte.delta, spte

    def mapped_pages(self) -> int:
        """Number of gfns with a leaf."""
        return sum(e - s for s, e, _ in self.sptes.items())
