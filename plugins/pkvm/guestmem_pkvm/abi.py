"""arm64 / pKVM ABI constants, with the kernel's names and values.

Sources: ``arch/arm64/include/uapi/asm/kvm.h`` and ``include/uapi/linux/kvm.h`` (VM type
bits), ``include/linux/arm-smccc.h`` (SMCCC function IDs and return codes), Android
``arch/arm64/kvm/pkvm.c`` (pvmfw load address).  See backends.md section 3.
"""

from __future__ import annotations

from typing import Final

# --- KVM_CREATE_VM machine type (arm64) ------------------------------------------------
KVM_VM_TYPE_ARM_IPA_SIZE_MASK: Final = 0xFF
KVM_VM_TYPE_ARM_PROTECTED: Final = 1 << 31
KVM_VM_TYPE_ARM_MASK: Final = KVM_VM_TYPE_ARM_IPA_SIZE_MASK | KVM_VM_TYPE_ARM_PROTECTED
#: ``KVM_VM_TYPE_ARM_IPA_SIZE(0)``: a normal (non-protected) VM with the default 40-bit IPA.
KVM_VM_TYPE_ARM_DEFAULT: Final = 0


def KVM_VM_TYPE_ARM_IPA_SIZE(bits: int) -> int:  # noqa: N802 - the kernel macro's name
    """The machine-type bits requesting an IPA space of *bits* bits."""
    return bits & KVM_VM_TYPE_ARM_IPA_SIZE_MASK


# --- SMCCC (include/linux/arm-smccc.h) ---------------------------------------------------
ARM_SMCCC_FAST_CALL: Final = 1
ARM_SMCCC_SMC_32: Final = 0
ARM_SMCCC_SMC_64: Final = 1
ARM_SMCCC_OWNER_VENDOR_HYP: Final = 6

SMCCC_RET_SUCCESS: Final = 0
SMCCC_RET_NOT_SUPPORTED: Final = -1
SMCCC_RET_NOT_REQUIRED: Final = -2
SMCCC_RET_INVALID_PARAMETER: Final = -3


def ARM_SMCCC_CALL_VAL(call_type: int, calling_convention: int, owner: int, func_num: int) -> int:  # noqa: N802
    """The 32-bit SMCCC function ID, as the kernel macro builds it."""
    return (call_type << 31) | (calling_convention << 30) | ((owner & 0x3F) << 24) | (func_num & 0xFFFF)


# KVM "vendor specific" hypervisor services.
ARM_SMCCC_KVM_FUNC_FEATURES: Final = 0
ARM_SMCCC_KVM_FUNC_PTP: Final = 1
ARM_SMCCC_KVM_FUNC_HYP_MEMINFO: Final = 2
ARM_SMCCC_KVM_FUNC_MEM_SHARE: Final = 3
ARM_SMCCC_KVM_FUNC_MEM_UNSHARE: Final = 4
ARM_SMCCC_KVM_FUNC_MMIO_GUARD_INFO: Final = 5
ARM_SMCCC_KVM_FUNC_MMIO_GUARD_ENROLL: Final = 6
ARM_SMCCC_KVM_FUNC_MMIO_GUARD_MAP: Final = 7
ARM_SMCCC_KVM_FUNC_MMIO_GUARD_UNMAP: Final = 8
ARM_SMCCC_KVM_FUNC_MEM_RELINQUISH: Final = 9
#: x1 of HYP_MEMINFO on Android: MEM_SHARE/MEM_UNSHARE take ``(ipa, nr_pages, 0)``.
KVM_FUNC_HAS_RANGE: Final = 1 << 0

ARM_SMCCC_VENDOR_HYP_KVM_HYP_MEMINFO_FUNC_ID: Final = ARM_SMCCC_CALL_VAL(
    ARM_SMCCC_FAST_CALL, ARM_SMCCC_SMC_64, ARM_SMCCC_OWNER_VENDOR_HYP, ARM_SMCCC_KVM_FUNC_HYP_MEMINFO
)
ARM_SMCCC_VENDOR_HYP_KVM_MEM_SHARE_FUNC_ID: Final = ARM_SMCCC_CALL_VAL(
    ARM_SMCCC_FAST_CALL, ARM_SMCCC_SMC_64, ARM_SMCCC_OWNER_VENDOR_HYP, ARM_SMCCC_KVM_FUNC_MEM_SHARE
)
ARM_SMCCC_VENDOR_HYP_KVM_MEM_UNSHARE_FUNC_ID: Final = ARM_SMCCC_CALL_VAL(
    ARM_SMCCC_FAST_CALL, ARM_SMCCC_SMC_64, ARM_SMCCC_OWNER_VENDOR_HYP, ARM_SMCCC_KVM_FUNC_MEM_UNSHARE
)
ARM_SMCCC_VENDOR_HYP_KVM_MEM_RELINQUISH_FUNC_ID: Final = ARM_SMCCC_CALL_VAL(
    ARM_SMCCC_FAST_CALL, ARM_SMCCC_SMC_64, ARM_SMCCC_OWNER_VENDOR_HYP, ARM_SMCCC_KVM_FUNC_MEM_RELINQUISH
)

#: ``KVM_EXIT_HYPERCALL`` mask bits userspace may enable with ``KVM_CAP_EXIT_HYPERCALL`` on a
#: protected VM of this backend (a model choice: the capability is x86-only in Linux 6.18).
KVM_EXIT_HYPERCALL_VALID_MASK: Final = (1 << ARM_SMCCC_KVM_FUNC_MEM_SHARE) | (
    1 << ARM_SMCCC_KVM_FUNC_MEM_UNSHARE
)

# --- pvmfw (Android arch/arm64/kvm/pkvm.c) -------------------------------------------------
PVMFW_INVALID_LOAD_ADDR: Final = -1
