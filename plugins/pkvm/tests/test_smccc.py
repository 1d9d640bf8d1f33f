"""The guest's view of the KVM vendor hypercalls: argument checks and return registers.

Source: Android common kernel ``arch/arm64/kvm/hyp/nvhe/pkvm.c`` (``kvm_handle_pvm_hvc64``,
``pkvm_meminfo_call``, ``pkvm_memshare_call``, ``pkvm_memunshare_call``,
``pkvm_memrelinquish_call``) and ``Documentation/virt/kvm/arm/hypercalls.rst`` ("Must be
zero" arguments).  A call whose arguments the hypervisor refuses returns
``SMCCC_RET_INVALID_PARAMETER`` in x0 and changes nothing.
"""

from __future__ import annotations

import errno

import pytest

from guestmem import MemoryFault, uapi
from guestmem_pkvm import abi
from guestmem_pkvm.exits import HypercallExit
from guestmem_pkvm.ownership import PageState
from guestmem_pkvm.policy import enable_exit_hypercall, pkvm_state

from .conftest import GPA, Guest

PAGE = uapi.PAGE_SIZE
SHARE = abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_SHARE_FUNC_ID
UNSHARE = abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_UNSHARE_FUNC_ID
RELINQUISH = abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_RELINQUISH_FUNC_ID
MEMINFO = abi.ARM_SMCCC_VENDOR_HYP_KVM_HYP_MEMINFO_FUNC_ID


@pytest.mark.parametrize("args", [(1, 0, 0), (0, 1, 0), (0, 0, 1)])
def test_meminfo_with_a_nonzero_argument_is_invalid_parameter(guest: Guest, args: tuple[int, ...]) -> None:
    """``pkvm_meminfo_call``: ``if (arg1 || arg2 || arg3) goto out_guest_err``."""
    assert guest.vcpu.hypercall(MEMINFO, *args) == abi.SMCCC_RET_INVALID_PARAMETER
    assert pkvm_state(guest.vm).last_error is not None
    assert guest.vcpu.hypercall(MEMINFO, 0, 0, 0) == PAGE


@pytest.mark.parametrize("nr", [SHARE, UNSHARE])
def test_share_and_unshare_with_nonzero_arg3_are_invalid_parameter(guest: Guest, nr: int) -> None:
    """``pkvm_memshare_call`` / ``pkvm_memunshare_call``: ``if (arg3 || !PAGE_ALIGNED(ipa))``."""
    guest.vcpu.access(GPA, 1)
    if nr == UNSHARE:
        enable_exit_hypercall(guest.vm, 0)
        assert guest.vcpu.hypercall(SHARE, GPA, 1, 0) == abi.SMCCC_RET_SUCCESS
    before = pkvm_state(guest.vm).hvm.guest.copy()
    assert guest.vcpu.hypercall(nr, GPA, 1, 7) == abi.SMCCC_RET_INVALID_PARAMETER
    state = pkvm_state(guest.vm)
    assert state.last_error is not None and state.last_error.errno == errno.EINVAL
    assert state.hvm.guest.copy() == before


@pytest.mark.parametrize("args", [(GPA, 1, 0), (GPA, 0, 1)])
def test_relinquish_with_nonzero_arg2_or_arg3_is_invalid_parameter(
    guest: Guest, args: tuple[int, ...]
) -> None:
    """``pkvm_memrelinquish_call``: ``if (arg2 || arg3) goto out_guest_err`` (no range form)."""
    guest.vcpu.access(GPA, data=b"kept")
    assert guest.vcpu.hypercall(RELINQUISH, *args) == abi.SMCCC_RET_INVALID_PARAMETER
    assert pkvm_state(guest.vm).hvm.state(GPA >> 12).state == PageState.OWNED
    assert guest.vcpu.access(GPA, 4) == b"kept"


def test_meminfo_returns_the_granule_and_has_range_in_x1(guest: Guest) -> None:
    """``pkvm_meminfo_call``: ``smccc_set_retval(vcpu, PAGE_SIZE, KVM_FUNC_HAS_RANGE, 0, 0)``."""
    assert guest.vcpu.hypercall(MEMINFO) == PAGE
    assert pkvm_state(guest.vm).ret == (PAGE, abi.KVM_FUNC_HAS_RANGE, 0, 0)


def _fault_in_reversed(guest: Guest, first: int, n: int) -> list[int]:
    """Touch pages ``first+n-1`` down to ``first``: their host pages come out in reverse order."""
    for i in reversed(range(n)):
        guest.vcpu.access(GPA + (first + i) * PAGE, data=bytes([i + 1]))
    hvm = pkvm_state(guest.vm).hvm
    return [hvm.state((GPA >> 12) + first + i).pfn((GPA >> 12) + first + i) for i in range(n)]


