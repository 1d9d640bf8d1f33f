"""Gunyah ABI constants with their sources' names and values.

Sources: ``CodeLinaro-mirror/linux-kernel_gunyah-linux`` ``include/uapi/linux/gunyah.h``
(``/dev/gunyah`` ioctls, ``enum gunyah_map_flags``, ``GHMF_*``, vCPU exits),
``drivers/virt/gunyah/rsc_mgr_rpc.c`` and ``rsc_mgr.h`` (RM RPC ids, VM status,
``gunyah_rm_error_remap``), ``include/linux/gunyah.h`` (hypercall errors,
``gunyah_error_remap``, memextent donate types, addrspace map flags);
``quic/gunyah-resource-manager`` ``include/memparcel_msg.h`` and ``include/rm_types.h``
(memparcel RPCs and flags, RM error codes, VMIDs); ``quic/gunyah-hypervisor``
``hyp/core/base/types.tc`` and ``hyp/interfaces/memdb/memdb.tc`` (hypervisor errors).
"""

from __future__ import annotations

import enum
import errno
from typing import Final

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (GUNYAH_IOCTL_TYPE << 8) | nr


# --- /dev/gunyah and VM fd ioctls (include/uapi/linux/gunyah.h) -----------------------------
GUNYAH_IOCTL_TYPE: Final = ord("G")
_IOC_WRITE = 1
GUNYAH_CREATE_VM: Final = _ioc(0, 0x0, 0)
GUNYAH_VM_SET_DTB_CONFIG: Final = _ioc(_IOC_WRITE, 0x2, 16)
GUNYAH_VM_START: Final = _ioc(0, 0x3, 0)
GUNYAH_VM_ADD_FUNCTION: Final = _ioc(_IOC_WRITE, 0x4, 16)
GUNYAH_VCPU_RUN: Final = _ioc(0, 0x5, 0)
GUNYAH_VCPU_MMAP_SIZE: Final = _ioc(0, 0x6, 0)
GUNYAH_VM_REMOVE_FUNCTION: Final = _ioc(_IOC_WRITE, 0x7, 16)
GUNYAH_CREATE_GUEST_MEM: Final = _ioc(_IOC_WRITE, 0x8, 64)
GUNYAH_VM_MAP_MEM: Final = _ioc(_IOC_WRITE, 0x9, 32)
GUNYAH_VM_SET_BOOT_CONTEXT: Final = _ioc(_IOC_WRITE, 0xA, 16)

#: The ``KVM_CREATE_VM`` type of the uAPI face: ``GUNYAH_CREATE_VM``'s argument is "reserved
#: for future use" and must be 0 (``gunyah_dev_ioctl_create_vm``).
GUNYAH_VM_TYPE: Final = 0

# enum gunyah_vm_boot_context_reg (GUNYAH_VM_SET_BOOT_CONTEXT)
REG_SET_X: Final = 0
REG_SET_PC: Final = 1
REG_SET_SP: Final = 2
GUNYAH_VM_BOOT_CONTEXT_REG_SHIFT: Final = 8


def GUNYAH_VM_BOOT_CONTEXT_REG(reg: int, idx: int) -> int:  # noqa: N802 - the uAPI macro's name
    """The ``reg`` of ``struct gunyah_vm_boot_context``."""
    return ((reg & 0xFF) << GUNYAH_VM_BOOT_CONTEXT_REG_SHIFT) | (idx & 0xFF)


# enum gunyah_mem_flags (GUNYAH_CREATE_GUEST_MEM)
GHMF_CLOEXEC: Final = 1 << 0
GHMF_ALLOW_HUGEPAGE: Final = 1 << 1

# enum gunyah_map_flags (GUNYAH_VM_MAP_MEM)
GUNYAH_MEM_ALLOW_READ: Final = 1 << 0
GUNYAH_MEM_ALLOW_WRITE: Final = 1 << 1
GUNYAH_MEM_ALLOW_EXEC: Final = 1 << 2
GUNYAH_MEM_ALLOW_RWX: Final = GUNYAH_MEM_ALLOW_READ | GUNYAH_MEM_ALLOW_WRITE | GUNYAH_MEM_ALLOW_EXEC
GUNYAH_MEM_DEFAULT_ACCESS: Final = 0x00
GUNYAH_MEM_FORCE_LEND: Final = 0x10
GUNYAH_MEM_FORCE_SHARE: Final = 0x20
GUNYAH_MEM_ACCESS_MASK: Final = 0x70
GUNYAH_MEM_UNMAP: Final = 1 << 8

