"""The pkvm policy on the core model: VM types, hypercall outcomes, reclaim paths, costs."""

from __future__ import annotations

import errno
from typing import Any

import pytest

import guestmem
from guestmem import HostSigbus, KvmError, MemoryFault, uapi
from guestmem_pkvm import abi
from guestmem_pkvm.exits import HypercallExit
from guestmem_pkvm.ownership import HANDLE_OFFSET, PageState
from guestmem_pkvm.policy import enable_exit_hypercall, pkvm_state, set_pvmfw

from .conftest import GMEM_FLAGS, GPA, SIZE, Guest

PAGE = uapi.PAGE_SIZE
SHARE = abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_SHARE_FUNC_ID
UNSHARE = abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_UNSHARE_FUNC_ID
RELINQUISH = abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_RELINQUISH_FUNC_ID
MEMINFO = abi.ARM_SMCCC_VENDOR_HYP_KVM_HYP_MEMINFO_FUNC_ID


def test_smccc_function_ids_are_the_kernels() -> None:
    """``ARM_SMCCC_CALL_VAL(FAST_CALL, SMC_64, OWNER_VENDOR_HYP, n)`` (include/linux/arm-smccc.h)."""
    assert (MEMINFO, SHARE, UNSHARE, RELINQUISH) == (0xC6000002, 0xC6000003, 0xC6000004, 0xC6000009)
    assert abi.KVM_VM_TYPE_ARM_PROTECTED == 0x8000_0000
    assert abi.KVM_VM_TYPE_ARM_IPA_SIZE(40) == 40


# --- VM types and capabilities (CAP-3, S-7, S-16, A-1) -----------------------------------------
def test_backend_offers_protected_and_default_arm64_vm_types() -> None:
    backend = guestmem.backends()["pkvm"]
    assert backend.distribution == "guestmem-pkvm"
    protected = backend.vm_type(abi.KVM_VM_TYPE_ARM_PROTECTED)
    default = backend.vm_type(abi.KVM_VM_TYPE_ARM_DEFAULT)
    assert protected is not None and default is not None
    for info in (protected, default):
        assert not info.memory_attributes and info.gmem_slot_requires_mmap
        assert info.nr_memslot_as_ids == 1 and info.init_shared_allowed
        assert info.arch == "arm64"


def test_vms_get_handles_and_vmids_3_1(kvm: Any) -> None:
    a = kvm.create_vm(abi.KVM_VM_TYPE_ARM_PROTECTED)
    b = kvm.create_vm(abi.KVM_VM_TYPE_ARM_DEFAULT)
    assert (pkvm_state(a).handle, pkvm_state(a).vmid) == (HANDLE_OFFSET, 1)
    assert (pkvm_state(b).handle, pkvm_state(b).vmid, pkvm_state(b).protected) == (
        HANDLE_OFFSET + 1,
        2,
        False,
    )
    a.close()
    assert pkvm_state(kvm.create_vm(abi.KVM_VM_TYPE_ARM_PROTECTED)).vmid == 1  # slot freed at teardown
    b.close()


def test_arm64_capabilities_cap_3_cap_4(kvm: Any) -> None:
    vm = kvm.create_vm(abi.KVM_VM_TYPE_ARM_PROTECTED)
    assert vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == GMEM_FLAGS  # CAP-3 non-x86
    assert vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == 0
    assert vm.check_extension(uapi.KVM_CAP_EXIT_HYPERCALL) == abi.KVM_EXIT_HYPERCALL_VALID_MASK
    assert kvm.check_extension(uapi.KVM_CAP_VM_TYPES) == 0
    with pytest.raises(KvmError) as info:
        vm.set_memory_attributes(GPA, PAGE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert info.value.errno == errno.ENOTTY  # x86 only
    vm.close()


def test_gmem_slot_without_mmap_is_einval_s_16(kvm: Any) -> None:
    vm = kvm.create_vm(abi.KVM_VM_TYPE_ARM_PROTECTED)
    gmem = vm.create_guest_memfd(SIZE, 0)
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, GPA, SIZE, guest_memfd=gmem)
    assert info.value.errno == errno.EINVAL and info.value.rule == "S-16"
    gmem.close()
    vm.close()


