"""The guest side on the core model: PSC exits, MSR protocol, MAP_GPA_RANGE, PVALIDATE (2.2, 2.3)."""

from __future__ import annotations

import errno

import pytest
from snp_helpers import MIB, SnpVm, make_snp_vm

from guestmem import uapi
from guestmem.backend import view
from guestmem.errors import HypercallExit, MemoryFault
from guestmem_snp import UnvalidatedAccess
from guestmem_snp.ghcb import (
    GHCB_MSR_PSC_RESP,
    GHCB_MSR_PSC_RESP_ERROR,
    KVM_ENOSYS,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    SNP_PAGE_STATE_PRIVATE,
    SNP_PAGE_STATE_SHARED,
    VMGEXIT_PSC_ERROR_GENERIC,
    VMGEXIT_PSC_MAX_ENTRY,
    PscEntry,
)
from guestmem_snp.rmp import PVALIDATE_FAIL_NOUPDATE, PVALIDATE_FAIL_SIZEMISMATCH, RmpState, RmpViolation

PAGE = uapi.PAGE_SIZE
PRIV, SHARED = SNP_PAGE_STATE_PRIVATE, SNP_PAGE_STATE_SHARED


def test_psc_leaves_to_userspace_as_map_gpa_range(snp: SnpVm) -> None:
    """2.3: a PSC request reaches the VMM as KVM_EXIT_HYPERCALL(KVM_HC_MAP_GPA_RANGE); no RMP change."""
    g = snp.guest
    with pytest.raises(HypercallExit) as info:
        g.page_state_change([PscEntry(gfn=0x200, operation=PRIV, pagesize=1)])
    exit_ = info.value
    assert exit_.exit_reason == uapi.KVM_EXIT_HYPERCALL
    assert exit_.nr == KVM_HC_MAP_GPA_RANGE
    assert tuple(exit_.args) == (2 * MIB, 512, KVM_MAP_GPA_RANGE_ENCRYPTED | 1)
    assert snp.vm.counters["rmpupdate"] == 0
    assert g.resume(0) == 0
    assert snp.vm.counters["psc_exits"] == 1 and snp.vm.counters["userspace_exits"] == 1


# --- KVM_RUN and a pending exit (kvm_arch_vcpu_ioctl_run -> complete_userspace_io) ----------------
def test_resume_with_no_exit_pending_ignores_ret(snp: SnpVm) -> None:
    """``complete_userspace_io`` is NULL: ``KVM_RUN`` ignores ``run->hypercall.ret`` and the
    vCPU runs on; nothing changes, and nothing is returned for a request."""
    g = snp.guest
    before = dict(snp.vm.counters)
    assert g.resume(0) is None
    assert g.resume(0xDEAD) is None
    assert dict(snp.vm.counters) == before
    with pytest.raises(HypercallExit):
        g.psc_msr(0x42, SHARED)
    assert g.resume(0) == GHCB_MSR_PSC_RESP
    assert g.resume(7) is None  # answered already: nothing pending any more


def test_instruction_with_an_exit_unanswered_completes_it_with_ret_0(snp: SnpVm) -> None:
    """An instruction's ``KVM_RUN`` while an exit is unanswered completes it first with
    ``run->hypercall.ret`` as KVM left it at the exit, 0: the guest's request succeeds;
    a request with more to do exits again instead of entering the guest."""
    g = snp.guest
    with pytest.raises(HypercallExit):
        g.page_state_change([PscEntry(gfn=0x10, operation=PRIV), PscEntry(gfn=0x20, operation=PRIV)])
    requests = snp.vm.counters["psc_requests"]
    with pytest.raises(HypercallExit) as info:  # the PSC's second range, not the MSR request
        g.psc_msr(0x42, SHARED)
    assert tuple(info.value.args) == (0x20 * PAGE, 1, KVM_MAP_GPA_RANGE_ENCRYPTED)
    assert snp.vm.counters["psc_requests"] == requests  # the MSR request was not executed
    assert g.resume(0) == 0  # the whole PSC succeeded
    with pytest.raises(HypercallExit):
        g.psc_msr(0x42, SHARED)
    assert g.map_gpa_range(0x5001, 1, 0) == -errno.EINVAL  # executed once the MSR exit completed
    assert g.state.completed == GHCB_MSR_PSC_RESP and g.state.pending is None


def test_kvm_zeroes_hypercall_ret_at_each_exit(snp: SnpVm) -> None:
    """``snp_begin_psc_msr`` sets ``run->hypercall.ret = 0`` with every exit: a value an
    earlier answer left there does not answer the next exit."""
    g = snp.guest
    with pytest.raises(HypercallExit):
        g.psc_msr(0x42, PRIV)
    assert g.resume(7) == GHCB_MSR_PSC_RESP_ERROR
    with pytest.raises(HypercallExit):
        g.psc_msr(0x43, PRIV)
    assert g.state.hypercall_ret == 0
    assert g.map_gpa_range(0x5001, 1, 0) == -errno.EINVAL
    assert g.state.completed == GHCB_MSR_PSC_RESP  # not the error 7 would have given


