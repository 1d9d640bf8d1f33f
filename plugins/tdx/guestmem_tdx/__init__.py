"""guestmem-tdx: an Intel TDX host for guestmem.

* :func:`tdx` gives a VM's TDX commands (``KVM_MEMORY_ENCRYPT_OP`` with :class:`TdxCmd`:
  ``KVM_TDX_INIT_VM``, ``INIT_VCPU``, ``INIT_MEM_REGION``, ``FINALIZE_VM``) and what they
  left; :func:`guest` a vCPU's TD side (TDG.MEM.PAGE.ACCEPT, TDG.VP.VMCALL<MapGPA>,
  loads and stores by gpa with the shared bit); :class:`TdxVmm` converts memory on the
  TD's requests as QEMU does.
* :func:`expected_mrtd` computes a payload's launch measurement offline.
* :mod:`guestmem_tdx.module` (the TDX module: S-EPT, PAMT, KOT) stands alone, without the
  core model; :func:`tdx_host` reaches a host's module and KeyID pool.
* :class:`TdxChecker` checks the S-EPT/PAMT invariants after every event.
"""

from __future__ import annotations

from typing import Any

from guestmem.errors import HypercallExit
from guestmem_tdx.abi import (
    KVM_TDX_CAPABILITIES,
    KVM_TDX_FINALIZE_VM,
    KVM_TDX_INIT_MEM_REGION,
    KVM_TDX_INIT_VCPU,
    KVM_TDX_INIT_VM,
    KVM_TDX_MEASURE_MEMORY_REGION,
    TDX_TD_ATTR_SEPT_VE_DISABLE,
    KvmCpuid2,
    KvmCpuidEntry2,
    KvmTdxCapabilities,
    KvmTdxInitMemRegion,
    KvmTdxInitVm,
    TdxCmd,
)
from guestmem_tdx.guest import TdxGuest
from guestmem_tdx.host import KeyIdPool, TdxHost, TdxSysInfo, tdx_host
from guestmem_tdx.invariants import TdxChecker, check_tdx, check_tdx_host, check_tdx_vm
from guestmem_tdx.kvm import KvmTdx, PendingAccessVe, TdState, TdxVcpu, VcpuTdState
from guestmem_tdx.measure import MeasuredRegion, MrtdChain, expected_mrtd
from guestmem_tdx.module import EPT_VIOLATION, Lifecycle, OpState, Outcome, Td, TdxModule
from guestmem_tdx.plugin import TDX_VM
from guestmem_tdx.sept import PamtEntry, PamtType, SeptState
from guestmem_tdx.vmm import Ram, Tdx, TdxVmm

__all__ = [
    "EPT_VIOLATION",
    "KVM_TDX_CAPABILITIES",
    "KVM_TDX_FINALIZE_VM",
    "KVM_TDX_INIT_MEM_REGION",
    "KVM_TDX_INIT_VCPU",
    "KVM_TDX_INIT_VM",
    "KVM_TDX_MEASURE_MEMORY_REGION",
    "TDX_TD_ATTR_SEPT_VE_DISABLE",
    "TDX_VM",
    "HypercallExit",
    "KeyIdPool",
    "KvmCpuid2",
    "KvmCpuidEntry2",
    "KvmTdx",
    "KvmTdxCapabilities",
    "KvmTdxInitMemRegion",
    "KvmTdxInitVm",
    "Lifecycle",
    "MeasuredRegion",
    "MrtdChain",
    "OpState",
    "Outcome",
    "PamtEntry",
    "PamtType",
    "PendingAccessVe",
    "Ram",
    "SeptState",
    "Td",
    "TdState",
    "Tdx",
    "TdxChecker",
    "TdxCmd",
    "TdxGuest",
    "TdxHost",
    "TdxModule",
    "TdxSysInfo",
    "TdxVcpu",
    "TdxVmm",
    "VcpuTdState",
    "check_tdx",
    "check_tdx_host",
    "check_tdx_vm",
    "expected_mrtd",
    "guest",
    "tdx",
    "tdx_host",
]


def tdx(vm: Any) -> Tdx:
    """The TDX commands of *vm* (a TD of the ``tdx`` backend), issued as
    ``KVM_MEMORY_ENCRYPT_OP``; ``ENOTTY`` for any other VM."""
    return Tdx(vm)


def guest(vcpu: Any) -> TdxGuest:
    """The TD side of *vcpu* (a vCPU of a TD)."""
    return TdxGuest(vcpu)
