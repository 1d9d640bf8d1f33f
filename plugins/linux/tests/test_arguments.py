"""The model and the real kernel take the same Python arguments the same way (guestmem.cabi).

Each case calls the uAPI face with an argument that is not a plain in-range integer: a
float, a string, None, NaN, a value wider than its C field, bytes-like data of another type,
a file argument that is no file.  The outcome (a TypeError naming the parameter, the
kernel's errno for the value the C field holds, or success) is checked on the model
everywhere and, where /dev/kvm is usable, on the running kernel too, which must agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from guestmem import KvmError, api, diff, uapi
from guestmem_linux.testing import kvm_unavailable, open_fds

PAGE = uapi.PAGE_SIZE
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
GMEM = uapi.KVM_MEM_GUEST_MEMFD
MODEL = diff.opener("sw", diff.host_profile())
KERNEL = diff.opener("linux")
Outcome = tuple[Any, ...]


class _Calls:
    """One case's /dev/kvm and every object the case made, closed when it ends."""

    def __init__(self, kvm: Any) -> None:
        self.kvm = kvm
        self.made: list[Any] = []

    def keep(self, obj: Any) -> Any:
        self.made.append(obj)
        return obj

    def vm(self) -> Any:
        return self.keep(self.kvm.create_vm(uapi.KVM_X86_DEFAULT_VM))

    def gmem(self, flags: int = SHARED) -> Any:
        return self.keep(self.vm().create_guest_memfd(4 * PAGE, flags))

    def vcpu(self) -> Any:
        return self.keep(self.vm().create_vcpu(0))

    def map(self, length: int = PAGE) -> Any:
        return self.keep(self.kvm.mmap_anonymous(length))

    def close(self) -> None:
        for obj in reversed(self.made):
            obj.close()


def _slot_twice(c: _Calls) -> None:
    vm = c.vm()
    host = c.map()
    vm.set_user_memory_region((1 << 32) + 1, 0, 0, PAGE, host.address)
    vm.set_user_memory_region(1, 0, 0, PAGE, host.address)  # the same slot: no change


def _write_read(mapping: Any) -> bytes:
    mapping.write(0, bytearray(b"ab"))
    mapping.write(2, memoryview(b"cd"))
    data: bytes = mapping.read(0, 4)
    return data


