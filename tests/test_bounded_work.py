"""Every call's cost follows the ranges it touches, never the bytes it names (docs/model.md).

Where the kernel has no limit of its own the model has a documented one: one guest or host
access moves at most ``guestmem.api.MAX_ACCESS`` bytes (EINVAL beyond), one
``KVM_PRE_FAULT_MEMORY`` makes at most ``PRE_FAULT_BATCH`` faults and returns the size
left, as the kernel's loop does when a signal is pending (PF-4).  Each test would run for
minutes (or exhaust memory) without them.
"""

from __future__ import annotations

import errno
import time
from typing import Any

import pytest
from gmem_support import PAGE, raises_kvm

from guestmem import KvmError, api, uapi
from guestmem.model import vcpu as model_vcpu

GiB = 1 << 30
TiB = 1 << 40


def _fast(start: float) -> None:
    assert time.perf_counter() - start < 5, "the call's cost followed the bytes"


def test_discarding_a_terabyte_of_anonymous_memory_costs_what_it_holds(kvm: Any) -> None:
    """``MADV_REMOVE`` over 1 TiB of anonymous memory that holds two pages: the cost follows
    the 2 MiB chunks the mapping has, and the pages read zero after."""
    mapping = kvm.mmap_anonymous(TiB)
    mapping.write(0, b"first")
    mapping.write(TiB - PAGE, b"last")
    start = time.perf_counter()
    mapping.madvise(uapi.MADV_REMOVE, 0, TiB)
    with pytest.raises(KvmError) as info:  # beyond the mapping's end: ENOMEM, at once too
        mapping.madvise(uapi.MADV_REMOVE, PAGE, 1 << 40)
    assert info.value.errno == errno.ENOMEM
    _fast(start)
    assert mapping.read(0, 5) == bytes(5) and mapping.read(TiB - PAGE, 4) == bytes(4)
    mapping.close()


def test_a_host_access_beyond_max_access_is_einval(kvm: Any) -> None:
    """``HostMapping.read(0, 4 GiB)``: refused at once (the model's limit), the mapping
    untouched; a load of MAX_ACCESS bytes works."""
    mapping = kvm.mmap_anonymous(8 * GiB)
    start = time.perf_counter()
    for call in (lambda: mapping.read(0, 4 * GiB), lambda: mapping.read(PAGE, api.MAX_ACCESS + 1)):
        with raises_kvm(errno.EINVAL):
            call()
    _fast(start)
    assert mapping.read(8 * GiB - api.MAX_ACCESS, api.MAX_ACCESS) == bytes(api.MAX_ACCESS)
    mapping.close()


def test_a_guest_access_beyond_max_access_is_einval(kvm: Any) -> None:
    """A load of 1 TiB from a guest with a 1 TiB memslot: EINVAL before the guest runs."""
    vm = kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    host = kvm.mmap_anonymous(GiB)
    vm.set_user_memory_region(0, 0, 0, GiB, host.address)
    vcpu = vm.create_vcpu(0)
    start = time.perf_counter()
    for length in (TiB, api.MAX_ACCESS + 1):
        with raises_kvm(errno.EINVAL):
            vcpu.access(0, length)
    _fast(start)
    assert vm.mmu.mapped_pages() == 0
    vm.close()
    host.close()


def test_pre_fault_of_2_62_bytes_returns_what_is_left_after_a_batch(kvm: Any) -> None:
    """``KVM_PRE_FAULT_MEMORY`` over 2**62 bytes of a guest whose memory is host-mapped 4 KiB
    at a time (the host address is not 2 MiB aligned): one call makes PRE_FAULT_BATCH faults
    and returns the rest (PF-4), each page mapped once."""
    vm = kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    host = kvm.mmap_anonymous(GiB + PAGE)
    vm.set_user_memory_region(0, 0, 0, GiB, host.address + PAGE)
    vcpu = vm.create_vcpu(0)
    start = time.perf_counter()
    left = vcpu.pre_fault_memory(0, 1 << 62)
    _fast(start)
    done = model_vcpu.PRE_FAULT_BATCH * PAGE
    assert left == (1 << 62) - done and vm.mmu.mapped_pages() == model_vcpu.PRE_FAULT_BATCH
    vm.close()
    host.close()


def test_a_pre_fault_loop_ends_where_memory_ends(kvm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Userspace loops on the size left; the call that reaches the end of the memslot maps
    up to it and succeeds, the next one is ENOENT (PF-4)."""
    monkeypatch.setattr(model_vcpu, "PRE_FAULT_BATCH", 8)
    vm = kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    host = kvm.mmap_anonymous(64 * PAGE)
    vm.set_user_memory_region(0, 0, 0, 60 * PAGE, host.address + PAGE)
    vcpu = vm.create_vcpu(0)
    gpa, size, calls = 0, 1 << 62, 0
    while True:
        try:
            left = vcpu.pre_fault_memory(gpa, size)
        except OSError as exc:
            assert exc.errno == errno.ENOENT
            break
        gpa, size, calls = gpa + size - left, left, calls + 1
    assert (gpa, calls) == (60 * PAGE, 8) and vm.mmu.mapped_pages() == 60
    vm.close()
    host.close()
