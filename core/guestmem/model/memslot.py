"""Memslots (``struct kvm_memory_slot``) and the checks of ``KVM_SET_USER_MEMORY_REGION(2)``.

:func:`check_region` runs every validation of spec 2.F in the kernel's order and returns
what the ioctl will do; nothing is changed until every check passed.
"""

from __future__ import annotations

import enum
import errno
from typing import TYPE_CHECKING

import attrs

from guestmem import uapi
from guestmem.errors import KvmError

if TYPE_CHECKING:
    from guestmem.model.gmem import GmemFile
    from guestmem.model.vm import ModelVm

PAGE_SIZE = uapi.PAGE_SIZE


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


@attrs.frozen
class Region:
    """``struct kvm_userspace_memory_region2`` as the ioctl received it."""

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd_offset: int = 0
    guest_memfd: int = 0

    @property
    def as_id(self) -> int:
        """Bits 31:16 of ``slot``."""
        return (self.slot >> 16) & 0xFFFF

    @property
    def id(self) -> int:
        """Bits 15:0 of ``slot``."""
        return self.slot & 0xFFFF


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

    old = vm.memslots.get((mem.as_id, mem.id))
    if mem.memory_size == 0:
        if old is None:
            raise KvmError(errno.EINVAL, "S-8", f"deleting slot {mem.as_id}:{mem.id}, which does not exist")
        return Change.DELETE, old

    base_gfn = mem.guest_phys_addr >> uapi.PAGE_SHIFT
    npages = mem.memory_size >> uapi.PAGE_SHIFT
    if old is None:
        change = Change.CREATE
        if vm.nr_memslot_pages + npages > uapi.ULONG_MAX:
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
        other = vm.slot_overlapping(mem.as_id, base_gfn, base_gfn + npages, exclude_id=mem.id)
        if other is not None:
            raise KvmError(errno.EEXIST, "S-14", f"gpa range overlaps {other.describe()}")
    return change, old
