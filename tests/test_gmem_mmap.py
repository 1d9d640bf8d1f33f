"""mmap of a guest_memfd and host userspace faults (spec 2.E, M-1..M-7, M-10).

Not modelled, so not tested: M-8 (mbind/get_mempolicy: NUMA policy exists only in [CUR];
the model follows 6.18, which has no policy ops) and M-9 (MADV_HUGEPAGE/MADV_COLLAPSE: a
[CUR] selftest; the host mappings' ``madvise`` takes MADV_DONTNEED and MADV_REMOVE only).
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
from gmem_support import INIT_SHARED, KEEP, MMAP, PAGE, PRIVATE, PUNCH, bind, pattern, raises_kvm

from guestmem import HostSigbus, uapi

DEFAULT = uapi.KVM_X86_DEFAULT_VM
SW_PROTECTED = uapi.KVM_X86_SW_PROTECTED_VM


@pytest.mark.parametrize(("vm_type", "flags"), [(DEFAULT, 0), (DEFAULT, INIT_SHARED), (SW_PROTECTED, 0)])
def test_M1_mmap_without_flag_mmap_ENODEV(kvm: Any, vm_type: int, flags: int) -> None:
    """M-1: a guest_memfd without GUEST_MEMFD_FLAG_MMAP cannot be mmapped (ENODEV)."""
    vm = kvm.create_vm(vm_type)
    gmem = vm.create_guest_memfd(4 * PAGE, flags)
    with raises_kvm(errno.ENODEV, "M-1"):
        gmem.mmap(4 * PAGE)
    assert gmem.file.refs == 1 and not gmem.file.inode.vmas


def test_M1_checked_before_M2(default_vm: Any) -> None:
    """M-1 before M-2: MAP_PRIVATE of a non-mmappable guest_memfd is ENODEV, not EINVAL."""
    gmem = default_vm.create_guest_memfd(PAGE)
    with raises_kvm(errno.ENODEV, "M-1"):
        gmem.mmap(PAGE, shared=False)


@pytest.mark.parametrize("flags", [MMAP, MMAP | INIT_SHARED])
def test_M2_map_private_EINVAL(default_vm: Any, flags: int) -> None:
    """M-2: MAP_PRIVATE (no VM_SHARED|VM_MAYSHARE) is EINVAL; no VMA, no file reference."""
    gmem = default_vm.create_guest_memfd(PAGE, flags)
    with raises_kvm(errno.EINVAL, "M-2"):
        gmem.mmap(PAGE, shared=False)
    assert gmem.file.refs == 1 and not gmem.file.inode.vmas


def test_M3_mapping_past_eof_succeeds_fault_past_eof_sigbus(default_vm: Any) -> None:
    """M-3: mmap longer than i_size succeeds; a fault at pgoff >= i_size pages is SIGBUS,
    below it works."""
    gmem = default_vm.create_guest_memfd(2 * PAGE, MMAP | INIT_SHARED)
    view = gmem.mmap(4 * PAGE)
    view.write(PAGE, pattern(1))
    assert view.read(PAGE, 16) == pattern(1)
    for offset in (2 * PAGE, 3 * PAGE + 5):
        with pytest.raises(HostSigbus) as info:
            view.read(offset, 1)
        assert info.value.rule == "M-3"
        assert info.value.address == view.address + offset // PAGE * PAGE
    with pytest.raises(HostSigbus):
        view.write(2 * PAGE, b"x")
    assert gmem.file.inode.allocated_pages() == 1


def test_M3_mapping_at_offset_past_eof(default_vm: Any) -> None:
    """M-3: a mapping whose file offset starts past EOF succeeds; every fault in it is SIGBUS."""
    gmem = default_vm.create_guest_memfd(PAGE, MMAP | INIT_SHARED)
    view = gmem.mmap(PAGE, offset=8 * PAGE)
    with pytest.raises(HostSigbus) as info:
        view.read(0, 1)
    assert info.value.rule == "M-3"


def test_M3_checked_before_M4(protected_vm: Any) -> None:
    """M-3 before M-4: past EOF, a private (non-INIT_SHARED) file's fault reports the EOF rule."""
    gmem = protected_vm.create_guest_memfd(PAGE, MMAP)
    view = gmem.mmap(2 * PAGE)
    with pytest.raises(HostSigbus) as info:
        view.read(PAGE, 1)
    assert info.value.rule == "M-3"


@pytest.mark.parametrize("vm_type", [DEFAULT, SW_PROTECTED])
def test_M4_without_init_shared_every_fault_sigbus(kvm: Any, vm_type: int) -> None:
    """M-4: without INIT_SHARED the whole file is private: host reads and writes at every
    offset are SIGBUS and allocate nothing."""
    vm = kvm.create_vm(vm_type)
    gmem = vm.create_guest_memfd(4 * PAGE, MMAP)
    view = gmem.mmap(4 * PAGE)
    for page in range(4):
        for access in (lambda p: view.read(p * PAGE, 1), lambda p: view.write(p * PAGE + 9, b"z")):
            with pytest.raises(HostSigbus) as info:
                access(page)
            assert info.value.rule == "M-4"
    assert gmem.file.inode.allocated_pages() == 0


def test_M4_allocated_pages_still_sigbus(default_vm: Any) -> None:
    """M-4: allocation doesn't make a private file's pages host-accessible."""
    gmem = default_vm.create_guest_memfd(2 * PAGE, MMAP)
    gmem.fallocate(KEEP, 0, 2 * PAGE)
    view = gmem.mmap(2 * PAGE)
    with pytest.raises(HostSigbus):
        view.read(0, 1)