# --- hypercalls -------------------------------------------------------------------------------
def test_meminfo_and_unknown_functions(guest: Guest) -> None:
    assert guest.vcpu.hypercall(MEMINFO) == PAGE
    assert guest.vcpu.hypercall(0xC6000007, GPA) == abi.SMCCC_RET_NOT_SUPPORTED  # MMIO guard: not modelled
    assert guest.vm.counters["pkvm.hvc.hyp_meminfo"] == 1


@pytest.mark.parametrize(
    ("nr", "args", "err"),
    [
        (SHARE, (GPA + 1, 1, 0), errno.EINVAL),  # unaligned ipa
        (UNSHARE, (GPA, 1, 0), errno.EFAULT),  # never faulted: no valid PTE
        (RELINQUISH, (GPA + 3, 0, 0), errno.EINVAL),
        (SHARE, (GPA + SIZE, 1, 0), errno.EFAULT),  # no memslot: nothing to fault in
    ],
)
def test_refused_hypercalls_return_invalid_parameter_3_2(
    guest: Guest, nr: int, args: tuple[int, ...], err: int
) -> None:
    assert guest.vcpu.hypercall(nr, *args) == abi.SMCCC_RET_INVALID_PARAMETER
    state = pkvm_state(guest.vm)
    assert state.last_error is not None and state.last_error.errno == err
    assert guest.vm.counters["pkvm.hvc_refused"] == 1


def test_share_twice_and_unshare_private_are_eperm_3_2(guest: Guest) -> None:
    guest.vcpu.access(GPA, 1)
    enable_exit_hypercall(guest.vm, 0)  # no exits: the guest just gets its x0
    assert guest.vcpu.hypercall(UNSHARE, GPA, 1, 0) == abi.SMCCC_RET_INVALID_PARAMETER
    assert pkvm_state(guest.vm).last_error.errno == errno.EPERM  # type: ignore[union-attr]
    assert guest.vcpu.hypercall(SHARE, GPA, 1, 0) == abi.SMCCC_RET_SUCCESS
    assert guest.vcpu.hypercall(SHARE, GPA, 1, 0) == abi.SMCCC_RET_INVALID_PARAMETER
    assert pkvm_state(guest.vm).last_error.errno == errno.EPERM  # type: ignore[union-attr]
    assert guest.vm.counters["pkvm.userspace_exits"] == 0


def test_exit_mask_rejects_unknown_bits(guest: Guest) -> None:
    with pytest.raises(KvmError) as info:
        enable_exit_hypercall(guest.vm, 1 << 20)
    assert info.value.errno == errno.EINVAL
    assert pkvm_state(guest.vm).exit_mask == abi.KVM_EXIT_HYPERCALL_VALID_MASK


def test_exit_hypercall_is_kvm_enable_cap(guest: Guest) -> None:
    """``KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL, mask)`` reaches the policy as an arch ioctl."""
    vm, vcpu = guest.vm, guest.vcpu
    vcpu.access(GPA, 1)
    assert vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << abi.ARM_SMCCC_KVM_FUNC_MEM_SHARE) == 0
    with pytest.raises(HypercallExit):
        vcpu.hypercall(SHARE, GPA, 1, 0)
    assert vcpu.hypercall(UNSHARE, GPA, 1, 0) == abi.SMCCC_RET_SUCCESS  # no exit for unshare now
    assert vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 0) == 0
    assert vcpu.hypercall(SHARE, GPA, 1, 0) == abi.SMCCC_RET_SUCCESS
    assert vm.counters["pkvm.userspace_exits"] == 1


@pytest.mark.parametrize(
    ("args", "flags"),
    [
        ((1 << 20,), 0),  # a bit outside KVM_EXIT_HYPERCALL_VALID_MASK
        ((1 << 12,), 0),  # x86's KVM_HC_MAP_GPA_RANGE bit
        ((abi.KVM_EXIT_HYPERCALL_VALID_MASK,), 1),  # arm64 kvm_vm_ioctl_enable_cap: flags must be 0
    ],
)
def test_enable_cap_exit_hypercall_bad_mask_or_flags_is_einval(
    guest: Guest, args: tuple[int, ...], flags: int
) -> None:
    pkvm_state(guest.vm).exit_mask = 0
    with pytest.raises(KvmError) as info:
        guest.vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, *args, flags=flags)
    assert info.value.errno == errno.EINVAL
    assert pkvm_state(guest.vm).exit_mask == 0  # nothing changed