def test_linux_sized_requests_coalesce(snp: SnpVm) -> None:
    """A Linux guest's 64-entry request of contiguous 4K pages is a single exit."""
    vmm = snp.vmm()
    entries = [PscEntry(gfn=i, operation=PRIV) for i in range(VMGEXIT_PSC_MAX_ENTRY)]
    assert vmm.run(lambda: snp.guest.page_state_change(entries), snp.guest) == 0
    assert vmm.exits == 1
    assert snp.vm.is_private(0) and snp.vm.is_private(63) and not snp.vm.is_private(64)


def test_psc_without_exit_capability_fails_without_exit() -> None:
    snp = make_snp_vm(exits=False)
    rc = snp.guest.page_state_change([PscEntry(gfn=0, operation=PRIV)])
    assert rc == VMGEXIT_PSC_ERROR_GENERIC
    assert snp.vm.counters["userspace_exits"] == 0


def test_vmm_error_fails_the_request(snp: SnpVm) -> None:
    g = snp.guest
    with pytest.raises(HypercallExit):
        g.page_state_change([PscEntry(gfn=0, operation=PRIV), PscEntry(gfn=9, operation=PRIV)])
    assert g.resume(1) == VMGEXIT_PSC_ERROR_GENERIC


def test_msr_protocol_round_trip(snp: SnpVm) -> None:
    g = snp.guest
    with pytest.raises(HypercallExit) as info:
        g.psc_msr(0x42, SHARED)
    assert tuple(info.value.args) == (0x42 * PAGE, 1, KVM_MAP_GPA_RANGE_DECRYPTED)
    assert g.resume(0) == GHCB_MSR_PSC_RESP
    with pytest.raises(HypercallExit):
        g.psc_msr(0x42, PRIV)
    assert g.resume(7) == GHCB_MSR_PSC_RESP_ERROR
    assert g.psc_msr(0x42, 9) == GHCB_MSR_PSC_RESP_ERROR  # bad operation: no exit


def test_map_gpa_range_hypercall(snp: SnpVm) -> None:
    """KVM_HC_MAP_GPA_RANGE (nr 12) from the guest: exit with the guest's arguments; ret returned."""
    g = snp.guest
    with pytest.raises(HypercallExit) as info:
        g.map_gpa_range(0x5000, 3, KVM_MAP_GPA_RANGE_ENCRYPTED)
    assert tuple(info.value.args) == (0x5000, 3, KVM_MAP_GPA_RANGE_ENCRYPTED)
    assert g.resume(0) == 0
    assert g.map_gpa_range(0x5001, 1, 0) == -errno.EINVAL
    plain = make_snp_vm(exits=False)
    assert plain.guest.map_gpa_range(0x5000, 1, 0) == -KVM_ENOSYS


def test_implicit_conversion_is_a_memory_fault_exit(snp: SnpVm) -> None:
    """2.3 implicit: a private access to a shared gfn exits KVM_EXIT_MEMORY_FAULT (G-2)."""
    with pytest.raises(MemoryFault) as info:
        snp.guest.pvalidate(0x7000)
    assert info.value.is_private and info.value.gpa == 0x7000
    snp.private(0x7000, PAGE)
    assert snp.guest.pvalidate(0x7000) == 0


def test_pvalidate_then_access(snp: SnpVm) -> None:
    """Guest-Invalid -> Guest-Valid by PVALIDATE; a private access before it is #VC."""
    snp.private(0, MIB)
    g = snp.guest
    with pytest.raises(UnvalidatedAccess):
        g.write(0x2000, b"secret")
    assert g.pvalidate(0x2000) == 0
    assert g.pvalidate(0x2000) == PVALIDATE_FAIL_NOUPDATE
    g.write(0x2000, b"secret")
    assert g.read(0x2000, 6) == b"secret"
    assert snp.rmp.lookup(snp.pfn(0x2000)).state is RmpState.GUEST_VALID


def test_2m_pvalidate_on_4k_entries_falls_back(snp: SnpVm) -> None:
    """6.18 order-0 folios give 4K entries: 2M PVALIDATE says SIZEMISMATCH, the guest goes 4K."""
    snp.private(0, 2 * MIB)
    g = snp.guest
    assert g.pvalidate(0, uapi.PG_LEVEL_2M) == PVALIDATE_FAIL_SIZEMISMATCH
    assert g.pvalidate_range(0, 2 * MIB, uapi.PG_LEVEL_2M) == 0
    assert snp.rmp.lookup(snp.pfn(2 * MIB - PAGE)).validated


def test_4k_pvalidate_in_a_2m_entry_psmashes_and_zaps(snp_huge: SnpVm) -> None:
    """2.2: 4K PVALIDATE over a 2M RMP entry -> #NPF SIZEM -> PSMASH + 512-gfn zap, then OK."""
    snp = snp_huge
    snp.private(0, 2 * MIB)
    g = snp.guest
    assert g.pvalidate(0x3000) == 0
    counters = snp.vm.counters
    assert counters["rmp_npf"] == 1 and counters["psmash"] == 1
    assert snp.rmp.lookup(snp.pfn(0x3000)).level == uapi.PG_LEVEL_4K
    assert snp.rmp.lookup(snp.pfn(0x3000)).validated and not snp.rmp.lookup(snp.pfn(0x4000)).validated


