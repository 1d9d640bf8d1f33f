"""Kernel uAPI constants, with the kernel's names and values.

Sources: ``include/uapi/linux/kvm.h``, ``arch/x86/include/uapi/asm/kvm.h`` and
``include/uapi/linux/falloc.h``, ``include/uapi/linux/kvm_para.h``,
``include/uapi/asm-generic/siginfo.h``.  Constants are plain
``int`` so values can be compared with what the real kernel returns; structs an ioctl
takes are frozen value classes with the kernel's field names.
"""

from __future__ import annotations

from typing import Final, NamedTuple, Self

from guestmem import cabi

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
PMD_ORDER: Final = 9  # 2 MiB on x86-64 / arm64 4K granule
PUD_ORDER: Final = 18  # 1 GiB

# Mapping levels, as arch/x86 PG_LEVEL_*.
PG_LEVEL_4K: Final = 1
PG_LEVEL_2M: Final = 2
PG_LEVEL_1G: Final = 3

# si_code of a SIGSEGV (include/uapi/asm-generic/siginfo.h).
SEGV_MAPERR: Final = 1  # no mapping at the address
SEGV_ACCERR: Final = 2  # a mapping, but the access is not allowed

# --- ioctl numbers (KVMIO = 0xAE) -------------------------------------------------------
KVMIO: Final = 0xAE
KVM_GET_API_VERSION: Final = 0xAE00
KVM_CREATE_VM: Final = 0xAE01
KVM_CHECK_EXTENSION: Final = 0xAE03
KVM_GET_VCPU_MMAP_SIZE: Final = 0xAE04
KVM_CREATE_VCPU: Final = 0xAE41
KVM_SET_USER_MEMORY_REGION: Final = 0x4020AE46
KVM_SET_USER_MEMORY_REGION2: Final = 0x40A0AE49
KVM_RUN: Final = 0xAE80
KVM_SET_MEMORY_ATTRIBUTES: Final = 0x4020AED2
KVM_CREATE_GUEST_MEMFD: Final = 0xC040AED4
KVM_PRE_FAULT_MEMORY: Final = 0xC040AED5

# --- memslot flags ---------------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1
KVM_MEM_GUEST_MEMFD: Final = 1 << 2
KVM_MEMSLOT_INVALID: Final = 1 << 16  # kernel-internal
KVM_MEMSLOT_GMEM_ONLY: Final = 1 << 17  # kernel-internal, [6.18]+

# --- guest_memfd flags -----------------------------------------------------------------
GUEST_MEMFD_FLAG_MMAP: Final = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED: Final = 1 << 1

# --- memory attributes and exits -------------------------------------------------------
KVM_MEMORY_ATTRIBUTE_PRIVATE: Final = 1 << 3
KVM_MEMORY_EXIT_FLAG_PRIVATE: Final = 1 << 3

KVM_EXIT_UNKNOWN: Final = 0
KVM_EXIT_IO: Final = 2
KVM_EXIT_HYPERCALL: Final = 3
KVM_EXIT_HLT: Final = 5
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_SHUTDOWN: Final = 8
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTERNAL_ERROR: Final = 17
KVM_EXIT_MEMORY_FAULT: Final = 39

# --- capabilities ----------------------------------------------------------------------
KVM_CAP_USER_MEMORY: Final = 3
KVM_CAP_NR_MEMSLOTS: Final = 10
KVM_CAP_READONLY_MEM: Final = 81
KVM_CAP_MULTI_ADDRESS_SPACE: Final = 118
KVM_CAP_EXIT_HYPERCALL: Final = 201
KVM_CAP_USER_MEMORY2: Final = 231
KVM_CAP_MEMORY_FAULT_INFO: Final = 232
KVM_CAP_MEMORY_ATTRIBUTES: Final = 233
KVM_CAP_GUEST_MEMFD: Final = 234
KVM_CAP_VM_TYPES: Final = 235
KVM_CAP_PRE_FAULT_MEMORY: Final = 236
KVM_CAP_GUEST_MEMFD_FLAGS: Final = 244

# --- x86 VM types ----------------------------------------------------------------------
KVM_X86_DEFAULT_VM: Final = 0
KVM_X86_SW_PROTECTED_VM: Final = 1
KVM_X86_SEV_VM: Final = 2
KVM_X86_SEV_ES_VM: Final = 3
KVM_X86_SNP_VM: Final = 4
KVM_X86_TDX_VM: Final = 5

