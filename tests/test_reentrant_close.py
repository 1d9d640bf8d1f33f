"""A close from inside a hook takes effect when the operation under way ends (L-3, L-9).

A system call holds the files it works on (``fdget`` ... ``fdput``), and the last ``fput``
of a file defers its release (``__fput``) to ``task_work``, run on the way back to
userspace or, inside ``KVM_RUN``, before the guest is entered again.  An observer that
closes a guest_memfd, a VM or a vCPU from a hook therefore never leaves an invalidation
open, never makes an operation fail with an internal error and never lets a fault finish
on a destroyed VM: the close is done, the release follows the operation.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from gmem_helpers import plugin
from gmem_support import PAGE, PRIVATE, PUNCH, bind, raises_kvm

import guestmem
from guestmem import MemoryFault, uapi
from guestmem.invariants import InvariantChecker

SW_PROTECTED = uapi.KVM_X86_SW_PROTECTED_VM


class _Closer:
    """Observer base: on the first call of its hook, runs ``action`` (a close)."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action: Callable[[], None] | None = action
        self.calls = 0

    def fire(self) -> None:
        self.calls += 1
        if self.action is not None:
            action, self.action = self.action, None
            action()


def _close_once(hook: str, action: Callable[[], None]) -> _Closer:
    """An observer whose ``guestmem_<hook>`` runs *action* the first time it is called."""

    def impl(self: _Closer) -> None:
        self.fire()

    cls = type(f"CloseOn_{hook}", (_Closer,), {f"guestmem_{hook}": guestmem.hookimpl(impl)})
    closer: _Closer = cls(action)
    return closer


def _two_files(kvm: Any) -> tuple[Any, Any, Any, Any]:
    """A SW_PROTECTED VM with two private guest_memfd slots (gpa 0 and 1 MiB) and a vCPU."""
    vm = kvm.create_vm(SW_PROTECTED)
    a = vm.create_guest_memfd(16 * PAGE)
    b = vm.create_guest_memfd(16 * PAGE)
    bind(vm, a, 0, 16 * PAGE, slot=0)
    bind(vm, b, 1 << 20, 16 * PAGE, slot=1)
    vm.set_memory_attributes(0, 2 << 20, PRIVATE)
    return vm, a, b, vm.create_vcpu(0)


@pytest.fixture
def checker() -> Iterator[object]:
    """The core's invariant checker, watching every operation of the test."""
    with plugin(InvariantChecker(), "test-invariants") as c:
        yield c


def test_closing_a_guest_memfd_inside_its_own_punch_hole_leaves_no_invalidation_open(
    kvm: Any, checker: object
) -> None:
    """``kvm_gmem_punch_hole`` holds the file (``fdget``): a close from
    ``guestmem_gmem_invalidate`` (a folio freed by the punch) only drops the descriptor;
    ``kvm_gmem_release`` runs when fallocate returns.  Both invalidations end, the other
    file's faults go on, and the closed file's slot exits with L-4."""
    vm, a, b, vcpu = _two_files(kvm)
    vcpu.access(0, data=b"a")
    vcpu.access(1 << 20, data=b"b")
    spy = _close_once("gmem_invalidate", a.close)
    with plugin(spy):
        a.fallocate(PUNCH, 0, 16 * PAGE)
    assert spy.calls == 1 and a.closed
    assert vm.mmu.invalidate_in_progress == 0
    assert vcpu.access(1 << 20, 1) == b"b"  # no EAGAIN (3.3): nothing is left in progress
    with pytest.raises(MemoryFault) as info:
        vcpu.access(0, 1)
    assert (info.value.errno, info.value.rule) == (errno.EFAULT, "L-4")
    vm.close()
    b.close()
    assert vm.destroyed


def test_closing_the_vm_during_a_memslot_delete_destroys_it_afterwards(kvm: Any, checker: object) -> None:
    """The delete's zap (``kvm_unmap_gfn_range``) runs a hook that closes the VM fd: the
    ioctl holds the VM file, so the delete completes and the VM is destroyed when it
    returns (no ``KeyError`` from a memslot freed under it)."""
    vm = kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    shared = kvm.mmap_anonymous(16 * PAGE)
    vm.set_user_memory_region(0, 0, 0, 16 * PAGE, shared.address)
    vcpu = vm.create_vcpu(0)
    vcpu.access(0, data=b"x")
    spy = _close_once("unmap_gfn_range", vm.close)
    with plugin(spy):
        vm.set_user_memory_region(0, 0, 0, 0, shared.address)
    assert spy.calls >= 1 and vm.closed and vcpu.closed and vm.destroyed
    assert not vm.memslots and vm.mmu.mapped_pages() == 0
    with raises_kvm(errno.EBADF):
        vm.create_vcpu(1)
    shared.close()


