"""Nothing half-applied: every rejected memslot, attribute or create call leaves the state as it was.

The state compared is the host's snapshot (``kvm.snapshot()``: memslots, attributes,
stage-2 leaves, VM references, every guest_memfd's files, bindings and pages with their
bytes, host mappings, the fd table, allocated host memory, the backend's tables), with
the MMU counters no snapshot shows (:func:`gmem_helpers.vm_state`).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest
from gmem_helpers import (
    GMEM,
    LOG_DIRTY,
    MMAP,
    PAGE,
    PRIVATE,
    READONLY,
    MiB,
    anon_slot,
    throwaway_backend,
    vm_state,
    x86_type,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import guestmem
from guestmem import KvmError, uapi


@pytest.fixture
def busy(kvm: Any) -> Iterator[tuple[Any, Any, Any]]:
    """(vm, gmem, other_vm_gmem): a SW_PROTECTED VM with a bound gmem slot (half private, some
    pages faulted in), a plain slot with mapped shared pages, and a gmem of another VM."""
    vm, gmem, other = _busy_vm(kvm)
    yield vm, gmem, other
    vm.close()


def _region_calls(gmem: Any, other: Any) -> list[tuple[str, tuple[Any, ...]]]:
    """(rule, set_user_memory_region2 args) that the busy VM must reject."""
    closed_fd = 0xFFFFFFFF
    return [
        ("S-3", ((1 << 32) + uapi.KVM_USER_MEM_SLOTS, 0, 16 * MiB, PAGE, 0)),  # a __u32 slot
        ("S-3", (uapi.KVM_USER_MEM_SLOTS, 0, 16 * MiB, PAGE, 0)),
        ("S-4", (2, GMEM | LOG_DIRTY, 16 * MiB, PAGE, 0, gmem, 2 * MiB)),
        ("S-4", (2, GMEM | READONLY, 16 * MiB, PAGE, 0, gmem, 2 * MiB)),
        ("S-4", (0, 1 << 9, 0, 0, 0)),  # delete with a bad flag
        ("S-5", (2, 0, 16 * MiB, PAGE + 1, 0)),
        ("S-5", (2, 0, 16 * MiB, PAGE, uapi.TASK_SIZE)),
        ("S-6", (2, GMEM, 16 * MiB, PAGE, 0, gmem, 3)),
        ("S-6", (0, GMEM, 0, 0, 0, gmem, 3)),  # delete with GMEM and a bad offset
        ("S-7", (1 << 16, 0, 16 * MiB, PAGE, 0)),
        ("S-7", (2, 0, uapi.U64_MAX - PAGE + 1, 2 * PAGE, 0)),
        ("S-7", (2, GMEM, (1 << 52) - PAGE, 2 * PAGE, 0, gmem, 2 * MiB)),  # after bind: rolled back
        ("S-8", (7, 0, 0, 0, 0)),
        ("S-11", (0, GMEM, 0, 2 * MiB, 0, gmem, 0)),
        ("S-11", (0, GMEM, 32 * MiB, 2 * MiB, 0, gmem, 0)),
        ("S-12", (0, 0, 0, 2 * MiB, 0)),
        ("S-12", (1, 0, 8 * MiB, 2 * MiB, 0)),
        ("S-14", (2, 0, MiB, PAGE, 0)),
        ("S-14", (2, GMEM, 8 * MiB, PAGE, 0, closed_fd, 0)),
        ("B-1", (2, GMEM, 16 * MiB, PAGE, 0, closed_fd, 0)),
        ("B-2", (2, GMEM, 16 * MiB, PAGE, 0, 1, 0)),
        ("B-3", (2, GMEM, 16 * MiB, PAGE, 0, other, 0)),
        ("B-4", (2, GMEM, 16 * MiB, MiB, 0, gmem, 4 * MiB - PAGE)),
        ("B-5", (2, GMEM, 16 * MiB, MiB, 0, gmem, MiB)),
    ]


def test_rejected_memslot_calls_change_nothing(busy: Any) -> None:
    """2.F/2.G: each rejected KVM_SET_USER_MEMORY_REGION2 (by the rule listed) changes nothing."""
    vm, gmem, other = busy
    for rule, args in _region_calls(gmem, other):
        before = vm_state(vm, gmem, other)
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region2(*args)
        assert info.value.rule == rule, (rule, info.value)
        assert vm_state(vm, gmem, other) == before, rule


def test_rejected_v1_call_changes_nothing(busy: Any) -> None:
    """S-2: a rejected KVM_SET_USER_MEMORY_REGION changes nothing."""
    vm, gmem, _ = busy
    before = vm_state(vm, gmem)
    with pytest.raises(KvmError):
        vm.set_user_memory_region(2, GMEM, 16 * MiB, PAGE, 0)
    assert vm_state(vm, gmem) == before


@pytest.mark.parametrize(
    ("rule", "args"),
    [
        ("A-5", (-PAGE, PAGE, PRIVATE, 0)),  # a __u64 address: -PAGE + PAGE wraps
        ("A-3", (0, MiB, 0, 1)),
        ("A-4", (0, MiB, 1, 0)),
        ("A-5", (0, 0, 0, 0)),
        ("A-5", (uapi.U64_MAX - PAGE + 1, 2 * PAGE, 0, 0)),
        ("A-6", (1, MiB, 0, 0)),
        ("A-6", (0, MiB + 1, 0, 0)),
    ],
)
def test_rejected_attribute_calls_change_nothing(busy: Any, rule: str, args: tuple[int, ...]) -> None:
    """2.I: a rejected KVM_SET_MEMORY_ATTRIBUTES changes no attribute, leaf or counter."""
    vm, gmem, _ = busy
    before = vm_state(vm, gmem)
    with pytest.raises(KvmError) as info:
        vm.set_memory_attributes(*args)
    assert info.value.rule == rule
    assert vm_state(vm, gmem) == before


@pytest.mark.parametrize(
    ("size", "flags", "rule"),
    [
        (MiB, uapi.GUEST_MEMFD_FLAG_INIT_SHARED, "C-3"),
        (MiB, 1 << 5, "C-3"),
        (0, 0, "C-4"),
        (PAGE + 1, MMAP, "C-4"),
    ],
)
def test_rejected_gmem_create_changes_nothing(busy: Any, size: int, flags: int, rule: str) -> None:
    """2.B: a rejected KVM_CREATE_GUEST_MEMFD takes no fd, no VM reference and no memory."""
    vm, gmem, _ = busy
    before = vm_state(vm, gmem)
    with pytest.raises(KvmError) as info:
        vm.create_guest_memfd(size, flags)
    assert info.value.rule == rule
    assert vm_state(vm, gmem) == before  # no fd, no reference, no memory (snapshot.allocated)


def test_rejected_vcpu_create_changes_nothing(busy: Any) -> None:
    """A rejected KVM_CREATE_VCPU (duplicate id, id out of range) takes no VM reference."""
    vm, gmem, _ = busy
    before = vm_state(vm, gmem)
    for vcpu_id in (0, -1, 1 << 20):
        with pytest.raises(KvmError):
            vm.create_vcpu(vcpu_id)
    assert vm_state(vm, gmem) == before
    assert set(vm.vcpus) == {0}


def test_rejected_vm_type_changes_nothing(kvm: Any) -> None:
    """CAP-6: KVM_CREATE_VM with an unsupported type takes no fd and leaves no VM."""
    before = kvm.snapshot()
    with pytest.raises(KvmError) as info:
        kvm.create_vm(64)  # no host has a VM type 64
    assert info.value.errno == errno.EINVAL
    assert kvm.snapshot() == before


class RefusingPolicy:
    """A policy whose kvm_arch_init_vm refuses the VM."""

    @guestmem.hookimpl
    def guestmem_vm_init(self, vm: Any) -> None:
        raise KvmError(errno.ENOSPC, "", "no ASID left")


def test_vm_init_refusal_leaves_nothing_behind() -> None:
    """guestmem_vm_init raising: KVM_CREATE_VM fails with that errno, and no fd or VM is left."""
    with throwaway_backend("t-refuse", x86_type(1), policy=RefusingPolicy()) as kvm:
        before = kvm.snapshot()
        with pytest.raises(KvmError) as info:
            kvm.create_vm(1)
        assert info.value.errno == errno.ENOSPC
        assert kvm.snapshot() == before


# --- property: any rejected region / attribute / pre-fault call -----------------------------------
_sizes = st.sampled_from([0, PAGE, PAGE + 1, MiB, 2 * MiB, 1 << 40])
_addrs = st.sampled_from(
    [0, 1, PAGE, MiB, 8 * MiB, 9 * MiB, uapi.TASK_SIZE, 1 << 52, uapi.U64_MAX - PAGE + 1]
)


@settings(max_examples=150, deadline=None)
@given(
    slot=st.sampled_from([0, 1, 2, 1 << 16, uapi.KVM_USER_MEM_SLOTS]),
    flags=st.sampled_from([0, GMEM, LOG_DIRTY, READONLY, GMEM | LOG_DIRTY, 1 << 3]),
    gpa=_addrs,
    size=_sizes,
    uaddr=_addrs,
    fd=st.sampled_from(["gmem", "other", "closed", "none"]),
    offset=st.sampled_from([0, 3, MiB, 4 * MiB - PAGE, 1 << 63]),
)
def test_any_rejected_region_call_changes_nothing(
    slot: int, flags: int, gpa: int, size: int, uaddr: int, fd: str, offset: int
) -> None:
    """2.F/2.G: whatever the arguments, a KVM_SET_USER_MEMORY_REGION2 that fails changed nothing."""
    with guestmem.open("sw") as kvm:
        vm, gmem, other = _busy_vm(kvm)
        fds: dict[str, Any] = {"gmem": gmem, "other": other, "closed": 0xFFFFFFFF, "none": None}
        before = vm_state(vm, gmem, other)
        try:
            vm.set_user_memory_region2(slot, flags, gpa, size, uaddr, fds[fd], offset)
        except KvmError:
            assert vm_state(vm, gmem, other) == before
        assert vm.mmu.invalidate_in_progress == 0


@settings(max_examples=100, deadline=None)
@given(
    address=_addrs, size=_sizes, attributes=st.sampled_from([0, PRIVATE, 1, PRIVATE | 1]), flags=st.just(0)
)
def test_any_rejected_attribute_call_changes_nothing(
    address: int, size: int, attributes: int, flags: int
) -> None:
    """2.I: a KVM_SET_MEMORY_ATTRIBUTES that fails changed nothing."""
    with guestmem.open("sw") as kvm:
        vm, gmem, _ = _busy_vm(kvm)
        before = vm_state(vm, gmem)
        try:
            vm.set_memory_attributes(address, size, attributes, flags)
        except KvmError:
            assert vm_state(vm, gmem) == before
        assert vm.mmu.invalidate_in_progress == 0


def _busy_vm(kvm: Any) -> tuple[Any, Any, Any]:
    vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    gmem = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, 2 * MiB, 0, gmem, 0)
    anon_slot(vm, MiB, slot=1, gpa=8 * MiB)
    vm.set_memory_attributes(0, MiB, PRIVATE)
    vcpu = vm.create_vcpu(0)
    vcpu.access(0, data=b"p")
    vcpu.access(8 * MiB, data=b"s")
    return vm, gmem, kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM).create_guest_memfd(MiB)