def test_enable_cap_exit_hypercall_of_a_normal_vm_or_an_unknown_cap_is_einval(kvm: Any) -> None:
    vm = kvm.create_vm(abi.KVM_VM_TYPE_ARM_DEFAULT)
    assert vm.check_extension(uapi.KVM_CAP_EXIT_HYPERCALL) == 0
    for cap in (uapi.KVM_CAP_EXIT_HYPERCALL, uapi.KVM_CAP_MEMORY_ATTRIBUTES):
        with pytest.raises(KvmError) as info:
            vm.enable_cap(cap, 0)
        assert info.value.errno == errno.EINVAL
    vm.close()


def test_share_of_an_unfaulted_page_faults_it_in_first_3_2(guest: Guest) -> None:
    with pytest.raises(HypercallExit):
        guest.vcpu.hypercall(SHARE, GPA + 5 * PAGE, 1, 0)
    state = pkvm_state(guest.vm)
    assert state.hvm.state((GPA >> 12) + 5).state == PageState.SHARED_OWNED
    assert guest.vm.counters["pkvm.memshare_fault_in"] == 1
    assert guest.vm.counters["pkvm.donations"] == 1
    guest.map.write(5 * PAGE, b"ok")  # shared: the host may map it


def test_share_a_range_in_one_call_3_3(guest: Guest) -> None:
    for i in range(4):
        guest.vcpu.access(GPA + (8 + i) * PAGE, data=bytes([i]))
    with pytest.raises(HypercallExit) as info:
        guest.vcpu.hypercall(SHARE, GPA + 8 * PAGE, 4, 0)
    assert info.value.args == (GPA + 8 * PAGE, 4, 0)
    assert [guest.map.read((8 + i) * PAGE, 1) for i in range(4)] == [bytes([i]) for i in range(4)]
    assert guest.vm.counters["pkvm.copies"] == 0


def test_relinquish_returns_a_zeroed_page_early_3_2(guest: Guest) -> None:
    gpa = GPA + 3 * PAGE
    guest.vcpu.access(gpa, data=b"secret")
    assert guest.vcpu.hypercall(RELINQUISH, gpa, 0, 0) == abi.SMCCC_RET_SUCCESS
    state = pkvm_state(guest.vm)
    assert state.hvm.state(gpa >> 12).state == PageState.NOPAGE
    assert not guest.vm.is_mapped(gpa >> 12)
    assert guest.vm.counters["pkvm.relinquished_pages"] == 1
    assert guest.map.read(3 * PAGE, 6) == bytes(6)  # the host owns it again, zeroed
    guest.map.madvise(uapi.MADV_DONTNEED, 3 * PAGE, PAGE)
    assert guest.vcpu.access(gpa, 6) == bytes(6)  # re-donated on the next fault


def test_gmem_closed_before_the_vm_force_reclaims_and_poisons_3_6(kvm: Any, checker: Any) -> None:
    g = Guest(kvm)
    g.vcpu.access(GPA, data=b"x")
    g.map.close()
    # The VM is alive when its gmem goes away: the host force-reclaims the donated page.
    vm, vcpu, gmem = g.vm, g.vcpu, g.gmem
    gmem.close()
    state = pkvm_state(vm)
    assert state.hvm.state(GPA >> 12).state == PageState.POISON
    assert vm.counters["pkvm.force_reclaims"] == 1
    assert vm.counters["pkvm.zeroed_bytes"] == PAGE
    with pytest.raises(MemoryFault) as info:
        vcpu.access(GPA, 1)
    assert info.value.rule == "L-4"  # the memslot's guest_memfd is gone
    vcpu.close()
    vm.close()
    assert vm.destroyed