def test_closing_the_vm_from_a_fault_hook_lets_the_access_finish_on_a_live_vm(
    kvm: Any, checker: object
) -> None:
    """``KVM_RUN`` holds its vCPU file, which holds the VM: a fault hook that closes the VM
    (and so, in the model, its vCPUs) lets the access complete on a live VM; the VM is
    destroyed, its leaves zapped, once the access returned (not a leaf installed in a
    destroyed VM)."""
    vm = kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    shared = kvm.mmap_anonymous(16 * PAGE)
    vm.set_user_memory_region(0, 0, 0, 16 * PAGE, shared.address)
    vcpu = vm.create_vcpu(0)
    seen: list[bool] = []

    def close_vm() -> None:
        vm.close()
        seen.append(vm.destroyed)

    spy = _close_once("fault", close_vm)
    with plugin(spy):
        vcpu.access(0x2000, data=b"stored")
    assert seen == [False]  # the fault went on with the VM alive
    assert vm.closed and vcpu.closed and vm.destroyed
    assert vm.mmu.mapped_pages() == 0 and vm.mmu.invalidate_in_progress == 0
    assert shared.read(0x2000, 6) == b"stored"
    with raises_kvm(errno.EBADF):
        vcpu.access(0x2000, 1)
    shared.close()


def test_closing_the_running_vcpu_from_a_fault_hook_finishes_the_access(kvm: Any, checker: object) -> None:
    """A vCPU closed while its own ``KVM_RUN`` faults: the descriptor goes, the access
    completes, the next one is EBADF."""
    vm = kvm.create_vm(SW_PROTECTED)
    gmem = vm.create_guest_memfd(16 * PAGE)
    bind(vm, gmem, 0, 16 * PAGE)
    vm.set_memory_attributes(0, 16 * PAGE, PRIVATE)
    vcpu = vm.create_vcpu(0)
    spy = _close_once("fault", vcpu.close)
    with plugin(spy):
        vcpu.access(0, data=b"kept")
    assert vcpu.closed and not vm.destroyed
    with raises_kvm(errno.EBADF):
        vcpu.access(0, 4)
    second = vm.create_vcpu(1)
    assert second.access(0, 4) == b"kept"
    vm.close()
    gmem.close()
    assert vm.destroyed


def test_a_vm_closed_inside_an_operation_refuses_further_ioctls_in_it(kvm: Any, checker: object) -> None:
    """The fd is gone as soon as ``close()`` returns: an ioctl a hook makes on it next, in
    the same operation, is EBADF, while the operation itself goes on."""
    vm = kvm.create_vm(SW_PROTECTED)
    gmem = vm.create_guest_memfd(16 * PAGE)
    bind(vm, gmem, 0, 16 * PAGE)
    errors: list[int | None] = []

    def close_then_ioctl() -> None:
        vm.close()
        try:
            vm.set_memory_attributes(0, PAGE, 0)
        except guestmem.KvmError as exc:
            errors.append(exc.errno)

    spy = _close_once("pre_set_memory_attributes", close_then_ioctl)
    with plugin(spy):
        vm.set_memory_attributes(0, 16 * PAGE, PRIVATE)
    assert errors == [errno.EBADF]
    assert vm.is_private(15) and vm.mmu.invalidate_in_progress == 0
    gmem.close()
    assert vm.destroyed


def test_a_mapping_closed_inside_a_host_access_keeps_its_file_until_the_access_ends(
    kvm: Any, checker: object
) -> None:
    """munmap during a host store through a guest_memfd mapping: the file reference the
    mapping held is put when the store returns, so the store's page stays valid."""
    vm = kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    gmem = vm.create_guest_memfd(4 * PAGE, uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED)
    mapping = gmem.mmap(4 * PAGE)
    vm.close()
    gmem.close()  # the mapping alone keeps the file, and the file the VM (L-6, L-1)
    assert not vm.destroyed
    spy = _close_once("trace", mapping.close)
    with plugin(spy):
        mapping.write(0, b"x")
    assert mapping.closed and vm.destroyed


# --- every close from every hook during every operation ----------------------------------------
_HOOKS = (
    "unmap_gfn_range",
    "gmem_invalidate",
    "trace",
    "pre_set_memory_attributes",
    "post_set_memory_attributes",
    "gmem_unbind",
    "gmem_bind",
    "prepare_memory_region",
    "fault",
    "gmem_prepare",
    "host_access",
    "guest_access",
    "vcpu_pre_run",
)
_TARGETS = ("gmem", "vm", "vcpu", "map", "all")


def _operation(op: str, vm: Any, a: Any, vcpu: Any, mapping: Any) -> None:
    match op:
        case "punch":
            a.fallocate(PUNCH, 0, 16 * PAGE)
        case "memory_failure":
            a.inject_memory_failure(0)
        case "attributes":
            vm.set_memory_attributes(0, 2 << 20, 0)
        case "delete":
            vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, 0, 0, a, 0)
        case "discard":
            mapping.madvise(uapi.MADV_REMOVE, 0, 16 * PAGE)
        case "munmap":
            mapping.close()
        case "access":
            vcpu.access(2 * PAGE, data=b"x")
        case "host_store":
            vm.set_memory_attributes(0, 16 * PAGE, 0)
            mapping.write(3 * PAGE, b"h")
        case "pre_fault":
            vcpu.pre_fault_memory(4 * PAGE, 4 * PAGE)
        case "bind":
            with vm.create_guest_memfd(4 * PAGE) as c:
                vm.set_user_memory_region2(5, uapi.KVM_MEM_GUEST_MEMFD, 4 << 20, 4 * PAGE, 0, c, 0)


