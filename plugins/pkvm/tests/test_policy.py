"""The pkvm policy on the core model: VM types, hypercall outcomes, reclaim paths, costs."""

from __future__ import annotations

import errno
from typing import Any

import pytest

import guestmem
from guestmem import HostSigbus, KvmError, MemoryFault, uapi
from guestmem.backend import view
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


@pytest.mark.parametrize("vm_type", [abi.KVM_VM_TYPE_ARM_PROTECTED, abi.KVM_VM_TYPE_ARM_DEFAULT])
def test_memslot_beyond_the_40_bit_ipa_space_is_efault_s_7(kvm: Any, vm_type: int) -> None:
    """arm64 ``kvm_arch_prepare_memory_region``: a memslot ending past the IPA space (40 bits
    for a machine type asking for no size) is EFAULT, where x86 says EINVAL."""
    vm = kvm.create_vm(vm_type)
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region2(0, 0, (1 << 40) - PAGE, 2 * PAGE, 0)
    assert (info.value.errno, info.value.rule) == (errno.EFAULT, "S-7")
    vm.set_user_memory_region2(0, 0, (1 << 40) - PAGE, PAGE, 0)
    vm.close()


def _first_run(vm: Any) -> None:
    """The first KVM_RUN of a new vCPU of *vm* (a HYP_MEMINFO call), then its fd is closed."""
    with vm.create_vcpu(len(pkvm_state(vm).hyp.vm_table) + 7) as vcpu:
        assert vcpu.hypercall(MEMINFO, 0, 0, 0) == PAGE


def test_vms_get_handles_and_vmids_at_their_first_run_3_1(kvm: Any) -> None:
    """``pkvm_create_hyp_vm`` runs at a VM's first KVM_RUN (``kvm_arch_vcpu_run_pid_change``):
    the handle and VMID follow the order of first runs, not of KVM_CREATE_VM."""
    a = kvm.create_vm(abi.KVM_VM_TYPE_ARM_PROTECTED)
    b = kvm.create_vm(abi.KVM_VM_TYPE_ARM_DEFAULT)
    assert (pkvm_state(a).handle, pkvm_state(b).handle) == (0, 0)
    assert pkvm_state(a).hyp.vm_table == []
    _first_run(b)
    _first_run(a)
    assert (pkvm_state(b).handle, pkvm_state(b).vmid, pkvm_state(b).protected) == (HANDLE_OFFSET, 1, False)
    assert (pkvm_state(a).handle, pkvm_state(a).vmid) == (HANDLE_OFFSET + 1, 2)
    _first_run(a)  # once per VM
    assert pkvm_state(a).vmid == 2
    b.close()
    c = kvm.create_vm(abi.KVM_VM_TYPE_ARM_PROTECTED)
    _first_run(c)
    assert pkvm_state(c).vmid == 1  # b's slot was freed at its teardown
    a.close()
    c.close()


def test_a_full_vm_table_fails_the_first_run_not_the_create_3_1(kvm: Any) -> None:
    """``__pkvm_init_vm``: ENOMEM once ``KVM_MAX_PVMS`` VMs hold a slot; it is the first
    KVM_RUN that fails, and it can be retried once a slot is free."""
    hyp = pkvm_state(kvm.create_vm(abi.KVM_VM_TYPE_ARM_DEFAULT)).hyp
    hyp.max_vms = 1
    a, b = kvm.create_vm(abi.KVM_VM_TYPE_ARM_PROTECTED), kvm.create_vm(abi.KVM_VM_TYPE_ARM_PROTECTED)
    _first_run(a)
    vcpu = b.create_vcpu(0)
    with pytest.raises(KvmError) as info:
        vcpu.hypercall(MEMINFO, 0, 0, 0)
    assert info.value.errno == errno.ENOMEM and pkvm_state(b).hvm is None
    a.close()
    assert vcpu.hypercall(MEMINFO, 0, 0, 0) == PAGE
    vcpu.close()
    b.close()


def test_pvmfw_address_is_fixed_once_the_vm_ran_3_4(guest: Guest) -> None:
    """Android ``pkvm_vm_ioctl_set_fw_ipa``: the firmware address may change until the hyp VM
    exists (the first KVM_RUN), then it is EBUSY (pKVM-3.4)."""
    set_pvmfw(guest.vm, GPA + 8 * PAGE, b"old")
    set_pvmfw(guest.vm, GPA + 16 * PAGE, b"pvmfw!")
    assert guest.vcpu.hypercall(MEMINFO, 0, 0, 0) == PAGE
    with pytest.raises(KvmError) as info:
        set_pvmfw(guest.vm, GPA, b"late")
    assert (info.value.errno, info.value.rule) == (errno.EBUSY, "pKVM-3.4")
    assert guest.vcpu.access(GPA + 16 * PAGE, 6) == b"pvmfw!"
    assert guest.vcpu.access(GPA + 8 * PAGE, 3) == bytes(3)


