"""Every integer argument of the uAPI face is an integer, checked before anything changes.

Each parameter of each method, in turn, gets a float, a string, None, NaN and a float that
is a whole number: the call is a TypeError naming that parameter and the VM, its
guest_memfd and the host mapping are exactly as before (guestmem.cabi).  What a wider
integer becomes (the C type of each field) is checked against the real kernel in
plugins/linux/tests/test_arguments.py.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from gmem_helpers import throwaway_backend, vm_state
from gmem_support import GMEM_SLOT, MMAP, PAGE, PRIVATE, bind

import guestmem
from guestmem import cabi, uapi

SW_PROTECTED = uapi.KVM_X86_SW_PROTECTED_VM
BAD = [1.5, 4096.0, "4096", None, math.nan, b"\x00"]

#: (object, method, arguments by name): a call that succeeds (or fails with an errno) as is.
CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("kvm", "check_extension", {"cap": uapi.KVM_CAP_GUEST_MEMFD}),
    ("kvm", "create_vm", {"vm_type": SW_PROTECTED}),
    ("kvm", "mmap_anonymous", {"length": PAGE}),
    ("vm", "check_extension", {"cap": uapi.KVM_CAP_GUEST_MEMFD}),
    ("vm", "create_guest_memfd", {"size": PAGE, "flags": 0}),
    (
        "vm",
        "set_user_memory_region",
        {
            "slot": 1,
            "flags": 0,
            "guest_phys_addr": 1 << 30,
            "memory_size": PAGE,
            "userspace_addr": 0,
        },
    ),
    (
        "vm",
        "set_user_memory_region2",
        {
            "slot": 1,
            "flags": GMEM_SLOT,
            "guest_phys_addr": 1 << 30,
            "memory_size": PAGE,
            "userspace_addr": 0,
            "guest_memfd": None,
            "guest_memfd_offset": 0,
        },
    ),
    ("vm", "set_memory_attributes", {"address": 0, "size": 2 * PAGE, "attributes": 0, "flags": 0}),
    ("vm", "create_vcpu", {"vcpu_id": 1}),
    ("vm", "enable_cap", {"cap": uapi.KVM_CAP_EXIT_HYPERCALL, "flags": 0}),
    ("gmem", "fallocate", {"mode": uapi.FALLOC_FL_KEEP_SIZE, "offset": 0, "length": PAGE}),
    ("gmem", "read", {"n": 1}),
    ("gmem", "write", {"data": b"x"}),
    ("gmem", "truncate", {"size": PAGE}),
    ("gmem", "mmap", {"length": PAGE, "offset": 0}),
    ("gmem", "inject_memory_failure", {"offset": 0}),
    ("map", "read", {"offset": 0, "n": 1}),
    ("map", "write", {"offset": 0, "data": b"x"}),
    ("map", "madvise", {"advice": uapi.MADV_DONTNEED, "offset": 0, "length": PAGE}),
    ("map", "madvise", {"advice": uapi.MADV_REMOVE, "offset": 0, "length": PAGE}),
    ("vcpu", "access", {"gpa": 0, "length": 1}),
    ("vcpu", "access", {"gpa": 0, "data": b"x"}),
    ("vcpu", "pre_fault_memory", {"gpa": 0, "size": PAGE, "flags": 0}),
    ("vcpu", "hypercall", {"nr": uapi.KVM_HC_KICK_CPU}),
]
CASES = [
    pytest.param(obj, method, kwargs, name, id=f"{obj}.{method}:{name}")
    for obj, method, kwargs in CALLS
    for name in kwargs
    if name != "guest_memfd"
]


@pytest.fixture
def guest(kvm: Any) -> Any:
    vm = kvm.create_vm(SW_PROTECTED)
    gmem = vm.create_guest_memfd(8 * PAGE, MMAP)
    bind(vm, gmem, 0, 8 * PAGE)
    vm.set_memory_attributes(0, PAGE, PRIVATE)
    objects = {"kvm": kvm, "vm": vm, "gmem": gmem, "map": gmem.mmap(8 * PAGE), "vcpu": vm.create_vcpu(0)}
    objects["vcpu"].access(0, data=b"kept")
    yield objects
    vm.close()


def _state(objects: dict[str, Any]) -> Any:
    vm, gmem = objects["vm"], objects["gmem"]
    return vm_state(vm, gmem), vm.counters, list(vm.kvm.vms), vm.kvm.host.allocated_pages


@pytest.mark.parametrize(("obj", "method", "kwargs", "name"), CASES)
@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_a_non_integer_is_a_typeerror_naming_it_before_anything_changes(
    guest: dict[str, Any], obj: str, method: str, kwargs: dict[str, Any], name: str, bad: Any
) -> None:
    if bad is None and (method, name) in {("madvise", "length"), ("access", "data")}:
        pytest.skip("None is this parameter's default")
    if name == "data":
        if isinstance(bad, bytes):
            pytest.skip("bytes are data")
        expected = "data must be a bytes-like object"
    else:
        expected = f"{name} must be an integer"
    before = _state(guest)
    with pytest.raises(TypeError, match=expected):
        getattr(guest[obj], method)(**{**kwargs, name: bad})
    assert _state(guest) == before


@pytest.mark.parametrize("bad", ["3", 3.0, object(), [3]], ids=repr)
def test_guest_memfd_is_a_file_an_fd_number_or_none(guest: dict[str, Any], bad: Any) -> None:
    """``guest_memfd``: a file object, an fd number or None; anything else is a TypeError."""
    vm = guest["vm"]
    before = _state(guest)
    with pytest.raises(TypeError, match="guest_memfd must be a file object"):
        vm.set_user_memory_region2(1, GMEM_SLOT, 1 << 30, PAGE, 0, bad, 0)
    assert _state(guest) == before


def test_the_issues_reproducers_are_typeerrors(guest: dict[str, Any]) -> None:
    """The fuzzer's findings: ``create_guest_memfd(8192.0)`` made a file whose repr and
    binding failed later; ``create_vcpu(2.5)`` made a vCPU; ``set_memory_attributes(0,
    None, 8)`` failed from deep inside; NaN and floats passed ``0 <= x <= U64``."""
    vm = guest["vm"]
    for call, name in (
        (lambda: vm.create_guest_memfd(8192.0), "size"),
        (lambda: vm.create_vcpu(2.5), "vcpu_id"),
        (lambda: vm.set_memory_attributes(0, None, PRIVATE), "size"),
        (lambda: vm.set_memory_attributes(math.nan, PAGE, PRIVATE), "address"),
        (lambda: vm.set_user_memory_region2(0.0, 0, 0, PAGE, 0), "slot"),
    ):
        with pytest.raises(TypeError, match=f"^{name} must be an integer"):
            call()
    assert sorted(vm.vcpus) == [0]


class _CommandPolicy:
    """A backend whose ``KVM_MEMORY_ENCRYPT_OP`` command is ``(opcode, value)``: it reads
    ``value`` as a ``__u64`` (guestmem.cabi); opcode 2 is a bug of the backend."""

    @guestmem.hookimpl
    def guestmem_vm_ioctl(self, vm: Any, request: int, arg: Any) -> int | None:
        if request != uapi.KVM_MEMORY_ENCRYPT_OP:
            return None
        opcode, value = arg
        if opcode == 2:
            return int(value + "")  # a TypeError of the backend's own
        return cabi.u64(value, "value")


def test_a_backends_command_struct_with_a_non_integer_is_the_callers_typeerror() -> None:
    """A backend converting its command struct inside ``guestmem_vm_ioctl`` raises
    ``cabi.ArgumentTypeError``: it reaches the caller as the TypeError naming the field
    (the caller's mistake), while any other exception of the backend is a BackendError."""
    with throwaway_backend("t-command", policy=_CommandPolicy()) as kvm:
        vm = kvm.create_vm(1)
        assert vm.memory_encrypt_op((1, (1 << 64) + 5)) == 5
        with pytest.raises(guestmem.errors.ArgumentTypeError, match=r"^value must be an integer, not float"):
            vm.memory_encrypt_op((1, 5.0))
        with pytest.raises(guestmem.BackendError, match="t-command"):
            vm.memory_encrypt_op((2, 5))
        vm.close()
