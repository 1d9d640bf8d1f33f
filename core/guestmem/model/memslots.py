"""Memslots: ``struct kvm_memory_slot``, the VM's table of them and
``KVM_SET_USER_MEMORY_REGION(2)`` (rules S-*, B-1..B-3).

:func:`check_region` runs every validation of ``kvm_set_memory_region`` in the kernel's
order and returns what the ioctl will do; nothing is changed until every check passed.
:class:`Memslots` then applies it as ``kvm_set_memslot`` does.
"""

from __future__ import annotations

import enum
import errno
from typing import TYPE_CHECKING

import attrs

from guestmem import uapi
from guestmem.backend import GfnRange, SlotView, VmTypeInfo
from guestmem.errors import KvmError
from guestmem.ranges import RangeMap

if TYPE_CHECKING:
    from collections.abc import Iterator

    from guestmem.model.gmem import GmemFile
    from guestmem.model.vm import ModelVm

PAGE_SIZE = uapi.PAGE_SIZE
#: arm64 ``KVM_VM_TYPE_ARM_IPA_SIZE_MASK``: bits 7:0 of the machine type ask for an IPA size.
KVM_VM_TYPE_ARM_IPA_SIZE_MASK = 0xFF
#: arm64 ``KVM_PHYS_SHIFT_DEFAULT``: the IPA size of a machine type that asks for none.
KVM_PHYS_SHIFT_DEFAULT = 40


def guest_phys_shift(info: VmTypeInfo, x86_phys_bits: int) -> int:
    """The guest physical address width of a VM of type *info*, in bits.

    x86: the host's (``kvm_mmu_max_gfn``: MAXPHYADDR with TDP, here the profile's
    *x86_phys_bits*).  arm64: ``kvm_init_ipa_range``, ``KVM_VM_TYPE_ARM_IPA_SIZE(type)``
    or, for 0, ``KVM_PHYS_SHIFT_DEFAULT``.
    """
    if info.arch == "arm64":
        return info.type & KVM_VM_TYPE_ARM_IPA_SIZE_MASK or KVM_PHYS_SHIFT_DEFAULT
    return x86_phys_bits


@attrs.define(eq=False)
class Memslot:
    """One memslot.  ``gmem_file`` is not a reference (L-2): release NULLs it (L-3)."""

    as_id: int
    id: int
    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int
    gmem_file: GmemFile | None = None
    gmem_pgoff: int = 0
    #: What the slot was created with (``KVM_MEM_GUEST_MEMFD`` stays set after release).
    gmem_only: bool = False

    @property
    def end_gfn(self) -> int:
        """One past the last gfn."""
        return self.base_gfn + self.npages

    @property
    def has_gmem(self) -> bool:
        """``kvm_slot_has_gmem``: the slot was created with KVM_MEM_GUEST_MEMFD."""
        return bool(self.flags & uapi.KVM_MEM_GUEST_MEMFD)

    def gfn_to_index(self, gfn: int) -> int:
        """``kvm_gmem_get_index``: the gmem page index backing *gfn*."""
        return gfn - self.base_gfn + self.gmem_pgoff

    def gfn_to_hva(self, gfn: int) -> int:
        """``__gfn_to_hva_memslot``."""
        return self.userspace_addr + (gfn - self.base_gfn) * PAGE_SIZE

    @property
    def view(self) -> SlotView:
        """The slot as hooks see it."""
        return SlotView(self)

    def describe(self) -> str:
        """``slot AS:ID gpa [a, b)``."""
        gpa = self.base_gfn * PAGE_SIZE
        return f"slot {self.as_id}:{self.id} gpa [{gpa:#x}, {gpa + self.npages * PAGE_SIZE:#x})"


class Change(enum.Enum):
    """``enum kvm_mr_change``, plus NONE for an identical re-issue (S-13)."""

    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags_only"
    NONE = "none"


#: ``struct kvm_userspace_memory_region2`` as the ioctl received it.
Region = uapi.KvmUserspaceMemoryRegion2


def access_ok(addr: int, size: int) -> bool:
    """x86-64 ``access_ok``: ``[addr, addr+size)`` lies in user space."""
    return size <= uapi.TASK_SIZE and addr <= uapi.TASK_SIZE - size


def check_flags(vm: ModelVm, flags: int) -> None:
    """``check_memory_region_flags`` (S-4)."""
    valid = uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_GUEST_MEMFD
    if flags & uapi.KVM_MEM_GUEST_MEMFD:
        valid &= ~uapi.KVM_MEM_LOG_DIRTY_PAGES
    if vm.type_info.readonly_mem and not flags & uapi.KVM_MEM_GUEST_MEMFD:
        valid |= uapi.KVM_MEM_READONLY
    if flags & ~valid:
        raise KvmError(
            errno.EINVAL, "S-4", f"memslot flags {flags:#x} not in the valid set {valid:#x} for this VM"
        )