def test_the_arch_face_takes_integers_and_bytes(guest: Guest) -> None:
    """``set_pvmfw``'s *ipa* is the capability's ``__u64`` argument and *image* bytes-like;
    a hypercall's registers are ``unsigned long`` and its function ID the low 32 bits of
    x0 (``smccc_get_function``).  A non-integer is a TypeError naming it, nothing set."""
    state = pkvm_state(guest.vm)
    for call, name in (
        (lambda: set_pvmfw(guest.vm, float(GPA), b"fw"), "ipa"),
        (lambda: set_pvmfw(guest.vm, GPA, "fw"), "image"),
        (lambda: enable_exit_hypercall(guest.vm, None), "args"),
        (lambda: guest.vcpu.hypercall(MEMINFO, 0.0), "args"),
        (lambda: guest.vcpu.hypercall(str(MEMINFO)), "nr"),
    ):
        with pytest.raises(TypeError, match=f"^{name}"):
            call()
    assert state.pvmfw is None and state.hvm is None
    set_pvmfw(guest.vm, GPA + (1 << 64), bytearray(b"fw"))  # a __u64 ipa
    assert state.pvmfw is not None and state.pvmfw.ipa == GPA
    assert guest.vcpu.hypercall(MEMINFO + (1 << 32), 0, 0, 0) == PAGE  # a u32 function ID


@pytest.mark.parametrize("gmem_open", [True, False], ids=["closed", "destroyed"])
def test_pvmfw_and_exit_hypercall_on_a_closed_vm_are_ebadf_and_change_nothing(
    kvm: Any, gmem_open: bool
) -> None:
    """Both are VM ioctls (``KVM_ENABLE_CAP``): on a closed VM fd ``kvm_vm_ioctl`` fails with
    EBADF before the command, whether a guest_memfd keeps the VM alive or it was destroyed."""
    vm = kvm.create_vm(abi.KVM_VM_TYPE_ARM_PROTECTED)
    gmem = vm.create_guest_memfd(SIZE, GMEM_FLAGS)
    vm.close()
    if not gmem_open:
        gmem.close()
    assert vm.destroyed != gmem_open
    state = pkvm_state(vm)
    for call in (lambda: set_pvmfw(vm, GPA, b"fw"), lambda: enable_exit_hypercall(vm, 0)):
        with pytest.raises(KvmError) as info:
            call()
        assert info.value.errno == errno.EBADF
    assert state.pvmfw is None and state.exit_mask == abi.KVM_EXIT_HYPERCALL_VALID_MASK
    assert state.hyp.vm_table == [] and len(state.hyp.host) == 0


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


# --- host access to a donated page (3.2: host_inject_abort, then the host's do_page_fault) -----
def _plain_slot_vm(kvm: Any, backing: Any) -> tuple[Any, Any]:
    """A protected VM whose memslot is a plain (hva) one over *backing*, and its vCPU."""
    vm = kvm.create_vm(abi.KVM_VM_TYPE_ARM_PROTECTED)
    vm.set_user_memory_region2(0, 0, GPA, backing.length, backing.address)
    return vm, vm.create_vcpu(0)


def test_host_userspace_access_to_a_donated_page_is_sigsegv_not_a_host_crash_3_2(kvm: Any) -> None:
    """A plain memslot over a host mapping of guest_memfd: nothing in the hypervisor sees the
    host's stage-1 mapping, so ``__pkvm_host_donate_guest`` (host OWNED, guest NOPAGE) donates
    the page the host still maps.  The host's next access to it is a host stage-2 abort that
    ``handle_host_mem_abort`` injects back (``host_inject_abort``); arm64 ``do_page_fault``
    answers a userspace one with SIGSEGV/SEGV_ACCERR, and the machine goes on."""
    gmem = kvm.create_vm(abi.KVM_VM_TYPE_ARM_PROTECTED).create_guest_memfd(SIZE, GMEM_FLAGS)
    host_map = gmem.mmap(SIZE)
    host_map.write(0, b"hello")
    vm, vcpu = _plain_slot_vm(kvm, host_map)
    assert vcpu.access(GPA, 5) == b"hello"
    state = pkvm_state(vm)
    pfn = state.hvm.state(GPA >> 12).pfn(GPA >> 12)
    assert state.hyp.host_state(pfn).state == PageState.NOPAGE  # donated while host-mapped
    for access in (lambda: host_map.read(0, 1), lambda: host_map.write(2, b"X")):
        with pytest.raises(guestmem.HostSigsegv) as info:
            access()
        exc = info.value
        assert (exc.errno, exc.si_code, exc.rule) == (errno.EFAULT, uapi.SEGV_ACCERR, "pKVM-3.2")
        assert exc.address in (host_map.address, host_map.address + 2)
    host = view(kvm)
    assert host.crashed is None and host.counters["pkvm.host_stage2_aborts"] == 2
    assert vcpu.access(GPA, 5) == b"hello"  # the refused store changed nothing
    assert host_map.read(PAGE, 1) == b"\0"  # the rest of the mapping is the host's
    with pytest.raises(guestmem.HostCrash, match="hypervisor-protected memory"):
        host.kernel_write(pfn, 0, b"k")  # the host kernel's own access: __do_kernel_fault dies


