"""The stage-2 fault: ``kvm_mmu_do_page_fault`` down to the installed leaf (spec 2.J, 2.K, 3.3).

There is one path, and it takes a run of pages: a vCPU access is a run of one, and
:func:`fault_range` (``KVM_PRE_FAULT_MEMORY``-style bulk faults, a guest accepting its
memory) asks for more.  A run is what that many single faults in gfn order would do at
once, so it only extends over pages whose state is uniform: the same memslot, attribute
and binding, one contiguous pfn run of folios in the same state, no leaf yet, and one
mapping level.  Where a backend hook would see each page (a policy implementing
``guestmem_fault`` or ``guestmem_gmem_prepare`` without ``Backend.range_faults``) the run
is one page (one folio for prepare).

Order of one attempt, as ``kvm_mmu_faultin_pfn`` and ``kvm_tdp_mmu_map``: privateness
(G-2), memslot (G-4, G-8), retry check, pfn (gmem: ``kvm_gmem_get_pfn``; else the host
VMA), retry check, the window where other threads may run (the kernel takes
``mmu_lock`` only now), ``guestmem_fault``, ``is_page_fault_stale``, mapping level
(``kvm_mmu_hugepage_adjust``), install (``guestmem_set_external_spte`` for mirrored
private leaves).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from guestmem import uapi
from guestmem.backend import Fault, Leaf
from guestmem.errors import GuestExit, KvmError, MemoryFault, MmioExit
from guestmem.model import attributes, gmem
from guestmem.model.mmu import level_pages
from guestmem.model.operation import mmu_lock_window

if TYPE_CHECKING:
    from guestmem.model.memslots import Memslot
    from guestmem.model.vcpu import ModelVcpu
    from guestmem.model.vm import ModelVm

PAGE_SHIFT = uapi.PAGE_SHIFT
PAGE_SIZE = uapi.PAGE_SIZE
MAX_FAULT_RETRIES = 16
#: What :func:`_faultin` returns when another thread's operation, run while this fault let
#: the host lock go (:func:`~guestmem.model.operation.mmu_lock_window`), made it stale.
RACED = -1


class Emulate(Exception):
    """The fault needs emulation (MMIO, or a write to a read-only slot)."""


def level_for_order(order: int) -> int:
    """``kvm_max_level_for_order``."""
    if order >= uapi.PUD_ORDER:
        return uapi.PG_LEVEL_1G
    if order >= uapi.PMD_ORDER:
        return uapi.PG_LEVEL_2M
    return uapi.PG_LEVEL_4K


def page_fault(vm: ModelVm, fault: Fault) -> int:
    """``kvm_mmu_do_page_fault`` until it stops retrying; returns how many pages from
    ``fault.gfn`` on the installed leaves cover (at least 1; a huge leaf may cover more
    than ``fault.npages``).

    Raises :class:`MemoryFault` (memory-fault exit), :class:`KvmError` (plain errno) or
    :class:`Emulate` (MMIO / read-only write).  EAGAIN (3.3) after
    :data:`MAX_FAULT_RETRIES` attempts made stale by this thread (an invalidation a hook
    began and never ended); a retry caused by another thread is not counted.
    """
    max_level, npages = fault.max_level, fault.npages
    attempts = 0
    window = True
    while attempts < MAX_FAULT_RETRIES:
        # each attempt of kvm_mmu_do_page_fault starts from a fresh kvm_page_fault
        fault.max_level, fault.npages = max_level, npages
        fault.slot, fault.pfn, fault.order, fault.map_writable = None, None, 0, True
        mapped = _faultin(vm, fault, window)
        if mapped > 0:
            return mapped
        vm.count("fault_retries")
        if mapped == RACED:
            # Another thread's operation made the fault stale: the kernel's vCPU re-enters
            # the guest and faults again.  Not this thread's own invalidation, so not an
            # attempt towards EAGAIN; a leaf another vCPU installed meanwhile may serve it.
            # The window opens once per fault, so that a thread invalidating without pause
            # cannot keep it from completing.
            vm.count("fault_races")
            window = False
            mapped = _spurious(vm, fault)
            if mapped:
                return mapped
            continue
        attempts += 1
    raise KvmError(
        errno.EAGAIN, "3.3", f"fault at gpa {fault.gpa:#x} kept retrying: an invalidation is in progress"
    )


def _spurious(vm: ModelVm, fault: Fault) -> int:
    """``RET_PF_SPURIOUS``: the pages from ``fault.gfn`` another vCPU mapped meanwhile, if
    its leaf serves this access (privateness, write permission), else 0; sets ``fault.pfn``."""
    found = vm.mmu.sptes.entry(fault.gfn)
    if found is None:
        return 0
    _, end, spte = found
    if spte.private != fault.is_private or (fault.write and not spte.writable):
        return 0
    fault.pfn = fault.gfn + spte.delta
    return end - fault.gfn


def memory_fault(vm: ModelVm, fault: Fault, err: int, rule: str, why: str) -> MemoryFault:
    """``kvm_mmu_prepare_memory_fault_exit``: the exit *fault* would leave with.

    Counted and traced only by :func:`memory_fault_exit`, once it really leaves to
    userspace: ``KVM_PRE_FAULT_MEMORY`` turns it into a plain errno, and a bulk fault
    that stops at it does not exit.
    """
    flags = uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE if fault.is_private else 0
    return MemoryFault(err, fault.gpa, PAGE_SIZE, flags, rule, why)


def memory_fault_exit(vm: ModelVm, exc: MemoryFault) -> None:
    """``KVM_RUN`` returns with ``KVM_EXIT_MEMORY_FAULT``: count and trace it."""
    vm.count("memory_fault_exits")
    vm.trace("memory_fault_exit", gpa=exc.gpa, flags=exc.flags, errno=exc.errno, rule=exc.rule)


def _faultin(vm: ModelVm, fault: Fault, window: bool) -> int:
    """One attempt; returns the pages mapped, 0 to retry, :data:`RACED` to retry because
    another thread's operation ran in the fault's window and made it stale."""
    gfn = fault.gfn
    mmu = vm.mmu
    seq = mmu.invalidate_seq
    gen = vm.slots.gen
    if fault.is_private != attributes.is_private(vm, gfn):
        raise memory_fault(
            vm, fault, errno.EFAULT, "G-2", "access privateness differs from the gfn's attribute"
        )
    slot = vm.slots.for_gfn(gfn)
    if slot is None:
        if fault.is_private:
            raise memory_fault(vm, fault, errno.EFAULT, "G-4", "no memslot for a private access")
        raise Emulate("no memslot")
    fault.slot = slot.view
    if slot.flags & uapi.KVM_MEMSLOT_INVALID:  # G-8: being deleted or moved
        if fault.prefetch:
            raise KvmError(errno.EAGAIN, "G-8", f"{slot.describe()} is being deleted or moved")
        return 0
    if mmu.retry_gfn(seq, gfn):
        return 0
    end = _run_end(vm, slot, fault)
    gmem_path = fault.is_private or (slot.gmem_only and vm.profile.gmem_only_faults_from_gmem)
    if gmem_path:
        if not slot.has_gmem:
            raise memory_fault(vm, fault, errno.EFAULT, "G-5", f"{slot.describe()} has no guest_memfd")
        try:
            pfn, order, npages = gmem.get_pfn(vm, slot, gfn, end - gfn)
        except KvmError as exc:
            raise memory_fault(vm, fault, exc.errno or errno.EFAULT, exc.rule, exc.detail) from None
        fault.map_writable = not slot.flags & uapi.KVM_MEM_READONLY
        # kvm_max_level_for_order (G-6): the folio bounds the mapping
        fault.max_level = min(fault.max_level, level_for_order(order))
    else:
        if fault.write and slot.flags & uapi.KVM_MEM_READONLY:
            raise Emulate("write to a read-only memslot")
        try:
            pfn, host_level = _hva_to_pfn(vm, slot, gfn, fault.write)
        except KvmError:
            if vm.profile.hva_error_exits_mmio:  # the shadow MMU emulates: KVM_EXIT_MMIO
                raise Emulate("no usable host page behind userspace_addr") from None
            raise
        order, npages = 0, 1
        # hva_to_pfn: a read-only memslot maps read-only; a later store re-faults and emulates
        fault.map_writable = not slot.flags & uapi.KVM_MEM_READONLY
        fault.max_level = min(fault.max_level, host_level)  # host_pfn_mapping_level
    fault.pfn, fault.order = pfn, order
    # A run over several huge frames is one level decision where the backend's
    # max_mapping_level holds for the whole run (range_faults), or there is none.
    frames_ok = vm.backend.range_faults or not vm.hooks.policy_implements("max_mapping_level")
    first_frame = npages
    if fault.max_level > uapi.PG_LEVEL_4K:
        frame = level_pages(fault.max_level)
        first_frame = min(npages, (gfn | (frame - 1)) + 1 - gfn)
        if not frames_ok:
            npages = first_frame  # one frame: one level decision
    fault.npages = npages
    if mmu.retry_gfn(seq, gfn) or vm.slots.gen != gen:
        return 0
    # kvm_mmu_faultin_pfn is done; kvm_tdp_mmu_page_fault now takes mmu_lock.  Until then
    # the kernel holds none of the locks the host lock stands for: other threads may run.
    if window and mmu_lock_window(vm.kvm):
        vm.host.check_alive()
        if vm.destroyed:
            raise KvmError(errno.EBADF, "", "the VM was destroyed")
        if vm.dead:
            raise KvmError(errno.EIO, "CAP-9", f"VM is dead: {vm.dead_reason}")
        if mmu.retry_gfn(seq, gfn) or vm.slots.gen != gen or mmu.sptes.overlaps(gfn, gfn + npages):
            return RACED
    allowed_level, map_writable = fault.max_level, fault.map_writable
    vm.hooks.fault(vm.view, fault)
    if mmu.retry_gfn(seq, gfn) or vm.slots.gen != gen:  # is_page_fault_stale
        return 0
    # The hook may only restrict what the core computed.
    npages = max(1, min(fault.npages, npages))
    max_level = min(fault.max_level, allowed_level)
    writable = fault.map_writable and map_writable
    level, uniform = _mapping_level(vm, fault, slot, pfn, max_level, gmem_path)
    if not (frames_ok and uniform):
        npages = min(npages, first_frame)
    if level > uapi.PG_LEVEL_4K:
        n = level_pages(level)
        start = gfn & ~(n - 1)
        frames = max(1, (gfn + npages - start) // n)
        mmu.install(Leaf(start, frames * n, pfn - (gfn - start), level, fault.is_private, writable))
        mapped = start + frames * n - gfn
    else:
        frames = npages
        mmu.install(Leaf(gfn, npages, pfn, level, fault.is_private, writable))
        mapped = npages
    vm.count("faults", frames)  # one per fault the guest takes: a page, or a huge frame
    if vm.tracing:
        fields = {
            "gpa": fault.gpa,
            "pfn": pfn,
            "private": fault.is_private,
            "level": level,
            "write": fault.write,
        }
        if mapped > 1:
            fields["npages"] = mapped
        vm.trace("fault", **fields)
    return mapped


def _run_end(vm: ModelVm, slot: Memslot, fault: Fault) -> int:
    """How far a run from ``fault.gfn`` may go before the pfn is known: inside the slot,
    one attribute run, not over an existing leaf, and one page where a backend hook must
    see every fault."""
    gfn = fault.gfn
    if fault.npages <= 1:
        return gfn + 1
    hooks = vm.hooks
    if not vm.backend.range_faults and hooks.policy_implements("fault"):
        return gfn + 1
    end = min(gfn + fault.npages, slot.end_gfn)
    if vm.has_private_mem:
        ent = vm.attributes.entry(gfn)
        if ent is not None:
            end = min(end, ent[1])
        else:
            nxt = vm.attributes.first_overlap(gfn, end)
            end = end if nxt is None else nxt[0]
    leaf = vm.mmu.sptes.first_overlap(gfn, end)
    if leaf is not None:
        end = max(gfn + 1, leaf[0])
    return end


def _hva_to_pfn(vm: ModelVm, slot: Memslot, gfn: int, write: bool) -> tuple[int, int]:
    """The hva path (G-7): resolve ``userspace_addr`` through the host's VMAs."""
    hva = slot.gfn_to_hva(gfn)
    vma = vm.kvm.mm.find(hva)
    if vma is None:
        raise KvmError(errno.EFAULT, "G-7", f"no host mapping at hva {hva:#x} for gfn {gfn:#x}")
    page = (hva - vma.address) >> PAGE_SHIFT
    try:
        pfn = vma.fault(page, write)
    except KvmError as exc:
        raise KvmError(errno.EFAULT, "G-7", f"host fault at hva {hva:#x} failed: {exc.detail}") from None
    return pfn, vma.host_level(page)


