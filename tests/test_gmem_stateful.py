"""The core's stateful machine (:mod:`guestmem.conformance.machine`) on the built-in ``sw``
backend, both VM types, with a larger budget than the kit's and the model's own accounting
cross-checked as well (spec FA-4..FA-8, M-3, M-5, M-7, M-10, L-7, E-1, E-2, G-2).

On a DEFAULT VM the machine drives one MMAP|INIT_SHARED guest_memfd bound as a gmem-only
memslot (allocate, punch, host and guest accesses, poison, rebind); on a SW_PROTECTED VM
private and shared guest accesses, destructive conversions, punches, host accesses and
private/shared mismatches.  Every step is checked against the machine's reference and the
public views; here also against the inode's page accounting, which only the core sees.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis.stateful import invariant

import guestmem
from guestmem import uapi
from guestmem.conformance.machine import GmemMachine, machine_for


class _Accounting(GmemMachine):
    @invariant()
    def inode_accounting(self) -> None:
        """The inode's page count is the number of pages holding a folio."""
        if self.ram.gmem.closed:
            return
        inode = self.ram.gmem.file.inode
        assert inode.allocated_pages() == sum(1 for i in range(inode.npages) if inode.pfn(i) is not None)


def _machine(vm_type: int) -> type[GmemMachine]:
    info = guestmem.backends()["sw"].vm_type(vm_type)
    base = machine_for("sw", info)
    machine = type(base.__name__, (base, _Accounting), {})
    machine.TestCase.settings = settings(
        max_examples=50, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
    )
    return machine


TestDefaultVmMachine = _machine(uapi.KVM_X86_DEFAULT_VM).TestCase
TestSwProtectedVmMachine = _machine(uapi.KVM_X86_SW_PROTECTED_VM).TestCase
