"""guestmem-snp: an AMD SEV-SNP host for guestmem.

* :func:`sev` gives a VM's SEV state (``KVM_MEMORY_ENCRYPT_OP`` commands: INIT2, SNP
  launch) and :func:`guest` a vCPU's guest side (PVALIDATE, page-state changes).
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
from guestmem_snp.sev import SevVm, SnpLaunchUpdate, as_sev
from guestmem_snp.vmm import ConvertingVmm, RamRegion

__all__ = [
    "AsidAllocator",
    "AsidRange",
    "ConvertingVmm",
    "HypercallExit",
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


def sev(vm: Any) -> SevVm:
    """The SEV state of *vm* (a VM of the ``snp`` backends): its ``KVM_MEMORY_ENCRYPT_OP`` face."""
    return as_sev(vm)


def guest(vcpu: Any) -> SnpGuest:
    """The guest side of *vcpu* (an SNP VM's vCPU)."""
    return SnpGuest(vcpu)