def _mapping_level(
    vm: ModelVm, fault: Fault, slot: Memslot, pfn: int, max_level: int, gmem_path: bool
) -> tuple[int, bool]:
    """``kvm_mmu_hugepage_adjust`` + ``kvm_mmu_max_mapping_level`` (H-1..H-3).

    No huge mapping in a dirty-logged slot; otherwise step down from *max_level* while the
    frame is disallowed (``lpage_info``), then, on the gmem path, the vendor's
    ``gmem_max_mapping_level`` (called once, only for a level above 4K) may lower it.  On
    the hva path *max_level* already holds ``host_pfn_mapping_level``.

    Also says whether the decision holds for every frame of the fault's run: it does
    unless the first frame was stepped down for a reason of its own (it straddles the
    slot's edge or mixes attributes, H-3); the frames after it lie inside the run, whose
    slot, attributes and pfn alignment are uniform.
    """
    if max_level <= uapi.PG_LEVEL_4K or slot.flags & uapi.KVM_MEM_LOG_DIRTY_PAGES:
        return uapi.PG_LEVEL_4K, True
    top = level = min(max_level, uapi.PG_LEVEL_1G)
    while level > uapi.PG_LEVEL_4K and _lpage_disallowed(vm, slot, fault.gfn, pfn, level):
        level -= 1
    uniform = level == top
    if level > uapi.PG_LEVEL_4K and gmem_path:
        limit = vm.hooks.max_mapping_level(vm.view, pfn, fault.is_private)
        if limit:
            level = min(level, limit)
    return level, uniform


