"""The ``guestmem_conformance_options`` of guestmem-tdx: the kit's settings for TDX hosts.

The kit launches and drives a TD through the backend's intents
(:class:`guestmem_tdx.intents.TdxIntents`), as scenarios and the VMM-testing pytest plugin
do: ``KVM_TDX_INIT_VM`` before any vCPU, ``KVM_TDX_INIT_VCPU``, the firmware page added
and measured (``KVM_TDX_INIT_MEM_REGION``), ``KVM_TDX_FINALIZE_VM``, the TD accepting its
RAM, MapGPA answered by QEMU's destructive conversion and an ACCEPT of what became
private (backends.md 1.3, 1.4).  The kit's TD accepts on fault: it is launched without
``SEPT_VE_DISABLE`` and answers the #VE of a page the host took away with ACCEPT.
"""

from __future__ import annotations

from typing import Any

from guestmem import uapi
from guestmem.backend import Backend, VmTypeInfo, hookimpl
from guestmem_tdx.guest import TdxGuest
from guestmem_tdx.host import tdx_host
from guestmem_tdx.invariants import TdxChecker
from guestmem_tdx.vmm import Tdx

#: The TDX arch face for ``guestmem fuzz --hostile``: the VMM's ``KVM_TDX_*`` commands and
#: the TD's TDCALLs, with their arguments' kinds (``guestmem.conformance.hostile``).
HOSTILE_OPS: dict[str, tuple[Any, ...]] = {
    "tdx.init_vm": ("vm", lambda vm, attributes, xfam: Tdx(vm).init_vm(attributes, xfam), ("u64", "u64")),
    "tdx.init_vcpu": ("vm", lambda vm, vcpu, rcx: Tdx(vm).init_vcpu(vcpu, rcx), ("vcpu", "u64")),
    "tdx.init_mem_region": (
        "vm",
        lambda vm, vcpu, gpa, data: Tdx(vm).init_mem_region(vcpu, gpa, data),
        ("vcpu", "gpa", "data"),
        True,  # kvm_gmem_populate keeps the folio when TDH.MEM.PAGE.ADD fails
    ),
    "tdx.finalize": ("vm", lambda vm: Tdx(vm).finalize(), ()),
    "tdx.enable_cap_exit_hypercall": (
        "vm",
        lambda vm, mask: Tdx(vm).enable_cap_exit_hypercall(mask),
        ("u64",),
    ),
    "guest.accept": ("vcpu", lambda c, gpa, level: TdxGuest(c).accept(gpa, level), ("gpa", "u32")),
    "guest.map_gpa": ("vcpu", lambda c, gpa, size: TdxGuest(c).map_gpa(gpa, size), ("gpa", "size")),
    "guest.tdvmcall": ("vcpu", lambda c, leaf, arg: TdxGuest(c).tdvmcall(leaf, arg), ("u64", "u64")),
    "guest.resume": ("vcpu", lambda c, ret: TdxGuest(c).resume(ret), ("u64",)),
    "guest.read": ("vcpu", lambda c, gpa, length: TdxGuest(c).read(gpa, length), ("gpa", "length")),
}


def held_keyids(kvm: Any) -> list[str]:
    """The TDX private KeyIDs still allocated: once every TD is destroyed
    (``tdx_mmu_release_hkid``, ``tdx_guest_keyid_free``), none but those it leaked."""
    keyids = tdx_host(kvm).keyids
    return [f"KeyID {hkid}" for hkid in sorted(keyids.in_use - keyids.leaked)]


@hookimpl
def guestmem_conformance_options(backend: Backend, vm_type: VmTypeInfo) -> dict[str, Any] | None:
    """The kit's settings for the ``tdx`` backend: the TDX checker watches every VM, and a
    TD's private page whose S-EPT leaf a memslot change removed (TDH.MEM.PAGE.REMOVE, then
    the page cleared) comes back as a new page the TD accepts: zeroed
    (``private_unmap="destroy"``)."""
    if backend.name != "tdx":
        return None
    options: dict[str, Any] = {"observers": (TdxChecker,), "leaks": held_keyids}
    if vm_type.type == uapi.KVM_X86_TDX_VM:
        options.update(private_unmap="destroy", hostile_ops=HOSTILE_OPS)
    return options