def test_M5_fault_allocates_zeroed_uptodate_folio(default_vm: Any) -> None:
    """M-5: a host fault on a hole allocates a folio, zeroes it, marks it uptodate and maps it."""
    gmem = default_vm.create_guest_memfd(4 * PAGE, MMAP | INIT_SHARED)
    inode = gmem.file.inode
    view = gmem.mmap(4 * PAGE)
    assert inode.pfn(2) is None
    assert view.read(2 * PAGE, 32) == bytes(32)
    assert inode.pfn(2) is not None and inode.is_prepared(2) and inode.host_mapped(2)
    assert [i for i in range(4) if inode.pfn(i) is not None] == [2]


def test_M5_fault_clears_a_not_uptodate_folio(kvm: Any) -> None:
    """M-5: an allocated but not uptodate folio (fallocate does not zero it, FA-6) is cleared by
    the first host fault, so stale bytes of the page never leak to userspace."""
    vm = kvm.create_vm(DEFAULT)
    gmem = vm.create_guest_memfd(PAGE, MMAP | INIT_SHARED)
    gmem.fallocate(KEEP, 0, PAGE)
    pfn = gmem.file.inode.pfn(0)
    kvm.host.write(pfn, 100, b"stale data")  # whatever the page held before
    view = gmem.mmap(PAGE)
    assert view.read(100, 10) == bytes(10)


def test_M5_uptodate_folio_is_not_cleared_again(default_vm: Any) -> None:
    """M-5: once uptodate, a re-fault (after the PTE was dropped) maps the same data."""
    gmem = default_vm.create_guest_memfd(PAGE, MMAP | INIT_SHARED)
    view = gmem.mmap(PAGE)
    view.write(0, pattern(7))
    view.madvise(uapi.MADV_DONTNEED)  # MADV_DONTNEED drops the PTE, not the folio
    assert not gmem.file.inode.host_mapped(0)
    assert view.read(0, 16) == pattern(7)
    other = gmem.mmap(PAGE)
    assert other.read(0, 16) == pattern(7)


def test_M6_attributes_not_consulted_by_host_faults(protected_vm: Any) -> None:
    """M-6: shared/private is a whole-file property for host faults: a non-INIT_SHARED file
    is SIGBUS even where the gfns it backs are shared, and making them private changes nothing
    for an INIT_SHARED file either (its faults always succeed)."""
    vm = protected_vm
    gmem = vm.create_guest_memfd(4 * PAGE, MMAP)
    bind(vm, gmem, 0, 4 * PAGE)
    assert not vm.is_private(0)
    view = gmem.mmap(4 * PAGE)
    with pytest.raises(HostSigbus):
        view.read(0, 1)
    vm.set_memory_attributes(0, 4 * PAGE, PRIVATE)
    with pytest.raises(HostSigbus):
        view.read(0, 1)


def test_M6_init_shared_fault_ignores_attributes(default_vm: Any) -> None:
    """M-6: an INIT_SHARED file's host faults succeed regardless of attributes (all shared on a
    DEFAULT VM, the only type with INIT_SHARED, CAP-3)."""
    gmem = default_vm.create_guest_memfd(4 * PAGE, MMAP | INIT_SHARED)
    bind(default_vm, gmem, 0, 4 * PAGE)
    view = gmem.mmap(4 * PAGE)
    view.write(3 * PAGE, pattern(3))
    assert view.read(3 * PAGE, 16) == pattern(3)


def test_M7_gmem_only_slot_is_coherent_both_ways(default_vm: Any) -> None:
    """M-7: on a gmem-only slot (MMAP gmem bound), host writes through mmap are what the guest
    reads, and guest writes are what the host reads: one folio."""
    vm = default_vm
    gmem = vm.create_guest_memfd(8 * PAGE, MMAP | INIT_SHARED)
    bind(vm, gmem, 0x200000, 4 * PAGE, offset=4 * PAGE)
    slot = vm.memslots[(0, 0)]
    assert slot.gmem_only
    view = gmem.mmap(8 * PAGE)
    vcpu = vm.create_vcpu(0)
    view.write(5 * PAGE + 3, pattern(1))  # gmem page 5 = gpa 0x201000
    assert vcpu.access(0x201003, 16) == pattern(1)
    vcpu.access(0x202010, data=pattern(2))  # gmem page 6
    assert view.read(6 * PAGE + 0x10, 16) == pattern(2)
    assert vm.gmem_pfn(0x201) == gmem.file.inode.pfn(5)


def test_M10_punch_while_mapped_unmaps_and_refaults_zero(default_vm: Any) -> None:
    """M-10: a punch unmaps the page from the host VMA; the next access faults a new zeroed page."""
    gmem = default_vm.create_guest_memfd(4 * PAGE, MMAP | INIT_SHARED)
    inode = gmem.file.inode
    view = gmem.mmap(4 * PAGE)
    view.write(PAGE, pattern(9))
    view.write(2 * PAGE, pattern(8))
    old = inode.pfn(1)
    gmem.fallocate(PUNCH, PAGE, PAGE)
    assert not inode.host_mapped(1) and inode.host_mapped(2)
    assert view.read(PAGE, 16) == bytes(16)
    assert inode.pfn(1) != old and inode.host_mapped(1)
    assert view.read(2 * PAGE, 16) == pattern(8)
