"""guestmem-snp: an AMD SEV-SNP host for guestmem.

* :func:`sev` gives a VM's SEV commands (``KVM_MEMORY_ENCRYPT_OP``: INIT2, the SNP
  launch; ``SevCmd`` values for ``vm.memory_encrypt_op`` directly) and what they left,
  :func:`guest` a vCPU's guest side (PVALIDATE, page-state changes).
* :mod:`guestmem_snp.rmp` (the RMP table) and :mod:`guestmem_snp.asid` (ASIDs) stand
  alone, without the core model.
"""

from __future__ import annotations

from typing import Any

from guestmem.errors import HypercallExit
from guestmem_snp.asid import AsidAllocator, AsidRange
from guestmem_snp.ghcb import MapGpaRange, PscBuffer, PscEngine, PscEntry
from guestmem_snp.guest import SnpGuest, UnvalidatedAccess
from guestmem_snp.host import SnpHost, snp_host
from guestmem_snp.invariants import RmpChecker, check_rmp
from guestmem_snp.rmp import RmpEntry, RmpState, RmpTable, RmpViolation
from guestmem_snp.sev import (
    KVM_SEV_INIT2,
    KVM_SEV_SNP_LAUNCH_FINISH,
    KVM_SEV_SNP_LAUNCH_START,
    KVM_SEV_SNP_LAUNCH_UPDATE,
    HostWriteOutsidePage,
    KvmSevInit,
    KvmSevSnpLaunchFinish,
    KvmSevSnpLaunchStart,
    Sev,
    SevCmd,
    SevVm,
    SnpLaunchUpdate,
)
from guestmem_snp.vmm import ConvertingVmm, RamRegion

__all__ = [
    "KVM_SEV_INIT2",
    "KVM_SEV_SNP_LAUNCH_FINISH",
    "KVM_SEV_SNP_LAUNCH_START",
    "KVM_SEV_SNP_LAUNCH_UPDATE",
    "AsidAllocator",
    "AsidRange",
    "ConvertingVmm",
    "HostWriteOutsidePage",
    "HypercallExit",
    "KvmSevInit",
    "KvmSevSnpLaunchFinish",
    "KvmSevSnpLaunchStart",
    "MapGpaRange",
    "PscBuffer",
    "PscEngine",
    "PscEntry",
    "RamRegion",
    "RmpChecker",
    "RmpEntry",
    "RmpState",
    "RmpTable",
    "RmpViolation",
    "Sev",
    "SevCmd",
    "SevVm",
    "SnpGuest",
    "SnpHost",
    "SnpLaunchUpdate",
    "UnvalidatedAccess",
    "check_rmp",
    "guest",
    "sev",
    "snp_host",
]


def sev(vm: Any) -> Sev:
    """The SEV commands of *vm* (a VM of the ``snp`` backends), issued as
    ``KVM_MEMORY_ENCRYPT_OP``; ``ENOTTY`` for any other VM."""
    return Sev(vm)


def guest(vcpu: Any) -> SnpGuest:
    """The guest side of *vcpu* (an SNP VM's vCPU)."""
    return SnpGuest(vcpu)
