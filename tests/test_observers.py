"""Observers: the invariant checker (it must catch what it names) and JSON traces."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest

import guestmem
from guestmem import uapi
from guestmem.invariants import InvariantChecker, InvariantViolation, check_vm
from guestmem.model.mmu import Spte
from guestmem.serialize import event_from_json, event_to_json, write_trace

PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
MiB = 1 << 20


@pytest.fixture
def checker() -> Iterator[InvariantChecker]:
    c = InvariantChecker()
    registry = guestmem.get_registry()
    registry.add_plugin(c, distribution="test-invariants")
    try:
        yield c
    finally:
        registry.remove_plugin(c)


def _private_guest(kvm: Any) -> tuple[Any, Any, Any]:
    vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    gmem = vm.create_guest_memfd(MiB)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, MiB, 0, gmem, 0)
    vm.set_memory_attributes(0, MiB, PRIVATE)
    return vm, gmem, vm.create_vcpu(0)


def test_checker_follows_a_lifecycle(kvm: Any, checker: InvariantChecker) -> None:
    vm, gmem, vcpu = _private_guest(kvm)
    vcpu.access(0x1000, data=b"x")
    gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0, MiB)
    vm.set_memory_attributes(0, MiB, 0)
    assert checker.checked >= 4


def test_leaf_backed_catches_a_stale_mapping(kvm: Any) -> None:
    vm, _, vcpu = _private_guest(kvm)
    vcpu.access(0x1000, data=b"x")
    pfn = vm.gmem_pfn(1)
    # Free the folio behind the kernel's back: the leaf now maps a freed page.
    vm.host.free(pfn, 1)
    with pytest.raises(InvariantViolation, match="leaf-backed"):
        check_vm(vm)


def test_leaf_privateness_catches_a_leaf_of_the_wrong_kind(kvm: Any) -> None:
    vm, _, vcpu = _private_guest(kvm)
    vcpu.access(0x1000, data=b"x")
    vm.attributes.set(1, 2, None)  # attribute flipped without the zap of A-10
    with pytest.raises(InvariantViolation, match="leaf-privateness"):
        check_vm(vm)


def test_gmem_leaf_catches_a_foreign_pfn(kvm: Any) -> None:
    vm, _, vcpu = _private_guest(kvm)
    vcpu.access(0x1000, data=b"x")
    other = vm.host.alloc(1)
    vm.mmu.sptes.set(1, 2, Spte(other - 1, True, True))
    with pytest.raises(InvariantViolation, match="gmem-leaf"):
        check_vm(vm)


def test_gmem_leaf_looks_inside_a_leaf_run(kvm: Any) -> None:
    """A leaf run whose ends agree with guest_memfd but whose middle maps a page gmem no
    longer holds (allocated again for something else, so ``leaf-backed`` is satisfied) is a
    ``gmem-leaf`` violation: the check walks the folio runs under the leaf, not its ends."""
    vm, _, vcpu = _private_guest(kvm)
    vcpu.access(0, 1)
    first = vm.gmem_pfn(0)
    assert vm.host.alloc(1) == first + 1  # somebody else's page
    vcpu.access(2 * 4096, 1)
    vcpu.access(4096, 1)
    assert (vm.gmem_pfn(2), vm.gmem_pfn(1)) == (first + 2, first + 3)
    vm.mmu.sptes.set(0, 3, Spte(first, True, True))  # one run [0, 3) -> [first, first + 3)
    with pytest.raises(InvariantViolation, match=r"gmem-leaf.*gfn 0x1 "):
        check_vm(vm)


def test_mmu_balanced_catches_an_open_invalidation(kvm: Any) -> None:
    vm, _, _ = _private_guest(kvm)
    vm.mmu.invalidate_begin()
    with pytest.raises(InvariantViolation, match="mmu-balanced"):
        check_vm(vm, "punch_hole")


def test_trace_round_trip() -> None:
    with guestmem.open("sw", record=True) as kvm:
        _, _, vcpu = _private_guest(kvm)
        vcpu.access(0x2000, data=b"y")
        events = list(kvm.events or [])
    kinds = [e.kind for e in events if e.kind not in ("uapi", "mmu_invalidate")]
    assert kinds[:4] == ["vm_create", "gmem_create", "memslot_create", "set_memory_attributes"]
    calls = [e.fields["call"] for e in events if e.kind == "uapi"]
    assert calls[:3] == ["Kvm.create_vm", "Vm.create_guest_memfd", "Vm.set_user_memory_region2"]
    assert "fault" in kinds
    out = io.StringIO()
    assert write_trace(events, out) == len(events)
    back = [event_from_json(line) for line in out.getvalue().splitlines()]
    assert back == events
    assert event_to_json(back[0]) == event_to_json(events[0])


def test_madv_remove_drops_shared_contents_but_dontneed_keeps_them(kvm: Any) -> None:
    """MADV_REMOVE vs MADV_DONTNEED on shared anonymous memory, as seen by host and guest."""
    vm = kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    shared = kvm.mmap_anonymous(MiB)
    vm.set_user_memory_region(0, 0, 0, MiB, shared.address)
    vcpu = vm.create_vcpu(0)
    shared.write(0x1000, b"keep")
    shared.write(0x2000, b"drop")
    assert vcpu.access(0x2000, 4) == b"drop"
    shared.madvise(uapi.MADV_DONTNEED, 0x1000, 0x1000)
    shared.madvise(uapi.MADV_REMOVE, 0x2000, 0x1000)
    assert shared.read(0x1000, 4) == b"keep"
    assert shared.read(0x2000, 4) == bytes(4)
    assert not vm.is_mapped(2)  # the mmu notifier zapped the guest's leaf
    assert vcpu.access(0x2000, 4) == bytes(4)