def test_punch_hole_of_donated_page_force_reclaims_fa_7_3_6(guest: Guest) -> None:
    guest.vcpu.access(GPA + PAGE, data=b"y")
    guest.gmem.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, PAGE, PAGE)
    state = pkvm_state(guest.vm)
    assert state.hvm.state((GPA >> 12) + 1).state == PageState.POISON
    # "KVM: arm64: Return -EFAULT from VCPU_RUN on access to a poisoned pte": KVM_RUN fails
    # with EFAULT (__pkvm_vcpu_in_poison_fault); no KVM_EXIT_MEMORY_FAULT is reported.
    with pytest.raises(KvmError) as info:
        guest.vcpu.access(GPA + PAGE, 1)
    assert info.value.errno == errno.EFAULT and not isinstance(info.value, MemoryFault)
    assert guest.vm.counters["pkvm.poison_faults"] == 1


def test_pvmfw_is_copied_in_by_the_hypervisor_3_4(guest: Guest) -> None:
    set_pvmfw(guest.vm, GPA + 16 * PAGE, b"pvmfw!")
    assert guest.vcpu.access(GPA + 16 * PAGE, 6) == b"pvmfw!"
    assert guest.vm.counters["pkvm.pvmfw_bytes"] == PAGE


def test_host_sees_sigbus_on_donated_pages_but_not_fresh_ones_3_5(guest: Guest) -> None:
    guest.vcpu.access(GPA, 1)
    with pytest.raises(HostSigbus) as info:
        guest.map.read(0, 1)
    assert info.value.rule == "host-mappability"
    assert guest.map.read(PAGE, 1) == b"\0"  # never donated: still the host's


# --- a normal VM under pKVM ---------------------------------------------------------------------
def test_normal_vm_shares_pages_and_unshares_on_invalidation_3_2(kvm: Any, checker: Any) -> None:
    g = Guest(kvm, abi.KVM_VM_TYPE_ARM_DEFAULT)
    state = pkvm_state(g.vm)
    g.map.write(0, b"np")
    assert g.vcpu.access(GPA, 2) == b"np"  # host keeps its mapping: only shared
    page = state.hvm.state(GPA >> 12)
    assert page.state == PageState.SHARED_BORROWED
    assert state.hyp.host_state(page.pfn(GPA >> 12)).share_count == 1
    assert g.vcpu.hypercall(SHARE, GPA, 1, 0) == abi.SMCCC_RET_NOT_SUPPORTED
    # MEM_RELINQUISH of a non-protected guest gives the shared page back to the host
    # (kvm_hyp_handle_hvc64 -> pkvm_memrelinquish_call; expected state SHARED_BORROWED).
    assert g.vcpu.hypercall(RELINQUISH, GPA, 0, 0) == abi.SMCCC_RET_SUCCESS
    assert state.hvm.state(GPA >> 12).state == PageState.NOPAGE and not g.vm.is_mapped(GPA >> 12)
    assert len(state.hyp.host) == 0 and g.vm.counters["pkvm.zeroed_bytes"] == 0
    assert g.vcpu.access(GPA, 2) == b"np"  # shared again at the next fault
    g.gmem.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, 0, PAGE)
    assert state.hvm.state(GPA >> 12).state == PageState.NOPAGE
    assert len(state.hyp.host) == 0
    g.teardown()


def test_without_init_shared_only_shared_pages_are_host_mappable_m_4_3_5(kvm: Any, checker: Any) -> None:
    vm = kvm.create_vm(abi.KVM_VM_TYPE_ARM_PROTECTED)
    gmem = vm.create_guest_memfd(SIZE, uapi.GUEST_MEMFD_FLAG_MMAP)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, GPA, SIZE, guest_memfd=gmem)
    vcpu = vm.create_vcpu(0)
    m = gmem.mmap(SIZE)
    with pytest.raises(HostSigbus) as info:
        m.read(0, 1)  # a fresh page of a private-by-default file (M-4)
    assert info.value.rule == "host-mappability"
    vcpu.access(GPA, data=b"shared later")
    with pytest.raises(HypercallExit):
        vcpu.hypercall(SHARE, GPA, 1, 0)
    assert m.read(0, 12) == b"shared later"
    m.madvise(uapi.MADV_DONTNEED, 0, PAGE)
    with pytest.raises(HypercallExit):
        vcpu.hypercall(UNSHARE, GPA, 1, 0)
    with pytest.raises(HostSigbus):
        m.read(0, 1)
    vcpu.close()
    vm.close()
    m.close()
    gmem.close()
    assert vm.destroyed
