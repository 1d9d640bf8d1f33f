"""The core's conformance kit against both pKVM VM types."""

from __future__ import annotations

from guestmem import uapi
from guestmem.conformance import GmemConformance
from guestmem_pkvm import abi


class _Arm64Kit(GmemConformance):
    backend = "pkvm"
    # arm64 accepts only gmem-only (MMAP) guest_memfd memslots (S-16).
    slot_gmem_flags = uapi.GUEST_MEMFD_FLAG_MMAP


class TestPkvmDefaultVm(_Arm64Kit):
    """A normal arm64 VM under pKVM: the 6.18 guest_memfd rules."""

    vm_type = abi.KVM_VM_TYPE_ARM_DEFAULT


class TestPkvmProtectedVm(_Arm64Kit):
    """A protected VM: the same uAPI rules.

    Its memory is private unless the guest shares it, so the kit's plain host/guest
    coherence test (M-7) does not apply: ``test_e2e`` covers it through MEM_SHARE.
    """

    vm_type = abi.KVM_VM_TYPE_ARM_PROTECTED
    init_shared_coherent = False
