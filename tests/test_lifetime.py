"""Close, release and lifetime of guest_memfd files and VMs (spec 2.H, L-1..L-9)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from gmem_helpers import plugin, throwaway_backend, x86_type
from gmem_support import (
    GMEM_SLOT,
    INIT_SHARED,
    KEEP,
    MMAP,
    PAGE,
    PRIVATE,
    PUNCH,
    bind,
    delete_slot,
    pattern,
    raises_kvm,
)

import guestmem
from guestmem import MemoryFault, uapi

SW_PROTECTED = uapi.KVM_X86_SW_PROTECTED_VM


def private_guest(kvm: Any, pages: int = 8) -> tuple[Any, Any, Any]:
    """A SW_PROTECTED VM with a guest_memfd bound at gpa 0, all private, and a vCPU."""
    vm = kvm.create_vm(SW_PROTECTED)
    gmem = vm.create_guest_memfd(pages * PAGE)
    bind(vm, gmem, 0, pages * PAGE)
    vm.set_memory_attributes(0, pages * PAGE, PRIVATE)
    return vm, gmem, vm.create_vcpu(0)


def test_L1_gmem_file_pins_the_vm(kvm: Any) -> None:
    """L-1: closing the VM fd does not destroy the VM while a guest_memfd is open; the VM fd
    itself is gone (EBADF) but the file keeps working; the last file close destroys the VM."""
    vm = kvm.create_vm(SW_PROTECTED)
    gmem = vm.create_guest_memfd(4 * PAGE)
    vm.close()
    assert not vm.destroyed and vm in kvm.vms
    with raises_kvm(errno.EBADF):
        vm.create_guest_memfd(PAGE)
    gmem.fallocate(KEEP, 0, 4 * PAGE)
    gmem.close()
    assert vm.destroyed and vm not in kvm.vms


def test_L2_closing_a_bound_gmem_is_legal_and_not_pinned_by_the_slot(kvm: Any) -> None:
    """L-2: the memslot does not pin the file: closing the only fd of a bound guest_memfd
    releases it at once; the memslot stays, still flagged GUEST_MEMFD."""
    vm, gmem, _ = private_guest(kvm)
    file = gmem.file
    gmem.close()
    assert file.released and file.refs == 0
    slot = vm.memslots[(0, 0)]
    assert slot.flags & GMEM_SLOT and slot.gmem_file is None


def test_L3_release_zaps_unbinds_and_drops_the_vm_reference(kvm: Any) -> None:
    """L-3: release NULLs the slot's file, zaps this VM's SPTEs for the file (an invalidation),
    removes the view from the inode, clears bindings and puts the VM reference."""
    vm, gmem, vcpu = private_guest(kvm)
    for page in range(4):
        vcpu.access(page * PAGE, data=pattern(page))
    assert vm.mmu.mapped_pages() == 4
    refs, seq = vm.refs, vm.mmu.invalidate_seq
    file, inode = gmem.file, gmem.file.inode
    gmem.close()
    assert vm.mmu.mapped_pages() == 0
    assert vm.mmu.invalidate_seq > seq and vm.mmu.invalidate_in_progress == 0
    assert vm.memslots[(0, 0)].gmem_file is None
    assert not file.bindings and file not in inode.views
    assert vm.refs == refs - 1


def test_L3_release_orphans_every_slot_bound_to_the_file(kvm: Any) -> None:
    """L-3 (with B-7): every slot bound to the released file loses it, each one's SPTEs are
    zapped, and slots bound to another guest_memfd are untouched."""
    vm = kvm.create_vm(SW_PROTECTED)
    gmem, other = vm.create_guest_memfd(8 * PAGE), vm.create_guest_memfd(4 * PAGE)
    bind(vm, gmem, 0, 4 * PAGE, offset=4 * PAGE, slot=0)
    bind(vm, gmem, 0x100000, 4 * PAGE, offset=0, slot=1)
    bind(vm, other, 0x200000, 4 * PAGE, slot=2)
    vm.set_memory_attributes(0, 0x300000, PRIVATE)
    vcpu = vm.create_vcpu(0)
    for gpa in (0, 0x100000, 0x200000):
        vcpu.access(gpa, data=b"x")
    gmem.close()
    assert vm.memslots[(0, 0)].gmem_file is None and vm.memslots[(0, 1)].gmem_file is None
    assert vm.memslots[(0, 2)].gmem_file is other.file
    assert [vm.is_mapped(gpa >> 12) for gpa in (0, 0x100000, 0x200000)] == [False, False, True]
    assert vcpu.access(0x200000, 1) == b"x"


def test_L4_guest_access_after_release_is_EFAULT_memory_fault(kvm: Any) -> None:
    """L-4: a private access to a slot whose file was released exits with
    KVM_EXIT_MEMORY_FAULT, errno EFAULT, the page-aligned gpa and the PRIVATE flag."""
    vm, gmem, vcpu = private_guest(kvm)
    vcpu.access(2 * PAGE, data=pattern(2))
    gmem.close()
    with pytest.raises(MemoryFault) as info:
        vcpu.access(2 * PAGE + 0x10, 4)
    exc = info.value
    assert exc.errno == errno.EFAULT and exc.rule == "L-4"
    assert (exc.gpa, exc.size, exc.flags) == (2 * PAGE, PAGE, uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    assert not vm.is_mapped(2)


def test_L4_shared_access_to_gmem_only_slot_after_release(kvm: Any) -> None:
    """L-4: on a gmem-only slot even a shared access goes to guest_memfd, so after release it
    is a memory-fault exit with EFAULT and no PRIVATE flag."""
    vm = kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    gmem = vm.create_guest_memfd(4 * PAGE, MMAP | INIT_SHARED)
    bind(vm, gmem, 0, 4 * PAGE)
    vcpu = vm.create_vcpu(0)
    vcpu.access(0, data=b"x")
    gmem.close()
    with pytest.raises(MemoryFault) as info:
        vcpu.access(0)
    assert (info.value.errno, info.value.flags, info.value.gpa) == (errno.EFAULT, 0, 0)


def test_L4_released_slot_can_still_be_deleted_and_gpa_reused(kvm: Any) -> None:
    """L-4/B-8: the orphaned slot is deleted normally (its unbind is a no-op) and its gpa range
    can take a new guest_memfd."""
    vm, gmem, vcpu = private_guest(kvm, pages=4)
    gmem.close()
    delete_slot(vm)
    assert not vm.memslots
    fresh = vm.create_guest_memfd(4 * PAGE)
    bind(vm, fresh, 0, 4 * PAGE)
    assert vcpu.access(0, 8) == bytes(8)


def test_L5_memory_lives_with_the_inode(kvm: Any) -> None:
    """L-5: deleting the slot frees nothing; the last file reference (inode eviction) frees
    every folio back to the host."""
    vm, gmem, _ = private_guest(kvm, pages=4)
    gmem.fallocate(KEEP, 0, 4 * PAGE)
    pfns = [gmem.file.inode.pfn(i) for i in range(4)]
    delete_slot(vm)
    assert all(kvm.host.is_allocated(p) for p in pfns)
    assert [gmem.file.inode.pfn(i) for i in range(4)] == pfns
    freed = vm.counters["gmem_pages_freed"]
    gmem.close()
    assert not any(kvm.host.is_allocated(p) for p in pfns)
    assert vm.counters["gmem_pages_freed"] == freed + 4


def test_L6_host_vma_defers_release(kvm: Any) -> None:
    """L-6: a host mapping holds a file reference: after closing the fd (and the VM fd) the file
    is not released, the slot stays bound and the guest still reaches its memory; munmap then
    releases the file and destroys the VM."""
    vm = kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    gmem = vm.create_guest_memfd(4 * PAGE, MMAP | INIT_SHARED)
    bind(vm, gmem, 0, 4 * PAGE)
    view = gmem.mmap(4 * PAGE)
    view.write(PAGE, pattern(4))
    file = gmem.file
    pfn = file.inode.pfn(1)
    gmem.close()
    vm.close()
    assert not file.released and not vm.destroyed
    assert vm.memslots[(0, 0)].gmem_file is file
    assert view.read(PAGE, 16) == pattern(4)
    view.close()
    assert file.released and vm.destroyed
    assert not kvm.host.is_allocated(pfn)


def test_L7_slot_delete_keeps_contents_and_rebind_sees_them(kvm: Any) -> None:
    """L-7: deleting the slot keeps the gmem contents; binding the same offsets again (even at
    another gpa) exposes the same, still prepared, pages without preparing them again."""
    vm, gmem, vcpu = private_guest(kvm, pages=4)
    vcpu.access(PAGE + 8, data=pattern(11))
    inode = gmem.file.inode
    pfn = inode.pfn(1)
    prepares = vm.counters["gmem_prepare"]
    delete_slot(vm)
    assert inode.pfn(1) == pfn and inode.is_prepared(1)
    base = 0x40000
    vm.set_memory_attributes(base, 4 * PAGE, PRIVATE)
    bind(vm, gmem, base, 4 * PAGE, slot=3)
    assert vcpu.access(base + PAGE + 8, 16) == pattern(11)
    assert vm.gmem_pfn((base >> 12) + 1) == pfn
    assert vm.counters["gmem_prepare"] == prepares


def test_L8_one_view_per_inode(kvm: Any) -> None:
    """L-8: the uAPI creates exactly one view per inode, and release removes it."""
    vm = kvm.create_vm(SW_PROTECTED)
    a, b = vm.create_guest_memfd(PAGE), vm.create_guest_memfd(PAGE)
    assert a.file.inode.views == [a.file] and b.file.inode.views == [b.file]
    inode = a.file.inode
    a.close()
    assert inode.views == [] and inode.evicted


@pytest.mark.parametrize("order", ["vm_first", "gmem_first"])
def test_L9_vm_destroyed_after_its_last_reference(kvm: Any, order: str) -> None:
    """L-9: the VM is destroyed only when its fd and every guest_memfd are gone, in either order;
    destruction frees the memslots (their unbind is a no-op: the views were already released)."""
    vm, gmem, vcpu = private_guest(kvm, pages=2)
    vcpu.access(0, data=b"1")
    vcpu.close()
    first, second = (vm, gmem) if order == "vm_first" else (gmem, vm)
    first.close()
    assert not vm.destroyed and vm in kvm.vms
    second.close()
    assert vm.destroyed and vm not in kvm.vms
    assert not vm.memslots and vm.mmu.mapped_pages() == 0


def test_L9_vcpu_holds_a_vm_reference(kvm: Any) -> None:
    """L-9: a vCPU holds a VM reference (kvm_get_kvm at KVM_CREATE_VCPU), dropped when it is
    closed.  (The uAPI face's ``Vm.close`` also closes the VM's vCPUs, so only the VM fd and
    guest_memfds can outlive each other here.)"""
    vm = kvm.create_vm(SW_PROTECTED)
    refs = vm.refs
    vcpu = vm.create_vcpu(0)
    assert vm.refs == refs + 1
    vcpu.close()
    assert vm.refs == refs and not vm.destroyed
    vm.close()
    assert vm.destroyed


class _RecordInvalidate:
    """An arch policy that records every ``kvm_arch_gmem_invalidate`` pfn range."""

    def __init__(self) -> None:
        self.freed: list[tuple[int, int]] = []

    @guestmem.hookimpl
    def guestmem_gmem_invalidate(self, vm: Any, start_pfn: int, end_pfn: int) -> None:
        self.freed.append((start_pfn, end_pfn))


def test_L5_each_freed_folio_reaches_arch_invalidate() -> None:
    """L-5: every folio freed by a punch or by inode eviction reaches kvm_arch_gmem_invalidate
    with its pfn range; deleting the slot, closing the VM fd or poisoning frees nothing."""
    policy = _RecordInvalidate()
    with throwaway_backend("l5-invalidate", x86_type(), policy=policy) as kvm:
        vm = kvm.create_vm(1)
        gmem = vm.create_guest_memfd(4 * PAGE)
        bind(vm, gmem, 0, 4 * PAGE)
        gmem.fallocate(KEEP, 0, 4 * PAGE)
        inode = gmem.file.inode
        pfns = [inode.pfn(i) for i in range(4)]
        gmem.fallocate(PUNCH, PAGE, PAGE)
        assert policy.freed == [(pfns[1], pfns[1] + 1)]
        gmem.inject_memory_failure(0)
        delete_slot(vm)
        vm.close()
        assert len(policy.freed) == 1
        gmem.close()
        freed = sorted(p for s, e in policy.freed[1:] for p in range(s, e))
        assert freed == [pfns[0], pfns[2], pfns[3]]


class _DestroyAndFreeOrder:
    """Observer: the order in which the VM is destroyed and its gmem folios are freed."""

    def __init__(self) -> None:
        self.events: list[str] = []

    @guestmem.hookimpl
    def guestmem_vm_destroy(self, vm: Any) -> None:
        self.events.append("vm_destroy")

    @guestmem.hookimpl
    def guestmem_gmem_invalidate(self, vm: Any, start_pfn: int, end_pfn: int) -> None:
        self.events.append("free_folio")


def test_L1_L5_last_gmem_close_destroys_the_vm_before_freeing_folios(kvm: Any) -> None:
    """L-1/L-5: ``kvm_gmem_release`` (``->release``) ends with ``kvm_put_kvm``; the inode and
    its folios go later in ``__fput`` (``dput``/``iput`` -> eviction -> ``free_folio``).  So when
    the gmem file held the last VM reference, ``kvm_arch_destroy_vm`` runs before the folios
    reach ``kvm_arch_gmem_invalidate``."""
    vm, gmem, vcpu = private_guest(kvm, 2)
    vcpu.access(0, data=b"x")
    vcpu.close()
    vm.close()
    spy = _DestroyAndFreeOrder()
    with plugin(spy):
        gmem.close()
    assert spy.events == ["vm_destroy", "free_folio"]


class _CloseDuringPrepare:
    """Observer: userspace closes the guest_memfd while KVM prepares one of its folios."""

    def __init__(self, gmem: Any) -> None:
        self.gmem = gmem
        self.prepared_when_freed: list[bool] = []

    @guestmem.hookimpl
    def guestmem_gmem_prepare(self, vm: Any, gfn: int, pfn: int, order: int) -> None:
        if not self.gmem.closed:
            self.gmem.close()

    @guestmem.hookimpl
    def guestmem_gmem_invalidate(self, vm: Any, start_pfn: int, end_pfn: int) -> None:
        self.prepared_when_freed.append(vm.counters["gmem_prepare"] == 1)


def test_L3_close_during_get_pfn_releases_when_get_pfn_drops_its_reference(kvm: Any) -> None:
    """L-3/L-4: ``kvm_gmem_get_pfn`` holds a file reference (``kvm_gmem_get_file`` ... ``fput``),
    so a close meanwhile releases the file only after the folio was prepared; the fault then
    retries and exits with L-4 EFAULT."""
    vm, gmem, vcpu = private_guest(kvm, 1)
    spy = _CloseDuringPrepare(gmem)
    with plugin(spy), pytest.raises(MemoryFault) as info:
        vcpu.access(0, 1)
    assert (info.value.errno, info.value.rule) == (errno.EFAULT, "L-4")
    assert spy.prepared_when_freed == [True]
    assert not vm.is_mapped(0) and vm.mmu.invalidate_in_progress == 0


# --- what-if: memslots pin their guest_memfd (KernelProfile.memslots_pin_gmem) ------------------
MiB = 1 << 20


def _pinned_kvm() -> Any:
    import attrs

    from guestmem.model.profile import UPSTREAM_6_18

    return guestmem.open("sw", profile=attrs.evolve(UPSTREAM_6_18, memslots_pin_gmem=True))


def test_what_if_memslots_pin_gmem_keeps_a_closed_file_bound() -> None:
    """L-3 does not run on close while bound: the private page survives and stays mapped."""
    with _pinned_kvm() as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = vm.create_guest_memfd(MiB)
        vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, MiB, 0, gmem, 0)
        vm.set_memory_attributes(0, MiB, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        vcpu = vm.create_vcpu(0)
        vcpu.access(0, data=b"pinned")
        gmem.close()
        assert vcpu.access(0, 6) == b"pinned"
        vm.set_user_memory_region2(0, 0, 0, 0, 0)  # the slot's reference was the last one
        assert kvm.host.allocated_pages == 0


def test_what_if_memslots_pin_gmem_leaks_a_vm_closed_while_bound() -> None:
    """The cycle: file -> VM (L-1), VM's slot -> file: closing every fd destroys nothing."""
    with _pinned_kvm() as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = vm.create_guest_memfd(MiB)
        vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, MiB, 0, gmem, 0)
        vm.set_memory_attributes(0, MiB, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        vm.create_vcpu(0).access(0, data=b"x")
        gmem.close()
        vm.close()
        assert not vm.destroyed and kvm.host.allocated_pages == 1


def test_a_backends_own_vm_commands_check_the_fd_as_kvm_vm_ioctl_does(kvm: Any) -> None:
    """``VmView.check_ioctl``: what ``kvm_vm_ioctl`` checks before a command, for a backend's
    command that has no uAPI method: fine on an open VM, EIO on a dead one (CAP-9), EBADF
    once the fd is closed (also while a guest_memfd keeps the VM alive, L-1)."""
    vm = kvm.create_vm(SW_PROTECTED)
    gmem = vm.create_guest_memfd(PAGE)
    vm_view = guestmem.backend.view(vm)
    vm_view.check_ioctl()
    vm.close()
    with raises_kvm(errno.EBADF):
        vm_view.check_ioctl()
    gmem.close()
    with raises_kvm(errno.EBADF):
        vm_view.check_ioctl()
    dead = kvm.create_vm(SW_PROTECTED)
    guestmem.backend.view(dead).kill("test")
    with raises_kvm(errno.EIO):
        guestmem.backend.view(dead).check_ioctl()
    dead.close()


def test_madvise_of_a_closed_mapping_is_enomem_and_leaves_the_file_alone(kvm: Any) -> None:
    """``madvise`` of addresses no longer mapped is ENOMEM: discarding through a closed
    guest_memfd mapping does not punch the file (still open, its page still allocated), and
    zapping a closed anonymous mapping does nothing."""
    vm = kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    gmem = vm.create_guest_memfd(4 * PAGE, MMAP | INIT_SHARED)
    mapping = gmem.mmap(4 * PAGE)
    mapping.write(0, b"kept")
    anon = kvm.mmap_anonymous(4 * PAGE)
    mapping.close()
    anon.close()
    for m in (mapping, anon):
        for advice in (uapi.MADV_REMOVE, uapi.MADV_DONTNEED):
            with raises_kvm(errno.ENOMEM):
                m.madvise(advice)
    with gmem.mmap(4 * PAGE) as again:
        assert again.read(0, 4) == b"kept"
    gmem.close()
    vm.close()