# --- VM ioctls with an argument the backend interprets -----------------------------------
KVM_ENABLE_CAP: Final = 0x4068AEA3  # _IOW(KVMIO, 0xa3, struct kvm_enable_cap)
KVM_MEMORY_ENCRYPT_OP: Final = 0xC008AEBA  # _IOWR(KVMIO, 0xba, unsigned long)

# --- hypercalls (include/uapi/linux/kvm_para.h) ----------------------------------------
KVM_ENOSYS: Final = 1000
KVM_EFAULT: Final = 14
KVM_EINVAL: Final = 22
KVM_E2BIG: Final = 7
KVM_EPERM: Final = 1
KVM_EOPNOTSUPP: Final = 95
KVM_HC_VAPIC_POLL_IRQ: Final = 1
KVM_HC_KICK_CPU: Final = 5
KVM_HC_SCHED_YIELD: Final = 11
KVM_HC_MAP_GPA_RANGE: Final = 12
KVM_MAP_GPA_RANGE_PAGE_SZ_4K: Final = 0
KVM_MAP_GPA_RANGE_PAGE_SZ_2M: Final = 1 << 0
KVM_MAP_GPA_RANGE_PAGE_SZ_1G: Final = 1 << 1
KVM_MAP_GPA_RANGE_ENCRYPTED: Final = 1 << 4
KVM_MAP_GPA_RANGE_DECRYPTED: Final = 0 << 4
#: x86 ``KVM_EXIT_HYPERCALL_VALID_MASK``: only MAP_GPA_RANGE may exit to userspace.
KVM_EXIT_HYPERCALL_VALID_MASK: Final = 1 << KVM_HC_MAP_GPA_RANGE
KVM_EXIT_HYPERCALL_LONG_MODE: Final = 1 << 0

# --- madvise(2) advice the host-mapping face takes --------------------------------------
MADV_DONTNEED: Final = 4
MADV_REMOVE: Final = 9

# --- fallocate modes (include/uapi/linux/falloc.h) -------------------------------------
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02

# --- limits ----------------------------------------------------------------------------
SHRT_MAX: Final = 0x7FFF
KVM_MEM_SLOTS_NUM: Final = SHRT_MAX
KVM_INTERNAL_MEM_SLOTS: Final = 3  # x86
KVM_USER_MEM_SLOTS: Final = KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS
KVM_MEM_MAX_NR_PAGES: Final = (1 << 31) - 1
U64_MAX: Final = (1 << 64) - 1
ULONG_MAX: Final = U64_MAX
LOFF_MAX: Final = (1 << 63) - 1
# x86-64 4-level paging: the highest user address + 1 (TASK_SIZE_MAX).
TASK_SIZE: Final = (1 << 47) - PAGE_SIZE

# Range filters (kernel-internal enum kvm_gfn_range_filter).
KVM_FILTER_SHARED: Final = 1 << 0
KVM_FILTER_PRIVATE: Final = 1 << 1

VM_TYPE_NAMES: Final[dict[int, str]] = {
    KVM_X86_DEFAULT_VM: "KVM_X86_DEFAULT_VM",
    KVM_X86_SW_PROTECTED_VM: "KVM_X86_SW_PROTECTED_VM",
    KVM_X86_SEV_VM: "KVM_X86_SEV_VM",
    KVM_X86_SEV_ES_VM: "KVM_X86_SEV_ES_VM",
    KVM_X86_SNP_VM: "KVM_X86_SNP_VM",
    KVM_X86_TDX_VM: "KVM_X86_TDX_VM",
}

CAP_NAMES: Final[dict[int, str]] = {
    value: name
    for name, value in dict(globals()).items()
    if name.startswith("KVM_CAP_") and isinstance(value, int)
}


# --- the structs ioctls read, field by field as the kernel declares them --------------------
# Each ``of()`` takes the Python arguments of the uAPI face and converts every field as the
# C compiler would store it (guestmem.cabi): a non-integer is a TypeError naming the field.