# enum gunyah_vcpu_exit, enum gunyah_vcpu_resume_action
GUNYAH_VCPU_EXIT_UNKNOWN: Final = 0
GUNYAH_VCPU_EXIT_MMIO: Final = 1
GUNYAH_VCPU_EXIT_STATUS: Final = 2
GUNYAH_VCPU_EXIT_PAGE_FAULT: Final = 3
GUNYAH_VCPU_RESUME_HANDLED: Final = 0
GUNYAH_VCPU_RESUME_FAULT: Final = 1
GUNYAH_VCPU_RESUME_RETRY: Final = 2

# enum gunyah_vm_status (vcpu_run->status.status)
GUNYAH_VM_STATUS_LOAD_FAILED: Final = 1
GUNYAH_VM_STATUS_EXITED: Final = 2
GUNYAH_VM_STATUS_CRASHED: Final = 3


# --- resource manager RPCs -------------------------------------------------------------------
class Rpc(enum.IntEnum):
    """RM message ids (``rsc_mgr_rpc.c``; ``memparcel_msg.h`` and ``vm_mgnt_message.h`` of the RM)."""

    MEM_DONATE = 0x51000010
    MEM_ACCEPT = 0x51000011
    MEM_LEND = 0x51000012
    MEM_SHARE = 0x51000013
    MEM_RELEASE = 0x51000014
    MEM_RECLAIM = 0x51000015
    MEM_NOTIFY = 0x51000017
    MEM_APPEND = 0x51000018
    VM_ALLOC_VMID = 0x56000001
    VM_DEALLOC_VMID = 0x56000002
    VM_START = 0x56000004
    VM_STOP = 0x56000005
    VM_RESET = 0x56000006
    VM_CONFIG_IMAGE = 0x56000009
    VM_INIT = 0x5600000B
    VM_EXIT = 0x56000085
    VM_GET_HYP_RESOURCES = 0x56000020
    VM_GET_VMID = 0x56000024
    VM_SET_BOOT_CONTEXT = 0x56000031
    VM_SET_DEMAND_PAGING = 0x56000033
    VM_SET_ADDRESS_LAYOUT = 0x56000034


class Notification(enum.IntEnum):
    """RM notification ids (``memparcel_msg.h``; ``enum gunyah_rm_notification_id``)."""

    MEM_SHARED = 0x51100011
    MEM_RELEASED = 0x51100012
    MEM_ACCEPTED = 0x51100013
    MEM_RECALL = 0x51100014
    VM_EXITED = 0x56100001
    VM_STATUS = 0x56100008


#: Memory entries ``gunyah_rm_mem_share`` puts in one LEND/SHARE message; the rest go in
#: ``MEM_APPEND`` messages of at most as many (``GUNYAH_RM_MAX_MEM_ENTRIES``).
GUNYAH_RM_MAX_MEM_ENTRIES: Final = 512
#: The RM's limit on any list of a request (``MAX_LIST_ENTRIES``, ``memparcel.h``).
MAX_LIST_ENTRIES: Final = 512
#: Memparcels one VM may own (``MAX_MEMPARCEL_PER_VM``, ``memparcel.c``).
MAX_MEMPARCEL_PER_VM: Final = 64
#: ``ADDR_LIMIT`` (``vm_memory.h``): ``util_bit(32 + PAGE_BITS)``, in bytes.
ADDR_LIMIT: Final = 1 << (32 + PAGE_SHIFT)
MEMPARCEL_INVALID_HANDLE: Final = 0xFFFFFFFF