def test_guest_memory_behind_anonymous_host_memory_is_not_readable_by_the_host_3_2(kvm: Any) -> None:
    """The same for a protected VM's ordinary (anonymous) memory: the host cannot read what
    the guest stored in its private page, and gets it back zeroed at teardown."""
    shared = kvm.mmap_anonymous(SIZE)
    vm, vcpu = _plain_slot_vm(kvm, shared)
    vcpu.access(GPA, data=b"secret")
    with pytest.raises(guestmem.HostSigsegv):
        shared.read(0, 6)
    vcpu.close()
    vm.close()  # teardown: __pkvm_host_reclaim_page_guest zeroes the page for the host
    assert vm.destroyed and shared.read(0, 6) == bytes(6)
    shared.close()


class _CloseVmOnFault:
    """Observer: the first stage-2 fault after ``armed`` closes the VM (a VMM thread
    closing it while a vCPU runs)."""

    def __init__(self, vm: Any) -> None:
        self.vm: Any = None
        self.target = vm
        self.destroyed_then: list[bool] = []

    @guestmem.hookimpl
    def guestmem_fault(self) -> None:
        if self.vm is not None:
            vm, self.vm = self.vm, None
            vm.close()
            self.destroyed_then.append(vm.destroyed)


def test_a_vm_closed_during_a_share_is_torn_down_after_it_leaving_no_share(kvm: Any, checker: Any) -> None:
    """MEM_SHARE of a page not faulted yet: the host's fault-in (a stage-2 fault) runs an
    observer that closes the VM.  ``KVM_RUN`` holds the vCPU and so the VM: the HVC finishes
    on the live VM and exits to userspace, then the VM is destroyed and the hypervisor's
    teardown gives every page back to the host, the shared one included."""
    shared = kvm.mmap_anonymous(SIZE)
    vm = kvm.create_vm(abi.KVM_VM_TYPE_ARM_PROTECTED)
    vm.set_user_memory_region2(0, 0, GPA, SIZE, shared.address)
    vcpu = vm.create_vcpu(0)
    vcpu.access(GPA, data=b"run")  # the first run creates the hyp VM
    hyp = pkvm_state(vm).hyp
    closer = _CloseVmOnFault(vm)
    registry = guestmem.get_registry()
    registry.add_plugin(closer, name="close-vm-on-fault")
    try:
        closer.vm = vm
        with pytest.raises(HypercallExit) as info:
            vcpu.hypercall(SHARE, GPA + PAGE, 1, 0)
    finally:
        registry.remove_plugin(closer)
    assert info.value.args[:2] == (GPA + PAGE, 1)  # the share was done, on a live VM
    assert closer.destroyed_then == [False]
    assert vm.destroyed and list(hyp.host.items()) == [] and hyp.vm_table == [None]
    with pytest.raises(KvmError) as err:
        vcpu.hypercall(SHARE, GPA + 2 * PAGE, 1, 0)
    assert err.value.errno == errno.EBADF
    shared.close()


# --- memslot changes of a protected VM (3.6) -------------------------------------------------------
def test_memslots_of_a_protected_vm_that_ran_are_kept_and_its_pages_untouched_3_6(kvm: Any) -> None:
    """``kvm_set_memslot`` zaps a slot being deleted or moved (``kvm_arch_flush_shadow_memslot``)
    before ``kvm_arch_prepare_memory_region``, which Android's pKVM makes refuse a DELETE or a
    MOVE of a protected VM that ran with EPERM.  The zap does not take the guest's pages back
    (``pkvm_pgtable_stage2_unmap`` refuses a protected VM): after a refused change, whatever
    refused it, the guest still owns its page with its contents, nothing was poisoned."""
    shared = kvm.mmap_anonymous(SIZE)
    vm, vcpu = _plain_slot_vm(kvm, shared)
    vcpu.access(GPA, data=b"secret")
    hvm = pkvm_state(vm).hvm
    owned = hvm.state(GPA >> 12)
    refusals = [
        ((0, 0, GPA + SIZE, SIZE, shared.address), errno.EPERM, "pKVM-3.6"),  # MOVE
        ((0, 0, GPA, 0, 0), errno.EPERM, "pKVM-3.6"),  # DELETE
        # A MOVE past the IPA space: arm64's own check in kvm_arch_prepare_memory_region
        # (Android runs the pKVM check first; both refuse and change nothing).
        ((0, 0, (1 << 40) - PAGE, SIZE, shared.address), errno.EFAULT, "S-7"),
    ]
    for args, err, rule in refusals:
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region2(*args)
        assert (info.value.errno, info.value.rule) == (err, rule), args
        assert hvm.state(GPA >> 12) == owned
        assert vcpu.access(GPA, 6) == b"secret"
    assert vm.counters["pkvm.force_reclaims"] == vm.counters["pkvm.poison_faults"] == 0
    assert vm.memslots[(0, 0)].base_gfn == GPA >> 12
    vcpu.close()
    vm.close()
    assert shared.read(0, 6) == bytes(6)  # reclaimed, zeroed, at teardown
    shared.close()


