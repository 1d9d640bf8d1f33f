"""The TDX uAPI and guest ABI: ``KVM_MEMORY_ENCRYPT_OP`` sub-commands and their structs
(``arch/x86/include/uapi/asm/kvm.h`` of Linux 6.18), TD attributes, and the TDCALL /
TDG.VP.VMCALL constants a TD uses (``arch/x86/include/asm/shared/tdx.h``, the GHCI).

Structs keep the kernel's field names.  Where a field is a user pointer the model takes
the object it points to (``TdxCmd.data`` is a :class:`KvmTdxInitVm`...), and a source
buffer in user memory is given as the bytes it holds
(:attr:`KvmTdxInitMemRegion.source`).
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from guestmem import cabi

# enum kvm_tdx_cmd_id (6.18 has no KVM_TDX_TERMINATE_VM: see the README).
KVM_TDX_CAPABILITIES: Final = 0
KVM_TDX_INIT_VM: Final = 1
KVM_TDX_INIT_VCPU: Final = 2
KVM_TDX_INIT_MEM_REGION: Final = 3
KVM_TDX_FINALIZE_VM: Final = 4
KVM_TDX_GET_CPUID: Final = 5
KVM_TDX_CMD_NAMES: Final = {
    KVM_TDX_CAPABILITIES: "KVM_TDX_CAPABILITIES",
    KVM_TDX_INIT_VM: "KVM_TDX_INIT_VM",
    KVM_TDX_INIT_VCPU: "KVM_TDX_INIT_VCPU",
    KVM_TDX_INIT_MEM_REGION: "KVM_TDX_INIT_MEM_REGION",
    KVM_TDX_FINALIZE_VM: "KVM_TDX_FINALIZE_VM",
    KVM_TDX_GET_CPUID: "KVM_TDX_GET_CPUID",
}

KVM_TDX_MEASURE_MEMORY_REGION: Final = 1 << 0
KVM_MAX_CPUID_ENTRIES: Final = 256
KVM_TDX_CPUID_NO_SUBLEAF: Final = 0xFFFFFFFF

# TD attributes (arch/x86/include/asm/tdx.h TDX_TD_ATTR_*).
TDX_TD_ATTR_DEBUG: Final = 1 << 0
TDX_TD_ATTR_SEPT_VE_DISABLE: Final = 1 << 28
TDX_TD_ATTR_PKS: Final = 1 << 30
TDX_TD_ATTR_KL: Final = 1 << 31
TDX_TD_ATTR_PERFMON: Final = 1 << 63
#: ``KVM_SUPPORTED_TD_ATTRS``: the only attribute KVM lets userspace set.
KVM_SUPPORTED_TD_ATTRS: Final = TDX_TD_ATTR_SEPT_VE_DISABLE

# XSAVE feature masks (XFAM bits).
XFEATURE_MASK_FPSSE: Final = 0x3
XFEATURE_MASK_YMM: Final = 0x4
XFEATURE_MASK_AVX512: Final = 0xE0
XFEATURE_MASK_PKRU: Final = 0x200

# TDCALL and TDG.VP.VMCALL (GHCI).
TDG_MEM_PAGE_ACCEPT: Final = 6
TDX_HYPERCALL_STANDARD: Final = 0
TDVMCALL_GET_TD_VM_CALL_INFO: Final = 0x10000
TDVMCALL_MAP_GPA: Final = 0x10001
TDVMCALL_GET_QUOTE: Final = 0x10002
TDVMCALL_REPORT_FATAL_ERROR: Final = 0x10003
TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT: Final = 0x10004
TDVMCALL_STATUS_SUCCESS: Final = 0x0
TDVMCALL_STATUS_RETRY: Final = 0x1
TDVMCALL_STATUS_INVALID_OPERAND: Final = 0x8000000000000000
TDVMCALL_STATUS_ALIGN_ERROR: Final = 0x8000000000000002
TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED: Final = 0x8000000000000003
#: ``TDVMCALLINFO_SETUP_EVENT_NOTIFY_INTERRUPT``: a TDVMCALL KVM forwards to userspace.
TDVMCALLINFO_SETUP_EVENT_NOTIFY_INTERRUPT: Final = 1 << 1
#: ``TDX_MAP_GPA_MAX_LEN``: KVM turns MapGPA into exits of at most 2 MiB each.
TDX_MAP_GPA_MAX_LEN: Final = 2 << 20

#: The ``nr`` a TD's TDG.VP.VMCALL takes in ``Vcpu.hypercall(nr, leaf, r12, r13, ...)``:
#: ``EXIT_REASON_TDCALL`` with R10 = ``TDX_HYPERCALL_STANDARD`` (a GHCI call whose leaf is
#: R11).  A KVM hypercall from a TD (R10 = its number) is ``Vcpu.hypercall(nr, ...)``.
EXIT_REASON_TDCALL: Final = 77
#: ``KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON``.
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: Final = 4

# TDX S-EPT levels (pg_level_to_tdx_sept_level): 0 = 4 KiB, 1 = 2 MiB, 2 = 1 GiB.
TDX_PS_4K: Final = 0
TDX_PS_2M: Final = 1
TDX_PS_1G: Final = 2


@attrs.define
class TdxCmd:
    """``struct kvm_tdx_cmd``: the argument of ``KVM_MEMORY_ENCRYPT_OP`` on a TDX host
    (``__u32 id; __u32 flags; __u64 data; __u64 hw_error``).

    ``data`` is the sub-command's struct (or, for ``KVM_TDX_INIT_VCPU``, the initial RCX);
    ``hw_error`` must be 0 on entry and returns the TDX module's status where a SEAMCALL
    failed.
    """

    id: int
    flags: int = 0
    data: Any = None
    hw_error: int = 0


@attrs.define
class KvmCpuidEntry2:
    """``struct kvm_cpuid_entry2``: ``__u32`` function, index, flags, eax, ebx, ecx, edx."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0


