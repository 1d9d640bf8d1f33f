"""SEAMCALL and TDCALL completion status codes of the TDX module (returned in RAX).

Values from ``intel/tdx-module`` (tdx_1.5) ``include/auto_gen/tdx_error_codes_defs.h``;
the subset KVM names is also in Linux's ``arch/x86/kvm/vmx/tdx_errno.h``.  Bits 63:32
are the class and code, bits 31:0 a detail: for most errors the ID of the operand that
failed (``api_error_with_operand_id``), for ACCEPT's size errors the S-EPT level reached.
Bit 63 set means an error; a clear bit 63 with a nonzero code is a warning
(``TDX_PAGE_ALREADY_ACCEPTED``, ``TDX_GPA_RANGE_ALREADY_BLOCKED``).
"""

from __future__ import annotations

from typing import Final

TDX_SEAMCALL_STATUS_MASK: Final = 0xFFFFFFFF00000000

TDX_SUCCESS: Final = 0x0000000000000000
TDX_NON_RECOVERABLE_VCPU: Final = 0x4000000100000000
TDX_NON_RECOVERABLE_TD: Final = 0x6000000200000000
TDX_INTERRUPTED_RESUMABLE: Final = 0x8000000300000000
TDX_OPERAND_INVALID: Final = 0xC000010000000000
TDX_OPERAND_BUSY: Final = 0x8000020000000000
TDX_PREVIOUS_TLB_EPOCH_BUSY: Final = 0x8000020100000000
TDX_RND_NO_ENTROPY: Final = 0x8000020300000000
TDX_PAGE_METADATA_INCORRECT: Final = 0xC000030000000000
TDX_TD_ASSOCIATED_PAGES_EXIST: Final = 0xC000040000000000
TDX_TD_FATAL: Final = 0xE000060400000000
TDX_TDCS_NOT_ALLOCATED: Final = 0xC000060600000000
TDX_LIFECYCLE_STATE_INCORRECT: Final = 0xC000060700000000
TDX_OP_STATE_INCORRECT: Final = 0xC000060800000000
TDX_NO_VCPUS: Final = 0xC000060900000000
TDX_TDCX_NUM_INCORRECT: Final = 0xC000061000000000
TDX_VCPU_STATE_INCORRECT: Final = 0xC000070000000000
TDX_VCPU_NOT_ASSOCIATED: Final = 0x8000070200000000
TDX_TD_KEYS_NOT_CONFIGURED: Final = 0x8000081000000000
TDX_KEY_STATE_INCORRECT: Final = 0xC000081100000000
TDX_KEY_CONFIGURED: Final = 0x0000081500000000
TDX_WBCACHE_NOT_COMPLETE: Final = 0x8000081700000000
TDX_NO_HKID_READY_TO_WBCACHE: Final = 0x0000082100000000
TDX_FLUSHVP_NOT_DONE: Final = 0x8000082400000000
TDX_EPT_WALK_FAILED: Final = 0xC0000B0000000000
TDX_EPT_ENTRY_NOT_PRESENT: Final = 0xC0000B0300000000
TDX_GPA_RANGE_NOT_BLOCKED: Final = 0xC0000B0600000000
TDX_GPA_RANGE_ALREADY_BLOCKED: Final = 0x00000B0700000000
TDX_TLB_TRACKING_NOT_DONE: Final = 0xC0000B0800000000
TDX_PAGE_ALREADY_ACCEPTED: Final = 0x00000B0A00000000
TDX_PAGE_SIZE_MISMATCH: Final = 0xC0000B0B00000000
TDX_EPT_ENTRY_STATE_INCORRECT: Final = 0xC0000B0D00000000

# Operand IDs in bits 31:0 (tdx_error_codes_defs.h OPERAND_ID_*).
OPERAND_ID_RCX: Final = 1
OPERAND_ID_RDX: Final = 2
OPERAND_ID_R8: Final = 8
OPERAND_ID_R9: Final = 9
OPERAND_ID_TDR: Final = 128
OPERAND_ID_TD_EPOCH: Final = 169

#: Status code -> name, for messages and traces.
STATUS_NAMES: Final[dict[int, str]] = {
    value: name
    for name, value in dict(globals()).items()
    if name.startswith("TDX_") and name != "TDX_SEAMCALL_STATUS_MASK" and isinstance(value, int)
}


def with_operand(status: int, operand: int) -> int:
    """``api_error_with_operand_id``: *status* with the failing operand (or level) in 31:0."""
    return status | operand


def status_class(status: int) -> int:
    """The status without its detail bits (``err & TDX_SEAMCALL_STATUS_MASK``)."""
    return status & TDX_SEAMCALL_STATUS_MASK


def is_busy(status: int) -> bool:
    """``tdx_operand_busy``: the SEAMCALL lost a race for a TDX-module lock."""
    return status_class(status) == TDX_OPERAND_BUSY


def status_name(status: int) -> str:
    """``TDX_EPT_ENTRY_STATE_INCORRECT|0x1``: the name of the class, and the detail if any."""
    name = STATUS_NAMES.get(status_class(status), f"{status_class(status):#018x}")
    detail = status & ~TDX_SEAMCALL_STATUS_MASK
    return f"{name}|{detail:#x}" if detail else name
