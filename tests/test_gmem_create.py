"""Capabilities (spec 2.A, CAP-1..CAP-9) and KVM_CREATE_GUEST_MEMFD (spec 2.B, C-1..C-11).

The sw backend models Linux 6.18 x86 with the TDP MMU: KVM_X86_DEFAULT_VM (no private
memory) and KVM_X86_SW_PROTECTED_VM (private memory, attributes decide privateness).

Not testable through the uAPI face and therefore not tested here:
C-1 (the ioctl argument is never a user pointer that could fault), C-2 (CONFIG_KVM_GUEST_MEMFD
is always built in the 6.18 profiles), C-5 (``create_guest_memfd`` takes no reserved words),
C-10 (the model's fd table and allocator never run out).
"""

from __future__ import annotations

import errno
import stat
from typing import Any

import pytest
from gmem_helpers import vm_state
from gmem_support import GMEM_SLOT, INIT_SHARED, MMAP, PAGE, PRIVATE, bind, raises_kvm

import guestmem
from guestmem import MemoryFault, uapi

DEFAULT = uapi.KVM_X86_DEFAULT_VM
SW_PROTECTED = uapi.KVM_X86_SW_PROTECTED_VM


# --- 2.A capabilities ---------------------------------------------------------------------------
@pytest.mark.parametrize("vm_type", [None, DEFAULT, SW_PROTECTED], ids=["system", "default", "sw_protected"])
def test_CAP1_guest_memfd_cap_is_1_for_every_vm_type(kvm: Any, vm_type: int | None) -> None:
    """CAP-1 [6.18]: KVM_CAP_GUEST_MEMFD is 1 on /dev/kvm and on every VM type's fd."""
    fd = kvm if vm_type is None else kvm.create_vm(vm_type)
    assert fd.check_extension(uapi.KVM_CAP_GUEST_MEMFD) == 1


@pytest.mark.parametrize(
    ("vm_type", "flags"),
    [(None, MMAP | INIT_SHARED), (DEFAULT, MMAP | INIT_SHARED), (SW_PROTECTED, MMAP)],
    ids=["system", "default", "sw_protected"],
)
def test_CAP2_CAP3_guest_memfd_flags_per_vm_type(kvm: Any, vm_type: int | None, flags: int) -> None:
    """CAP-2: the system fd reports MMAP|INIT_SHARED (0x3); CAP-3: x86 VMs with private memory
    (SW_PROTECTED) lack INIT_SHARED (0x1), DEFAULT VMs report 0x3."""
    fd = kvm if vm_type is None else kvm.create_vm(vm_type)
    assert fd.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == flags


@pytest.mark.parametrize(
    ("vm_type", "attrs"),
    [(None, PRIVATE), (DEFAULT, 0), (SW_PROTECTED, PRIVATE)],
    ids=["system", "default", "sw_protected"],
)
def test_CAP4_memory_attributes_cap_follows_private_mem(kvm: Any, vm_type: int | None, attrs: int) -> None:
    """CAP-4: KVM_CAP_MEMORY_ATTRIBUTES is 0x8 on /dev/kvm, 0x8 iff the VM has private memory."""
    fd = kvm if vm_type is None else kvm.create_vm(vm_type)
    assert fd.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == attrs


def test_CAP4_memory_attributes_not_built_is_0() -> None:
    """CAP-4: without CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES (kvm_pvm profile) the cap is 0."""
    with guestmem.open("sw", profile="kvm_pvm-6.18") as k:
        assert k.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == 0
        assert k.create_vm(DEFAULT).check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == 0


@pytest.mark.parametrize(("vm_type", "private"), [(DEFAULT, False), (SW_PROTECTED, True)])
def test_CAP5_has_private_mem_per_vm_type(kvm: Any, vm_type: int, private: bool) -> None:
    """CAP-5: has_private_mem is true for SW_PROTECTED, false for DEFAULT; it is what makes
    PRIVATE a valid attribute (A-4) and drops INIT_SHARED (CAP-3)."""
    vm = kvm.create_vm(vm_type)
    assert vm.has_private_mem is private
    if private:
        vm.set_memory_attributes(0, PAGE, PRIVATE)
        assert vm.is_private(0)
    else:
        with raises_kvm(errno.EINVAL, "A-4"):
            vm.set_memory_attributes(0, PAGE, PRIVATE)