def check_region(vm: ModelVm, mem: Region) -> tuple[Change, Memslot | None]:
    """Validate *mem* as ``kvm_set_memory_region`` does, in its order (S-4..S-14).

    Returns the change and the existing slot; gmem binding (B-*) comes after this.
    """
    check_flags(vm, mem.flags)
    u64 = uapi.U64_MAX
    if mem.memory_size % PAGE_SIZE or mem.memory_size > uapi.ULONG_MAX:
        raise KvmError(errno.EINVAL, "S-5", f"memory_size {mem.memory_size:#x} is not page aligned")
    if mem.guest_phys_addr % PAGE_SIZE:
        raise KvmError(errno.EINVAL, "S-5", f"guest_phys_addr {mem.guest_phys_addr:#x} is not page aligned")
    if mem.userspace_addr % PAGE_SIZE or not access_ok(mem.userspace_addr, mem.memory_size):
        raise KvmError(
            errno.EINVAL,
            "S-5",
            f"userspace_addr {mem.userspace_addr:#x} (+{mem.memory_size:#x}) "
            "is unaligned or not a user address",
        )
    if mem.flags & uapi.KVM_MEM_GUEST_MEMFD and (
        mem.guest_memfd_offset % PAGE_SIZE or mem.guest_memfd_offset + mem.memory_size > u64
    ):
        raise KvmError(
            errno.EINVAL, "S-6", f"guest_memfd_offset {mem.guest_memfd_offset:#x} unaligned or wraps"
        )
    nr_as_ids = vm.type_info.nr_memslot_as_ids if vm.profile.smm else 1
    if mem.as_id >= nr_as_ids or mem.id >= uapi.KVM_MEM_SLOTS_NUM:
        raise KvmError(errno.EINVAL, "S-7", f"address space {mem.as_id} / slot id {mem.id} out of range")
    if mem.guest_phys_addr + mem.memory_size > u64:
        raise KvmError(errno.EINVAL, "S-7", "guest_phys_addr + memory_size wraps")
    if mem.id < uapi.KVM_USER_MEM_SLOTS and mem.memory_size >> uapi.PAGE_SHIFT > uapi.KVM_MEM_MAX_NR_PAGES:
        raise KvmError(errno.EINVAL, "S-7", "memslot larger than KVM_MEM_MAX_NR_PAGES")

    old = vm.slots.by_id.get((mem.as_id, mem.id))
    if mem.memory_size == 0:
        if old is None:
            raise KvmError(errno.EINVAL, "S-8", f"deleting slot {mem.as_id}:{mem.id}, which does not exist")
        return Change.DELETE, old

    base_gfn = mem.guest_phys_addr >> uapi.PAGE_SHIFT
    npages = mem.memory_size >> uapi.PAGE_SHIFT
    if old is None:
        change = Change.CREATE
        if vm.slots.nr_pages + npages > uapi.ULONG_MAX:
            raise KvmError(errno.EINVAL, "S-10", "total memslot pages overflow")
    else:
        if mem.flags & uapi.KVM_MEM_GUEST_MEMFD:
            raise KvmError(errno.EINVAL, "S-11", "private memslots are immutable, they can only be deleted")
        if (
            mem.userspace_addr != old.userspace_addr
            or npages != old.npages
            or (mem.flags ^ old.flags) & (uapi.KVM_MEM_READONLY | uapi.KVM_MEM_GUEST_MEMFD)
        ):
            raise KvmError(
                errno.EINVAL, "S-12", "modifying a memslot may change only its gpa or LOG_DIRTY_PAGES"
            )
        if base_gfn != old.base_gfn:
            change = Change.MOVE
        elif mem.flags != old.flags:
            change = Change.FLAGS_ONLY
        else:
            return Change.NONE, old

    if change in (Change.CREATE, Change.MOVE):
        other = vm.slots.overlapping(mem.as_id, base_gfn, base_gfn + npages, exclude_id=mem.id)
        if other is not None:
            raise KvmError(errno.EEXIST, "S-14", f"gpa range overlaps {other.describe()}")
    return change, old