def test_share_of_a_discontiguous_range_shares_the_first_run_and_returns_it_in_x1(guest: Guest) -> None:
    """``pkvm_memshare_call``: ``smccc_set_retval(vcpu, SMCCC_RET_SUCCESS, nr_shared, 0, 0)``.

    ``__guest_request_page_transition`` stops at the first physically discontiguous leaf;
    the guest asks again for the rest.  Userspace is told the pages actually shared.
    """
    pfns = _fault_in_reversed(guest, 8, 3)
    assert pfns[1] != pfns[0] + 1  # not physically contiguous
    gpa = GPA + 8 * PAGE
    with pytest.raises(HypercallExit) as info:
        guest.vcpu.hypercall(SHARE, gpa, 3, 0)
    state = pkvm_state(guest.vm)
    assert info.value.args == (gpa, 1, 0)
    assert state.ret == (abi.SMCCC_RET_SUCCESS, 1, 0, 0)
    assert [state.hvm.state((gpa >> 12) + i).state for i in range(3)] == [
        PageState.SHARED_OWNED,
        PageState.OWNED,
        PageState.OWNED,
    ]
    shared = 1
    while shared < 3:  # what a guest does with x1
        with pytest.raises(HypercallExit):
            guest.vcpu.hypercall(SHARE, gpa + shared * PAGE, 3 - shared, 0)
        shared += state.ret[1]
    assert [guest.map.read((8 + i) * PAGE, 1) for i in range(3)] == [b"\x01", b"\x02", b"\x03"]
    assert guest.vm.counters["pkvm.converted_pages"] == 3


def test_unshare_checks_host_mappings_of_the_run_it_converts(guest: Guest) -> None:
    """MEM_UNSHARE of a range converts the walker's run; a host mapping past it does not matter."""
    enable_exit_hypercall(guest.vm, 0)
    _fault_in_reversed(guest, 8, 2)
    gpa = GPA + 8 * PAGE
    for i in range(2):
        assert guest.vcpu.hypercall(SHARE, gpa + i * PAGE, 1, 0) == abi.SMCCC_RET_SUCCESS
    assert guest.map.read(9 * PAGE, 1) == b"\x02"  # the host maps the second page only
    assert guest.vcpu.hypercall(UNSHARE, gpa, 2, 0) == abi.SMCCC_RET_SUCCESS
    state = pkvm_state(guest.vm)
    assert state.ret == (abi.SMCCC_RET_SUCCESS, 1, 0, 0)
    assert state.hvm.state(gpa >> 12).state == PageState.OWNED
    assert guest.vcpu.hypercall(UNSHARE, gpa + PAGE, 1, 0) == abi.SMCCC_RET_INVALID_PARAMETER
    assert state.last_error is not None and state.last_error.errno == errno.EAGAIN


def test_share_fault_in_of_a_host_mapped_page_exits_to_userspace_3_5(guest: Guest) -> None:
    """``pkvm_memshare_call``: -EFAULT makes the host map the range and the HVC is retried.

    The host maps it as a stage-2 fault, so a page the VMM still maps ends ``KVM_RUN`` with
    the same memory-fault exit a guest access gets (pKVM-3.5); the guest's HVC has not
    completed and nothing changed.  Once the VMM unmaps, the retried HVC goes through.
    """
    guest.map.write(5 * PAGE, b"vmm data")
    gpa = GPA + 5 * PAGE
    with pytest.raises(MemoryFault) as info:
        guest.vcpu.hypercall(SHARE, gpa, 1, 0)
    assert info.value.errno == errno.EFAULT and info.value.rule == "pKVM-3.5"
    assert info.value.gpa == gpa
    state = pkvm_state(guest.vm)
    assert state.hvm.state(gpa >> 12).state == PageState.NOPAGE
    assert guest.vm.counters["pkvm.hvc_refused"] == 0
    guest.map.madvise(uapi.MADV_DONTNEED, 5 * PAGE, PAGE)
    with pytest.raises(HypercallExit):
        guest.vcpu.hypercall(SHARE, gpa, 1, 0)
    assert guest.map.read(5 * PAGE, 8) == b"vmm data"


def test_not_supported_is_what_the_guest_gets_in_x0_for_unknown_calls(guest: Guest) -> None:
    """``val[0] = SMCCC_RET_NOT_SUPPORTED`` for a function the hypervisor does not handle."""
    guest.vcpu.hypercall(MEMINFO)
    assert guest.vcpu.hypercall(0xC6000005) == abi.SMCCC_RET_NOT_SUPPORTED  # MMIO_GUARD_INFO
    assert pkvm_state(guest.vm).ret == (abi.SMCCC_RET_NOT_SUPPORTED, 0, 0, 0)