def test_2m_pvalidate_on_a_2m_entry(snp_huge: SnpVm) -> None:
    snp = snp_huge
    snp.private(0, 4 * MIB)
    assert snp.guest.pvalidate_range(0, 4 * MIB, uapi.PG_LEVEL_2M) == 0
    assert snp.vm.counters["pvalidate"] == 2 and snp.vm.counters["psmash"] == 0
    assert snp.rmp.lookup(snp.pfn(3 * MIB)).state is RmpState.GUEST_VALID


def test_pvalidate_of_a_page_the_host_reassigned_is_an_rmp_violation(snp: SnpVm) -> None:
    """Wrong ASID in the RMP entry: #NPF with the RMP bit that KVM cannot resolve."""
    snp.private(0, MIB)
    snp.vcpu.access(0, private=True)
    rmp = snp.rmp
    pfn = snp.pfn(0)
    assert rmp.make_private(pfn, 0, uapi.PG_LEVEL_4K, snp.sev.asid + 1, immutable=False) == 0
    with pytest.raises(RmpViolation, match="ASID"):
        snp.guest.pvalidate(0)


def test_npt_level_follows_the_rmp_page_size(snp_huge: SnpVm) -> None:
    """2.3 max mapping level: NPT 2M over a 2M RMP entry; after PSMASH + zap, 4K."""
    snp = snp_huge
    snp.private(0, 2 * MIB)
    snp.vcpu.access(0x1000, private=True)
    assert snp.vm.mapping_level(1) == uapi.PG_LEVEL_2M
    assert snp.guest.pvalidate(0x1000) == 0  # 4K PVALIDATE: SIZEM #NPF, PSMASH, zap
    assert snp.vm.mapping_level(1) == uapi.PG_LEVEL_4K
    assert snp.rmp.lookup(snp.pfn(0x1000)).level == uapi.PG_LEVEL_4K


def test_rmp_fault_zaps_512_gfns_from_the_faulting_gfn(snp_huge: SnpVm) -> None:
    """sev_handle_rmp_fault: kvm_zap_gfn_range(gfn, gfn + 512) is not 2M-aligned.

    A SIZEM #NPF at gfn 5 zaps [5, 517): the 2M leaf of the next block goes as well (the TDP
    MMU drops any leaf overlapping the range); its RMP entry stays 2M.
    """
    snp = snp_huge
    snp.private(0, 4 * MIB)
    snp.vcpu.access(0x5000, private=True)
    snp.vcpu.access(2 * MIB + 0x1000, private=True)
    assert snp.vm.mapping_level(512 + 1) == uapi.PG_LEVEL_2M
    assert snp.guest.pvalidate(0x5000) == 0
    assert not snp.vm.is_mapped(512 + 1)
    assert snp.rmp.lookup(snp.pfn(2 * MIB)).level == uapi.PG_LEVEL_2M


def test_6_18_maps_private_memory_at_4k(snp: SnpVm) -> None:
    """H-1: order-0 gmem folios: private mappings are 4K."""
    snp.private(0, 2 * MIB)
    snp.vcpu.access(0x1000, private=True)
    assert snp.vm.mapping_level(1) == uapi.PG_LEVEL_4K


def test_a_fault_run_ends_where_the_rmp_page_size_changes(snp_huge: SnpVm) -> None:
    """sev_gmem_max_mapping_level answers per pfn: a bulk fault over 2M entries with a
    PSMASHed one in the middle maps 2M, 4K, 2M, as one access per page would."""
    ranged, stepped = snp_huge, make_snp_vm("snp-hugepage")
    for snp in (ranged, stepped):
        snp.private(0, 6 * MIB)
        snp.vcpu.access(2 * MIB, private=True)  # prepares the middle folio: a 2M entry
        view(snp.vm).zap_gfn_range(512, 1024)
        assert snp.rmp.psmash(snp.pfn(2 * MIB)) == 0
    assert view(ranged.vm).fault_range(0, 3 * 512, private=True) == 3 * 512
    for gfn in range(0, 3 * 512):
        stepped.vcpu.access(gfn * PAGE, 1, private=True)
    levels = [(leaf.gfn, leaf.npages, leaf.level) for leaf in view(ranged.vm).leaves()]
    assert levels == [(0, 512, uapi.PG_LEVEL_2M), (512, 512, uapi.PG_LEVEL_4K), (1024, 512, uapi.PG_LEVEL_2M)]
    assert levels == [(leaf.gfn, leaf.npages, leaf.level) for leaf in view(stepped.vm).leaves()]
    assert ranged.vm.counters["faults"] == stepped.vm.counters["faults"] == 1 + 2 + 512
