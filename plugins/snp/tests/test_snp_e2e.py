"""End to end: measured launch, guest validation through PSC, a bounce buffer, hole punching.

Afterwards no assigned RMP entry belongs to a freed page and no private page is
host-mapped (backends.md 2.2-2.6, 6.1).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import attrs
import pytest
from snp_helpers import MIB, SnpVm, make_snp_vm

import guestmem_snp
from guestmem import uapi
from guestmem.errors import KvmError
from guestmem.registry import get_registry
from guestmem_snp.ghcb import SNP_PAGE_STATE_PRIVATE, SNP_PAGE_STATE_SHARED, PscEntry
from guestmem_snp.rmp import RmpState

PAGE = uapi.PAGE_SIZE
SIZE = 8 * MIB
PAYLOAD = bytes(range(256)) * 16 * 4  # 4 pages
BOUNCE = 4 * MIB


@pytest.fixture
def rmp_checker() -> Iterator[guestmem_snp.RmpChecker]:
    """check_rmp after every event of the scenario."""
    checker = guestmem_snp.RmpChecker()
    registry = get_registry()
    registry.add_plugin(checker, distribution="test-rmp-checker")
    try:
        yield checker
    finally:
        registry.remove_plugin(checker)


def check_invariants(snp: SnpVm) -> None:
    """No assigned RMP entry on a freed page; no private page reachable by the host (page by page)."""
    guestmem_snp.check_rmp(snp.vm)
    host = snp.kvm.host
    sev = snp.sev
    assert not sev.host.freed_while_assigned, "an assigned page went back to the host"
    for start, end, _ in sev.host.rmp.runs():
        for pfn in range(start, end):  # test sizes only: a few thousand pages
            assert host.is_allocated(pfn), f"RMP-assigned pfn {pfn:#x} is free"
    gmem = snp.vm.gfn_to_gmem(0).gmem
    for folio in list(gmem.folios()):
        for index in range(folio.start, folio.end):
            assert not gmem.host_mapped(index)
            if snp.vm.is_private(index):
                assert sev.host.rmp.is_assigned(folio.pfn + index - folio.start) or not folio.prepared


@pytest.mark.parametrize(("backend", "bounce_pages"), [("snp", 1), ("snp", 3), ("snp-hugepage", 512)])
def test_snp_guest_lifecycle(backend: str, bounce_pages: int, rmp_checker: guestmem_snp.RmpChecker) -> None:
    """Launch, accept memory, share and unshare a bounce buffer, punch, tear down (2.2-2.6).

    On the hugepage backend the bounce buffer is a whole 2 MiB folio: a partial punch of a
    large folio zeroes it in place (the core does not split folios) instead of freeing it.
    """
    snp = make_snp_vm(backend, SIZE, launch=False)
    vm, sev, g, rmp = snp.vm, snp.sev, snp.guest, snp.rmp
    vmm = snp.vmm()
    bounce_size = bounce_pages * PAGE
    huge = bounce_pages == 512

    # --- launch with a measured payload in the first 2 MiB ---------------------------------------
    snp.private(0, 2 * MIB)
    sev.snp_launch_start()
    sev.launch_update_data(0, PAYLOAD)
    digest = sev.snp_launch_finish()
    assert len(digest) == 48
    assert rmp.lookup(snp.pfn(0)).state is RmpState.GUEST_VALID

    # --- the guest accepts the rest of its memory: PSC to private, then PVALIDATE ------------------
    entries = [
        PscEntry(gfn=gfn, operation=SNP_PAGE_STATE_PRIVATE, pagesize=1)
        for gfn in range(512, SIZE // PAGE, 512)
    ]
    assert vmm.run(lambda: g.page_state_change(entries), g) == 0
    assert vmm.exits == 1  # three contiguous 2M entries: one KVM_HC_MAP_GPA_RANGE exit
    assert g.pvalidate_range(len(PAYLOAD), 2 * MIB - len(PAYLOAD)) == 0
    assert g.pvalidate_range(2 * MIB, SIZE - 2 * MIB, uapi.PG_LEVEL_2M) == 0
    assert g.read(0, len(PAYLOAD)) == PAYLOAD
    g.write(BOUNCE, b"private data")
    if huge:
        assert rmp.lookup(snp.pfn(BOUNCE)).level == uapi.PG_LEVEL_2M

    # --- share a bounce buffer: rescind, PSC shared (VMM punches the private pages) -----------------
    private_pfns = [snp.pfn(BOUNCE + i * PAGE) for i in (0, bounce_pages - 1)]
    level = uapi.PG_LEVEL_2M if huge else uapi.PG_LEVEL_4K
    assert g.pvalidate_range(BOUNCE, bounce_size, level, validate=False) == 0
    shared_req = [
        PscEntry(gfn=gfn, operation=SNP_PAGE_STATE_SHARED, pagesize=int(huge))
        for gfn in range(BOUNCE // PAGE, (BOUNCE + bounce_size) // PAGE, bounce_pages if huge else 1)
    ]
    assert vmm.run(lambda: g.page_state_change(shared_req), g) == 0
    assert not any(rmp.is_assigned(pfn) for pfn in private_pfns)
    assert vm.gmem_pfn(BOUNCE // PAGE) is None
    g.write(BOUNCE, b"to the host", private=False)
    assert snp.shared.read(BOUNCE, 11) == b"to the host"
    snp.shared.write(BOUNCE, b"from host")
    assert g.read(BOUNCE, 9, private=False) == b"from host"
    assert not rmp.is_assigned(snp.vcpu.translate(BOUNCE, private=False))

    # --- unshare it: PSC private, the shared copy is discarded, the pages come back zeroed ----------
    private_req = [attrs.evolve(e, operation=SNP_PAGE_STATE_PRIVATE, cur_page=0) for e in shared_req]
    assert vmm.run(lambda: g.page_state_change(private_req), g) == 0
    assert g.pvalidate_range(BOUNCE, bounce_size, level) == 0
    assert g.read(BOUNCE, 11) == bytes(11)
    assert rmp.lookup(snp.pfn(BOUNCE)).state is RmpState.GUEST_VALID

    # --- the VMM punches holes --------------------------------------------------------------------
    freed = [snp.pfn(gpa) for gpa in (6 * MIB, 6 * MIB + 0x5000, 8 * MIB - PAGE)]
    snp.gmem.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, 6 * MIB, 2 * MIB)
    assert not any(rmp.is_assigned(pfn) for pfn in freed)
    assert not any(snp.kvm.host.is_allocated(pfn) for pfn in freed)
    check_invariants(snp)

    # --- the VMM cannot map the gmem file: no FLAG_MMAP (M-1); private pages never (2.5) ------------
    with pytest.raises(KvmError) as info:
        snp.gmem.mmap(PAGE)
    assert info.value.errno == errno.ENODEV

    counters = vm.counters
    assert counters["psc_exits"] == 3  # accept, share, unshare: each one coalesced exit
    assert counters["pvalidate"] > 0 and counters["clflush"] > 0
    assert snp.kvm.host.crashed is None

    # --- teardown returns every page -----------------------------------------------------------------
    asid = sev.asid
    snp.gmem.close()
    snp.vcpu.close()
    vm.close()
    assert rmp.assigned_pages(asid) == 0
    assert not sev.host.freed_while_assigned and not sev.host.leaked
    assert rmp_checker.checked > 20
