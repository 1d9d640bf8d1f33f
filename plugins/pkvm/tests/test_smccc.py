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

from guestmem import uapi
from guestmem_pkvm import abi
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