# memparcel_msg.h
MEM_TYPE_NORMAL: Final = 0
MEM_TYPE_IO: Final = 1
MEM_RIGHTS_X: Final = 0x1
MEM_RIGHTS_W: Final = 0x2
MEM_RIGHTS_R: Final = 0x4
MEM_RIGHTS_RX: Final = 0x5
MEM_RIGHTS_RW: Final = 0x6
MEM_RIGHTS_RWX: Final = 0x7
MEM_CREATE_FLAG_SANITIZE: Final = 1
MEM_CREATE_FLAG_APPEND: Final = 2
MEM_APPEND_FLAG_DONE: Final = 1
MEM_ACCEPT_FLAG_VALIDATE_SANITIZED: Final = 1
MEM_ACCEPT_FLAG_VALIDATE_ACL_ATTR: Final = 2
MEM_ACCEPT_FLAG_VALIDATE_LABEL: Final = 4
MEM_ACCEPT_FLAG_MAP_OTHER: Final = 8
MEM_ACCEPT_FLAG_MAP_CONTIGUOUS: Final = 16
MEM_ACCEPT_FLAG_SANITIZE: Final = 32
MEM_ACCEPT_FLAG_DONE: Final = 128
MEM_RELEASE_FLAG_SANITIZE: Final = 1
MEM_RECLAIM_FLAG_SANITIZE: Final = 1
MEM_NOTIFY_FLAG_SHARED: Final = 1
MEM_NOTIFY_FLAG_RELEASED: Final = 2
MEM_NOTIFY_FLAG_ACCEPTED: Final = 4
MEM_NOTIFY_FLAG_RECALL: Final = 8


class TransType(enum.IntEnum):
    """``TRANS_TYPE_*``: how a memparcel was created."""

    DONATE = 0
    LEND = 1
    SHARE = 2


# rm_types.h
VMID_HYP: Final = 0x0
VMID_HLOS: Final = 0x3
VMID_DYNAMIC_BASE: Final = 0x80
VMID_DYNAMIC_END: Final = 0xBF
VMID_RM: Final = 0xFF
#: ``GUNYAH_VMID_INVAL`` (``rsc_mgr.h``).
GUNYAH_VMID_INVAL: Final = 0xFFFF


class RmError(enum.IntEnum):
    """``rm_error_t`` values (``rm_types.h``)."""

    OK = 0x0
    UNIMPLEMENTED = 0xFFFFFFFF
    NOMEM = 0x1
    NORESOURCE = 0x2
    DENIED = 0x3
    MSG_INVALID = 0x4
    BUSY = 0x5
    ARGUMENT_INVALID = 0x6
    HANDLE_INVALID = 0x7
    VALIDATE_FAILED = 0x8
    MAP_FAILED = 0x9
    MEM_INVALID = 0xA
    MEM_INUSE = 0xB
    MEM_RELEASED = 0xC
    VMID_INVALID = 0xD
    LOOKUP_FAILED = 0xE
    IRQ_INVALID = 0xF
    IRQ_INUSE = 0x10
    IRQ_RELEASED = 0x11
    IN_USE = 0x12
    IRQ_NOT_MAPPED = 0x13
    VM_STATE = 0x14


def rm_error_remap(err: RmError) -> int:
    """``gunyah_rm_error_remap``: the errno Linux returns for an RM error (positive)."""
    if err == RmError.OK:
        return 0
    table = {
        RmError.UNIMPLEMENTED: errno.EOPNOTSUPP,
        RmError.NOMEM: errno.ENOMEM,
        RmError.NORESOURCE: errno.ENODEV,
        RmError.DENIED: errno.EPERM,
        RmError.BUSY: errno.EBUSY,
    }
    # INVALID, ARGUMENT_INVALID ... IRQ_RELEASED are EINVAL; so is anything unknown (default).
    return table.get(err, errno.EINVAL)


class VmStatus(enum.IntEnum):
    """``enum gunyah_rm_vm_status`` (``rsc_mgr.h``): the RM's VM states, which the driver
    mirrors in ``ghvm->vm_status``."""

    NO_STATE = 0
    INIT = 1
    READY = 2
    RUNNING = 3
    PAUSED = 4
    LOAD = 5
    AUTH = 6
    INIT_FAILED = 8
    EXITED = 9
    RESETTING = 10
    RESET = 11