@pytest.mark.sw_host
def test_CAP6_vm_types_bitmap_and_unsupported_type(kvm: Any) -> None:
    """CAP-6: KVM_CAP_VM_TYPES has DEFAULT and SW_PROTECTED (TDP MMU); other types are EINVAL."""
    assert kvm.check_extension(uapi.KVM_CAP_VM_TYPES) == (1 << DEFAULT) | (1 << SW_PROTECTED)
    for vm_type in (uapi.KVM_X86_SEV_VM, uapi.KVM_X86_SNP_VM, uapi.KVM_X86_TDX_VM, 64):
        with raises_kvm(errno.EINVAL, "CAP-6"):
            kvm.create_vm(vm_type)


def test_CAP6_sw_protected_needs_tdp_mmu() -> None:
    """CAP-6: SW_PROTECTED exists only with the TDP MMU (absent in the kvm_pvm profile)."""
    with guestmem.open("sw", profile="kvm_pvm-6.18") as k:
        assert k.check_extension(uapi.KVM_CAP_VM_TYPES) == 1 << DEFAULT
        with raises_kvm(errno.EINVAL, "CAP-6"):
            k.create_vm(SW_PROTECTED)


@pytest.mark.parametrize("vm_type", [None, DEFAULT, SW_PROTECTED], ids=["system", "default", "sw_protected"])
def test_CAP7_user_memory2_is_1(kvm: Any, vm_type: int | None) -> None:
    """CAP-7: KVM_CAP_USER_MEMORY2 is 1."""
    fd = kvm if vm_type is None else kvm.create_vm(vm_type)
    assert fd.check_extension(uapi.KVM_CAP_USER_MEMORY2) == 1


def test_CAP8_memory_fault_info_and_exit_contents(protected_vm: Any) -> None:
    """CAP-8: MEMORY_FAULT_INFO is present, and an unresolved fault reports exit_reason 39
    with errno EFAULT and ``memory_fault`` filled (page-aligned gpa, PAGE_SIZE, PRIVATE flag)."""
    vm = protected_vm
    assert vm.check_extension(uapi.KVM_CAP_MEMORY_FAULT_INFO) == 1
    vm.set_memory_attributes(0, PAGE, PRIVATE)
    vcpu = vm.create_vcpu(0)
    with pytest.raises(MemoryFault) as info:  # private access, no memslot (G-4)
        vcpu.access(0x123)
    exc = info.value
    assert exc.exit_reason == uapi.KVM_EXIT_MEMORY_FAULT == 39
    assert exc.errno == errno.EFAULT
    assert (exc.gpa, exc.size, exc.flags) == (0, PAGE, uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE)


def test_CAP9_dead_vm_ioctls_are_EIO_and_change_nothing(kvm: Any) -> None:
    """CAP-9: once the VM is dead (vm.kill), every VM ioctl fails with EIO and changes nothing;
    KVM_RUN on its vCPUs fails with EIO too."""
    vm = kvm.create_vm(SW_PROTECTED)
    gmem = vm.create_guest_memfd(4 * PAGE)
    vcpu = vm.create_vcpu(0)
    vm.kill("test")
    before = vm_state(vm, gmem)
    calls = [
        lambda: vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD),
        lambda: vm.create_guest_memfd(PAGE),
        lambda: bind(vm, gmem, 0, PAGE),
        lambda: vm.set_user_memory_region(1, 0, 0x100000, PAGE, 0),
        lambda: vm.set_memory_attributes(0, PAGE, PRIVATE),
        lambda: vm.create_vcpu(1),
        lambda: vcpu.access(0),
        lambda: vcpu.pre_fault_memory(0, PAGE),
    ]
    for call in calls:
        with raises_kvm(errno.EIO, "CAP-9"):
            call()
    assert vm_state(vm, gmem) == before
    assert not vm.memslots
    assert list(kvm.vms) == [vm]
    for ref in (gmem, vcpu, vm):  # a dead VM is still torn down by its last reference
        ref.close()
    assert vm.destroyed and not kvm.vms


# --- 2.B KVM_CREATE_GUEST_MEMFD -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("vm_type", "flags"),
    [(DEFAULT, 1 << 2), (DEFAULT, 1 << 63), (SW_PROTECTED, INIT_SHARED), (SW_PROTECTED, MMAP | INIT_SHARED)],
)
def test_C3_unsupported_flags_EINVAL(kvm: Any, vm_type: int, flags: int) -> None:
    """C-3: flags outside kvm_gmem_get_supported_flags are EINVAL (INIT_SHARED on SW_PROTECTED,
    CAP-3); nothing is created."""
    vm = kvm.create_vm(vm_type)
    refs = vm.refs
    with raises_kvm(errno.EINVAL, "C-3"):
        vm.create_guest_memfd(PAGE, flags)
    assert vm.refs == refs


