"""kvm_gmem_bind / kvm_gmem_unbind as seen through memslots: spec 2.G, rules B-1..B-11."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from gmem_helpers import GMEM, MMAP, PAGE, PRIVATE, MiB, gmem_slot, vm_state

from guestmem import KvmError, uapi


def bind_fails(
    vm: Any, fd: Any, *, err: int, rule: str, offset: int = 0, size: int = MiB, gpa: int = 0
) -> None:
    """A GUEST_MEMFD slot bound to *fd* fails with *err*/*rule* and changes nothing."""
    before = vm_state(vm)
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region2(0, GMEM, gpa, size, 0, fd, offset)
    assert (info.value.errno, info.value.rule) == (err, rule), info.value
    assert vm_state(vm) == before


# --- B-1 .. B-3 the fd ----------------------------------------------------------------------
def test_B1_closed_gmem_fd_is_EBADF(protected_vm: Any) -> None:
    """B-1: fget of a closed guest_memfd fails: EBADF."""
    gmem = protected_vm.create_guest_memfd(MiB)
    gmem.close()
    bind_fails(protected_vm, gmem, err=errno.EBADF, rule="B-1")


@pytest.mark.parametrize("fd", [-1, 0xFFFFFFFF, 999], ids=["minus1", "u32max", "never-opened"])
def test_B1_bad_fd_number_is_EBADF(protected_vm: Any, fd: int) -> None:
    """B-1: -1 (read as 0xffffffff) or a number with no open file is EBADF."""
    bind_fails(protected_vm, fd, err=errno.EBADF, rule="B-1")


def test_B1_closed_fd_number_is_EBADF(protected_vm: Any) -> None:
    """B-1: the number of a guest_memfd that was closed no longer names a file."""
    gmem = protected_vm.create_guest_memfd(MiB)
    number = gmem.fileno()
    gmem.close()
    bind_fails(protected_vm, number, err=errno.EBADF, rule="B-1")


@pytest.mark.parametrize("fd", [None, 0, 1, 2], ids=["none", "stdin", "stdout", "stderr"])
def test_B2_non_gmem_file_is_EINVAL(protected_vm: Any, fd: Any) -> None:
    """B-2: an open file that is not a guest_memfd (stdio, fd 0 from a zeroed field) is EINVAL."""
    bind_fails(protected_vm, fd, err=errno.EINVAL, rule="B-2")


@pytest.mark.parametrize("which", ["dev-kvm", "vm"])
def test_B2_kvm_and_vm_fds_are_not_gmem(kvm: Any, protected_vm: Any, which: str) -> None:
    """B-2: the /dev/kvm fd or a VM fd passed as guest_memfd is EINVAL (f_op != kvm_gmem_fops)."""
    fd = kvm if which == "dev-kvm" else protected_vm
    bind_fails(protected_vm, fd, err=errno.EINVAL, rule="B-2")


def test_B3_gmem_of_another_vm_is_EINVAL(kvm: Any, protected_vm: Any) -> None:
    """B-3: a guest_memfd created on another VM is EINVAL."""
    other = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    gmem = other.create_guest_memfd(MiB)
    bind_fails(protected_vm, gmem, err=errno.EINVAL, rule="B-3")
    assert not list(gmem.file.bindings.items())


def test_B1_before_B4(protected_vm: Any) -> None:
    """B-1 (the fd) is checked before the offset (B-4)."""
    bind_fails(protected_vm, -1, err=errno.EBADF, rule="B-1", offset=64 * MiB)


def test_B3_before_B4(kvm: Any, protected_vm: Any) -> None:
    """B-3 (other VM) is checked before the offset (B-4)."""
    gmem = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM).create_guest_memfd(MiB)
    bind_fails(protected_vm, gmem, err=errno.EINVAL, rule="B-3", offset=64 * MiB)


# --- B-4 / B-5 offsets -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("offset", "size"),
    [(MiB, PAGE), (MiB - PAGE, 2 * PAGE), (0, 2 * MiB), (1 << 63, PAGE), (uapi.U64_MAX - 2 * PAGE + 1, PAGE)],
    ids=["at-eof", "straddles-eof", "larger-than-file", "negative-loff", "huge"],
)
def test_B4_offset_outside_file_is_EINVAL(protected_vm: Any, offset: int, size: int) -> None:
    """B-4: offset < 0 (as loff_t) or offset + size > i_size is EINVAL."""
    gmem = protected_vm.create_guest_memfd(MiB)
    bind_fails(protected_vm, gmem, err=errno.EINVAL, rule="B-4", offset=offset, size=size)


def test_B4_exactly_to_eof_is_fine(protected_vm: Any) -> None:
    """B-4: offset + size == i_size is accepted."""
    gmem = protected_vm.create_guest_memfd(MiB)
    protected_vm.set_user_memory_region2(0, GMEM, 0, PAGE, 0, gmem, MiB - PAGE)
    assert protected_vm.memslots[(0, 0)].gmem_pgoff == (MiB - PAGE) // PAGE


def test_B6_unaligned_offset_is_S6_first(protected_vm: Any) -> None:
    """An unaligned offset is caught by S-6 in kvm_set_memory_region, before kvm_gmem_bind (B-4)."""
    gmem = protected_vm.create_guest_memfd(MiB)
    bind_fails(protected_vm, gmem, err=errno.EINVAL, rule="S-6", offset=PAGE + 8)


def test_B5_file_offset_overlap_is_EINVAL(protected_vm: Any) -> None:
    """B-5: pages of the file already bound (to another slot, other gpa) are EINVAL."""
    vm = protected_vm
    gmem = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, 2 * MiB, 0, gmem, 0)
    before = vm_state(vm, gmem)
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region2(1, GMEM, 8 * MiB, MiB, 0, gmem, 2 * MiB - PAGE)
    assert (info.value.errno, info.value.rule) == (errno.EINVAL, "B-5")
    assert vm_state(vm, gmem) == before


def test_B5_gpa_overlap_is_EEXIST_not_B5(protected_vm: Any) -> None:
    """B-5 vs S-14: overlapping in both gpa and file offset reports EEXIST (S-14 runs first)."""
    vm = protected_vm
    gmem = gmem_slot(vm, MiB)
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region2(1, GMEM, 0, MiB, 0, gmem, 0)
    assert (info.value.errno, info.value.rule) == (errno.EEXIST, "S-14")


# --- B-6 / B-7 success ----------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [0, MMAP], ids=["plain", "mmap"])
def test_B6_bind_success_state(protected_vm: Any, flags: int) -> None:
    """B-6: the slot points at the file and pgoff, is gmem-only iff FLAG_MMAP; no file ref is kept."""
    vm = protected_vm
    gmem = vm.create_guest_memfd(4 * MiB, flags)
    refs = gmem.file.refs
    vm.set_user_memory_region2(0, GMEM, 16 * MiB, MiB, 0, gmem, MiB)
    slot = vm.memslots[(0, 0)]
    assert slot.gmem_file is gmem.file
    assert slot.gmem_pgoff == MiB // PAGE
    assert slot.gmem_only is bool(flags & MMAP)
    assert list(gmem.file.bindings.items()) == [(MiB // PAGE, 2 * MiB // PAGE, slot)]
    assert gmem.file.refs == refs
    assert gmem.file.inode.allocated_pages() == 0  # binding allocates nothing


def test_B7_same_gmem_disjoint_offsets_in_two_slots(protected_vm: Any) -> None:
    """B-7: one gmem may back several slots at disjoint offsets; each gfn maps its own page."""
    vm = protected_vm
    gmem = vm.create_guest_memfd(2 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, MiB, 0, gmem, MiB)
    vm.set_user_memory_region2(1, GMEM, 8 * MiB, MiB, 0, gmem, 0)
    vm.set_memory_attributes(0, 16 * MiB, PRIVATE)
    vcpu = vm.create_vcpu(0)
    vcpu.access(0, data=b"slot0")
    vcpu.access(8 * MiB, data=b"slot1")
    assert vcpu.access(0, 5) == b"slot0"
    assert vcpu.access(8 * MiB, 5) == b"slot1"
    inode = gmem.file.inode
    assert vm.gmem_pfn(0) == inode.pfn(MiB // PAGE)
    assert vm.gmem_pfn((8 * MiB) // PAGE) == inode.pfn(0)


# --- B-8 .. B-11 unbind ----------------------------------------------------------------------------
def test_B8_delete_after_gmem_released_is_fine(protected_vm: Any) -> None:
    """B-8 (L-2, L-3): closing a bound gmem is legal; deleting the slot later is a no-op unbind."""
    vm = protected_vm
    gmem = gmem_slot(vm, MiB)
    gmem.close()
    slot = vm.memslots[(0, 0)]
    assert slot.gmem_file is None and slot.has_gmem
    vm.set_user_memory_region2(0, 0, 0, 0, 0)
    assert not vm.memslots


def test_B10_unbind_keeps_folios_and_zaps_nothing_else(protected_vm: Any) -> None:
    """B-10: deleting the slot clears the binding range only; folios are not freed."""
    vm = protected_vm
    gmem = vm.create_guest_memfd(2 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, MiB, 0, gmem, 0)
    vm.set_user_memory_region2(1, GMEM, 4 * MiB, MiB, 0, gmem, MiB)
    vm.set_memory_attributes(0, 8 * MiB, PRIVATE)
    vm.create_vcpu(0).access(0, data=b"data")
    pages = list(gmem.file.inode.pages.items())
    vm.set_user_memory_region2(0, 0, 0, 0, 0)
    assert list(gmem.file.inode.pages.items()) == pages
    assert [(s, e) for s, e, _ in gmem.file.bindings.items()] == [(MiB // PAGE, 2 * MiB // PAGE)]
    assert (0, 0) not in vm.memslots


def test_B11_rebind_after_delete_sees_same_data(protected_vm: Any) -> None:
    """B-11 (with L-7): after delete the offsets are bindable again, with the same contents."""
    vm = protected_vm
    gmem = gmem_slot(vm, MiB)
    vm.set_memory_attributes(0, 64 * MiB, PRIVATE)
    vcpu = vm.create_vcpu(0)
    vcpu.access(PAGE, data=b"persist")
    vm.set_user_memory_region2(0, 0, 0, 0, 0)
    vm.set_user_memory_region2(3, GMEM, 32 * MiB, MiB, 0, gmem, 0)
    assert vcpu.access(32 * MiB + PAGE, 7) == b"persist"
    assert gmem.file.bindings.get(0) is vm.memslots[(0, 3)]


def test_B11_rebind_after_failed_create_is_possible(protected_vm: Any) -> None:
    """B-11 / S-15: a create that failed after bind left the offsets free."""
    vm = protected_vm
    gmem = vm.create_guest_memfd(MiB)
    vm.set_user_memory_region2(0, 0, 0, MiB, 0)
    with pytest.raises(KvmError):
        vm.set_user_memory_region2(1, GMEM, 0, MiB, 0, gmem, 0)  # S-14
    vm.set_user_memory_region2(1, GMEM, MiB, MiB, 0, gmem, 0)
