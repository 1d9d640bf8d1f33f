"""Memory attributes: ``KVM_SET_MEMORY_ATTRIBUTES`` and the x86 private/shared bookkeeping
(rules A-*, H-3, H-4; spec 3.5).

The attributes are ``vm.attributes``, a range map of gfn -> attribute value (absent: 0).
Privateness is read from it only for VMs with private memory (``kvm_mem_is_private``).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from guestmem import uapi
from guestmem.backend import GfnRange
from guestmem.errors import KvmError

if TYPE_CHECKING:
    from guestmem.model.vm import ModelVm

PAGE_SHIFT = uapi.PAGE_SHIFT
PAGE_SIZE = uapi.PAGE_SIZE
LEVEL_PAGES = {uapi.PG_LEVEL_4K: 1, uapi.PG_LEVEL_2M: 1 << 9, uapi.PG_LEVEL_1G: 1 << 18}
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE


def supported(vm: ModelVm) -> int:
    """``kvm_supported_mem_attributes`` (CAP-4)."""
    return PRIVATE if vm.has_private_mem else 0


def is_private(vm: ModelVm, gfn: int) -> bool:
    """``kvm_mem_is_private``."""
    return vm.has_private_mem and bool((vm.attributes.get(gfn) or 0) & PRIVATE)


def set_memory_attributes(vm: ModelVm, address: int, size: int, attributes: int, flags: int) -> None:
    """``KVM_SET_MEMORY_ATTRIBUTES`` after the VM ioctl preamble (A-1, A-3..A-6); the
    arguments are the ``__u64`` fields of ``struct kvm_memory_attributes`` as read."""
    if not vm.kvm.attributes_built(vm):
        raise KvmError(errno.ENOTTY, "A-1", "KVM_SET_MEMORY_ATTRIBUTES is not supported by this kernel")
    if flags:
        raise KvmError(errno.EINVAL, "A-3", f"flags must be 0, got {flags:#x}")
    allowed = supported(vm)
    if attributes & ~allowed:
        raise KvmError(errno.EINVAL, "A-4", f"attributes {attributes:#x} not in supported {allowed:#x}")
    if size == 0 or address + size > uapi.U64_MAX:
        raise KvmError(errno.EINVAL, "A-5", "size is zero or address + size wraps")
    if address % PAGE_SIZE or size % PAGE_SIZE:
        raise KvmError(errno.EINVAL, "A-6", "address and size must be page aligned")
    vm_set_mem_attributes(vm, address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT, attributes)


def vm_set_mem_attributes(vm: ModelVm, start: int, end: int, attributes: int) -> None:
    """``kvm_vm_set_mem_attributes`` (A-7..A-10, H-4; spec 3.5).

    Both passes are ``kvm_handle_gfn_range`` over the memslots overlapping the range: the
    pre pass begins the invalidation at its first slot (``on_lock``) and runs
    ``kvm_pre_set_memory_attributes`` per slot; the post pass ends the invalidation at its
    first slot (``on_lock`` = ``kvm_mmu_invalidate_end``) and only then runs
    ``kvm_arch_post_set_memory_attributes`` per slot.
    """
    if vm.attributes.covers(start, end, attributes or None):
        return
    slots = [(max(s, start), min(e, end), slot) for s, e, slot in vm.slots.ranges(start, end)]
    mmu = vm.mmu
    hooks = vm.hooks
    # x86 kvm_arch_pre_set_memory_attributes unmaps the old type: the range it hands on says so
    flt = uapi.KVM_FILTER_SHARED if attributes & PRIVATE else uapi.KVM_FILTER_PRIVATE
    flush = False
    if slots:
        mmu.invalidate_begin()
    try:
        for s, e, slot in slots:
            rng = GfnRange(slot.view, s, e, flt, attributes)
            # kvm_pre_set_memory_attributes: range_add, then the arch pre hook
            mmu.invalidate_range_add(s, e)
            flush |= _arch_pre_set_memory_attributes(vm, rng)
            flush |= hooks.pre_set_memory_attributes(vm.view, rng)
        if flush:
            vm.count("remote_tlb_flushes")
        vm.attributes.set(start, end, attributes or None)
        mmu.gen += 1  # the vCPUs' cached privateness
    finally:
        if slots:
            mmu.invalidate_end()
    for s, e, slot in slots:
        hooks.post_set_memory_attributes(vm.view, GfnRange(slot.view, s, e, flt, attributes))
    vm.count("set_memory_attributes")
    vm.trace("set_memory_attributes", gfn_start=start, gfn_end=end, attributes=attributes)


def _arch_pre_set_memory_attributes(vm: ModelVm, rng: GfnRange) -> bool:
    """x86 ``kvm_arch_pre_set_memory_attributes``; True if a TLB flush is needed.

    The head and tail hugepage frames that currently allow a huge mapping join the
    invalidation (so no fault installs a huge leaf over them meanwhile), then the old
    attribute's mappings are unmapped through ``kvm_unmap_gfn_range`` (the
    ``guestmem_unmap_gfn_range`` hook).
    """
    if not vm.has_private_mem or rng.end <= rng.start:  # WARN_ON_ONCE in the kernel
        return False
    slot = rng.slot
    for level in (uapi.PG_LEVEL_2M, uapi.PG_LEVEL_1G):
        n = LEVEL_PAGES[level]
        head = rng.start & ~(n - 1)
        tail = (rng.end - 1) & ~(n - 1)
        if (
            (head != rng.start or head + n > rng.end)
            and head >= slot.base_gfn
            and head + n <= slot.end_gfn
            and not hugepage_mixed(vm, head, n)
        ):
            vm.mmu.invalidate_range_add(head, head + n)
        if tail == head:
            continue
        if tail + n > rng.end and tail + n <= slot.end_gfn and not hugepage_mixed(vm, tail, n):
            vm.mmu.invalidate_range_add(tail, tail + n)
    return vm.mmu.kvm_unmap_gfn_range(rng)


def hugepage_mixed(vm: ModelVm, start: int, npages: int) -> bool:
    """``hugepage_test_mixed`` (H-3): the frame ``[start, start+npages)`` has mixed attributes."""
    return not vm.attributes.covers(start, start + npages, vm.attributes.get(start))