@pytest.mark.parametrize("size", [0, PAGE + 1, 1 << 63, -PAGE])
def test_C3_flags_checked_before_size(default_vm: Any, size: int) -> None:
    """C-3 before C-4: bad flags *and* a bad size report the flags rule."""
    with raises_kvm(errno.EINVAL, "C-3"):
        default_vm.create_guest_memfd(size, 1 << 5)


@pytest.mark.parametrize("size", [0, 1, PAGE - 1, PAGE + 1, 1 << 63, (1 << 64) - PAGE, -PAGE])
def test_C4_bad_size_EINVAL(default_vm: Any, size: int) -> None:
    """C-4: size 0, bit 63 set ((loff_t)size <= 0), or not a multiple of PAGE_SIZE is EINVAL;
    no file, fd or VM reference is left behind."""
    refs, fds = default_vm.refs, dict(default_vm.kvm._fds)
    with raises_kvm(errno.EINVAL, "C-4"):
        default_vm.create_guest_memfd(size)
    assert default_vm.refs == refs and default_vm.kvm._fds == fds


@pytest.mark.parametrize("size", [PAGE, 1 << 30, (1 << 63) - PAGE])
def test_C4_good_sizes_accepted(default_vm: Any, size: int) -> None:
    """C-4: any positive page-aligned loff_t size is accepted (no memory is allocated, C-9)."""
    gmem = default_vm.create_guest_memfd(size)
    assert gmem.size == size == gmem.fstat().st_size


def test_C6_init_shared_without_mmap_accepted_mmap_still_ENODEV(default_vm: Any) -> None:
    """C-6: INIT_SHARED alone passes the pure mask check; the invalidation filter is SHARED,
    but mmap is still ENODEV (M-1)."""
    gmem = default_vm.create_guest_memfd(PAGE, INIT_SHARED)
    assert gmem.flags == INIT_SHARED
    assert gmem.file.inode.invalidate_filter == uapi.KVM_FILTER_SHARED
    with raises_kvm(errno.ENODEV, "M-1"):
        gmem.mmap(PAGE)


def test_C7_each_create_is_a_new_fd_and_inode(default_vm: Any) -> None:
    """C-7: every create returns a new fd on a new regular-file inode of the requested size."""
    a = default_vm.create_guest_memfd(PAGE)
    b = default_vm.create_guest_memfd(2 * PAGE)
    assert a.fileno() != b.fileno()
    sa, sb = a.fstat(), b.fstat()
    assert sa.st_ino != sb.st_ino
    assert stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode)
    assert (sa.st_size, sb.st_size) == (PAGE, 2 * PAGE)
    assert a.file.inode is not b.file.inode


def test_C8_create_takes_a_vm_reference_and_one_view(default_vm: Any) -> None:
    """C-8: the file takes a VM reference and is the inode's (only) view of the VM."""
    refs = default_vm.refs
    gmem = default_vm.create_guest_memfd(PAGE)
    assert default_vm.refs == refs + 1
    assert gmem.file.inode.views == [gmem.file]
    assert gmem.file.vm is default_vm
    gmem.close()
    assert default_vm.refs == refs


def test_C9_create_allocates_no_memory_and_flags_are_fixed(kvm: Any) -> None:
    """C-9: creating even a huge file allocates nothing; the flags stay what create was given."""
    vm = kvm.create_vm(DEFAULT)
    host_pages = kvm.host.allocated_pages
    gmem = vm.create_guest_memfd(1 << 40, MMAP | INIT_SHARED)
    assert kvm.host.allocated_pages == host_pages
    assert gmem.file.inode.allocated_pages() == 0
    assert gmem.flags == gmem.file.inode.flags == MMAP | INIT_SHARED


@pytest.mark.parametrize("vm_type", [DEFAULT, SW_PROTECTED])
def test_C11_create_and_bind_allowed_for_every_x86_type(kvm: Any, vm_type: int) -> None:
    """C-11 [6.18]: creating a guest_memfd, and binding it (S-4), works for every VM type."""
    vm = kvm.create_vm(vm_type)
    gmem = vm.create_guest_memfd(4 * PAGE)
    bind(vm, gmem, 0x100000, 4 * PAGE)
    slot = vm.memslots[(0, 0)]
    assert slot.flags == GMEM_SLOT
    assert slot.gmem_file is gmem.file