# enum gunyah_rm_range_id (VM_SET_ADDRESS_LAYOUT)
GUNYAH_RM_RANGE_ID_IMAGE: Final = 0
GUNYAH_RM_RANGE_ID_FIRMWARE: Final = 1

# VM_STOP request
GUNYAH_RM_VM_STOP_FLAG_FORCE_STOP: Final = 1 << 0
GUNYAH_RM_VM_STOP_REASON_FORCE_STOP: Final = 3

# enum gunyah_rm_vm_auth_mechanism
GUNYAH_RM_VM_AUTH_NONE: Final = 0


# --- hypervisor calls ------------------------------------------------------------------------
class HypError(enum.IntEnum):
    """Hypercall results: ``enum gunyah_error`` (``include/linux/gunyah.h``) plus the
    hypervisor's memdb codes (``memdb.tc``), which Linux has no name for."""

    OK = 0
    UNIMPLEMENTED = -1
    RETRY = -2
    ARG_INVAL = 1
    ARG_SIZE = 2
    ARG_ALIGN = 3
    NOMEM = 10
    ADDR_OVFL = 20
    ADDR_UNFL = 21
    ADDR_INVAL = 22
    DENIED = 30
    BUSY = 31
    IDLE = 32
    CSPACE_CAP_NULL = 50
    CSPACE_CAP_REVOKED = 51
    CSPACE_WRONG_OBJ_TYPE = 52
    CSPACE_INSUF_RIGHTS = 53
    CSPACE_FULL = 54
    MEMDB_EMPTY = 110
    MEMDB_NOT_OWNER = 111


def gunyah_error_remap(err: HypError) -> int:
    """``gunyah_error_remap``: the errno Linux returns for a hypercall error (positive)."""
    if err == HypError.OK:
        return 0
    table = {
        HypError.NOMEM: errno.ENOMEM,
        HypError.DENIED: errno.EACCES,
        HypError.CSPACE_CAP_NULL: errno.EACCES,
        HypError.CSPACE_CAP_REVOKED: errno.EACCES,
        HypError.CSPACE_WRONG_OBJ_TYPE: errno.EACCES,
        HypError.CSPACE_INSUF_RIGHTS: errno.EACCES,
        HypError.CSPACE_FULL: errno.EBUSY,
        HypError.BUSY: errno.EBUSY,
        HypError.IDLE: errno.EBUSY,
        HypError.UNIMPLEMENTED: errno.EOPNOTSUPP,
        HypError.RETRY: errno.EAGAIN,
    }
    return table.get(err, errno.EINVAL)


class DonateType(enum.IntEnum):
    """``enum gunyah_memextent_donate_type`` (the driver's; the public 12/2023 hypervisor
    has the first three only)."""

    TO_CHILD = 0
    TO_PARENT = 1
    TO_SIBLING = 2
    TO_PROTECTED = 3
    FROM_PROTECTED = 4


GUNYAH_MEMEXTENT_OPTION_TYPE_MASK: Final = 0xFF
GUNYAH_MEMEXTENT_OPTION_NOSYNC: Final = 1 << 31
# enum gunyah_addrspace_map_flag_bits
GUNYAH_ADDRSPACE_MAP_FLAG_PARTIAL: Final = 0
GUNYAH_ADDRSPACE_MAP_FLAG_PRIVATE: Final = 1
GUNYAH_ADDRSPACE_MAP_FLAG_VMMIO: Final = 2
GUNYAH_ADDRSPACE_MAP_FLAG_NOSYNC: Final = 31


class Access(enum.IntEnum):
    """``enum gunyah_pagetable_access``."""

    NONE = 0
    X = 1
    W = 2
    R = 4
    RX = 5
    RW = 6
    RWX = 7


# Resource labels the driver's tickets wait for (vm_mgr.c).
GUNYAH_VM_ADDRSPACE_LABEL: Final = 0
GUNYAH_VM_MEM_EXTENT_GUEST_PRIVATE_LABEL: Final = 0
GUNYAH_VM_MEM_EXTENT_HOST_SHARED_LABEL: Final = 1
GUNYAH_VM_MEM_EXTENT_HOST_PRIVATE_LABEL: Final = 2
GUNYAH_VM_MEM_EXTENT_GUEST_SHARED_LABEL: Final = 3
