"""guestmem-pkvm: arm64 protected KVM (pKVM) modelled on guest_memfd.

The hypervisor's ownership tables live in :mod:`guestmem_pkvm.ownership` (usable on their
own); the backend policy that plugs them into the guestmem core is
:mod:`guestmem_pkvm.policy`, registered by the entry point module
:mod:`guestmem_pkvm.plugin`.  :mod:`guestmem_pkvm.invariants` holds an observer plugin that
checks the pKVM isolation invariant while a scenario runs.
"""

from __future__ import annotations

from guestmem_pkvm.abi import KVM_VM_TYPE_ARM_DEFAULT, KVM_VM_TYPE_ARM_PROTECTED
from guestmem_pkvm.ownership import Component, GuestPage, HostPage, HypError, Hypervisor, HypVm, PageState

__all__ = [
    "KVM_VM_TYPE_ARM_DEFAULT",
    "KVM_VM_TYPE_ARM_PROTECTED",
    "Component",
    "GuestPage",
    "HostPage",
    "HypError",
    "HypVm",
    "Hypervisor",
    "PageState",
]