class Memslots:
    """``kvm->memslots``: the VM's memslots by id and, per address space, by gfn."""

    def __init__(self, vm: ModelVm) -> None:
        self.vm = vm
        self.by_id: dict[tuple[int, int], Memslot] = {}
        self._by_gfn: dict[int, RangeMap[Memslot]] = {}
        #: ``kvm->nr_memslot_pages``.
        self.nr_pages = 0
        #: Bumped by every update (``kvm_swap_active_memslots``): a fault that saw another
        #: generation retries, as SRCU would have kept the update from overtaking it.
        self.gen = 0
        #: A memslot was ever created, or a vCPU entered the guest (profile
        #: ``pre_fault_enospc_before_first_memslot``).
        self.ever_used = False

    # --- lookups ---------------------------------------------------------------------------
    def table(self, as_id: int) -> RangeMap[Memslot]:
        """The gfn index of address space *as_id*."""
        table = self._by_gfn.get(as_id)
        if table is None:
            table = self._by_gfn[as_id] = RangeMap()
        return table

    def for_gfn(self, gfn: int, as_id: int = 0) -> Memslot | None:
        """``gfn_to_memslot``."""
        table = self._by_gfn.get(as_id)
        return None if table is None else table.get(gfn)

    def overlapping(self, as_id: int, start: int, end: int, exclude_id: int = -1) -> Memslot | None:
        """``kvm_check_memslot_overlap``: a slot of *as_id* (not *exclude_id*) in ``[start, end)``."""
        for _, _, slot in self.table(as_id).items(start, end):
            if slot.id != exclude_id:
                return slot
        return None

    def ranges(self, start: int, end: int) -> Iterator[tuple[int, int, Memslot]]:
        """``(s, e, slot)`` for every slot of every address space overlapping ``[start, end)``."""
        for as_id in sorted(self._by_gfn):
            yield from list(self._by_gfn[as_id].items(start, end))

    def in_order(self) -> list[Memslot]:
        """Every slot, by address space and gfn."""
        return [slot for as_id in sorted(self._by_gfn) for _, _, slot in self._by_gfn[as_id].items()]

    # --- KVM_SET_USER_MEMORY_REGION2 after the ioctl's own checks ------------------------------
    def set_region(self, mem: Region) -> None:
        """``kvm_set_memory_region``: check, then create, delete, move or change flags."""
        change, old = check_region(self.vm, mem)
        if change is Change.NONE:
            return
        self.gen += 1
        if change is Change.DELETE:
            assert old is not None
            self._delete(old)
        elif change is Change.CREATE:
            self._create(mem)
        else:
            assert old is not None
            self._modify(old, mem, change)

    def _create(self, mem: Region) -> None:
        vm = self.vm
        new = Memslot(
            as_id=mem.as_id,
            id=mem.id,
            base_gfn=mem.guest_phys_addr >> uapi.PAGE_SHIFT,
            npages=mem.memory_size >> uapi.PAGE_SHIFT,
            flags=mem.flags,
            userspace_addr=mem.userspace_addr,
        )
        file: GmemFile | None = None
        if mem.flags & uapi.KVM_MEM_GUEST_MEMFD:
            file = self._gmem_file_for_bind(mem.guest_memfd)
            file.bind(new, mem.guest_memfd_offset)
        try:
            self._prepare(None, new, Change.CREATE)
        except KvmError:
            if file is not None:
                file.unbind(new)
            raise
        self.by_id[(new.as_id, new.id)] = new
        self.ever_used = True
        self.table(new.as_id).set(new.base_gfn, new.end_gfn, new)
        self.nr_pages += new.npages
        vm.trace(
            "memslot_create",
            slot=new.id,
            as_id=new.as_id,
            gpa=new.base_gfn << uapi.PAGE_SHIFT,
            size=new.npages << uapi.PAGE_SHIFT,
            flags=new.flags,
        )

    def _gmem_file_for_bind(self, fd: int) -> GmemFile:
        """The fd checks of ``kvm_gmem_bind`` (B-1..B-3)."""
        from guestmem.model.files import ModelGuestMemfd

        obj = self.vm.kvm.fd_lookup(fd)
        if obj is None:
            raise KvmError(errno.EBADF, "B-1", f"guest_memfd {fd} is not an open file descriptor")
        if not isinstance(obj, ModelGuestMemfd):
            raise KvmError(errno.EINVAL, "B-2", f"fd {fd} is not a guest_memfd ({type(obj).__name__})")
        if obj.file.vm is not self.vm:
            raise KvmError(errno.EINVAL, "B-3", f"guest_memfd {fd} belongs to another VM")
        return obj.file

    def _prepare(self, old: Memslot | None, new: Memslot | None, change: Change) -> None:
        """``kvm_arch_prepare_memory_region`` for every change (S-7 max gfn, S-16), then the
        backend's.

        The architecture's own: x86 refuses a create or move beyond ``kvm_mmu_max_gfn`` with
        EINVAL; arm64 a create, move or flags change beyond the IPA space
        (``kvm_phys_size``) with EFAULT, then a gmem slot that is not gmem-only (S-16).
        """
        vm = self.vm
        if new is not None and new.end_gfn - 1 > vm.max_gfn:  # new is None only for a delete
            if vm.type_info.arch == "arm64":
                raise KvmError(errno.EFAULT, "S-7", f"{new.describe()} lies beyond the guest's IPA space")
            if change in (Change.CREATE, Change.MOVE):
                raise KvmError(
                    errno.EINVAL, "S-7", f"{new.describe()} exceeds the guest physical address width"
                )
        if (
            new is not None
            and change in (Change.CREATE, Change.MOVE)
            and vm.type_info.gmem_slot_requires_mmap
            and new.has_gmem
            and not new.gmem_only
        ):
            raise KvmError(
                errno.EINVAL, "S-16", "a guest_memfd memslot needs a GUEST_MEMFD_FLAG_MMAP file here"
            )
        vm.hooks.prepare_memory_region(
            vm.view, None if old is None else old.view, None if new is None else new.view, change.value
        )

    def _flush(self, slot: Memslot) -> None:
        """``kvm_invalidate_memslot``: mark the slot INVALID, then zap every leaf of it.

        ``kvm_arch_flush_shadow_memslot`` (x86 ``kvm_mmu_zap_memslot``) calls
        ``kvm_unmap_gfn_range`` under mmu_lock only: no MMU invalidation, so
        ``mmu_invalidate_seq`` does not move.  A fault that meets the slot meanwhile retries
        (G-8); the flag goes again when the delete or move is committed.
        """
        slot.flags |= uapi.KVM_MEMSLOT_INVALID
        self.gen += 1
        if self.vm.mmu.kvm_unmap_gfn_range(GfnRange(slot.view, slot.base_gfn, slot.end_gfn)):
            self.vm.count("remote_tlb_flushes")

    def _delete(self, slot: Memslot) -> None:
        """S-9: invalidate and zap, prepare, free, unbind (B-8..B-10).

        As for a move, ``kvm_set_memslot`` zaps before ``kvm_prepare_memory_region``; a
        refused delete reactivates the slot with its mappings zapped.
        """
        self._flush(slot)
        try:
            self._prepare(slot, None, Change.DELETE)
        except KvmError:
            slot.flags &= ~uapi.KVM_MEMSLOT_INVALID
            self.gen += 1
            raise
        self._remove(slot)
        self.vm.trace("memslot_delete", slot=slot.id, as_id=slot.as_id)

    def _remove(self, slot: Memslot) -> None:
        """``kvm_free_memslot``: out of the table, unbound from its guest_memfd."""
        del self.by_id[(slot.as_id, slot.id)]
        self.table(slot.as_id).erase(slot.base_gfn, slot.end_gfn)
        self.nr_pages -= slot.npages
        if slot.gmem_file is not None:
            slot.gmem_file.unbind(slot)

    def _modify(self, slot: Memslot, mem: Region, change: Change) -> None:
        """S-13: move to a new gpa, or change LOG_DIRTY_PAGES."""
        vm = self.vm
        if change is Change.MOVE:
            moved = Memslot(
                slot.as_id,
                slot.id,
                mem.guest_phys_addr >> uapi.PAGE_SHIFT,
                slot.npages,
                mem.flags,
                slot.userspace_addr,
                gmem_pgoff=slot.gmem_pgoff,
            )
            # kvm_set_memslot: kvm_invalidate_memslot (zap) comes before
            # kvm_prepare_memory_region; if that fails, the old slot is reactivated
            # (kvm_activate_memslot) but its mappings stay zapped.
            self._flush(slot)
            try:
                self._prepare(slot, moved, change)
            except KvmError:
                slot.flags &= ~uapi.KVM_MEMSLOT_INVALID
                self.gen += 1
                raise
            self.table(slot.as_id).erase(slot.base_gfn, slot.end_gfn)
            slot.base_gfn = moved.base_gfn
            self.table(slot.as_id).set(slot.base_gfn, slot.end_gfn, slot)
        else:
            self._prepare(slot, attrs.evolve(slot, flags=mem.flags), change)
        enable_dirty_log = (mem.flags & ~slot.flags) & uapi.KVM_MEM_LOG_DIRTY_PAGES
        slot.flags = mem.flags  # also drops KVM_MEMSLOT_INVALID
        if change is Change.FLAGS_ONLY and enable_dirty_log:
            vm.mmu.write_protect_4k(slot.base_gfn, slot.end_gfn)
        vm.trace("memslot_" + change.value, slot=slot.id, as_id=slot.as_id)

    def free_all(self) -> None:
        """``kvm_free_memslots`` at VM destruction."""
        for slot in list(self.by_id.values()):
            self._remove(slot)
