"""What a VMM does with SNP page-state changes: QEMU's ``kvm_convert_memory()``.

A ready-made handler for ``KVM_HC_MAP_GPA_RANGE`` exits, for tests and examples, on top of
the core's :func:`guestmem.backend.convert_memory` (:mod:`guestmem.vmm`): set the
attribute, then discard the old side (destructive conversion, backends.md 0.2 / 2.3):
to-shared punches the range out of guest_memfd (the private folios are freed and the RMP
reclaimed), to-private discards the shared copy from the anonymous mapping with
``MADV_REMOVE`` (it reads back as zeroes; ``MADV_DONTNEED`` would keep shared anonymous
memory's contents).  Scenario files and ``guestmem.guestvm.GuestVm`` use the core's
:class:`guestmem.backend.QemuVmm` directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from guestmem import uapi
from guestmem.backend import RamRegion, convert_memory
from guestmem.errors import HypercallExit
from guestmem_snp.ghcb import KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED

__all__ = ["ConvertingVmm", "RamRegion"]

PAGE_SHIFT = uapi.PAGE_SHIFT


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
        self.exits += 1
        to_private = bool(attrs_ & KVM_MAP_GPA_RANGE_ENCRYPTED)
        convert_memory(
            self.vm, self.regions, gpa, npages << PAGE_SHIFT, to_private=to_private, discard=self.discard
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