def test_memslots_change_freely_before_the_first_run_and_on_a_normal_vm_3_6(kvm: Any) -> None:
    """No hyp VM yet: nothing was donated, DELETE and MOVE go through.  A normal VM's pages
    are shared, not donated: its memslots change after it ran, unsharing what was mapped."""
    shared = kvm.mmap_anonymous(SIZE)
    vm, vcpu = _plain_slot_vm(kvm, shared)
    vm.set_user_memory_region2(0, 0, GPA + SIZE, SIZE, shared.address)  # MOVE
    vm.set_user_memory_region2(0, 0, GPA + SIZE, 0, 0)  # DELETE
    vcpu.close()
    vm.close()
    normal = kvm.create_vm(abi.KVM_VM_TYPE_ARM_DEFAULT)
    normal.set_user_memory_region2(0, 0, GPA, SIZE, shared.address)
    nvcpu = normal.create_vcpu(0)
    nvcpu.access(GPA, data=b"np")
    state = pkvm_state(normal)
    assert state.hvm.state(GPA >> 12).state == PageState.SHARED_BORROWED
    normal.set_user_memory_region2(0, 0, GPA + SIZE, SIZE, shared.address)  # MOVE: unshared
    assert state.hvm.state(GPA >> 12).state == PageState.NOPAGE and len(state.hyp.host) == 0
    assert nvcpu.access(GPA + SIZE, 2) == b"np"
    nvcpu.close()
    normal.close()
    shared.close()


@pytest.mark.parametrize("vm_type", [abi.KVM_VM_TYPE_ARM_PROTECTED, abi.KVM_VM_TYPE_ARM_DEFAULT])
def test_a_protected_vm_logs_no_dirty_pages_3_6(kvm: Any, vm_type: int) -> None:
    """Android ``kvm_arch_prepare_memory_region``: ``KVM_MEM_LOG_DIRTY_PAGES`` on a memslot of
    a protected VM is EPERM (create and flags change alike); a normal VM may log."""
    shared = kvm.mmap_anonymous(SIZE)
    vm = kvm.create_vm(vm_type)
    dirty = uapi.KVM_MEM_LOG_DIRTY_PAGES
    if vm_type == abi.KVM_VM_TYPE_ARM_PROTECTED:
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region2(0, dirty, GPA, SIZE, shared.address)  # CREATE
        assert (info.value.errno, info.value.rule) == (errno.EPERM, "pKVM-3.6") and not vm.memslots
        vm.set_user_memory_region2(0, 0, GPA, SIZE, shared.address)
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region2(0, dirty, GPA, SIZE, shared.address)  # FLAGS_ONLY
        assert (info.value.errno, info.value.rule) == (errno.EPERM, "pKVM-3.6")
        assert vm.memslots[(0, 0)].flags == 0
    else:
        vm.set_user_memory_region2(0, dirty, GPA, SIZE, shared.address)
    vm.close()
    shared.close()


def test_a_freed_folio_run_still_donated_is_reclaimed_page_by_page_3_2(guest: Guest) -> None:
    """``guestmem_gmem_invalidate`` (the folio free of a page a live guest still owns)
    force-reclaims every page of the host entry, not only its first: the host table stores
    one run for pages donated in a row, the hypercall takes one page."""
    from guestmem_pkvm.policy import PkvmPolicy

    for i in range(4):
        guest.vcpu.access(GPA + i * PAGE, data=b"z")
    state = pkvm_state(guest.vm)
    first = state.hvm.state(GPA >> 12).pfn(GPA >> 12)
    PkvmPolicy().guestmem_gmem_invalidate(view(guest.vm), first, first + 4)
    assert [state.hvm.state((GPA >> 12) + i).state for i in range(4)] == [PageState.POISON] * 4
    assert guest.vm.counters["pkvm.late_reclaims"] == 4
