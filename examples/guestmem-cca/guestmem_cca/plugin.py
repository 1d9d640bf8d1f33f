"""The ``guestmem`` entry point of guestmem-cca: registers the ``cca`` backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from guestmem.backend import Backend, VmTypeInfo, hookimpl
from guestmem_cca.policy import CcaPolicy

#: A normal arm64 VM as Linux 6.18 has it: no private memory, no memory attributes,
#: gmem-only memslots (S-16), no KVM_PRE_FAULT_MEMORY, one address space.
DEFAULT_VM = VmTypeInfo(
    type=0,
    name="KVM_VM_TYPE_ARM_IPA_SIZE(0)",
    arch="arm64",
    supports_init_shared=True,
    pre_fault_allowed=False,
    nr_memslot_as_ids=1,
    gmem_slot_requires_mmap=True,
    memory_attributes=False,
)
#: The backend's confidential VM type (``KVM_VM_TYPE_ARM(2)``: change it to yours).  Here
#: memory attributes decide privateness and conversions are destructive, as Arm CCA
#: realms have it; a design that shares pages in place (pKVM, Gunyah) declares
#: ``conversion="in_place"`` and converts through its own hypercalls.
CCA_VM = VmTypeInfo(
    type=0x200,
    name="KVM_VM_TYPE_ARM_CCA",
    arch="arm64",
    has_private_mem=True,
    pre_fault_allowed=False,
    nr_memslot_as_ids=1,
    conversion="destructive",
)

#: The policy object: reached only by hosts and VMs of this backend.
POLICY = CcaPolicy()


@hookimpl
def guestmem_register_backends(register: Callable[[Backend], None]) -> None:
    """Register the ``cca`` backend."""
    register(
        Backend(
            name="cca",
            summary="Cca: a guestmem backend made with guestmem new-backend",
            vm_types=(CCA_VM, DEFAULT_VM),
            policy=POLICY,
        )
    )


@hookimpl
def guestmem_conformance_options(backend: Backend, vm_type: VmTypeInfo) -> dict[str, Any] | None:
    """What the conformance kit cannot read from the VM types' declarations.

    Nothing yet: the kit's defaults drive the VMs as generic KVM does.  A backend whose
    guests launch, convert or access memory in their own way names its driver here
    (``{"vmm": MyKitVmm}``, a class with the methods of ``guestmem.conformance.KitVmm`` it
    changes), and its own invariant checkers (``{"observers": (MyChecker,)}``).
    """
    return None
