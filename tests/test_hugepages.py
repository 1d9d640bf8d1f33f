"""Stage-2 mapping level (x86): spec 2.K, rules H-1..H-6."""

from __future__ import annotations

from typing import Any

import pytest
from gmem_helpers import INIT_SHARED, MMAP, PAGE, PRIVATE, MiB, anon_slot, gmem_slot, plugin

import guestmem
from guestmem import uapi

L4K, L2M = uapi.PG_LEVEL_4K, uapi.PG_LEVEL_2M
FRAME = 512  # gfns per 2 MiB


def touch(vm: Any, *gfns: int) -> list[int | None]:
    """Shared-or-private (by attribute) guest reads of *gfns*; their mapping levels after."""
    vcpu = vm.vcpus.get(0) or vm.create_vcpu(0)
    for gfn in gfns:
        vcpu.access(gfn * PAGE, 1)
    return [vm.mapping_level(g) for g in gfns]


# --- H-1 -----------------------------------------------------------------------------------------
def test_H1_private_gmem_mappings_are_4K(protected_vm: Any) -> None:
    """H-1: gmem folios are order 0, so a private fault maps 4 KiB even in an aligned 2 MiB frame."""
    gmem_slot(protected_vm, 4 * MiB, gpa=4 * MiB)
    protected_vm.set_memory_attributes(4 * MiB, 4 * MiB, PRIVATE)
    assert touch(protected_vm, 2 * FRAME, 2 * FRAME + 1) == [L4K, L4K]
    assert not protected_vm.is_mapped(2 * FRAME + 2)


def test_H1_gmem_only_shared_mappings_are_4K(default_vm: Any) -> None:
    """H-1: a gmem-only slot's shared faults are gmem-backed too: 4 KiB."""
    gmem_slot(default_vm, 4 * MiB, gpa=4 * MiB, flags=MMAP | INIT_SHARED)
    assert touch(default_vm, 2 * FRAME) == [L4K]


# --- H-2 hva path ------------------------------------------------------------------------------------
def test_H2_hva_path_maps_2M_when_frame_in_slot_and_congruent(default_vm: Any) -> None:
    """H-2: anonymous THP memory, gpa and hva congruent mod 2 MiB, frame in the slot: 2 MiB."""
    anon_slot(default_vm, 4 * MiB, gpa=4 * MiB, align=2 * MiB)
    assert touch(default_vm, 2 * FRAME + 7) == [L2M]
    assert default_vm.is_mapped(2 * FRAME) and default_vm.is_mapped(3 * FRAME - 1)
    assert not default_vm.is_mapped(3 * FRAME)


def test_H2_2M_does_not_depend_on_earlier_host_allocations(default_vm: Any) -> None:
    """H-2: THP pages are physically 2 MiB aligned, whatever the host allocated before."""
    gmem = default_vm.create_guest_memfd(MiB)
    gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE, 0, 3 * PAGE)  # 3 host pages taken first
    anon_slot(default_vm, 4 * MiB, gpa=4 * MiB, align=2 * MiB)
    assert touch(default_vm, 2 * FRAME + 7) == [L2M]


def test_H2_incongruent_gpa_and_hva_map_4K(default_vm: Any) -> None:
    """H-2: gpa and userspace_addr not congruent mod 2 MiB: no huge mapping."""
    mapping = default_vm.kvm.mmap_anonymous(8 * MiB)
    hva = (mapping.address + 2 * MiB - 1) // (2 * MiB) * (2 * MiB) + PAGE
    default_vm.set_user_memory_region2(0, 0, 4 * MiB, 4 * MiB, hva)
    assert touch(default_vm, 2 * FRAME + 7) == [L4K]


