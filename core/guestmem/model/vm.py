"""The VM: memslots, attributes, stage-2 faults, lifetime (spec 2.A, 2.F-2.M, 3).

Locking is implicit (the model is single-threaded) but the kernel's order of checks,
invalidations and retries is kept, so a hook that changes state in the middle of a fault
sees what it would see in the kernel.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

import attrs

from guestmem import api, uapi
from guestmem.errors import EHWPOISON, GuestExit, KvmError, MemoryFault, MmioExit
from guestmem.model import gmem as gmem_mod
from guestmem.model.events import Counters, make_event
from guestmem.model.gmem import GmemFile, GmemInode, GmemLocation
from guestmem.model.memslot import Change, Memslot, Region, check_region
from guestmem.model.mmu import Fault, GfnRange, Mmu
from guestmem.ranges import RangeMap

if TYPE_CHECKING:
    from guestmem.model.files import ModelGuestMemfd
    from guestmem.model.kvm import ModelKvm
    from guestmem.model.vcpu import ModelVcpu
    from guestmem.registry import VmTypeInfo

PAGE_SHIFT = uapi.PAGE_SHIFT
PAGE_SIZE = uapi.PAGE_SIZE
_MAX_FAULT_RETRIES = 16
_LEVEL_PAGES = {uapi.PG_LEVEL_4K: 1, uapi.PG_LEVEL_2M: 1 << 9, uapi.PG_LEVEL_1G: 1 << 18}


def _level_for_order(order: int) -> int:
    """``kvm_max_level_for_order``."""
    if order >= uapi.PUD_ORDER:
        return uapi.PG_LEVEL_1G
    if order >= uapi.PMD_ORDER:
        return uapi.PG_LEVEL_2M
    return uapi.PG_LEVEL_4K


class _Emulate(Exception):
    """The fault needs emulation (MMIO, or a write to a read-only slot)."""


class ModelVm(api.Vm):
    """A VM of the model; also the object arch policy hooks receive."""

    def __init__(self, kvm: ModelKvm, type_info: VmTypeInfo, vm_id: int) -> None:
        self.kvm = kvm
        self.host = kvm.host
        self.backend = kvm.backend_info
        self.profile = kvm.profile
        self.hooks = kvm.hooks
        self.type_info = type_info
        self.vm_type = type_info.type
        self.vm_id = vm_id
        self.counters = Counters()
        self.refs = 1  # the VM fd
        self.fd_closed = False
        self.fd = kvm.fd_install(self)  # a VM fd passed as guest_memfd is not one (B-2)
        self.dead = False
        self.dead_reason = ""
        self.destroyed = False
        self.memslots: dict[tuple[int, int], Memslot] = {}
        self._slot_index: dict[int, RangeMap[Memslot]] = {}
        self.nr_memslot_pages = 0
        #: Bumped by every memslot update (``kvm_swap_active_memslots``): a fault that saw
        #: another generation retries, as SRCU would have kept the update from overtaking it.
        self.memslots_gen = 0
        self.attributes: RangeMap[int] = RangeMap()
        self.mmu = Mmu(self)
        self.vcpus: dict[int, ModelVcpu] = {}
        #: A memslot was ever created, or a vCPU entered the guest (profile
        #: ``pre_fault_enospc_before_first_memslot``).
        self.had_memslot = False
        self.max_gfn = (1 << (self.profile.phys_bits - PAGE_SHIFT)) - 1
        #: ``kvm->arch.pre_fault_allowed``: from the VM type; a backend may change it (SNP
        #: allows pre-faulting once the launch is finished).
        self.pre_fault_allowed = type_info.pre_fault_allowed
        self.arch: Any = None
        try:
            self.arch = self.hooks.vm_init(vm=self)
        except BaseException:
            kvm.fd_remove(self.fd)  # put_unused_fd: a refused VM leaves no descriptor
            raise

    def __repr__(self) -> str:
        return f"<ModelVm {self.vm_id} {self.type_info.name} on {self.backend.name}>"

    # --- bookkeeping used by backends -------------------------------------------------------
    def count(self, name: str, n: int = 1) -> None:
        """Add *n* to cost counter *name*."""
        if n:
            self.counters[name] += n

    def trace(self, kind: str, **fields: Any) -> None:
        """Emit a trace event to observers and the structlog logger ``guestmem``."""
        event = make_event(kind, self.vm_id, fields)
        self.kvm.record(event)
        self.hooks.trace(vm=self, event=event)

    def ownership_update(self, table: str, pfn: int, npages: int, old: Any, new: Any) -> None:
        """Tell observers that the backend changed its hardware ownership *table*."""
        self.hooks.ownership_update(vm=self, table=table, pfn=pfn, npages=npages, old=old, new=new)

    def kill(self, reason: str) -> None:
        """Mark the VM dead (``kvm_vm_dead``): its ioctls fail with EIO from now on (CAP-9)."""
        if not self.dead:
            self.dead = True
            self.dead_reason = reason
            self.trace("vm_dead", reason=reason)

    @property
    def has_private_mem(self) -> bool:
        """``kvm_arch_has_private_mem`` (CAP-5)."""
        return self.type_info.has_private_mem

    def get(self) -> None:
        """``kvm_get_kvm``."""
        self.refs += 1

    def put(self) -> None:
        """``kvm_put_kvm``: the last reference destroys the VM (L-9)."""
        self.refs -= 1
        if self.refs == 0:
            self._destroy()

    def _destroy(self) -> None:
        for slot in list(self.memslots.values()):
            if slot.gmem_file is not None:
                slot.gmem_file.unbind(slot)
        self.memslots.clear()
        self._slot_index.clear()
        self.mmu.sptes.clear()
        self.hooks.vm_destroy(vm=self)
        self.destroyed = True
        self.trace("vm_destroy")
        self.kvm.vm_destroyed(self)

    def _ioctl(self) -> None:
        """The checks of ``kvm_vm_ioctl`` before any command (fd open; CAP-9)."""
        if self.fd_closed:
            raise KvmError(errno.EBADF, "", "VM file descriptor is closed")
        self.host.check_alive()
        if self.dead:
            raise KvmError(errno.EIO, "CAP-9", f"VM is dead: {self.dead_reason}")

    # --- api.Vm -----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.fd_closed

    def fileno(self) -> int:
        """The VM's descriptor number in the model's fd table."""
        if self.fd_closed:
            raise ValueError("I/O operation on closed VM fd")
        return self.fd

    def close(self) -> None:
        if self.fd_closed:
            return
        self.fd_closed = True
        self.kvm.fd_remove(self.fd)
        for vcpu in list(self.vcpus.values()):
            vcpu.close()
        self.put()

    def check_extension(self, cap: int) -> int:
        self._ioctl()
        return self.kvm.extension(self, cap)

    def create_guest_memfd(self, size: int, flags: int = 0) -> ModelGuestMemfd:
        """``KVM_CREATE_GUEST_MEMFD`` (C-3, C-4, C-7..C-9)."""
        self._ioctl()
        supported = self.kvm.gmem_supported_flags(self)
        if flags & ~supported:
            raise KvmError(
                errno.EINVAL, "C-3", f"guest_memfd flags {flags:#x} not in supported {supported:#x}"
            )
        if size <= 0 or size > uapi.LOFF_MAX or size % PAGE_SIZE:
            raise KvmError(errno.EINVAL, "C-4", f"guest_memfd size {size:#x} is zero, negative or unaligned")
        inode = GmemInode(self, size, flags, self.type_info.gmem_folio_order)
        file = GmemFile(self, inode)
        self.trace("gmem_create", ino=inode.ino, size=size, flags=flags)
        from guestmem.model.files import ModelGuestMemfd

        return ModelGuestMemfd(self.kvm, file)

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` (S-2; the rest as v2)."""
        self._ioctl()
        v1_flags = uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_READONLY
        if flags & ~v1_flags:
            raise KvmError(
                errno.EINVAL, "S-2", f"flags {flags:#x} not allowed in KVM_SET_USER_MEMORY_REGION"
            )
        self._set_region(Region(slot, flags, guest_phys_addr, memory_size, userspace_addr))

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int = 0,
        guest_memfd: Any = None,
        guest_memfd_offset: int = 0,
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION2`` (S-3..S-16, B-1..B-11)."""
        self._ioctl()
        fd = self.kvm.fd_of(guest_memfd)
        self._set_region(
            Region(slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset, fd)
        )

    def _set_region(self, mem: Region) -> None:
        for name in ("slot", "flags"):
            if not 0 <= getattr(mem, name) <= 0xFFFFFFFF:
                raise KvmError(errno.EINVAL, "S-1", f"{name} does not fit the u32 field")
        for name in ("guest_phys_addr", "memory_size", "userspace_addr", "guest_memfd_offset"):
            if not 0 <= getattr(mem, name) <= uapi.U64_MAX:
                raise KvmError(errno.EINVAL, "S-1", f"{name} does not fit the u64 field")
        if mem.id >= uapi.KVM_USER_MEM_SLOTS:
            raise KvmError(errno.EINVAL, "S-3", f"slot id {mem.id} >= KVM_USER_MEM_SLOTS")
        change, old = check_region(self, mem)
        if change is Change.NONE:
            return
        self.memslots_gen += 1
        if change is Change.DELETE:
            assert old is not None
            self._delete_slot(old)
            return
        if change in (Change.MOVE, Change.FLAGS_ONLY):
            assert old is not None
            self._modify_slot(old, mem, change)
            return
        new = Memslot(
            as_id=mem.as_id,
            id=mem.id,
            base_gfn=mem.guest_phys_addr >> PAGE_SHIFT,
            npages=mem.memory_size >> PAGE_SHIFT,
            flags=mem.flags,
            userspace_addr=mem.userspace_addr,
        )
        file: GmemFile | None = None
        if mem.flags & uapi.KVM_MEM_GUEST_MEMFD:
            file = self._gmem_file_for_bind(mem.guest_memfd)
            file.bind(new, mem.guest_memfd_offset)
        try:
            self._prepare_memory_region(new)
        except KvmError:
            if file is not None:
                file.unbind(new)
            raise
        self.memslots[(new.as_id, new.id)] = new
        self.had_memslot = True
        self._slots(new.as_id).set(new.base_gfn, new.end_gfn, new)
        self.nr_memslot_pages += new.npages
        self.trace(
            "memslot_create",
            slot=new.id,
            as_id=new.as_id,
            gpa=new.base_gfn << PAGE_SHIFT,
            size=new.npages << PAGE_SHIFT,
            flags=new.flags,
        )

    def _gmem_file_for_bind(self, fd: int) -> GmemFile:
        """The fd checks of ``kvm_gmem_bind`` (B-1..B-3)."""
        obj = self.kvm.fd_lookup(fd)
        if obj is None:
            raise KvmError(errno.EBADF, "B-1", f"guest_memfd {fd} is not an open file descriptor")
        from guestmem.model.files import ModelGuestMemfd

        if not isinstance(obj, ModelGuestMemfd):
            raise KvmError(errno.EINVAL, "B-2", f"fd {fd} is not a guest_memfd ({type(obj).__name__})")
        if obj.file.vm is not self:
            raise KvmError(errno.EINVAL, "B-3", f"guest_memfd {fd} belongs to another VM")
        return obj.file

    def _prepare_memory_region(self, new: Memslot) -> None:
        """``kvm_arch_prepare_memory_region`` for create/move (S-7 max gfn, S-16)."""
        if new.end_gfn - 1 > self.max_gfn:
            raise KvmError(errno.EINVAL, "S-7", f"{new.describe()} exceeds the guest physical address width")
        if self.type_info.gmem_slot_requires_mmap and new.has_gmem and not new.gmem_only:
            raise KvmError(
                errno.EINVAL, "S-16", "a guest_memfd memslot needs a GUEST_MEMFD_FLAG_MMAP file here"
            )

    def _slots(self, as_id: int) -> RangeMap[Memslot]:
        table = self._slot_index.get(as_id)
        if table is None:
            table = self._slot_index[as_id] = RangeMap()
        return table

    def _flush_slot(self, slot: Memslot) -> None:
        """``kvm_invalidate_memslot``: mark the slot INVALID, then zap every leaf of it.

        ``kvm_arch_flush_shadow_memslot`` (x86 ``kvm_mmu_zap_memslot``) calls
        ``kvm_unmap_gfn_range`` under mmu_lock only: no MMU invalidation, so
        ``mmu_invalidate_seq`` does not move.  A fault that meets the slot meanwhile retries
        (G-8); the flag goes again when the delete or move is committed.
        """
        slot.flags |= uapi.KVM_MEMSLOT_INVALID
        self.memslots_gen += 1
        if self.mmu.kvm_unmap_gfn_range(GfnRange(slot, slot.base_gfn, slot.end_gfn)):
            self.count("remote_tlb_flushes")

    def _delete_slot(self, slot: Memslot) -> None:
        """S-9: invalidate, zap, free, unbind (B-8..B-10)."""
        self._flush_slot(slot)
        del self.memslots[(slot.as_id, slot.id)]
        self._slots(slot.as_id).erase(slot.base_gfn, slot.end_gfn)
        self.nr_memslot_pages -= slot.npages
        if slot.gmem_file is not None:
            slot.gmem_file.unbind(slot)
        self.trace("memslot_delete", slot=slot.id, as_id=slot.as_id)

    def _modify_slot(self, slot: Memslot, mem: Region, change: Change) -> None:
        """S-13: move to a new gpa, or change LOG_DIRTY_PAGES."""
        if change is Change.MOVE:
            moved = Memslot(
                slot.as_id,
                slot.id,
                mem.guest_phys_addr >> PAGE_SHIFT,
                slot.npages,
                mem.flags,
                slot.userspace_addr,
            )
            # kvm_set_memslot: kvm_invalidate_memslot (zap) comes before
            # kvm_prepare_memory_region; if that fails, the old slot is reactivated
            # (kvm_activate_memslot) but its mappings stay zapped.
            self._flush_slot(slot)
            try:
                self._prepare_memory_region(moved)
            except KvmError:
                slot.flags &= ~uapi.KVM_MEMSLOT_INVALID
                self.memslots_gen += 1
                raise
            self._slots(slot.as_id).erase(slot.base_gfn, slot.end_gfn)
            slot.base_gfn = moved.base_gfn
            self._slots(slot.as_id).set(slot.base_gfn, slot.end_gfn, slot)
        enable_dirty_log = (mem.flags & ~slot.flags) & uapi.KVM_MEM_LOG_DIRTY_PAGES
        slot.flags = mem.flags  # also drops KVM_MEMSLOT_INVALID
        if change is Change.FLAGS_ONLY and enable_dirty_log:
            # kvm_mmu_slot_apply_flags: eager split to 4K, then write-protect the leaves
            for s, e, spte in list(self.mmu.sptes.items(slot.base_gfn, slot.end_gfn)):
                self.mmu.sptes.set(s, e, attrs.evolve(spte, level=uapi.PG_LEVEL_4K, writable=False))
        self.trace("memslot_" + change.value, slot=slot.id, as_id=slot.as_id)

    def slot_overlapping(self, as_id: int, start: int, end: int, exclude_id: int = -1) -> Memslot | None:
        """``kvm_check_memslot_overlap``: a slot of *as_id* (not *exclude_id*) in ``[start, end)``."""
        for _, _, slot in self._slots(as_id).items(start, end):
            if slot.id != exclude_id:
                return slot
        return None

    def slot_for_gfn(self, gfn: int, as_id: int = 0) -> Memslot | None:
        """``gfn_to_memslot``."""
        return self._slots(as_id).get(gfn)

    # --- attributes (2.I, 3.5) --------------------------------------------------------------
    def supported_attributes(self) -> int:
        """``kvm_supported_mem_attributes`` (CAP-4)."""
        return uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if self.has_private_mem else 0

    def is_private(self, gfn: int) -> bool:
        """``kvm_mem_is_private``."""
        return self.has_private_mem and bool(
            (self.attributes.get(gfn) or 0) & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
        )

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES`` (A-1..A-12)."""
        self._ioctl()
        if not self.kvm.attributes_built(self):
            raise KvmError(errno.ENOTTY, "A-1", "KVM_SET_MEMORY_ATTRIBUTES is not supported by this kernel")
        for name, value in (
            ("address", address),
            ("size", size),
            ("attributes", attributes),
            ("flags", flags),
        ):
            if not 0 <= value <= uapi.U64_MAX:
                raise KvmError(errno.EINVAL, "A-2", f"{name} does not fit the u64 field")
        if flags:
            raise KvmError(errno.EINVAL, "A-3", f"flags must be 0, got {flags:#x}")
        supported = self.supported_attributes()
        if attributes & ~supported:
            raise KvmError(
                errno.EINVAL, "A-4", f"attributes {attributes:#x} not in supported {supported:#x}"
            )
        if size == 0 or address + size > uapi.U64_MAX:
            raise KvmError(errno.EINVAL, "A-5", "size is zero or address + size wraps")
        if address % PAGE_SIZE or size % PAGE_SIZE:
            raise KvmError(errno.EINVAL, "A-6", "address and size must be page aligned")
        self._set_mem_attributes(address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT, attributes)

    def _set_mem_attributes(self, start: int, end: int, attributes: int) -> None:
        """``kvm_vm_set_mem_attributes`` (A-7..A-10, H-4; spec 3.5).

        Both passes are ``kvm_handle_gfn_range`` over the memslots overlapping the range:
        the pre pass begins the invalidation at its first slot (``on_lock``) and runs
        ``kvm_pre_set_memory_attributes`` per slot; the post pass ends the invalidation at
        its first slot (``on_lock`` = ``kvm_mmu_invalidate_end``) and only then runs
        ``kvm_arch_post_set_memory_attributes`` per slot.
        """
        if self.attributes.covers(start, end, attributes or None):
            return
        slots = [
            (max(s, start), min(e, end), slot)
            for as_id in sorted(self._slot_index)
            for s, e, slot in self._slots(as_id).items(start, end)
        ]
        flush = False
        for i, (s, e, slot) in enumerate(slots):
            if i == 0:
                self.mmu.invalidate_begin()
            rng = GfnRange(slot, s, e, attributes=attributes)
            # kvm_pre_set_memory_attributes: range_add, then the arch pre hook
            self.mmu.invalidate_range_add(s, e)
            flush |= self._arch_pre_set_memory_attributes(rng)
            flush |= any(self.hooks.pre_set_memory_attributes(vm=self, range=rng))
        if flush:
            self.count("remote_tlb_flushes")
        self.attributes.set(start, end, attributes or None)
        for i, (s, e, slot) in enumerate(slots):
            if i == 0:
                self.mmu.invalidate_end()
            self.hooks.post_set_memory_attributes(vm=self, range=GfnRange(slot, s, e, attributes=attributes))
        self.count("set_memory_attributes")
        self.trace("set_memory_attributes", gfn_start=start, gfn_end=end, attributes=attributes)

    def _arch_pre_set_memory_attributes(self, rng: GfnRange) -> bool:
        """x86 ``kvm_arch_pre_set_memory_attributes``; True if a TLB flush is needed.

        The head and tail hugepage frames that currently allow a huge mapping join the
        invalidation (so no fault installs a huge leaf over them meanwhile), then the old
        attribute's mappings are unmapped through ``kvm_unmap_gfn_range`` (the
        ``guestmem_unmap_gfn_range`` hook).
        """
        if not self.has_private_mem or rng.end <= rng.start:  # WARN_ON_ONCE in the kernel
            return False
        slot = rng.slot
        assert slot is not None
        for level in (uapi.PG_LEVEL_2M, uapi.PG_LEVEL_1G):
            n = _LEVEL_PAGES[level]
            head = rng.start & ~(n - 1)
            tail = (rng.end - 1) & ~(n - 1)
            if (
                (head != rng.start or head + n > rng.end)
                and head >= slot.base_gfn
                and head + n <= slot.end_gfn
                and not self._hugepage_mixed(head, n)
            ):
                self.mmu.invalidate_range_add(head, head + n)
            if tail == head:
                continue
            if tail + n > rng.end and tail + n <= slot.end_gfn and not self._hugepage_mixed(tail, n):
                self.mmu.invalidate_range_add(tail, tail + n)
        if rng.attributes & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE:
            rng.attr_filter = uapi.KVM_FILTER_SHARED
        else:
            rng.attr_filter = uapi.KVM_FILTER_PRIVATE
        return self.mmu.kvm_unmap_gfn_range(rng)

    def _hugepage_mixed(self, start: int, npages: int) -> bool:
        """``hugepage_test_mixed`` (H-3): the frame ``[start, start+npages)`` has mixed attributes."""
        return not self.attributes.covers(start, start + npages, self.attributes.get(start))

    # --- vCPUs ---------------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> ModelVcpu:
        """``KVM_CREATE_VCPU``."""
        self._ioctl()
        from guestmem.model.vcpu import ModelVcpu

        if not 0 <= vcpu_id < 4096:
            raise KvmError(errno.EINVAL, "", f"vcpu id {vcpu_id} out of range")
        if vcpu_id in self.vcpus:
            raise KvmError(errno.EEXIST, "", f"vcpu {vcpu_id} already exists")
        vcpu = ModelVcpu(self, vcpu_id)
        self.vcpus[vcpu_id] = vcpu
        return vcpu

    # --- the stage-2 fault (spec 2.J, 3.3) ------------------------------------------------------
    def page_fault(self, fault: Fault) -> int:
        """``kvm_mmu_do_page_fault`` until it stops retrying; returns the mapped pfn.

        Raises :class:`MemoryFault` (memory-fault exit), :class:`KvmError` (plain errno),
        or ``_Emulate`` (MMIO / read-only write).
        """
        max_level = fault.max_level
        for _ in range(_MAX_FAULT_RETRIES):
            # each attempt of kvm_mmu_do_page_fault starts from a fresh kvm_page_fault
            fault.max_level = max_level
            fault.slot = None
            fault.pfn = None
            fault.map_writable = True
            pfn = self._faultin(fault)
            if pfn is not None:
                return pfn
            self.count("fault_retries")
        raise KvmError(
            errno.EAGAIN, "3.3", f"fault at gpa {fault.gpa:#x} kept retrying: an invalidation is in progress"
        )

    def _memory_fault(self, fault: Fault, err: int, rule: str, why: str) -> MemoryFault:
        flags = uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE if fault.is_private else 0
        self.count("memory_fault_exits")
        self.trace("memory_fault_exit", gpa=fault.gfn << PAGE_SHIFT, flags=flags, errno=err, rule=rule)
        return MemoryFault(err, fault.gfn << PAGE_SHIFT, PAGE_SIZE, flags, rule, why)

    def _faultin(self, fault: Fault) -> int | None:
        """One pass of ``kvm_mmu_faultin_pfn`` + ``is_page_fault_stale`` + map; None = retry."""
        gfn = fault.gfn
        mmu = self.mmu
        gen = self.memslots_gen
        fault.mmu_seq = mmu.invalidate_seq
        if fault.is_private != self.is_private(gfn):
            raise self._memory_fault(
                fault, errno.EFAULT, "G-2", "access privateness differs from the gfn's attribute"
            )
        slot = self.slot_for_gfn(gfn)
        fault.slot = slot
        if slot is None:
            if fault.is_private:
                raise self._memory_fault(fault, errno.EFAULT, "G-4", "no memslot for a private access")
            raise _Emulate("no memslot")
        if slot.flags & uapi.KVM_MEMSLOT_INVALID:  # G-8: being deleted or moved
            if fault.prefetch:
                raise KvmError(errno.EAGAIN, "G-8", f"{slot.describe()} is being deleted or moved")
            return None
        if mmu.retry_gfn(fault.mmu_seq, gfn):
            return None
        gmem_path = fault.is_private or (slot.gmem_only and self.profile.gmem_only_faults_from_gmem)
        if gmem_path:
            if not slot.has_gmem:
                raise self._memory_fault(fault, errno.EFAULT, "G-5", f"{slot.describe()} has no guest_memfd")
            try:
                pfn, order = gmem_mod.get_pfn(self, slot, gfn)
            except KvmError as exc:
                raise self._memory_fault(fault, exc.errno or errno.EFAULT, exc.rule, exc.detail) from None
            fault.map_writable = not slot.flags & uapi.KVM_MEM_READONLY
            # kvm_max_level_for_order (G-6): the folio bounds the mapping
            fault.max_level = min(fault.max_level, _level_for_order(order))
        else:
            if fault.write and slot.flags & uapi.KVM_MEM_READONLY:
                raise _Emulate("write to a read-only memslot")
            try:
                pfn, host_level = self._hva_to_pfn(slot, gfn, fault.write)
            except KvmError:
                if self.profile.hva_error_exits_mmio:  # the shadow MMU emulates: KVM_EXIT_MMIO
                    raise _Emulate("no usable host page behind userspace_addr") from None
                raise
            # hva_to_pfn: a read-only memslot maps read-only; a later store re-faults and emulates
            fault.map_writable = not slot.flags & uapi.KVM_MEM_READONLY
            fault.max_level = min(fault.max_level, host_level)  # host_pfn_mapping_level
        fault.pfn = pfn
        if mmu.retry_gfn(fault.mmu_seq, gfn) or self.memslots_gen != gen:
            return None
        self.hooks.fault(vm=self, fault=fault)
        if mmu.retry_gfn(fault.mmu_seq, gfn) or self.memslots_gen != gen:  # is_page_fault_stale
            return None
        level = self._mapping_level(fault, slot, pfn, fault.max_level, gmem_path)
        npages = _LEVEL_PAGES[level]
        start = gfn & ~(npages - 1)
        mmu.install(start, npages, pfn - (gfn - start), fault.is_private, fault.map_writable, level)
        self.count("faults")
        self.trace(
            "fault", gpa=gfn << PAGE_SHIFT, pfn=pfn, private=fault.is_private, level=level, write=fault.write
        )
        return pfn

    def _hva_to_pfn(self, slot: Memslot, gfn: int, write: bool) -> tuple[int, int]:
        """The hva path (G-7): resolve ``userspace_addr`` through the host's VMAs."""
        hva = slot.gfn_to_hva(gfn)
        vma = self.kvm.mm.find(hva)
        if vma is None:
            raise KvmError(errno.EFAULT, "G-7", f"no host mapping at hva {hva:#x} for gfn {gfn:#x}")
        page = (hva - vma.address) >> PAGE_SHIFT
        try:
            pfn = vma.fault(page, write)
        except KvmError as exc:
            raise KvmError(errno.EFAULT, "G-7", f"host fault at hva {hva:#x} failed: {exc.detail}") from None
        return pfn, vma.host_level(page)

    def _mapping_level(self, fault: Fault, slot: Memslot, pfn: int, max_level: int, gmem_path: bool) -> int:
        """``kvm_mmu_hugepage_adjust`` + ``kvm_mmu_max_mapping_level`` (H-1..H-3).

        No huge mapping in a dirty-logged slot; otherwise step down from *max_level* while the
        frame is disallowed (``lpage_info``), then, on the gmem path, the vendor's
        ``gmem_max_mapping_level`` (called once, only for a level above 4K) may lower it.
        On the hva path *max_level* already holds ``host_pfn_mapping_level``.
        """
        if max_level <= uapi.PG_LEVEL_4K or slot.flags & uapi.KVM_MEM_LOG_DIRTY_PAGES:
            return uapi.PG_LEVEL_4K
        level = min(max_level, uapi.PG_LEVEL_1G)
        while level > uapi.PG_LEVEL_4K and self._lpage_disallowed(slot, fault.gfn, pfn, level):
            level -= 1
        if level > uapi.PG_LEVEL_4K and gmem_path:
            limit = self.hooks.max_mapping_level(vm=self, pfn=pfn, is_private=fault.is_private)
            if limit:
                level = min(level, limit)
        return level

    def _lpage_disallowed(self, slot: Memslot, gfn: int, pfn: int, level: int) -> bool:
        """``lpage_info_slot(gfn, slot, level)->disallow_lpage`` (plus pfn alignment)."""
        n = _LEVEL_PAGES[level]
        start = gfn & ~(n - 1)
        if start < slot.base_gfn or start + n > slot.end_gfn:
            return True  # the frame is not wholly inside the slot
        if (slot.base_gfn ^ (slot.userspace_addr >> PAGE_SHIFT)) & (n - 1):
            return True  # kvm_alloc_memslot_metadata: gfn and hva disagree modulo the frame
        if (pfn - gfn) % n:
            return True  # the host pages cannot back one huge leaf (VM_BUG_ON in the kernel)
        return self.has_private_mem and self._hugepage_mixed(start, n)  # H-3

    # --- range faults for backends -----------------------------------------------------------
    def fault_range(
        self, gfn: int, npages: int, *, private: bool, write: bool = False, vcpu: Any = None
    ) -> int:
        """Map ``[gfn, gfn + npages)`` as *npages* guest accesses in that order would.

        Each page not already mapped for the access (same privateness, writable for a
        *write*) takes the stage-2 fault of spec 2.J with every check and hook of a vCPU
        fault; already-mapped pages are passed over, as the guest would not fault on them.
        Returns the number of pages mapped from *gfn* on: the first page that cannot be
        mapped raises (:class:`MemoryFault`, :class:`KvmError`, :class:`MmioExit`) if it is
        *gfn* itself, and otherwise ends the range.

        Range-based where the state is uniform: a run of gmem-path pages in one memslot and
        one attribute run, bound to it, whose order-0 folios are all prepared (no
        ``guestmem_gmem_prepare`` is due), not poisoned and unmapped, with no invalidation in
        progress, is resolved with one lookup of each map and installed as one leaf range.
        The ``guestmem_fault`` hook then sees it as one :class:`Fault` with ``npages`` set
        if the VM's backend policy declares ``guestmem_range_faults = True`` (the hook may
        lower ``fault.npages``); otherwise each page is faulted on its own.  Counters
        (``faults``, ``stage2_mapped_pages``) add up as for single faults; a run is one
        ``fault`` trace event with an ``npages`` field.
        """
        if npages <= 0:
            raise ValueError("npages must be positive")
        if self.dead:
            raise KvmError(errno.EIO, "CAP-9", f"VM is dead: {self.dead_reason}")
        ranges = bool(getattr(self.backend.policy, "guestmem_range_faults", False))
        end = gfn + npages
        cur = gfn
        while cur < end:
            try:
                if self.dead:  # a hook killed the VM
                    raise KvmError(errno.EIO, "CAP-9", f"VM is dead: {self.dead_reason}")
                run = self._uniform_run(cur, end, private) if ranges else None
                if run is not None:
                    cur += self._fault_run(cur, run, private, write, vcpu)
                else:
                    cur = self._fault_one(cur, end, private, write, vcpu)
            except (KvmError, GuestExit):
                if cur == gfn:
                    raise
                break
        return cur - gfn

    def _fault_one(self, gfn: int, end: int, private: bool, write: bool, vcpu: Any) -> int:
        """One vCPU access at *gfn*; returns the first gfn its leaf does not satisfy."""
        ent = self.mmu.sptes.entry(gfn)
        if ent is None or ent[2].private != private or not (ent[2].writable or not write):
            try:
                self.page_fault(Fault(gpa=gfn << PAGE_SHIFT, is_private=private, write=write, vcpu=vcpu))
            except _Emulate:
                raise MmioExit(gfn << PAGE_SHIFT, 0, write) from None
            ent = self.mmu.sptes.entry(gfn)
            if ent is None:
                return gfn + 1
        return min(ent[1], end)

    def _uniform_run(self, gfn: int, end: int, private: bool) -> tuple[int, Memslot, int, bool] | None:
        """``(end, slot, pfn, writable)`` of the uniform gmem run at *gfn* (2+ pages), or None."""
        if self.mmu.invalidate_in_progress or private != self.is_private(gfn):
            return None
        if self.has_private_mem:
            attr = self.attributes.entry(gfn)
            if attr is not None:
                end = min(end, attr[1])
            else:
                nxt = next(self.attributes.items(gfn, end), None)
                end = end if nxt is None else nxt[0]
        slot = self.slot_for_gfn(gfn)
        if slot is None or slot.flags & uapi.KVM_MEMSLOT_INVALID:
            return None
        if not (private or (slot.gmem_only and self.profile.gmem_only_faults_from_gmem)):
            return None
        file = slot.gmem_file
        if not slot.has_gmem or file is None or file.released or file.inode.folio_order:
            return None
        index = slot.gfn_to_index(gfn)
        bound = file.bindings.entry(index)
        folio = file.inode.pages.entry(index)
        if bound is None or bound[2] is not slot or folio is None:
            return None
        if not folio[2].uptodate or folio[2].hwpoison:
            return None
        end = min(end, slot.end_gfn, gfn + bound[1] - index, gfn + folio[1] - index)
        leaf = next(self.mmu.sptes.items(gfn, end), None)
        if leaf is not None:
            end = leaf[0]
        if end - gfn < 2:
            return None
        return end, slot, index + folio[2].delta, not slot.flags & uapi.KVM_MEM_READONLY

    def _fault_run(
        self, gfn: int, run: tuple[int, Memslot, int, bool], private: bool, write: bool, vcpu: Any
    ) -> int:
        """The fault of a uniform run (see :meth:`fault_range`); returns the pages mapped."""
        end, slot, pfn, writable = run
        fault = Fault(gpa=gfn << PAGE_SHIFT, is_private=private, write=write, vcpu=vcpu, npages=end - gfn)
        fault.mmu_seq = self.mmu.invalidate_seq
        gen = self.memslots_gen
        fault.slot, fault.pfn, fault.map_writable = slot, pfn, writable
        fault.max_level = _level_for_order(0)  # kvm_max_level_for_order(max_order = 0)
        self.hooks.fault(vm=self, fault=fault)
        if self.mmu.retry_gfn(fault.mmu_seq, gfn) or self.memslots_gen != gen:
            return self._fault_one(gfn, gfn + 1, private, write, vcpu) - gfn
        n = max(1, min(fault.npages, end - gfn))
        self.mmu.install(gfn, n, pfn, private, fault.map_writable, uapi.PG_LEVEL_4K)
        self.count("faults", n)
        level = uapi.PG_LEVEL_4K
        gpa = gfn << PAGE_SHIFT
        self.trace("fault", gpa=gpa, pfn=pfn, private=private, level=level, write=write, npages=n)
        return n

    def mapping_level(self, gfn: int) -> int | None:
        """Level of the stage-2 leaf mapping *gfn*, or None."""
        found = self.mmu.lookup(gfn)
        return None if found is None else found[1].level

    def is_mapped(self, gfn: int) -> bool:
        """True iff stage-2 has a leaf for *gfn*."""
        return self.mmu.lookup(gfn) is not None

    def zap_gfn_range(
        self, start: int, end: int, attr_filter: int = uapi.KVM_FILTER_PRIVATE | uapi.KVM_FILTER_SHARED
    ) -> None:
        """One MMU invalidation (begin, unmap, end) of ``[start, end)`` across memslots."""
        self.mmu.invalidate_begin()
        hit = False
        for as_id in sorted(self._slot_index):
            for s, e, slot in list(self._slots(as_id).items(start, end)):
                self.mmu.unmap_gfn_range(GfnRange(slot, s, e, attr_filter=attr_filter))
                hit = True
        if not hit:
            self.mmu.invalidate_range_add(start, end)
            self.mmu.zap(start, end)
        self.mmu.invalidate_end()

    def mmu_notifier_invalidate_range(self, start: int, end: int) -> None:
        """``kvm_mmu_notifier_invalidate_range_start``/``_end`` for host ``[start, end)``.

        ``__kvm_handle_hva_range``: every memslot (each address space) whose userspace range
        overlaps is unmapped with ``KVM_FILTER_SHARED``, inside one MMU invalidation that
        begins at the first such slot; no overlapping slot, no invalidation.
        """
        slots = sorted(self.memslots.values(), key=lambda slot: (slot.as_id, slot.userspace_addr))
        found = flush = False
        for slot in slots:
            lo = max(start, slot.userspace_addr)
            hi = min(end, slot.userspace_addr + (slot.npages << PAGE_SHIFT))
            if lo >= hi:
                continue
            if not found:
                found = True
                self.mmu.invalidate_begin()
            first = slot.base_gfn + ((lo - slot.userspace_addr) >> PAGE_SHIFT)
            last = slot.base_gfn + ((hi + PAGE_SIZE - 1 - slot.userspace_addr) >> PAGE_SHIFT)
            flush |= self.mmu.unmap_gfn_range(GfnRange(slot, first, last, attr_filter=uapi.KVM_FILTER_SHARED))
        if flush:
            self.count("remote_tlb_flushes")
        if found:
            self.mmu.invalidate_end()

    # --- gmem services for backends ---------------------------------------------------------
    def gfn_to_gmem(self, gfn: int) -> GmemLocation | None:
        """Memslot, inode and page index of *gfn* in guest_memfd, or None."""
        slot = self.slot_for_gfn(gfn)
        if slot is None or slot.gmem_file is None:
            return None
        return GmemLocation(slot, slot.gmem_file.inode, slot.gfn_to_index(gfn))

    def gmem_pfn(self, gfn: int) -> int | None:
        """The host pfn backing *gfn* in guest_memfd, or None if not allocated."""
        loc = self.gfn_to_gmem(gfn)
        return None if loc is None else loc.inode.pfn(loc.index)

    def gmem_populate(self, gfn: int, src: bytes | None, npages: int, opaque: Any = None) -> int:
        """``kvm_gmem_populate`` (P-1..P-5); returns the number of pages populated."""
        if npages <= 0:
            raise KvmError(errno.EINVAL, "P-1", "npages must be positive")
        slot = self.slot_for_gfn(gfn)
        if slot is None or not slot.has_gmem:
            raise KvmError(errno.EINVAL, "P-2", f"gfn {gfn:#x} is not in a guest_memfd memslot")
        file = slot.gmem_file
        if file is None or file.released:
            raise KvmError(errno.EFAULT, "P-2", "the memslot's guest_memfd was closed")
        npages = min(npages, slot.end_gfn - gfn)
        inode = file.inode
        done = 0
        file.get()  # kvm_gmem_get_file: a close meanwhile releases the file only at the end
        try:
            while done < npages:
                # The kernel's order: __kvm_gmem_get_pfn (binding, allocation, poison), then
                # "already prepared", then the attribute check (which leaves the folio allocated).
                cur = gfn + done
                index = slot.gfn_to_index(cur)
                if file.bindings.get(index) is not slot:
                    raise KvmError(
                        errno.EIO, "G-12", f"gmem index {index:#x} is not bound to {slot.describe()}"
                    )
                _, end, folio = inode.get_folio(index)
                if folio.hwpoison:
                    raise KvmError(EHWPOISON, "E-2", f"gmem page {index:#x} is hardware-poisoned")
                if folio.uptodate:
                    raise KvmError(errno.EEXIST, "P-4", f"gmem page {index:#x} is already prepared")
                # the largest aligned power of two the folio and the request allow
                n = 1 << (min(end - index, npages - done).bit_length() - 1)
                while index % n:
                    n //= 2
                while n > 1 and not self.attributes.covers(cur, cur + n, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE):
                    n //= 2
                if not self.is_private(cur):
                    raise KvmError(errno.EINVAL, "P-3", f"gfn {cur:#x} is not private")
                chunk = None if src is None else src[done * PAGE_SIZE : (done + n) * PAGE_SIZE]
                ret = self.hooks.post_populate(
                    vm=self,
                    gfn=cur,
                    pfn=index + folio.delta,
                    src=chunk,
                    order=n.bit_length() - 1,
                    opaque=opaque,
                )
                if ret:  # a nonzero return is the callback's -errno: not prepared, stop
                    raise KvmError(abs(int(ret)), "P-5", f"post_populate of gfn {cur:#x} returned {ret}")
                inode.set_state(index, index + n, uptodate=True)
                done += n
        except KvmError:
            if done == 0:
                raise
        finally:
            file.put()
        self.count("gmem_populated_pages", done)
        return done
