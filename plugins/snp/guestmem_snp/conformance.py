"""The ``guestmem_conformance_options`` of guestmem-snp: the kit's settings for SNP hosts.

The kit launches and drives an SNP VM through the backend's intents
(:class:`guestmem_snp.intents.SnpIntents`), as scenarios and the VMM-testing pytest plugin
do: ``KVM_SEV_INIT2``, the launch, the guest validating its RAM (page-state change and
PVALIDATE) and validating again a page the host took away (its #VC), conversions through
GHCB page-state changes answered by QEMU's destructive ``kvm_convert_memory``
(backends.md 2.3).  What is left to say here is the RMP checker.
"""

from __future__ import annotations

from typing import Any

from guestmem import uapi
from guestmem.backend import Backend, VmTypeInfo, hookimpl
from guestmem_snp.guest import SnpGuest, UnvalidatedAccess
from guestmem_snp.host import snp_host
from guestmem_snp.intents import PageStateChangeFailed
from guestmem_snp.invariants import RmpChecker
from guestmem_snp.sev import HostWriteOutsidePage, Sev, SnpLaunchUpdate

#: The SEV arch face for ``guestmem fuzz --hostile``: the VMM's commands on a VM and the
#: guest's instructions on a vCPU, with their arguments' kinds
#: (``guestmem.conformance.hostile``).
HOSTILE_OPS: dict[str, tuple[Any, ...]] = {
    "sev.init2": (
        "vm",
        lambda vm, vmsa_features, ghcb_version, flags: Sev(vm).init2(vmsa_features, ghcb_version, flags),
        ("u64", "u32", "u32"),
    ),
    "sev.snp_launch_start": (
        "vm",
        lambda vm, policy, flags: Sev(vm).snp_launch_start(policy, flags),
        ("u64", "u32"),
    ),
    "sev.snp_launch_update": (
        "vm",
        lambda vm, gfn_start, data, length, type_: Sev(vm).snp_launch_update(
            SnpLaunchUpdate(gfn_start, data, length, type_)
        ),
        ("gfn", "data", "size", "u32"),
        True,  # kvm_gmem_populate keeps the folio when SNP_LAUNCH_UPDATE fails
    ),
    "sev.snp_launch_finish": ("vm", lambda vm, flags: Sev(vm).snp_launch_finish(flags), ("u32",)),
    "sev.enable_cap_exit_hypercall": (
        "vm",
        lambda vm, mask: Sev(vm).enable_cap_exit_hypercall(mask),
        ("u64",),
    ),
    "sev.host_kernel_write": (
        "vm",
        lambda vm, pfn, data, offset: Sev(vm).host_kernel_write(pfn, data, offset),
        ("pfn", "data", "length"),
    ),
    "guest.pvalidate": (
        "vcpu",
        lambda c, gpa, page_size, validate: SnpGuest(c).pvalidate(gpa, page_size, validate),
        ("gpa", "u32", "bool"),
    ),
    "guest.psc_msr": ("vcpu", lambda c, gfn, op: SnpGuest(c).psc_msr(gfn, op), ("gfn", "u32")),
    "guest.map_gpa_range": (
        "vcpu",
        lambda c, gpa, npages, attrs: SnpGuest(c).map_gpa_range(gpa, npages, attrs),
        ("gpa", "u32", "u64"),
    ),
    "guest.resume": ("vcpu", lambda c, ret: SnpGuest(c).resume(ret), ("u64",)),
    "guest.read": (
        "vcpu",
        lambda c, gpa, length, private: SnpGuest(c).read(gpa, length, private=private),
        ("gpa", "length", "bool"),
    ),
    "guest.write": (
        "vcpu",
        lambda c, gpa, data, private: SnpGuest(c).write(gpa, data, private=private),
        ("gpa", "data", "bool"),
    ),
}


def held_asids(kvm: Any) -> list[str]:
    """The ASIDs still allocated (and not freed to the reclaim bitmap): once every VM is
    destroyed (``sev_vm_destroy``: ``sev_asid_free``), none."""
    asids = snp_host(kvm).asids
    return [f"ASID {asid}" for asid in range(1, asids.max_sev_asid + 1) if asids.in_use(asid)]


@hookimpl
def guestmem_conformance_options(backend: Backend, vm_type: VmTypeInfo) -> dict[str, Any] | None:
    """The kit's settings for the ``snp`` backends: the RMP checker watches every VM and the
    leak check asks for ASIDs still allocated; hostile calls reach the SEV commands and the
    guest's instructions.  Their outcomes that are no errno: a #VC for an unvalidated page
    (the guest's), a page-state change KVM refused (a VMM that turned off
    ``KVM_HC_MAP_GPA_RANGE`` exits gets ``VMGEXIT_PSC_ERROR_GENERIC``, ``snp_begin_psc``:
    the guest terminates), and the documented usage error of the model-only
    ``Sev.host_kernel_write`` (a store not within one page)."""
    if not backend.name.startswith("snp"):
        return None
    options: dict[str, Any] = {"observers": (RmpChecker,), "leaks": held_asids}
    if vm_type.type == uapi.KVM_X86_SNP_VM:
        options.update(
            hostile_ops=HOSTILE_OPS,
            hostile_outcomes=(UnvalidatedAccess, PageStateChangeFailed, HostWriteOutsidePage),
        )
    return options