@attrs.define
class KvmCpuid2:
    """``struct kvm_cpuid2`` (``__u32 nent; __u32 padding``): ``nent`` entries (the
    capacity, for an output buffer)."""

    entries: list[KvmCpuidEntry2] = attrs.Factory(list)
    nent: int = -1
    padding: int = 0

    def __attrs_post_init__(self) -> None:
        if self.nent < 0:
            self.nent = len(self.entries)


@attrs.define
class KvmTdxCapabilities:
    """``struct kvm_tdx_capabilities`` (``cpuid.nent`` in: room for entries; out: used)."""

    supported_attrs: int = 0
    supported_xfam: int = 0
    kernel_tdvmcallinfo_1_r11: int = 0
    user_tdvmcallinfo_1_r11: int = 0
    kernel_tdvmcallinfo_1_r12: int = 0
    user_tdvmcallinfo_1_r12: int = 0
    cpuid: KvmCpuid2 = attrs.Factory(lambda: KvmCpuid2(nent=KVM_MAX_CPUID_ENTRIES))


@attrs.define
class KvmTdxInitVm:
    """``struct kvm_tdx_init_vm``: ``__u64 attributes; __u64 mrconfigid[6]; __u64
    mrowner[6]; __u64 mrownerconfig[6]; __u64 xfam; __u64 reserved[12]; struct kvm_cpuid2
    cpuid`` (the measurement registers as bytes)."""

    attributes: int = 0
    xfam: int = XFEATURE_MASK_FPSSE
    mrconfigid: bytes = bytes(48)
    mrowner: bytes = bytes(48)
    mrownerconfig: bytes = bytes(48)
    reserved: tuple[int, ...] = (0,) * 12
    cpuid: KvmCpuid2 = attrs.Factory(lambda: KvmCpuid2([cpuid_gpaw(48)]))


@attrs.define
class KvmTdxInitMemRegion:
    """``struct kvm_tdx_init_mem_region`` (``__u64 source_addr; __u64 gpa; __u64
    nr_pages``), updated in place as pages are added.

    ``source`` stands for the bytes at ``source_addr`` (the model has no user memory to
    read): fewer than ``nr_pages`` pages of it is a source the kernel cannot pin.
    """

    source_addr: int
    gpa: int
    nr_pages: int
    source: bytes | None = None


def _read_cpuid(cpuid: KvmCpuid2) -> None:
    cabi.fields(cpuid, nent=cabi.u32, padding=cabi.u32)
    for entry in cpuid.entries:
        cabi.fields(
            entry,
            function=cabi.u32,
            index=cabi.u32,
            flags=cabi.u32,
            eax=cabi.u32,
            ebx=cabi.u32,
            ecx=cabi.u32,
            edx=cabi.u32,
        )


def read_command(cmd: TdxCmd) -> Any:
    """``struct kvm_tdx_cmd`` and its sub-command's struct as ``tdx_vm_ioctl`` and
    ``tdx_vcpu_ioctl`` read them (``copy_from_user``): each field stored as its C type in
    place (:mod:`guestmem.cabi`; a non-integer is a TypeError naming the field, before the
    command does anything).  ``data`` that is no struct is the ``__u64`` itself (the
    initial RCX of ``KVM_TDX_INIT_VCPU``).  Returns ``cmd.data``."""
    cabi.fields(cmd, id=cabi.u32, flags=cabi.u32, hw_error=cabi.u64)
    data = cmd.data
    if isinstance(data, KvmTdxInitVm):
        cabi.fields(data, attributes=cabi.u64, xfam=cabi.u64)
        for name in ("mrconfigid", "mrowner", "mrownerconfig"):
            setattr(data, name, cabi.buffer(getattr(data, name), name))
        data.reserved = tuple(cabi.u64(value, "reserved") for value in data.reserved)
        _read_cpuid(data.cpuid)
    elif isinstance(data, KvmTdxInitMemRegion):
        cabi.fields(data, source_addr=cabi.u64, gpa=cabi.u64, nr_pages=cabi.u64)
        if data.source is not None:
            data.source = cabi.buffer(data.source, "source")
    elif isinstance(data, KvmTdxCapabilities):
        _read_cpuid(data.cpuid)
    elif data is not None:
        cmd.data = data = cabi.u64(data, "data")
    return data


def cpuid_gpaw(bits: int) -> KvmCpuidEntry2:
    """CPUID 0x80000008 with guest physical address bits EAX[23:16] = *bits*: how a VMM
    picks GPAW 48 (4-level S-EPT, shared bit 47) or 52 (5-level, shared bit 51)."""
    return KvmCpuidEntry2(0x80000008, 0, 0, (bits & 0xFF) << 16 | 48)