def _lpage_disallowed(vm: ModelVm, slot: Memslot, gfn: int, pfn: int, level: int) -> bool:
    """``lpage_info_slot(gfn, slot, level)->disallow_lpage`` (plus pfn alignment)."""
    n = level_pages(level)
    start = gfn & ~(n - 1)
    if start < slot.base_gfn or start + n > slot.end_gfn:
        return True  # the frame is not wholly inside the slot
    if (slot.base_gfn ^ (slot.userspace_addr >> PAGE_SHIFT)) & (n - 1):
        return True  # kvm_alloc_memslot_metadata: gfn and hva disagree modulo the frame
    if (pfn - gfn) % n:
        return True  # the host pages cannot back one huge leaf (VM_BUG_ON in the kernel)
    return vm.has_private_mem and attributes.hugepage_mixed(vm, start, n)  # H-3


# --- bulk faults ------------------------------------------------------------------------------
def fault_range(
    vm: ModelVm, gfn: int, npages: int, *, private: bool, write: bool = False, vcpu: ModelVcpu | None = None
) -> int:
    """Map ``[gfn, gfn + npages)`` as *npages* guest accesses in that order would.

    Pages whose leaf already serves the access (same privateness, writable for a *write*)
    are passed over; every other run takes :func:`page_fault`.  Returns the number of pages
    mapped from *gfn* on: the first page's failure raises (:class:`MemoryFault`,
    :class:`KvmError`, :class:`MmioExit`), a later one ends the range.
    """
    if npages <= 0:
        raise ValueError("npages must be positive")
    end = gfn + npages
    cur = gfn
    view = None if vcpu is None else vcpu.view
    while cur < end:
        try:
            if vm.dead:  # a hook may have killed the VM
                raise KvmError(errno.EIO, "CAP-9", f"VM is dead: {vm.dead_reason}")
            ent = vm.mmu.sptes.entry(cur)
            if ent is not None and ent[2].private == private and (ent[2].writable or not write):
                cur = min(ent[1], end)
                continue
            fault = Fault(cur, private, write, vcpu=view, npages=end - cur)
            try:
                cur += page_fault(vm, fault)
            except Emulate:
                raise MmioExit(cur << PAGE_SHIFT, 0, write) from None
        except (KvmError, GuestExit) as exc:
            if cur == gfn:
                if isinstance(exc, MemoryFault):
                    memory_fault_exit(vm, exc)
                raise
            break
    return min(cur, end) - gfn
