"""Which host kernel the model models.

A :class:`KernelProfile` collects the behaviours that differ between kernels or KVM MMU
flavours.  ``upstream-6.18`` (the default) is Linux 6.18 with the x86 TDP MMU.  Other
profiles exist so the model can be compared like for like with a particular real host
(see docs/profiles.md).
"""

from __future__ import annotations

import attrs


@attrs.frozen
class KernelProfile:
    """Kernel behaviours the model switches on."""

    name: str
    description: str
    #: Kernel release modelled (spec version labels).
    version: str = "6.18"
    #: x86 TDP MMU enabled (needed for SW_PROTECTED VMs, CAP-6, and pre-fault, PF-2).
    tdp_mmu: bool = True
    #: KVM_CAP_MEMORY_ATTRIBUTES support built in (CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES).
    memory_attributes: bool = True
    #: VM types the kernel's /dev/kvm accepts (None: whatever the backend offers).
    vm_types: frozenset[int] | None = None
    #: A shared guest access to a gmem-only slot (MMAP gmem) is served from gmem (6.18 TDP
    #: MMU).  False models a shadow-paging host that walks ``userspace_addr`` instead.
    gmem_only_faults_from_gmem: bool = True
    #: Guest physical address width (x86 MAXPHYADDR), bounding memslots (S-7).
    phys_bits: int = 52
    #: CONFIG_KVM_SMM: x86 VMs without private memory have two memslot address spaces and
    #: ``KVM_CAP_MULTI_ADDRESS_SPACE`` reports 2.  False: one address space (an as_id of 1 is
    #: EINVAL, S-7) and the capability reports 0 on ``/dev/kvm`` and on VM fds.
    smm: bool = True
    #: A shared fault on the hva path (G-7) whose ``userspace_addr`` has no host mapping, or
    #: whose host fault fails (SIGBUS: M-3, M-4), leaves the guest as ``KVM_EXIT_MMIO`` at the
    #: faulting address (kvm_pvm's shadow MMU emulates it) instead of failing ``KVM_RUN``
    #: with EFAULT.
    hva_error_exits_mmio: bool = False
    #: ``KVM_PRE_FAULT_MEMORY`` fails with ENOSPC (not EOPNOTSUPP, PF-2) while the VM has
    #: never had a memslot: kvm_pvm cannot load an MMU root before the first memslot.
    pre_fault_enospc_before_first_memslot: bool = False
    #: What-if, not a kernel: a memslot binding holds a reference to its guest_memfd file,
    #: so closing the last fd while bound does not release it (L-3 does not run) and the
    #: slot keeps working until it is deleted.  The file pins the VM (L-1), so a VM whose
    #: slots pin its files is never destroyed once userspace closes everything: the
    #: reference cycle the upstream design avoids by not pinning.
    memslots_pin_gmem: bool = False


UPSTREAM_6_18 = KernelProfile(
    name="upstream-6.18",
    description="Linux 6.18, x86-64, TDP MMU (the default)",
)

KVM_PVM_6_18 = KernelProfile(
    name="kvm_pvm-6.18",
    description="Linux 6.18 with the kvm_pvm module: shadow paging, no TDP MMU, DEFAULT VMs only, no SMM",
    tdp_mmu=False,
    memory_attributes=False,
    vm_types=frozenset({0}),
    gmem_only_faults_from_gmem=False,
    smm=False,
    hva_error_exits_mmio=True,
    pre_fault_enospc_before_first_memslot=True,
)

PROFILES: dict[str, KernelProfile] = {p.name: p for p in (UPSTREAM_6_18, KVM_PVM_6_18)}


def get_profile(profile: str | KernelProfile | None) -> KernelProfile:
    """Resolve a profile name (or pass an instance through); None is the default."""
    if profile is None:
        return UPSTREAM_6_18
    if isinstance(profile, KernelProfile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise LookupError(
            f"unknown kernel profile {profile!r} (known: {', '.join(sorted(PROFILES))})"
        ) from None