def test_H2_frame_partly_outside_slot_maps_4K(default_vm: Any) -> None:
    """H-2/H-3: only 2 MiB frames wholly inside the memslot may be huge."""
    mapping = default_vm.kvm.mmap_anonymous(8 * MiB)
    base = (mapping.address + 2 * MiB - 1) // (2 * MiB) * (2 * MiB)
    # slot gpa [1 MiB, 5 MiB), hva congruent: frame [2 MiB, 4 MiB) inside, [0, 2 MiB) and [4, 6) not.
    default_vm.set_user_memory_region2(0, 0, MiB, 4 * MiB, base + MiB)
    assert touch(default_vm, FRAME // 2, FRAME + 3, 2 * FRAME + 1) == [L4K, L2M, L4K]


# --- H-3 .. H-6 attributes and the mixed flag ---------------------------------------------------------
@pytest.fixture
def shared_hva_vm(protected_vm: Any) -> Any:
    """SW_PROTECTED VM with a plain (hva) 4 MiB slot at gpa 4 MiB, congruent THP memory."""
    anon_slot(protected_vm, 4 * MiB, gpa=4 * MiB, align=2 * MiB)
    return protected_vm


def test_H3_uniform_attributes_allow_2M(shared_hva_vm: Any) -> None:
    """H-3: a private-mem VM's shared frame with uniform attributes may be huge."""
    assert touch(shared_hva_vm, 2 * FRAME + 9) == [L2M]


def test_H3_H6_mixed_frame_maps_4K(shared_hva_vm: Any) -> None:
    """H-3/H-6: one private gfn in the frame makes it mixed: shared faults there map 4 KiB."""
    vm = shared_hva_vm
    vm.set_memory_attributes((2 * FRAME + 100) * PAGE, PAGE, PRIVATE)
    assert touch(vm, 2 * FRAME + 9, 3 * FRAME + 9) == [L4K, L2M]


def test_H4_attribute_change_inside_a_mapped_2M_frame(shared_hva_vm: Any) -> None:
    """H-4: after an attribute change inside a huge-mapped frame, the next shared fault maps 4 KiB.

    The change zaps the whole 2 MiB leaf (its head/tail frame is part of the invalidation),
    so no part of the old huge mapping survives.
    """
    vm = shared_hva_vm
    assert touch(vm, 2 * FRAME) == [L2M]
    vm.set_memory_attributes((2 * FRAME + 5) * PAGE, PAGE, PRIVATE)
    assert not vm.is_mapped(2 * FRAME) and not vm.is_mapped(2 * FRAME + 300)
    assert touch(vm, 2 * FRAME + 10) == [L4K]


def test_H4_uniform_again_allows_2M_again(shared_hva_vm: Any) -> None:
    """H-4: converting the gfn back makes the frame uniform: huge mappings return."""
    vm = shared_hva_vm
    vm.set_memory_attributes((2 * FRAME + 5) * PAGE, PAGE, PRIVATE)
    assert touch(vm, 2 * FRAME + 10) == [L4K]
    vm.set_memory_attributes((2 * FRAME + 5) * PAGE, PAGE, 0)
    vm.zap_gfn_range(2 * FRAME, 3 * FRAME)
    assert touch(vm, 2 * FRAME + 10) == [L2M]


def test_H4_whole_frame_private_is_uniform(shared_hva_vm: Any) -> None:
    """H-3/H-4: a frame made wholly PRIVATE is uniform; the neighbour frame stays huge."""
    vm = shared_hva_vm
    vm.set_memory_attributes(2 * FRAME * PAGE, 2 * MiB, PRIVATE)
    assert touch(vm, 3 * FRAME) == [L2M]
    assert all(vm.is_private(g) for g in (2 * FRAME, 3 * FRAME - 1))


def test_H5_slot_created_over_mixed_attributes(protected_vm: Any) -> None:
    """H-5: attributes set before the memslot exists are honoured for its frames."""
    vm = protected_vm
    vm.set_memory_attributes((2 * FRAME + 1) * PAGE, PAGE, PRIVATE)
    anon_slot(vm, 4 * MiB, gpa=4 * MiB, align=2 * MiB)
    assert touch(vm, 2 * FRAME + 3, 3 * FRAME + 3) == [L4K, L2M]


def test_H6_default_vm_ignores_attributes(default_vm: Any) -> None:
    """H-6 applies to VMs with private memory; a DEFAULT VM has no attributes to mix."""
    anon_slot(default_vm, 4 * MiB, gpa=4 * MiB, align=2 * MiB)
    default_vm.set_memory_attributes(2 * FRAME * PAGE, PAGE, 0)
    assert touch(default_vm, 2 * FRAME + 1) == [L2M]


# --- kvm_mmu_hugepage_adjust / kvm_mmu_slot_apply_flags: dirty logging ------------------------------
def test_H2_dirty_logged_slot_maps_4K(default_vm: Any) -> None:
    """``kvm_mmu_hugepage_adjust``: ``kvm_slot_dirty_track_enabled`` keeps every mapping at 4 KiB,
    even in an aligned THP-backed frame (H-2 would allow 2 MiB)."""
    anon_slot(default_vm, 4 * MiB, gpa=4 * MiB, align=2 * MiB, flags=uapi.KVM_MEM_LOG_DIRTY_PAGES)
    assert touch(default_vm, 2 * FRAME + 7) == [L4K]
    assert not default_vm.is_mapped(2 * FRAME)


def test_H2_enabling_dirty_logging_splits_huge_leaves(default_vm: Any) -> None:
    """``kvm_mmu_slot_apply_flags`` (S-13 FLAGS_ONLY, LOG_DIRTY_PAGES on): eager page split to
    4 KiB and write protection; the pages stay mapped, a store re-faults at 4 KiB."""
    hva = anon_slot(default_vm, 4 * MiB, gpa=4 * MiB, align=2 * MiB)
    assert touch(default_vm, 2 * FRAME + 7) == [L2M]
    pfn = default_vm.mmu.lookup(2 * FRAME + 7)[0]
    default_vm.set_user_memory_region2(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 4 * MiB, 4 * MiB, hva)
    assert default_vm.mapping_level(2 * FRAME) == L4K
    assert default_vm.mmu.lookup(2 * FRAME + 7) == (pfn, default_vm.mmu.lookup(2 * FRAME + 7)[1])
    assert not default_vm.mmu.lookup(2 * FRAME + 7)[1].writable
    faults = default_vm.counters["faults"]
    default_vm.vcpus[0].access((2 * FRAME + 7) * PAGE, data=b"d")
    assert default_vm.counters["faults"] == faults + 1
    assert default_vm.mapping_level(2 * FRAME + 7) == L4K
    assert default_vm.mapping_level(2 * FRAME + 8) == L4K


class _LowerLevelOnceThenInvalidate:
    """Observer: the first fault attempt is limited to 4K and an unrelated invalidation ends
    meanwhile (the sequence moves), so the fault retries."""

    def __init__(self) -> None:
        self.fired = False

    @guestmem.hookimpl
    def guestmem_fault(self, vm: Any, fault: Any) -> None:
        if not self.fired:
            self.fired = True
            fault.max_level = L4K
            vm.zap_gfn_range(0, 1)


def test_3_3_a_retried_fault_starts_from_a_fresh_kvm_page_fault(default_vm: Any) -> None:
    """3.3: ``kvm_tdp_map_page``/``kvm_mmu_do_page_fault`` build a new ``kvm_page_fault`` for
    every attempt (``max_level = KVM_MAX_HUGEPAGE_LEVEL``), so a level lowered during an attempt
    that retried does not limit the retry."""
    anon_slot(default_vm, 4 * MiB, gpa=4 * MiB, align=2 * MiB)
    spy = _LowerLevelOnceThenInvalidate()
    with plugin(spy):
        assert touch(default_vm, 2 * FRAME + 7) == [L2M]
    assert spy.fired and default_vm.counters["fault_retries"] == 1
