"""Entry point of the ``guestmem-snp`` distribution (group ``guestmem``, name ``snp``).

Each backend is a whole SEV-SNP host: its ``/dev/kvm`` offers the x86 VM types every host
has, ``KVM_X86_DEFAULT_VM`` and ``KVM_X86_SW_PROTECTED_VM`` (the core's, run by the core
alone: the policy leaves them alone), next to SEV, SEV-ES and SNP, so ``KVM_CAP_VM_TYPES``
is 0x1f (CAP-6).  SW_PROTECTED needs ``CONFIG_KVM_SW_PROTECTED_VM`` (an EXPERT option,
default n) and the TDP MMU: the modelled kernel is built with it, as the ``sw`` backend's
is; a distribution kernel that is not reports 0x1d, which a profile whose ``vm_types``
leaves 1 out models.

Registers two backends that share one policy:

``snp``
    Linux 6.18 on an SEV-SNP host: gmem folios are order 0 (H-1), so every private page
    gets a 4 KiB RMP entry.
``snp-hugepage``
    The same host with the (unmerged) hugepage guest_memfd series: order-9 folios, so
    ``sev_gmem_prepare`` can create 2 MiB RMP entries.  Opt-in, never the default.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from guestmem import Backend, VmTypeInfo, hookimpl, uapi
from guestmem.backend import X86_DEFAULT_VM, X86_SW_PROTECTED_VM
from guestmem_snp.conformance import guestmem_conformance_options
from guestmem_snp.intents import SnpIntents
from guestmem_snp.policy import SnpPolicy

__all__ = ["BACKENDS", "POLICY", "guestmem_conformance_options", "guestmem_register_backends"]

SEV_VM = VmTypeInfo(
    type=uapi.KVM_X86_SEV_VM,
    name="KVM_X86_SEV_VM",
    has_private_mem=False,
    readonly_mem=True,
    pre_fault_allowed=True,
    nr_memslot_as_ids=2,
)
SEV_ES_VM = VmTypeInfo(
    type=uapi.KVM_X86_SEV_ES_VM,
    name="KVM_X86_SEV_ES_VM",
    has_private_mem=False,
    readonly_mem=False,  # has_protected_state (S-4)
    pre_fault_allowed=True,
    nr_memslot_as_ids=2,
)
SNP_VM = VmTypeInfo(
    type=uapi.KVM_X86_SNP_VM,
    name="KVM_X86_SNP_VM",
    has_private_mem=True,  # CAP-5; CAP-3: no INIT_SHARED
    readonly_mem=False,
    pre_fault_allowed=False,  # PF-2
    nr_memslot_as_ids=1,
    gmem_folio_order=0,  # H-1
    conversion="destructive",  # backends.md 2.3: PSC + the VMM's discard of the old side
)
SNP_VM_HUGEPAGE = attrs.evolve(SNP_VM, gmem_folio_order=uapi.PMD_ORDER)

POLICY = SnpPolicy()
INTENTS = SnpIntents()


BACKENDS = (
    Backend(
        name="snp",
        summary="AMD SEV-SNP host (Linux 6.18): RMP, ASIDs, launch, PVALIDATE, page-state changes",
        vm_types=(X86_DEFAULT_VM, X86_SW_PROTECTED_VM, SEV_VM, SEV_ES_VM, SNP_VM),
        policy=POLICY,
        range_faults=True,  # sev_gmem_prepare takes runs of order-0 folios at once
        intents=INTENTS,
    ),
    Backend(
        name="snp-hugepage",
        summary="AMD SEV-SNP host with hugepage guest_memfd (order-9 folios, 2 MiB RMP entries; unmerged)",
        vm_types=(X86_DEFAULT_VM, X86_SW_PROTECTED_VM, SEV_VM, SEV_ES_VM, SNP_VM_HUGEPAGE),
        policy=POLICY,
        range_faults=True,  # sev_gmem_prepare takes runs of order-0 folios at once
        intents=INTENTS,
    ),
)


@hookimpl
def guestmem_register_backends(register: Callable[[Backend], None]) -> None:
    """Register ``snp`` and ``snp-hugepage``."""
    for backend in BACKENDS:
        register(backend)
