"""The SNP invariant checks catch what they name (and stay quiet on a correct run)."""

from __future__ import annotations

from typing import Any

import pytest
from snp_helpers import MIB, SnpVm

import guestmem
import guestmem_snp
from guestmem import uapi
from guestmem.invariants import InvariantViolation

PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE


def test_rmp_freed_catches_an_entry_on_a_freed_page(snp: SnpVm) -> None:
    snp.private(0, MIB)
    snp.vcpu.access(0, private=True)
    pfn = snp.pfn(0)
    snp.gmem.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, 0, MIB)
    guestmem_snp.check_rmp(snp.vm)
    # Assign the freed page behind KVM's back.
    assert snp.rmp.make_private(pfn, 0, uapi.PG_LEVEL_4K, snp.sev.asid, immutable=False) == 0
    with pytest.raises(InvariantViolation, match="rmp-freed"):
        guestmem_snp.check_rmp(snp.vm)


def test_rmp_freed_catches_a_failed_reclaim(snp: SnpVm) -> None:
    pfn = snp.kvm.host.alloc(1)
    snp.rmp.mark_firmware(pfn)
    snp.state.gmem_invalidate(pfn, pfn + 1)
    with pytest.raises(InvariantViolation, match="freed while assigned"):
        guestmem_snp.check_rmp(snp.vm)


def test_rmp_host_mapped_catches_a_private_page_in_a_host_mapping() -> None:
    kvm: Any = guestmem.open("snp")
    vm = kvm.create_vm(uapi.KVM_X86_SEV_VM)  # INIT_SHARED gmem is allowed here (CAP-3)
    guestmem_snp.sev(vm).init2()
    gmem = vm.create_guest_memfd(MIB, uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED)
    mapping = gmem.mmap(MIB)
    mapping.write(0, b"x")
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, MIB, 0, gmem, 0)
    guestmem_snp.check_rmp(vm)
    pfn = vm.gmem_pfn(0)
    rmp = guestmem_snp.sev(vm).host.rmp
    assert rmp.make_private(pfn, 0, uapi.PG_LEVEL_4K, 7, immutable=False) == 0
    with pytest.raises(InvariantViolation, match="rmp-host-mapped"):
        guestmem_snp.check_rmp(vm)


def test_checker_runs_after_every_event(snp_huge: SnpVm) -> None:
    checker = guestmem_snp.RmpChecker()
    registry = guestmem.get_registry()
    registry.add_plugin(checker, distribution="test-rmp-checker")
    try:
        snp = snp_huge
        snp.private(0, 4 * MIB)
        assert snp.guest.pvalidate_range(0, 4 * MIB) == 0
        snp.gmem.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, 2 * MIB, 2 * MIB)
    finally:
        registry.remove_plugin(checker)
    assert checker.checked > 3
