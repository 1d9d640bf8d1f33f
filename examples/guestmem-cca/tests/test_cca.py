"""The ``cca`` backend's own tests: a guest's lifecycle under the core's invariant
checker, then the leak check.  Add a test per state transition of your hardware here,
legal and illegal, citing the source function each follows."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import guestmem
from guestmem import uapi
from guestmem.conformance import OwnershipLedger, allocated, check_released
from guestmem.invariants import InvariantChecker
from guestmem_cca import CCA_VM

MiB = 1 << 20
GPA = 0x10000000
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE


@pytest.fixture
def observers() -> Iterator[tuple[InvariantChecker, OwnershipLedger]]:
    """The invariant checker and the ownership ledger, registered for one test."""
    registry = guestmem.get_registry()
    checker, ledger = InvariantChecker(), OwnershipLedger()
    registry.add_plugin(checker, name="cca-invariants")
    registry.add_plugin(ledger, name="cca-ledger")
    try:
        yield checker, ledger
    finally:
        registry.remove_plugin(ledger)
        registry.remove_plugin(checker)


def test_a_guest_lifecycle_keeps_the_invariants_and_leaks_nothing(
    observers: tuple[InvariantChecker, OwnershipLedger],
) -> None:
    checker, ledger = observers
    with guestmem.open("cca") as kvm:
        baseline = allocated(kvm)
        vm = kvm.create_vm(CCA_VM.type)
        gmem = vm.create_guest_memfd(MiB)
        shared = kvm.mmap_anonymous(MiB)
        vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, GPA, MiB, shared.address, gmem, 0)
        vm.set_memory_attributes(GPA, MiB, PRIVATE)
        vcpu = vm.create_vcpu(0)
        vcpu.access(GPA + 0x2000, data=b"secret", private=True)
        assert vcpu.access(GPA + 0x2000, 6, private=True) == b"secret"
        # Destructive conversion to shared: attribute, then the VMM punches the private copy.
        vm.set_memory_attributes(GPA + 0x2000, 0x1000, 0)
        gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0x2000, 0x1000)
        assert vcpu.access(GPA + 0x2000, 6, private=False) == bytes(6)
        vcpu.close()
        vm.close()
        shared.close()
        gmem.close()
        check_released(kvm, ledger, baseline)
    assert checker.checked > 0