#: name -> (the call, made through a case's /dev/kvm, and the outcome both backends give)
CASES: dict[str, tuple[Callable[[_Calls], Any], Outcome]] = {
    "create_vm: a float type": (lambda c: c.keep(c.kvm.create_vm(0.0)), ("TypeError", "vm_type")),
    "create_vm: an unsigned long type of 2**64 is type 0": (
        lambda c: c.keep(c.kvm.create_vm(1 << 64)).vm_type,
        ("ok", 0),
    ),
    "create_vm: -1 is ULONG_MAX, no VM type": (lambda c: c.keep(c.kvm.create_vm(-1)), ("errno", 22)),
    "check_extension: a long cap of 2**64 + USER_MEMORY2": (
        lambda c: c.kvm.check_extension((1 << 64) + uapi.KVM_CAP_USER_MEMORY2),
        ("ok", 1),
    ),
    "check_extension: None": (lambda c: c.kvm.check_extension(None), ("TypeError", "cap")),
    "create_guest_memfd: a float size (8192.0)": (
        lambda c: c.keep(c.vm().create_guest_memfd(8192.0)),
        ("TypeError", "size"),
    ),
    "create_guest_memfd: NaN": (lambda c: c.keep(c.vm().create_guest_memfd(math.nan)), ("TypeError", "size")),
    "create_guest_memfd: a __u64 size of 2**64 + 8192 is 8192": (
        lambda c: c.keep(c.vm().create_guest_memfd((1 << 64) + 2 * PAGE)).fstat().st_size,
        ("ok", 2 * PAGE),
    ),
    "create_guest_memfd: -4096 is negative as the loff_t kvm_gmem_create reads (C-4)": (
        lambda c: c.keep(c.vm().create_guest_memfd(-PAGE)),
        ("errno", 22),
    ),
    "create_guest_memfd: __u64 flags of 2**64 + MMAP": (
        lambda c: c.keep(c.vm().create_guest_memfd(PAGE, (1 << 64) + MMAP)).closed,
        ("ok", False),
    ),
    "create_vcpu: 2.5": (lambda c: c.keep(c.vm().create_vcpu(2.5)), ("TypeError", "vcpu_id")),
    "create_vcpu: an unsigned long id of 2**64 + 1 is 1": (
        lambda c: c.keep(c.vm().create_vcpu((1 << 64) + 1)).closed,
        ("ok", False),
    ),
    "create_vcpu: -1 is beyond KVM_MAX_VCPU_IDS": (lambda c: c.keep(c.vm().create_vcpu(-1)), ("errno", 22)),
    "set_user_memory_region: a string userspace_addr": (
        lambda c: c.vm().set_user_memory_region(0, 0, 0, PAGE, "0"),
        ("TypeError", "userspace_addr"),
    ),
    "set_user_memory_region: a __u32 slot of 2**32 + 1 is slot 1, re-issued as slot 1": (
        _slot_twice,
        ("ok", None),
    ),
    "set_user_memory_region: gpa -PAGE + a page wraps": (
        lambda c: c.vm().set_user_memory_region(0, 0, -PAGE, PAGE, 0),
        ("errno", 22),
    ),
    "set_user_memory_region2: guest_memfd that is no file": (
        lambda c: c.vm().set_user_memory_region2(0, GMEM, 0, PAGE, 0, "3", 0),
        ("TypeError", "guest_memfd"),
    ),
    "set_user_memory_region2: a float guest_memfd": (
        lambda c: c.vm().set_user_memory_region2(0, GMEM, 0, PAGE, 0, 3.0, 0),
        ("TypeError", "guest_memfd"),
    ),
    "set_memory_attributes: None size": (
        lambda c: c.vm().set_memory_attributes(0, None, 0),
        ("TypeError", "size"),
    ),
    "enable_cap: a float cap": (lambda c: c.vm().enable_cap(1.5), ("TypeError", "cap")),
    "enable_cap: five args do not fit struct kvm_enable_cap": (
        lambda c: c.vm().enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 0, 0, 0, 0, 0),
        ("ValueError",),
    ),
    "enable_cap: __u32 flags of 2**32 are 0": (
        lambda c: c.vm().enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << 12, flags=1 << 32),
        ("ok", 0),
    ),
    "fallocate: a float offset": (lambda c: c.gmem().fallocate(3, 0.0, PAGE), ("TypeError", "offset")),
    "fallocate: an int mode of 2**32 + KEEP_SIZE is KEEP_SIZE": (
        lambda c: c.gmem().fallocate((1 << 32) + 1, 0, PAGE),
        ("ok", None),
    ),
    "fallocate: a loff_t offset of 2**64 - 1 is -1": (
        lambda c: c.gmem().fallocate(3, (1 << 64) - 1, PAGE),
        ("errno", 22),
    ),
    "read: a float count": (lambda c: c.gmem().read(1.0), ("TypeError", "n")),
    "write: a str": (lambda c: c.gmem().write("x"), ("TypeError", "data")),
    "write: a memoryview is bytes-like (F-1)": (lambda c: c.gmem().write(memoryview(b"x")), ("errno", 22)),
    "truncate: None": (lambda c: c.gmem().truncate(None), ("TypeError", "size")),
    "mmap: a float length": (lambda c: c.keep(c.gmem().mmap(4096.0)), ("TypeError", "length")),
    "mmap: an off_t offset of 2**64 is 0": (
        lambda c: c.keep(c.gmem().mmap(PAGE, 1 << 64)).length,
        ("ok", PAGE),
    ),
    "host read: a float offset": (lambda c: c.map().read(0.0, 1), ("TypeError", "offset")),
    "host write: a str": (lambda c: c.map().write(0, "x"), ("TypeError", "data")),
    "host write: bytearray and memoryview are bytes-like": (
        lambda c: _write_read(c.map()),
        ("ok", b"abcd".hex()),
    ),
    "host read: more than MAX_ACCESS": (
        lambda c: c.map(api.MAX_ACCESS + PAGE).read(0, api.MAX_ACCESS + 1),
        ("errno", 22),
    ),
    "vcpu access: a float gpa": (lambda c: c.vcpu().access(0.5, 1), ("TypeError", "gpa")),
    "vcpu access: a float length": (lambda c: c.vcpu().access(0, 1.0), ("TypeError", "length")),
    "vcpu access: str data": (lambda c: c.vcpu().access(0, data="x"), ("TypeError", "data")),
    "vcpu access: more than MAX_ACCESS": (lambda c: c.vcpu().access(0, api.MAX_ACCESS + 1), ("errno", 22)),
    "pre_fault_memory: a float gpa": (
        lambda c: c.vcpu().pre_fault_memory(0.0, PAGE),
        ("TypeError", "gpa"),
    ),
    "mmap_anonymous: None": (lambda c: c.map(None), ("TypeError", "length")),
}


def _outcome(open_kvm: Callable[[], Any], call: Callable[[_Calls], Any]) -> Outcome:
    with open_kvm() as kvm:
        calls = _Calls(kvm)
        try:
            value = call(calls)
        except TypeError as exc:
            return ("TypeError", str(exc).split(" ", 1)[0])
        except ValueError:
            return ("ValueError",)
        except KvmError as exc:
            return ("errno", exc.errno)
        finally:
            calls.close()
    return ("ok", value.hex() if isinstance(value, bytes) else value)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_model_converts_as_c_does(name: str) -> None:
    call, expected = CASES[name]
    assert _outcome(MODEL, call) == expected


@pytest.mark.skipif(
    kvm_unavailable() is not None, reason=f"the real kernel is not usable: {kvm_unavailable()}"
)
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_kernel_agrees(name: str) -> None:
    call, expected = CASES[name]
    before = open_fds()
    assert _outcome(KERNEL, call) == expected
    assert open_fds() == before, "file descriptors leaked"
