"""The ``guestmem`` entry point of guestmem-cca: registers the ``cca`` backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from guestmem.backend import Backend, VmTypeInfo, hookimpl
from guestmem_cca.intents import CcaIntents
from guestmem_cca.policy import CcaPolicy
from guestmem_cca.rmi import KVM_VM_TYPE_ARM_NORMAL, KVM_VM_TYPE_ARM_REALM

#: A normal arm64 VM on the CCA host, as Linux 6.18 has it: no private memory, no memory
#: attributes, gmem-only memslots (S-16), no KVM_PRE_FAULT_MEMORY, one address space.
DEFAULT_VM = VmTypeInfo(
    type=KVM_VM_TYPE_ARM_NORMAL,
    name="KVM_VM_TYPE_ARM_NORMAL",
    arch="arm64",
    supports_init_shared=True,
    pre_fault_allowed=False,
    nr_memslot_as_ids=1,
    gmem_slot_requires_mmap=True,
    memory_attributes=False,
)
#: A realm (``KVM_VM_TYPE_ARM_REALM``): memory attributes decide privateness, as the RMM's
#: RIPAS changes reach the VMM as memory-fault exits; conversions destroy the pages
#: (DATA_DESTROY); guest_memfd of a realm has no INIT_SHARED (CAP-3).
REALM_VM = VmTypeInfo(
    type=KVM_VM_TYPE_ARM_REALM,
    name="KVM_VM_TYPE_ARM_REALM",
    arch="arm64",
    has_private_mem=True,
    readonly_mem=False,
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
            summary="Arm CCA host (KVM CCA series) with its RMM: granules, RTTs, RIPAS, realm lifecycle",
            vm_types=(REALM_VM, DEFAULT_VM),
            policy=POLICY,
            intents=CcaIntents(),
        )
    )


@hookimpl
def guestmem_conformance_options(backend: Backend, vm_type: VmTypeInfo) -> dict[str, Any] | None:
    """The granule checker watches every VM; a realm (launched and driven through
    :class:`~guestmem_cca.intents.CcaIntents`) loses a page a memslot change unmapped
    (DATA_DESTROY leaves it DESTROYED: the realm's next access aborts until it converts the
    page again)."""
    if backend.name != "cca":
        return None
    from guestmem_cca.guest import RealmGuest, enable_rme
    from guestmem_cca.invariants import GranuleChecker
    from guestmem_cca.policy import populate

    options: dict[str, Any] = {"observers": (GranuleChecker,)}
    if vm_type.type == KVM_VM_TYPE_ARM_REALM:
        # The realm's arch face for ``guestmem fuzz --hostile``: KVM_CAP_ARM_RME commands,
        # populating (partial: as kvm_gmem_populate), and the realm's RSI_IPA_STATE_SET.
        hostile_ops = {
            "enable_rme": ("vm", enable_rme, ("u32", "u64")),
            "populate": ("vm", populate, ("gpa", "data"), True),
            "rsi.set_ipa_state": (
                "vcpu",
                lambda c, base, top, ripas: RealmGuest(c).set_ipa_state(base, top, ripas),
                ("gpa", "gpa", "u32"),
            ),
        }
        options.update(private_unmap="revoke", hostile_ops=hostile_ops)
    return options
