"""KVM_SET_USER_MEMORY_REGION(2): spec 2.F, rules S-1..S-16 and their evaluation order."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from gmem_helpers import (
    GMEM,
    LOG_DIRTY,
    MMAP,
    PAGE,
    READONLY,
    MiB,
    anon_slot,
    gmem_slot,
    throwaway_backend,
    vm_state,
    x86_type,
)

import guestmem
from guestmem import KvmError, uapi


def rejects(call: Any, *args: Any, err: int = errno.EINVAL, rule: str, **kwargs: Any) -> KvmError:
    with pytest.raises(KvmError) as info:
        call(*args, **kwargs)
    assert (info.value.errno, info.value.rule) == (err, rule), info.value
    return info.value


# --- S-1 .. S-3 ---------------------------------------------------------------------------
def test_S1_fields_are_stored_as_c_stores_them(protected_vm: Any) -> None:
    """S-1: each argument is a ``__u32`` or ``__u64`` field, a wider value taken modulo
    2**32 or 2**64, and the kernel's checks see that: a gpa of -PAGE plus a page wraps
    (S-7), flags of 2**32 are 0 and slot 2**32 + 1 is slot 1.  A non-integer is a TypeError
    naming it; nothing changes."""
    before = vm_state(protected_vm)
    with pytest.raises(KvmError) as info:
        protected_vm.set_user_memory_region2(0, 0, -PAGE, PAGE, 0)
    assert info.value.rule == "S-7"
    for args, name in (((0.0, 0, 0, PAGE, 0), "slot"), ((0, 0, 0, PAGE, "0"), "userspace_addr")):
        with pytest.raises(TypeError, match=name):
            protected_vm.set_user_memory_region2(*args)
    with pytest.raises(TypeError, match="guest_memfd"):
        protected_vm.set_user_memory_region2(0, GMEM, 0, PAGE, 0, "3")
    assert vm_state(protected_vm) == before
    protected_vm.set_user_memory_region2((1 << 32) + 1, 1 << 32, 0, PAGE, 0)
    assert set(protected_vm.memslots) == {(0, 1)} and protected_vm.memslots[(0, 1)].flags == 0


@pytest.mark.parametrize("flags", [GMEM, 1 << 3, GMEM | LOG_DIRTY])
def test_S2_v1_rejects_flags_beyond_log_dirty_and_readonly(default_vm: Any, flags: int) -> None:
    """S-2: KVM_SET_USER_MEMORY_REGION (v1) accepts only LOG_DIRTY_PAGES | READONLY."""
    rejects(default_vm.set_user_memory_region, 0, flags, 0, PAGE, 0, rule="S-2")


def test_S2_v1_accepts_readonly_and_log_dirty(default_vm: Any) -> None:
    """S-2: the v1 flags themselves pass."""
    hva = default_vm.kvm.mmap_anonymous(2 * PAGE).address
    default_vm.set_user_memory_region(0, READONLY, 0, PAGE, hva)
    default_vm.set_user_memory_region(1, LOG_DIRTY, PAGE, PAGE, hva + PAGE)
    assert {k[1] for k in default_vm.memslots} == {0, 1}


def test_S2_before_S3(default_vm: Any) -> None:
    """S-2 is checked in kvm_vm_ioctl, before the slot id (S-3)."""
    rejects(default_vm.set_user_memory_region, uapi.KVM_USER_MEM_SLOTS, GMEM, 0, PAGE, 0, rule="S-2")


def test_S3_slot_id_at_user_limit(default_vm: Any) -> None:
    """S-3: (u16)slot >= KVM_USER_MEM_SLOTS is EINVAL; the last user slot is fine."""
    rejects(default_vm.set_user_memory_region2, uapi.KVM_USER_MEM_SLOTS, 0, 0, PAGE, 0, rule="S-3")
    default_vm.set_user_memory_region2(uapi.KVM_USER_MEM_SLOTS - 1, 0, 0, PAGE, 0)


def test_S3_ignores_address_space_bits(default_vm: Any) -> None:
    """S-3 looks only at bits 15:0: as_id 1 with a small id passes S-3 (DEFAULT VM has 2 ASes)."""
    default_vm.set_user_memory_region2((1 << 16) | 5, 0, 0, PAGE, 0)
    assert (1, 5) in default_vm.memslots


def test_S3_before_S4(default_vm: Any) -> None:
    """S-3 (slot id) wins over S-4 (flags)."""
    rejects(default_vm.set_user_memory_region2, uapi.KVM_USER_MEM_SLOTS, 1 << 5, 0, PAGE, 0, rule="S-3")


# --- S-4 flags ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags",
    [GMEM | LOG_DIRTY, GMEM | READONLY, 1 << 3, 1 << 16, LOG_DIRTY | (1 << 31)],
    ids=["gmem+logdirty", "gmem+readonly", "bit3", "internal-invalid", "bit31"],
)
def test_S4_invalid_flag_combinations(protected_vm: Any, flags: int) -> None:
    """S-4: GMEM removes LOG_DIRTY and READONLY from the valid set; unknown bits are EINVAL."""
    gmem = protected_vm.create_guest_memfd(MiB)
    before = vm_state(protected_vm, gmem)
    rejects(protected_vm.set_user_memory_region2, 0, flags, 0, MiB, 0, gmem, 0, rule="S-4")
    assert vm_state(protected_vm, gmem) == before


def test_S4_readonly_needs_readonly_mem() -> None:
    """S-4: READONLY is valid only if kvm_arch_has_readonly_mem (x86: not protected state)."""
    info = x86_type(1, readonly_mem=False)
    with throwaway_backend("t-s4-ro", info) as kvm, kvm.create_vm(1) as vm:
        rejects(vm.set_user_memory_region2, 0, READONLY, 0, PAGE, 0, rule="S-4")
        vm.set_user_memory_region2(0, LOG_DIRTY, 0, PAGE, 0)


def test_S4_runs_on_delete(default_vm: Any) -> None:
    """S-4 runs for delete too: deleting an existing slot with a bad flag is EINVAL, slot stays."""
    default_vm.set_user_memory_region2(0, 0, 0, PAGE, 0)
    rejects(default_vm.set_user_memory_region2, 0, 1 << 7, 0, 0, 0, rule="S-4")
    assert (0, 0) in default_vm.memslots


def test_S4_gmem_is_valid_on_default_vm(default_vm: Any) -> None:
    """S-4 ([6.18]+): KVM_MEM_GUEST_MEMFD is a valid flag on any VM type."""
    gmem_slot(default_vm, MiB)
    assert default_vm.memslots[(0, 0)].has_gmem


def test_S4_before_S5(default_vm: Any) -> None:
    """S-4 (flags) wins over S-5 (alignment)."""
    rejects(default_vm.set_user_memory_region2, 0, 1 << 3, 1, PAGE + 1, 1, rule="S-4")


# --- S-5 alignment / user address -----------------------------------------------------------
@pytest.mark.parametrize(
    ("gpa", "size", "uaddr"),
    [
        (0, PAGE + 1, 0),
        (0, PAGE // 2, 0),
        (PAGE // 2, PAGE, 0),
        (0, PAGE, 0x10),
        (0, PAGE, uapi.TASK_SIZE),
        (0, 2 * PAGE, uapi.TASK_SIZE - PAGE),
        (0, PAGE, 1 << 63),
    ],
    ids=["size", "size<page", "gpa", "uaddr", "uaddr=TASK_SIZE", "uaddr+size>TASK_SIZE", "kernel-uaddr"],
)
def test_S5_alignment_and_access_ok(default_vm: Any, gpa: int, size: int, uaddr: int) -> None:
    """S-5: size, gpa, uaddr page aligned and [uaddr, +size) a user range, else EINVAL."""
    rejects(default_vm.set_user_memory_region2, 0, 0, gpa, size, uaddr, rule="S-5")
    assert not default_vm.memslots


def test_S5_applies_to_gmem_slots_but_uaddr_null_is_fine(protected_vm: Any) -> None:
    """S-5: a GUEST_MEMFD slot's uaddr must still be a legal user address; NULL is accepted."""
    gmem = protected_vm.create_guest_memfd(MiB)
    rejects(protected_vm.set_user_memory_region2, 0, GMEM, 0, MiB, 0x123, gmem, 0, rule="S-5")
    protected_vm.set_user_memory_region2(0, GMEM, 0, MiB, 0, gmem, 0)


