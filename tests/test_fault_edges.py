"""Guest-fault rules that need a hook to be reached in one thread (G-8) and the exit contract (G-13).

Rules of spec 2.I/2.J/2.G that the model cannot reach, and why:
- A-9 (``xa_reserve`` ENOMEM) and C-10: the model does not run out of memory.
- B-9 (unbind while the file is dying): the model's file release is atomic; there is no
  moment where the refcount is zero and release has not run.
- G-9 (private fault needing emulation) and G-10 (reserved-bit MMIO fault marked
  private): the model installs no MMIO SPTEs and emulates no instructions; private
  accesses without a memslot are G-4 (tested in test_faults.py).
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

import guestmem
from guestmem import uapi

MiB = 1 << 20


class _FaultDuringFlush:
    """Observer: while a memslot's leaves are zapped, a vCPU touches the slot."""

    def __init__(self) -> None:
        self.vcpu: Any = None
        self.seen: list[BaseException] = []

    @guestmem.hookimpl
    def guestmem_unmap_gfn_range(self, vm: Any, range: Any) -> None:  # noqa: A002
        if self.vcpu is None or range.slot is None or not range.slot.flags & uapi.KVM_MEMSLOT_INVALID:
            return
        vcpu, self.vcpu = self.vcpu, None
        for call in (
            lambda: vcpu.access(range.start << 12, 1),
            lambda: vcpu.pre_fault_memory(range.start << 12, 4096),
        ):
            try:
                call()
            except OSError as exc:
                self.seen.append(exc)


@pytest.mark.parametrize("move", [False, True])
def test_G8_fault_on_a_slot_being_deleted_or_moved_retries(kvm: Any, move: bool) -> None:
    """G-8: KVM_MEMSLOT_INVALID makes a fault retry and a pre-fault fail with EAGAIN."""
    observer = _FaultDuringFlush()
    registry = guestmem.get_registry()
    registry.add_plugin(observer, distribution="test-g8")
    try:
        vm = kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        shared = kvm.mmap_anonymous(MiB)
        vm.set_user_memory_region(0, 0, 0x100000, MiB, shared.address)
        vcpu = vm.create_vcpu(0)
        vcpu.access(0x100000, data=b"x")
        observer.vcpu = vcpu
        vm.set_user_memory_region(0, 0, 0x400000 if move else 0x100000, MiB if move else 0, shared.address)
        access_error, prefault_error = observer.seen
        assert access_error.errno == errno.EAGAIN and "3.3" in str(access_error)  # kept retrying
        assert prefault_error.errno == errno.EAGAIN and "[G-8]" in str(prefault_error)
        assert vm.mmu.invalidate_in_progress == 0
        if move:
            assert not vm.memslots[(0, 0)].flags & uapi.KVM_MEMSLOT_INVALID
            assert vcpu.access(0x400000, 1) == b"x"
        vm.close()
    finally:
        registry.remove_plugin(observer)


def test_G13_memory_fault_exits_carry_reason_39_and_only_efault_or_ehwpoison(protected_vm: Any) -> None:
    """G-13: a MemoryFault is exit_reason 39 with errno EFAULT or EHWPOISON; other failures are not."""
    gmem = protected_vm.create_guest_memfd(MiB)
    protected_vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, MiB, 0, gmem, 0)
    protected_vm.set_memory_attributes(0, MiB, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vcpu = protected_vm.create_vcpu(0)
    vcpu.access(0x3000, data=b"x")
    gmem.inject_memory_failure(0x3000)
    exits = []
    for gpa, private in ((0x1000, False), (0x3000, True), (2 * MiB, True)):
        with pytest.raises(guestmem.MemoryFault) as info:
            vcpu.access(gpa, 1, private=private)
        exits.append(info.value)
    assert [e.exit_reason for e in exits] == [uapi.KVM_EXIT_MEMORY_FAULT] * 3
    assert [e.errno for e in exits] == [errno.EFAULT, guestmem.errors.EHWPOISON, errno.EFAULT]
    # A shared fault on the hva path without a host page fails with EFAULT but is no exit (G-7).
    protected_vm.set_memory_attributes(0x5000, 4096, 0)
    with pytest.raises(guestmem.KvmError) as plain:
        vcpu.access(0x5000, 1)
    assert plain.value.errno == errno.EFAULT and not isinstance(plain.value, guestmem.MemoryFault)


@pytest.mark.parametrize(("nr", "expected"), [(1, 0), (5, 0), (11, 0), (12, -1000), (9, -1000), (77, -1000)])
def test_sw_hypercalls_as_kvm_emulate_hypercall(protected_vm: Any, nr: int, expected: int) -> None:
    """x86 ``__kvm_emulate_hypercall``: VAPIC_POLL_IRQ, KICK_CPU, SCHED_YIELD succeed, others -KVM_ENOSYS."""
    assert protected_vm.create_vcpu(0).hypercall(nr, 0, 0) == expected
