"""Host-wide SEV state: one RMP table and one ASID space per simulated host.

Both belong to the machine, not to a VM: every SEV VM on a host shares them.  The
policy's ``guestmem_host_init`` creates one :class:`SnpHost` per ``guestmem.open("snp")``;
it is ``host.arch`` of that host's :class:`~guestmem.backend.HostView`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from guestmem.backend import HostView, Owner, RangeMap, VmView, view
from guestmem_snp.asid import AsidAllocator
from guestmem_snp.rmp import PTRS_PER_PMD, RmpEntry, RmpState, RmpTable

# SEV_FEATURES bits of the VMSA (arch/x86/include/asm/svm.h).
SVM_SEV_FEAT_DEBUG_SWAP = 1 << 5
SVM_SEV_FEAT_SECURE_TSC = 1 << 9

#: The name of the RMP in ownership events.
RMP_TABLE = "rmp"


def rmp_owner(entry: RmpEntry | None) -> Owner:
    """Who an RMP entry gives its page to, in the terms every backend shares."""
    if entry is None or not entry.assigned:
        return Owner.HOST
    if entry.state in (RmpState.FIRMWARE, RmpState.RECLAIM):
        return Owner.HYPERVISOR
    return Owner.GUEST


class SnpHost:
    """The RMP, the ASID space and the host-side bookkeeping of one host.

    ``direct_map_split`` holds the 2 MiB blocks of the host direct map already split to
    4 KiB (``adjust_direct_map``); ``freed_while_assigned`` the pfns freed to the host
    although their RMP entry stayed assigned (``sev_gmem_invalidate``'s WARN path: a later
    host write there is an RMP #PF); ``leaked`` the pages ``snp_leak_pages`` kept away
    from the host; ``freed`` the pfns KVM gave back to the host (until a guest gets them
    again).
    """

    def __init__(self, host: HostView | None = None, asids: AsidAllocator | None = None) -> None:
        self.host = host
        self.rmp = RmpTable(on_change=self._changed)
        self.asids = asids if asids is not None else AsidAllocator()
        #: ``sev_supported_vmsa_features``: DebugSwap, and Secure TSC (SNP guests only).
        self.vmsa_features = SVM_SEV_FEAT_DEBUG_SWAP | SVM_SEV_FEAT_SECURE_TSC
        self.direct_map_split: RangeMap[bool] = RangeMap()
        self.freed_while_assigned: RangeMap[bool] = RangeMap()
        self.freed: RangeMap[bool] = RangeMap()
        self.leaked: RangeMap[bool] = RangeMap()
        self._actor: VmView | None = None

    @contextlib.contextmanager
    def acting(self, vm: VmView) -> Iterator[None]:
        """RMP changes inside the block are reported as made for *vm*."""
        previous, self._actor = self._actor, vm
        try:
            yield
        finally:
            self._actor = previous

    def _changed(self, pfn: int, npages: int, old: RmpEntry | None, new: RmpEntry | None) -> None:
        owners = {"old_owner": rmp_owner(old), "new_owner": rmp_owner(new)}
        if self._actor is not None:
            self._actor.ownership_update(RMP_TABLE, pfn, npages, old, new, **owners)
        elif self.host is not None:
            self.host.ownership_update(RMP_TABLE, pfn, npages, old, new, **owners)

    def split_direct_map(self, pfn: int, npages: int) -> int:
        """``adjust_direct_map`` for 4 KiB private pages: returns the 2 MiB blocks newly split."""
        first = pfn // PTRS_PER_PMD
        last = (pfn + npages - 1) // PTRS_PER_PMD + 1
        new = sum(e - s for s, e in self.direct_map_split.gaps(first, last))
        self.direct_map_split.set(first, last, True)
        return new

    def host_write_verdict(self, pfn: int) -> str | None:
        """A host write to *pfn*: the RMP #PF verdict if it is assigned, else None."""
        entry = self.rmp.lookup(pfn)
        if not entry.assigned:
            return None
        return (
            f"RMP #PF: host write to pfn {pfn:#x}, assigned to ASID {entry.asid} "
            f"({entry.state.value}, gpa {entry.gpa:#x})"
        )


def snp_host(kvm: Any) -> SnpHost:
    """The SEV state of the host behind *kvm* (a ``Kvm`` of an snp backend, or its view)."""
    state = view(kvm).arch
    if not isinstance(state, SnpHost):
        raise TypeError(f"{kvm!r} is not a host of the snp backends")
    return state