def test_S5_uaddr_need_not_be_mapped(default_vm: Any) -> None:
    """S-5: access_ok only: an unmapped but legal user address is accepted."""
    default_vm.set_user_memory_region2(0, 0, 0, MiB, 0x7000_0000_0000)


def test_S5_before_S6(protected_vm: Any) -> None:
    """S-5 (size alignment) wins over S-6 (gmem offset alignment)."""
    gmem = protected_vm.create_guest_memfd(MiB)
    rejects(protected_vm.set_user_memory_region2, 0, GMEM, 0, PAGE + 1, 0, gmem, 1, rule="S-5")


# --- S-6 gmem offset -----------------------------------------------------------------------
@pytest.mark.parametrize("offset", [1, PAGE // 2, uapi.U64_MAX - PAGE + 1], ids=["1", "half", "wraps"])
def test_S6_gmem_offset(protected_vm: Any, offset: int) -> None:
    """S-6: guest_memfd_offset unaligned, or offset + size wrapping u64, is EINVAL."""
    gmem = protected_vm.create_guest_memfd(MiB)
    rejects(protected_vm.set_user_memory_region2, 0, GMEM, 0, 2 * PAGE, 0, gmem, offset, rule="S-6")


def test_S6_offset_ignored_without_gmem_flag(default_vm: Any) -> None:
    """S-6 applies only with KVM_MEM_GUEST_MEMFD: a plain slot ignores guest_memfd_offset."""
    default_vm.set_user_memory_region2(0, 0, 0, PAGE, 0, None, 123)
    assert (0, 0) in default_vm.memslots


def test_S6_evaluated_on_delete_with_flag(protected_vm: Any) -> None:
    """S-6 is evaluated on delete if the GMEM flag is passed: the slot survives."""
    gmem = gmem_slot(protected_vm, MiB)
    before = vm_state(protected_vm, gmem)
    rejects(protected_vm.set_user_memory_region2, 0, GMEM, 0, 0, 0, gmem, 1, rule="S-6")
    assert vm_state(protected_vm, gmem) == before


def test_S6_before_S7(protected_vm: Any) -> None:
    """S-6 (offset) wins over S-7 (address space id)."""
    gmem = protected_vm.create_guest_memfd(MiB)
    rejects(protected_vm.set_user_memory_region2, 1 << 16, GMEM, 0, PAGE, 0, gmem, 7, rule="S-6")


# --- S-7 ids / size ------------------------------------------------------------------------
def test_S7_private_vm_has_one_address_space(protected_vm: Any, default_vm: Any) -> None:
    """S-7: as_id >= kvm_arch_nr_memslot_as_ids is EINVAL (private-mem x86 VMs: 1, DEFAULT: 2)."""
    rejects(protected_vm.set_user_memory_region2, 1 << 16, 0, 0, PAGE, 0, rule="S-7")
    default_vm.set_user_memory_region2(1 << 16, 0, 0, PAGE, 0)
    rejects(default_vm.set_user_memory_region2, 2 << 16, 0, 0, PAGE, 0, rule="S-7")


def test_S7_gpa_plus_size_wraps(default_vm: Any) -> None:
    """S-7: guest_phys_addr + memory_size wrapping u64 is EINVAL."""
    rejects(default_vm.set_user_memory_region2, 0, 0, uapi.U64_MAX - PAGE + 1, 2 * PAGE, 0, rule="S-7")


def test_S7_too_many_pages(default_vm: Any) -> None:
    """S-7: a user slot larger than KVM_MEM_MAX_NR_PAGES is EINVAL; exactly the max passes S-7."""
    too_big = (uapi.KVM_MEM_MAX_NR_PAGES + 1) * PAGE
    rejects(default_vm.set_user_memory_region2, 0, 0, 0, too_big, 0, rule="S-7")
    default_vm.set_user_memory_region2(0, 0, 0, uapi.KVM_MEM_MAX_NR_PAGES * PAGE, 0)


def test_S7_beyond_guest_physical_width(default_vm: Any) -> None:
    """S-7 (arch prepare): a slot ending beyond MAXPHYADDR is EINVAL."""
    top = 1 << default_vm.profile.phys_bits
    rejects(default_vm.set_user_memory_region2, 0, 0, top - PAGE, 2 * PAGE, 0, rule="S-7")
    default_vm.set_user_memory_region2(0, 0, top - PAGE, PAGE, 0)


def _arm64_type(vm_type: int = 0, **overrides: Any) -> guestmem.VmTypeInfo:
    """An arm64 VM type as 6.18 has it (no private memory, one address space)."""
    return x86_type(vm_type, has_private_mem=False, nr_memslot_as_ids=1, arch="arm64", **overrides)


@pytest.mark.parametrize(
    ("vm_type", "ipa_bits"),
    [(0, 40), (44, 44), ((1 << 31) | 36, 36)],
    ids=["ipa-default", "ipa-44", "ipa-36-high-type-bits"],
)
def test_S7_arm64_beyond_the_ipa_space_is_efault(vm_type: int, ipa_bits: int) -> None:
    """S-7 on arm64 (``kvm_arch_prepare_memory_region``): a slot ending past the IPA space is
    EFAULT, not x86's EINVAL; the IPA size is ``KVM_VM_TYPE_ARM_IPA_SIZE(type)``, 40 bits for
    0 (``kvm_init_ipa_range``).  A slot ending exactly at the top is fine; nothing is left
    behind by a refusal."""
    top = 1 << ipa_bits
    with throwaway_backend("t-arm64-ipa", _arm64_type(vm_type)) as kvm, kvm.create_vm(vm_type) as vm:
        before = vm_state(vm)
        rejects(vm.set_user_memory_region2, 0, 0, top - PAGE, 2 * PAGE, 0, err=errno.EFAULT, rule="S-7")
        assert vm_state(vm) == before
        vm.set_user_memory_region2(0, 0, top - PAGE, PAGE, 0)


def test_S7_arm64_move_beyond_the_ipa_space_is_efault() -> None:
    """arm64: a move past the IPA space is EFAULT too; the slot stays where it was."""
    with throwaway_backend("t-arm64-move", _arm64_type()) as kvm, kvm.create_vm(0) as vm:
        vm.set_user_memory_region2(0, 0, 0, MiB, 0)
        rejects(vm.set_user_memory_region2, 0, 0, (1 << 40) - PAGE, MiB, 0, err=errno.EFAULT, rule="S-7")
        assert vm.memslots[(0, 0)].base_gfn == 0
        vm.set_user_memory_region2(0, 0, (1 << 40) - MiB, MiB, 0)  # the last MiB is in range


def test_S7_arm64_bound_comes_before_S16() -> None:
    """arm64 ``kvm_arch_prepare_memory_region`` checks the IPA bound before the gmem-only rule
    (S-16): a non-MMAP gmem slot past the IPA space is EFAULT, and the binding is undone."""
    info = _arm64_type(gmem_slot_requires_mmap=True, supports_init_shared=True)
    with throwaway_backend("t-arm64-s16", info) as kvm, kvm.create_vm(0) as vm:
        plain = vm.create_guest_memfd(2 * PAGE)
        before = vm_state(vm, plain)
        top = 1 << 40
        rejects(
            vm.set_user_memory_region2,
            0,
            GMEM,
            top - PAGE,
            2 * PAGE,
            0,
            plain,
            0,
            err=errno.EFAULT,
            rule="S-7",
        )
        assert vm_state(vm, plain) == before
        rejects(vm.set_user_memory_region2, 0, GMEM, 0, 2 * PAGE, 0, plain, 0, rule="S-16")


def test_S7_before_S8(protected_vm: Any) -> None:
    """S-7 (as_id) wins over S-8 (deleting a slot that does not exist)."""
    rejects(protected_vm.set_user_memory_region2, (1 << 16) | 3, 0, 0, 0, 0, rule="S-7")


# --- S-8 / S-9 delete ------------------------------------------------------------------------
def test_S8_delete_nonexistent(default_vm: Any) -> None:
    """S-8: memory_size 0 for a slot that does not exist is EINVAL."""
    rejects(default_vm.set_user_memory_region2, 4, 0, 0, 0, 0, rule="S-8")


def test_S9_delete_zaps_unbinds_and_keeps_gmem_pages(protected_vm: Any) -> None:
    """S-9: delete zaps the slot's mappings and unbinds the gmem; gmem pages are untouched."""
    vm = protected_vm
    gmem = gmem_slot(vm, MiB, gpa=4 * MiB)
    other = gmem_slot(vm, MiB, slot=1, gpa=8 * MiB)
    vm.set_memory_attributes(0, 16 * MiB, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vcpu = vm.create_vcpu(0)
    vcpu.access(4 * MiB, data=b"kept")
    vcpu.access(8 * MiB, data=b"other")
    gfn = (4 * MiB) >> 12
    pfn = vm.gmem_pfn(gfn)
    seq = vm.mmu.invalidate_seq
    # guest_memfd / offset fields are ignored on delete
    vm.set_user_memory_region2(0, 0, 4 * MiB, 0, 0, -1, 12345 * PAGE)
    assert (0, 0) not in vm.memslots
    assert not vm.is_mapped(gfn)
    assert vm.is_mapped((8 * MiB) >> 12)
    assert vm.mmu.invalidate_seq == seq  # kvm_mmu_zap_memslot takes no MMU invalidation
    assert vm.mmu.invalidate_in_progress == 0
    assert not list(gmem.file.bindings.items())
    assert gmem.file.inode.pfn(0) == pfn
    assert vm.host.read(pfn, 0, 4) == b"kept"
    assert other.file.bindings.get(0) is vm.memslots[(0, 1)]
    assert vm.slots.nr_pages == MiB // PAGE


def test_S9_delete_plain_slot_by_flags_zero(default_vm: Any) -> None:
    """S-9: deleting a non-gmem slot frees its gpa range for a new slot."""
    default_vm.set_user_memory_region2(0, 0, 0, MiB, 0)
    default_vm.set_user_memory_region2(0, 0, 0, 0, 0)
    default_vm.set_user_memory_region2(1, 0, 0, MiB, 0)
    assert list(default_vm.memslots) == [(0, 1)]


# --- S-10 ----------------------------------------------------------------------------------
def test_S10_total_pages_overflow(default_vm: Any) -> None:
    """S-10: nr_memslot_pages + npages overflowing is EINVAL (state forced near the limit)."""
    default_vm.slots.nr_pages = uapi.ULONG_MAX
    rejects(default_vm.set_user_memory_region2, 0, 0, 0, PAGE, 0, rule="S-10")
    assert not default_vm.memslots


# --- S-11 .. S-13 modify ---------------------------------------------------------------------
def test_S11_identical_reissue_of_gmem_slot(protected_vm: Any) -> None:
    """S-11: re-issuing a gmem slot unchanged is EINVAL (private memslots are immutable)."""
    gmem = gmem_slot(protected_vm, MiB)
    before = vm_state(protected_vm, gmem)
    rejects(protected_vm.set_user_memory_region2, 0, GMEM, 0, MiB, 0, gmem, 0, rule="S-11")
    assert vm_state(protected_vm, gmem) == before


def test_S11_move_of_gmem_slot(protected_vm: Any) -> None:
    """S-11: moving a gmem slot is EINVAL."""
    gmem = gmem_slot(protected_vm, MiB)
    rejects(protected_vm.set_user_memory_region2, 0, GMEM, 4 * MiB, MiB, 0, gmem, 0, rule="S-11")
    assert protected_vm.memslots[(0, 0)].base_gfn == 0


def test_S11_adding_gmem_flag_to_plain_slot(protected_vm: Any) -> None:
    """S-11: a modify whose new flags contain GUEST_MEMFD is EINVAL, even for a plain slot."""
    protected_vm.set_user_memory_region2(0, 0, 0, MiB, 0)
    gmem = protected_vm.create_guest_memfd(MiB)
    rejects(protected_vm.set_user_memory_region2, 0, GMEM, 0, MiB, 0, gmem, 0, rule="S-11")
    assert not list(gmem.file.bindings.items())


def test_S11_before_S14(protected_vm: Any) -> None:
    """S-11 is decided before the overlap check (S-14)."""
    gmem = gmem_slot(protected_vm, MiB)
    protected_vm.set_user_memory_region2(1, 0, 4 * MiB, MiB, 0)
    rejects(protected_vm.set_user_memory_region2, 0, GMEM, 4 * MiB, MiB, 0, gmem, 0, rule="S-11")


def test_S12_dropping_gmem_flag_of_gmem_slot(protected_vm: Any) -> None:
    """S-12 [CUR]: (flags ^ old) & GUEST_MEMFD: a gmem slot cannot be modified into a plain one."""
    gmem = gmem_slot(protected_vm, MiB)
    before = vm_state(protected_vm, gmem)
    rejects(protected_vm.set_user_memory_region2, 0, 0, 0, MiB, 0, rule="S-12")
    assert vm_state(protected_vm, gmem) == before


@pytest.mark.parametrize(
    ("size", "uaddr", "flags"),
    [(2 * MiB, 0, 0), (MiB, 0x1000_0000, 0), (MiB, 0, READONLY)],
    ids=["npages", "uaddr", "readonly"],
)
def test_S12_modify_may_not_change_size_uaddr_readonly(
    default_vm: Any, size: int, uaddr: int, flags: int
) -> None:
    """S-12: a modify changing npages, userspace_addr or READONLY is EINVAL."""
    default_vm.set_user_memory_region2(0, 0, 0, MiB, 0)
    before = vm_state(default_vm)
    rejects(default_vm.set_user_memory_region2, 0, flags, 0, size, uaddr, rule="S-12")
    assert vm_state(default_vm) == before


def test_S12_before_S14(default_vm: Any) -> None:
    """S-12 (size change) wins over S-14 (overlap) on a modify that also moves into another slot."""
    default_vm.set_user_memory_region2(0, 0, 0, MiB, 0)
    default_vm.set_user_memory_region2(1, 0, 4 * MiB, MiB, 0)
    rejects(default_vm.set_user_memory_region2, 0, 0, 4 * MiB, 2 * MiB, 0, rule="S-12")


def test_S13_identical_reissue_of_plain_slot_is_a_noop(default_vm: Any) -> None:
    """S-13: re-issuing a non-gmem slot unchanged returns 0 and invalidates nothing."""
    hva = anon_slot(default_vm, MiB)
    default_vm.create_vcpu(0).access(0, data=b"x")
    before = vm_state(default_vm)
    default_vm.set_user_memory_region2(0, 0, 0, MiB, hva)
    assert vm_state(default_vm) == before


def test_S13_move_zaps_and_relocates(default_vm: Any) -> None:
    """S-13: a changed gpa is a MOVE: old mappings zapped, the same host memory at the new gpa."""
    vm = default_vm
    hva = anon_slot(vm, MiB, gpa=0)
    vcpu = vm.create_vcpu(0)
    vcpu.access(0, data=b"moved")
    assert vm.is_mapped(0)
    vm.set_user_memory_region2(0, 0, 16 * MiB, MiB, hva)
    assert not vm.is_mapped(0)
    assert vm.memslots[(0, 0)].base_gfn == (16 * MiB) >> 12
    assert vm.slot_for_gfn(0) is None
    assert vcpu.access(16 * MiB, 5) == b"moved"
    with pytest.raises(guestmem.MmioExit):
        vcpu.access(0)
    assert vm.mmu.invalidate_in_progress == 0


def test_S13_flags_only_toggles_log_dirty(default_vm: Any) -> None:
    """S-13: a changed LOG_DIRTY_PAGES alone is FLAGS_ONLY: the slot stays, its flags change."""
    hva = anon_slot(default_vm, MiB)
    slot = default_vm.memslots[(0, 0)]
    default_vm.set_user_memory_region2(0, LOG_DIRTY, 0, MiB, hva)
    assert default_vm.memslots[(0, 0)] is slot
    assert slot.flags == LOG_DIRTY
    default_vm.set_user_memory_region2(0, 0, 0, MiB, hva)
    assert slot.flags == 0


# --- S-14 / S-15 ----------------------------------------------------------------------------
def test_S14_gpa_overlap_is_EEXIST(default_vm: Any) -> None:
    """S-14: a new slot overlapping another slot's gpa range (same AS) is EEXIST."""
    default_vm.set_user_memory_region2(0, 0, MiB, MiB, 0)
    rejects(default_vm.set_user_memory_region2, 1, 0, 2 * MiB - PAGE, PAGE, 0, err=errno.EEXIST, rule="S-14")
    rejects(default_vm.set_user_memory_region2, 1, 0, 0, 4 * MiB, 0, err=errno.EEXIST, rule="S-14")
    default_vm.set_user_memory_region2(1, 0, 2 * MiB, PAGE, 0)  # adjacent is fine


def test_S14_other_address_space_does_not_overlap(default_vm: Any) -> None:
    """S-14 compares slots of the same address space only."""
    default_vm.set_user_memory_region2(0, 0, 0, MiB, 0)
    default_vm.set_user_memory_region2((1 << 16) | 1, 0, 0, MiB, 0)
    assert {(0, 0), (1, 1)} == set(default_vm.memslots)


def test_S14_move_into_overlap(default_vm: Any) -> None:
    """S-14: a MOVE onto another slot's range is EEXIST and leaves both slots alone."""
    default_vm.set_user_memory_region2(0, 0, 0, MiB, 0)
    default_vm.set_user_memory_region2(1, 0, 4 * MiB, MiB, 0)
    before = vm_state(default_vm)
    rejects(default_vm.set_user_memory_region2, 0, 0, 4 * MiB, MiB, 0, err=errno.EEXIST, rule="S-14")
    assert vm_state(default_vm) == before


@pytest.mark.parametrize("bad_fd", ["closed", "minus1", "other-vm", "offset-out-of-file", "bound"])
def test_S14_gpa_overlap_is_EEXIST_before_bind(kvm: Any, protected_vm: Any, bad_fd: str) -> None:
    """S-14 (EEXIST) is checked before every kvm_gmem_bind check (B-1..B-5)."""
    vm = protected_vm
    first = gmem_slot(vm, MiB)
    fd: Any
    offset = 0
    if bad_fd == "closed":
        fd = vm.create_guest_memfd(MiB)
        fd.close()
    elif bad_fd == "minus1":
        fd = -1
    elif bad_fd == "other-vm":
        fd = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM).create_guest_memfd(MiB)
    elif bad_fd == "offset-out-of-file":
        fd, offset = vm.create_guest_memfd(MiB), 64 * MiB
    else:
        fd = first
    before = vm_state(vm, first)
    rejects(
        vm.set_user_memory_region2, 1, GMEM, MiB - PAGE, MiB, 0, fd, offset, err=errno.EEXIST, rule="S-14"
    )
    assert vm_state(vm, first) == before


def test_S15_bind_rolled_back_when_create_fails_later(protected_vm: Any) -> None:
    """S-15: if the slot fails after kvm_gmem_bind (here arch prepare, S-7), the bind is undone."""
    vm = protected_vm
    gmem = vm.create_guest_memfd(2 * PAGE)
    top = 1 << vm.profile.phys_bits
    before = vm_state(vm, gmem)
    rejects(vm.set_user_memory_region2, 0, GMEM, top - PAGE, 2 * PAGE, 0, gmem, 0, rule="S-7")
    assert vm_state(vm, gmem) == before
    vm.set_user_memory_region2(0, GMEM, 0, 2 * PAGE, 0, gmem, 0)  # offsets still bindable


# --- S-16 -------------------------------------------------------------------------------------
def test_S16_gmem_slot_requires_mmap_when_arch_says_so() -> None:
    """S-16 (arm64): a GUEST_MEMFD slot whose gmem lacks FLAG_MMAP is EINVAL; nothing stays bound."""
    info = x86_type(1, gmem_slot_requires_mmap=True, supports_init_shared=True)
    with throwaway_backend("t-s16", info) as kvm, kvm.create_vm(1) as vm:
        plain = vm.create_guest_memfd(MiB)
        before = vm_state(vm, plain)
        rejects(vm.set_user_memory_region2, 0, GMEM, 0, MiB, 0, plain, 0, rule="S-16")
        assert vm_state(vm, plain) == before
        mappable = vm.create_guest_memfd(MiB, MMAP)
        vm.set_user_memory_region2(0, GMEM, 0, MiB, 0, mappable, 0)
        assert vm.memslots[(0, 0)].gmem_only


def test_S16_not_applied_without_the_arch_rule(protected_vm: Any) -> None:
    """S-16 is arch-specific: x86 (sw) accepts a non-mmap gmem slot."""
    gmem_slot(protected_vm, MiB)
    assert not protected_vm.memslots[(0, 0)].gmem_only


def test_S13_S7_failed_move_keeps_the_slot_but_its_mappings_are_gone(default_vm: Any) -> None:
    """S-13/S-7: ``kvm_set_memslot`` invalidates the old slot (zapping its leaves) before
    ``kvm_prepare_memory_region``; a MOVE beyond MAXPHYADDR then fails with EINVAL and the old
    slot is reactivated unchanged (not INVALID, same gpa), but its mappings were zapped."""
    vm = default_vm
    hva = anon_slot(vm, MiB, gpa=0)
    vcpu = vm.create_vcpu(0)
    vcpu.access(0, data=b"stay")
    top = 1 << vm.profile.phys_bits
    rejects(vm.set_user_memory_region2, 0, 0, top - PAGE, MiB, hva, rule="S-7")
    slot = vm.memslots[(0, 0)]
    assert (slot.base_gfn, slot.flags) == (0, 0)
    assert not vm.is_mapped(0)
    assert vcpu.access(0, 4) == b"stay"
    assert vm.mmu.invalidate_in_progress == 0
