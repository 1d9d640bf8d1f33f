"""Simulated stage-2 (TDP) leaves and the MMU invalidation protocol (spec 3.1-3.3).

Leaves are stored as gfn ranges whose value keeps ``pfn - gfn`` constant, so a contiguous
mapping of any size is one entry.  The counters follow ``struct kvm``:
``mmu_invalidate_in_progress``, ``mmu_invalidate_seq`` and the in-progress gfn range; a
fault snapshots the sequence number and retries if an invalidation covering its gfn ran or
is running (``mmu_invalidate_retry_gfn``).

On a VM type with a mirrored TDP (TDX) private leaves live in the mirror root: installing
and zapping them goes through ``guestmem_set_external_spte`` and
``guestmem_remove_external_spte``, and a zap reaches only the roots its ``attr_filter``
names (``kvm_gfn_range_filter_to_root_types``).  Every other VM has one direct root that
holds both kinds, and a zap removes whatever lies in its range, as the kernel does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import attrs

from guestmem import uapi
from guestmem.backend import GfnRange, Leaf
from guestmem.ranges import RangeMap

if TYPE_CHECKING:
    from guestmem.model.vm import ModelVm

INVALID_GFN = -1
_BOTH = uapi.KVM_FILTER_SHARED | uapi.KVM_FILTER_PRIVATE


def level_pages(level: int) -> int:
    """Pages one leaf of *level* maps."""
    return 1 << (9 * (level - 1))


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
        self.mirrored = vm.type_info.has_mirrored_tdp
        # Bumped whenever a leaf is installed, changed or zapped, or an attribute changes:
        # the vCPUs' translation caches (ModelVcpu._tlb) are valid for one generation.
        self.gen = 0

    # --- invalidation counters (kvm_mmu_invalidate_*) -------------------------------------------
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
        if self.vm.tracing:
            self.vm.trace(
                "mmu_invalidate",
                gfn_start=self.range_start,
                gfn_end=self.range_end,
                invalidate_seq=self.invalidate_seq,
            )

    def retry_gfn(self, seq: int, gfn: int) -> bool:
        """``mmu_invalidate_retry_gfn``: must a fault that snapshotted *seq* retry?"""
        if self.invalidate_in_progress and self.range_start <= gfn < self.range_end:
            return True
        return self.invalidate_seq != seq

    # --- stage-2 updates ------------------------------------------------------------------------
    def unmap_gfn_range(self, rng: GfnRange) -> bool:
        """``kvm_mmu_unmap_gfn_range``: range_add, then :meth:`kvm_unmap_gfn_range`."""
        self.invalidate_range_add(rng.start, rng.end)
        return self.kvm_unmap_gfn_range(rng)

    def kvm_unmap_gfn_range(self, rng: GfnRange) -> bool:
        """The arch ``kvm_unmap_gfn_range``: zap the leaves, then the backend's hook.

        Called inside an MMU invalidation, or (memslot delete/move) under slots_lock alone.
        Returns True if a TLB flush is needed.
        """
        flush = self.zap(rng.start, rng.end, rng.attr_filter)
        return self.vm.hooks.unmap_gfn_range(self.vm.view, rng) or flush

    def zap(self, start: int, end: int, attr_filter: int = _BOTH) -> bool:
        """``tdp_mmu_zap_leafs`` over the roots *attr_filter* names; True if something went.

        A huge leaf goes as a whole, as the TDP MMU zaps any leaf SPTE overlapping the range.
        """
        if not self.sptes.overlaps(start, end):
            return False
        for gfn in (start, end - 1):
            spte = self.sptes.get(gfn)
            if spte is not None and spte.level > uapi.PG_LEVEL_4K:
                n = level_pages(spte.level)
                start, end = min(start, gfn & ~(n - 1)), max(end, (gfn & ~(n - 1)) + n)
        private_ok = bool(attr_filter & uapi.KVM_FILTER_PRIVATE) or not self.mirrored
        shared_ok = bool(attr_filter & uapi.KVM_FILTER_SHARED) or not self.mirrored
        gone = [
            (s, e, spte)
            for s, e, spte in self.sptes.items(start, end)
            if (private_ok if spte.private else shared_ok)
        ]
        if not gone:
            return False
        self.gen += 1
        self.sptes.erase_runs((s, e) for s, e, _ in gone)
        external = [
            Leaf(s, e - s, s + spte.delta, spte.level, True, spte.writable)
            for s, e, spte in gone
            if self.mirrored and spte.private
        ]
        zapped = sum(e - s for s, e, _ in gone)
        self.vm.count("stage2_unmapped_pages", zapped)
        self.vm.count("tlb_flushes")
        if self.vm.tracing:
            private = sum(e - s for s, e, spte in gone if spte.private)
            self.vm.trace(
                "zap", gfn_start=gone[0][0], gfn_end=gone[-1][1], pages=zapped, private_pages=private
            )
        # remove_external_spte runs after the mirror leaf was zapped (handle_changed_spte)
        for leaf in external:
            self.vm.hooks.remove_external_spte(self.vm.view, leaf)
        return True

    def install(self, leaf: Leaf) -> None:
        """Install *leaf*; a private leaf of a mirrored VM reaches the backend first."""
        if self.mirrored and leaf.private:
            self.vm.hooks.set_external_spte(self.vm.view, leaf)
        self.gen += 1
        self.sptes.set(
            leaf.gfn, leaf.end_gfn, Spte(leaf.pfn - leaf.gfn, leaf.private, leaf.writable, leaf.level)
        )
        self.vm.count("stage2_mapped_pages", leaf.npages)

    def write_protect_4k(self, start: int, end: int) -> None:
        """``kvm_mmu_slot_apply_flags`` turning on dirty logging: eager split to 4K, then
        write-protect every leaf of ``[start, end)``."""
        self.gen += 1
        for s, e, spte in list(self.sptes.items(start, end)):
            self.sptes.set(s, e, attrs.evolve(spte, level=uapi.PG_LEVEL_4K, writable=False))

    def zap_all(self) -> None:
        """``kvm_mmu_zap_all`` (``kvm_flush_shadow_all`` at VM destruction): every root."""
        first = self.sptes.first()
        if first is not None:
            self.zap(first[0], 1 << 64)

    # --- lookups ----------------------------------------------------------------------------------
    def lookup(self, gfn: int) -> tuple[int, Spte] | None:
        """``(pfn, spte)`` of the leaf mapping *gfn*, or None."""
        spte = self.sptes.get(gfn)
        if spte is None:
            return None
        return gfn + spte.delta, spte

    def leaf(self, gfn: int) -> Leaf | None:
        """The stored leaf run holding *gfn*."""
        ent = self.sptes.entry(gfn)
        if ent is None:
            return None
        s, e, spte = ent
        return Leaf(s, e - s, s + spte.delta, spte.level, spte.private, spte.writable)

    def leaves(self, start: int = 0, end: int | None = None) -> Iterator[Leaf]:
        """The leaf runs overlapping ``[start, end)``, clipped to it."""
        for s, e, spte in self.sptes.items(start, end):
            yield Leaf(s, e - s, s + spte.delta, spte.level, spte.private, spte.writable)

    def mapped_pages(self) -> int:
        """Number of gfns with a leaf."""
        return sum(e - s for s, e, _ in self.sptes.items())