class KvmEnableCap(NamedTuple):
    """``struct kvm_enable_cap`` (``include/uapi/linux/kvm.h``): the argument of
    ``KVM_ENABLE_CAP``: ``__u32 cap; __u32 flags; __u64 args[4]; __u8 pad[64]``."""

    cap: int
    flags: int = 0
    args: tuple[int, ...] = ()

    @classmethod
    def of(cls, cap: object, flags: object, args: tuple[object, ...]) -> Self:
        """The struct a ``KVM_ENABLE_CAP`` call fills; more than four *args* do not fit
        (ValueError)."""
        if len(args) > 4:
            raise ValueError(f"struct kvm_enable_cap has four args, not {len(args)}")
        values = tuple(cabi.u64(arg, f"args[{i}]") for i, arg in enumerate(args))
        return cls(cabi.u32(cap, "cap"), cabi.u32(flags, "flags"), values)


class KvmUserspaceMemoryRegion2(NamedTuple):
    """``struct kvm_userspace_memory_region2`` (``include/uapi/linux/kvm.h``):
    ``__u32 slot; __u32 flags; __u64 guest_phys_addr; __u64 memory_size;
    __u64 userspace_addr; __u64 guest_memfd_offset; __u32 guest_memfd; __u32 pad1;
    __u64 pad2[14]``.  ``KVM_SET_USER_MEMORY_REGION`` reads its first five fields
    (``struct kvm_userspace_memory_region``) and zeroes the rest."""

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd_offset: int = 0
    guest_memfd: int = 0

    @property
    def as_id(self) -> int:
        """Bits 31:16 of ``slot``: the address space."""
        return (self.slot >> 16) & 0xFFFF

    @property
    def id(self) -> int:
        """Bits 15:0 of ``slot``: the memslot id."""
        return self.slot & 0xFFFF

    @classmethod
    def of(
        cls,
        slot: object,
        flags: object,
        guest_phys_addr: object,
        memory_size: object,
        userspace_addr: object,
        guest_memfd_offset: object = 0,
        guest_memfd: object = None,
    ) -> Self:
        """The struct for these arguments; *guest_memfd* is a file object, an fd number or
        None (:func:`guestmem.cabi.fd`)."""
        return cls(
            cabi.u32(slot, "slot"),
            cabi.u32(flags, "flags"),
            cabi.u64(guest_phys_addr, "guest_phys_addr"),
            cabi.u64(memory_size, "memory_size"),
            cabi.u64(userspace_addr, "userspace_addr"),
            cabi.u64(guest_memfd_offset, "guest_memfd_offset"),
            cabi.fd(guest_memfd, "guest_memfd"),
        )


class KvmMemoryAttributes(NamedTuple):
    """``struct kvm_memory_attributes`` (``include/uapi/linux/kvm.h``):
    ``__u64 address; __u64 size; __u64 attributes; __u64 flags``."""

    address: int
    size: int
    attributes: int
    flags: int

    @classmethod
    def of(cls, address: object, size: object, attributes: object, flags: object) -> Self:
        """The struct for these arguments."""
        return cls(
            cabi.u64(address, "address"),
            cabi.u64(size, "size"),
            cabi.u64(attributes, "attributes"),
            cabi.u64(flags, "flags"),
        )


class KvmCreateGuestMemfd(NamedTuple):
    """``struct kvm_create_guest_memfd`` (``include/uapi/linux/kvm.h``):
    ``__u64 size; __u64 flags; __u64 reserved[6]``.  ``kvm_gmem_create`` reads ``size``
    into a ``loff_t`` (so bit 63 makes it negative: EINVAL, C-4)."""

    size: int
    flags: int

    @classmethod
    def of(cls, size: object, flags: object) -> Self:
        """The struct for these arguments."""
        return cls(cabi.u64(size, "size"), cabi.u64(flags, "flags"))


class KvmPreFaultMemory(NamedTuple):
    """``struct kvm_pre_fault_memory`` (``include/uapi/linux/kvm.h``):
    ``__u64 gpa; __u64 size; __u64 flags; __u64 padding[5]``."""

    gpa: int
    size: int
    flags: int

    @classmethod
    def of(cls, gpa: object, size: object, flags: object) -> Self:
        """The struct for these arguments."""
        return cls(cabi.u64(gpa, "gpa"), cabi.u64(size, "size"), cabi.u64(flags, "flags"))
