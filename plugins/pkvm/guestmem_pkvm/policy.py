"""The ``pkvm`` backend's arch policy: pKVM hooked into the guestmem core model."""

from __future__ import annotations

from guestmem.registry import VmTypeInfo
from guestmem_pkvm.abi import KVM_VM_TYPE_ARM_DEFAULT, KVM_VM_TYPE_ARM_PROTECTED


def _arm64_vm_type(vm_type: int, name: str, *, readonly_mem: bool) -> VmTypeInfo:
    """An arm64 VM type as 6.18 sees it (spec CAP-3, S-7, S-16).

    No ``kvm_arch_has_private_mem`` and no ``KVM_SET_MEMORY_ATTRIBUTES`` on arm64 (x86
    only); INIT_SHARED is the ``__weak`` default (allowed); one memslot address space;
    ``KVM_PRE_FAULT_MEMORY`` is x86 only; a GUEST_MEMFD slot must be gmem-only (MMAP).
    """
    return VmTypeInfo(
        type=vm_type,
        name=name,
        has_private_mem=False,
        supports_init_shared=True,
        readonly_mem=readonly_mem,
        pre_fault_allowed=False,
        nr_memslot_as_ids=1,
        gmem_slot_requires_mmap=True,
        memory_attributes=False,
    )


# Protected VMs refuse read-only memslots (Android pKVM) [U: not in 6.18].
PROTECTED_VM = _arm64_vm_type(KVM_VM_TYPE_ARM_PROTECTED, "KVM_VM_TYPE_ARM_PROTECTED", readonly_mem=False)
DEFAULT_VM = _arm64_vm_type(KVM_VM_TYPE_ARM_DEFAULT, "KVM_VM_TYPE_ARM_IPA_SIZE(0)", readonly_mem=True)


class PkvmPolicy:
    """The arch policy hooks of the ``pkvm`` backend."""
