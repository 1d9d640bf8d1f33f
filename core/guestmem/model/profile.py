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


UPSTREAM_6_18 = KernelProfile(
    name="upstream-6.18",
    description="Linux 6.18, x86-64, TDP MMU (the default)",
)

PROFILES: dict[str, KernelProfile] = {UPSTREAM_6_18.name: UPSTREAM_6_18}


def get_profile(profile: str | KernelProfile | None) -> KernelProfile:
    """Resolve a profile name (or pass an instance through); None is the default."""
    if profile is None:
        return UPSTREAM_6_18
    if isinstance(profile, KernelProfile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise LookupError(f"unknown kernel profile {profile!r} (known: {', '.join(sorted(PROFILES))})") from None