def _close_during(kvm: Any, op: str, target: str, hook: str) -> list[str]:
    """Run *op* while the first call of *hook* closes *target*; what went wrong."""
    vm = kvm.create_vm(SW_PROTECTED)
    a = vm.create_guest_memfd(16 * PAGE, uapi.GUEST_MEMFD_FLAG_MMAP)
    b = vm.create_guest_memfd(16 * PAGE)
    bind(vm, a, 0, 16 * PAGE, slot=0)
    bind(vm, b, 1 << 20, 16 * PAGE, slot=1)
    vm.set_memory_attributes(0, 2 << 20, PRIVATE)
    vcpu = vm.create_vcpu(0)
    vcpu.access(0, data=b"a")
    vcpu.access(1 << 20, data=b"b")
    mapping = a.mmap(16 * PAGE)
    objects = {"gmem": [a], "vm": [vm], "vcpu": [vcpu], "map": [mapping], "all": [vcpu, vm, mapping, a, b]}

    def close() -> None:
        for obj in objects[target]:
            obj.close()

    # the kernel's answer to an operation on what the hook closed is an errno or an exit
    with plugin(_close_once(hook, close)), contextlib.suppress(guestmem.KvmError, guestmem.GuestExit):
        _operation(op, vm, a, vcpu, mapping)
    problems = []
    if vm.mmu.invalidate_in_progress:
        problems.append("an invalidation is left in progress")
    for obj in (vcpu, vm, mapping, a, b):
        obj.close()
    if not vm.destroyed or kvm.vms:
        problems.append("the VM outlived its last reference")
    if kvm.host.allocated_pages:
        problems.append(f"{kvm.host.allocated_pages} host pages leaked")
    return problems


@pytest.mark.parametrize(
    "op",
    [
        "punch",
        "memory_failure",
        "attributes",
        "delete",
        "discard",
        "munmap",
        "access",
        "host_store",
        "pre_fault",
        "bind",
    ],
)
def test_a_close_from_any_hook_during_an_operation_leaves_a_consistent_model(
    kvm: Any, checker: object, op: str
) -> None:
    """Every hook the core calls, closing the guest_memfd, the VM, the vCPU, the host
    mapping or all of them in the middle of *op*: the operation ends with the kernel's
    answer (no internal KeyError or AssertionError), every invalidation is ended, the
    invariant checker is content, and once everything is closed the VM is destroyed and
    no host page is left."""
    failures = {
        (target, hook): problems
        for target in _TARGETS
        for hook in _HOOKS
        if (problems := _close_during(kvm, op, target, hook))
    }
    assert failures == {}


class _Reenter:
    """An observer that, inside the first ``guestmem_unmap_gfn_range`` it sees, calls
    *action* and keeps the errno it got."""

    def __init__(self, action: Callable[[], Any]) -> None:
        self.action = action
        self.errnos: list[int | None] = []

    @guestmem.hookimpl
    def guestmem_unmap_gfn_range(self, vm: Any, range: Any) -> None:  # noqa: A002
        if self.errnos:
            return
        try:
            self.action()
            self.errnos.append(None)
        except guestmem.KvmError as exc:
            self.errnos.append(exc.errno)


@pytest.mark.parametrize("inner", ["delete_slot", "set_memory_attributes"])
def test_3_7_a_slots_lock_ioctl_inside_a_memslot_delete_is_edeadlk(kvm: Any, inner: str) -> None:
    """3.7: the delete's zap runs a hook that calls a uAPI needing kvm->slots_lock, which the
    delete holds: EDEADLK for the inner call (the kernel would deadlock), the delete
    completes, the model stays consistent (no internal KeyError)."""
    vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    gmem = vm.create_guest_memfd(16 * PAGE)
    bind(vm, gmem, 0, 16 * PAGE)
    vm.set_memory_attributes(0, 16 * PAGE, PRIVATE)
    vm.create_vcpu(0).access(0, data=b"x")
    actions = {
        "delete_slot": lambda: vm.set_user_memory_region2(0, 0, 0, 0, 0),
        "set_memory_attributes": lambda: vm.set_memory_attributes(0, PAGE, 0),
    }
    observer = _Reenter(actions[inner])
    with plugin(observer):
        vm.set_user_memory_region2(0, 0, 0, 0, 0)
    assert observer.errnos == [errno.EDEADLK]
    assert vm.slots.by_id == {} and vm.mmu.mapped_pages() == 0
    assert vm.attributes.get(0) == PRIVATE  # the refused inner call changed nothing
    gmem.close()
    vm.close()
