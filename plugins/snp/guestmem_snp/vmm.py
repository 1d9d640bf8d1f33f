"""What a VMM does with SNP page-state changes: QEMU's ``kvm_convert_memory()``.

A ready-made handler for ``KVM_HC_MAP_GPA_RANGE`` exits, for tests and examples: set the
attribute, then discard the old side (destructive conversion, backends.md 0.2 / 2.3):
to-shared punches the range out of guest_memfd (the private folios are freed and the RMP
reclaimed), to-private drops the shared copy from the anonymous mapping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from guestmem import uapi
from guestmem.errors import HypercallExit
from guestmem_snp.ghcb import KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED

PAGE_SHIFT = uapi.PAGE_SHIFT


@attrs.define
class RamRegion:
    """One guest RAM region: gpa range, its guest_memfd (at *gmem_offset*) and shared mapping."""

    gpa: int
    size: int
    gmem: Any
    gmem_offset: int = 0
    shared: Any = None  # a HostMapping for userspace_addr, or None


@attrs.define
class ConvertingVmm:
    """Handles ``KVM_HC_MAP_GPA_RANGE`` exits of one VM the way QEMU does."""

    vm: Any
    regions: list[RamRegion]
    discard: bool = True
    exits: int = 0

    def handle(self, exit_: Any) -> int:
        """Handle one exit; returns ``run->hypercall.ret`` (0 = done)."""
        if exit_.nr != KVM_HC_MAP_GPA_RANGE:
            return 1
        gpa, npages, attrs_ = exit_.args[:3]
        size = npages << PAGE_SHIFT
        to_private = bool(attrs_ & KVM_MAP_GPA_RANGE_ENCRYPTED)
        self.exits += 1
        self.vm.set_memory_attributes(gpa, size, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if to_private else 0)
        if not self.discard:
            return 0
        for region in self.regions:
            lo, hi = max(gpa, region.gpa), min(gpa + size, region.gpa + region.size)
            if lo >= hi:
                continue
            if to_private:
                if region.shared is not None:
                    region.shared.madvise(uapi.MADV_REMOVE, lo - region.gpa, hi - lo)
            else:
                region.gmem.fallocate(
                    uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE,
                    region.gmem_offset + lo - region.gpa,
                    hi - lo,
                )
        return 0

    def run(self, guest_op: Callable[[], int], guest: Any) -> int:
        """Run *guest_op*; handle each exit and re-enter until the guest gets its answer."""
        try:
            return guest_op()
        except HypercallExit as exc:
            pending = exc
        while True:
            try:
                return int(guest.resume(self.handle(pending)))
            except HypercallExit as exc:
                pending = exc
