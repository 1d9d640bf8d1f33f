"""Host-wide SEV state: one RMP table and one ASID space per simulated host.

Both belong to the machine, not to a VM: every SEV VM on a host shares them.  They are
kept per :class:`guestmem.model.host.HostMemory` object (one per ``guestmem.open``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from guestmem.ranges import RangeMap
from guestmem_snp.asid import AsidAllocator
from guestmem_snp.rmp import PTRS_PER_PMD, RmpEntry, RmpTable

# SEV_FEATURES bits of the VMSA (arch/x86/include/asm/svm.h).
SVM_SEV_FEAT_DEBUG_SWAP = 1 << 5
SVM_SEV_FEAT_SECURE_TSC = 1 << 9

if TYPE_CHECKING:
    from guestmem.model.vm import ModelVm


class SnpHost:
    """The RMP, the ASID space and the host-side bookkeeping of one host.

    ``direct_map_split`` holds the 2 MiB blocks of the host direct map already split to
    4 KiB (``adjust_direct_map``); ``freed_while_assigned`` the pfns freed to the host
    although their RMP entry stayed assigned (``sev_gmem_invalidate``'s WARN path: a later
    host write there is an RMP #PF); ``leaked`` the pages ``snp_leak_pages`` kept away
    from the host; ``freed`` the pfns KVM gave back to the host (until a guest gets them
    again).
    """

    def __init__(self, asids: AsidAllocator | None = None) -> None:
        self.rmp = RmpTable(on_change=self._changed)
        self.asids = asids if asids is not None else AsidAllocator()
        #: ``sev_supported_vmsa_features``: DebugSwap, and Secure TSC (SNP guests only).
        self.vmsa_features = SVM_SEV_FEAT_DEBUG_SWAP | SVM_SEV_FEAT_SECURE_TSC
        self.direct_map_split: RangeMap[bool] = RangeMap()
        self.freed_while_assigned: RangeMap[bool] = RangeMap()
        self.freed: RangeMap[bool] = RangeMap()
        self.leaked: RangeMap[bool] = RangeMap()
        self._actor: ModelVm | None = None

    @contextlib.contextmanager
    def acting(self, vm: ModelVm) -> Iterator[None]:
        """RMP changes inside the block are reported to *vm*'s observers."""
        previous, self._actor = self._actor, vm
        try:
            yield
        finally:
            self._actor = previous

    def _changed(self, pfn: int, npages: int, old: RmpEntry | None, new: RmpEntry | None) -> None:
        if self._actor is not None:
            self._actor.ownership_update("rmp", pfn, npages, old, new)

    def split_direct_map(self, pfn: int, npages: int) -> int:
        """``adjust_direct_map`` for 4 KiB private pages: returns the 2 MiB blocks newly split."""
        first = pfn // PTRS_PER_PMD
        last = (pfn + npages - 1) // PTRS_PER_PMD + 1
        new = sum(e - s for s, e in self.direct_map_split.gaps(first, last))
        self.direct_map_split.set(first, last, True)
        return new


_hosts: weakref.WeakKeyDictionary[Any, SnpHost] = weakref.WeakKeyDictionary()


def snp_host(host: Any) -> SnpHost:
    """The SEV state of simulated host memory *host* (created on first use)."""
    state = _hosts.get(host)
    if state is None:
        state = _hosts[host] = SnpHost()
    return state
