"""The snp backends on the core model: VM types, capabilities, ASIDs, host outcomes."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from snp_helpers import MIB, SnpVm, make_snp_vm

import guestmem
import guestmem.backend
import guestmem_snp
from guestmem import uapi
from guestmem.backend import Owner, OwnershipEvent
from guestmem.errors import HostCrash, HostSigbus, KvmError
from guestmem.registry import get_registry
from guestmem_snp.asid import AsidAllocator
from guestmem_snp.host import SVM_SEV_FEAT_DEBUG_SWAP, SVM_SEV_FEAT_SECURE_TSC, snp_host
from guestmem_snp.rmp import RmpState

PAGE = uapi.PAGE_SIZE


def test_backends_and_vm_types_registered() -> None:
    """CAP-5/CAP-3/S-4/PF-2: the VmTypeInfo flags of SEV, SEV-ES and SNP."""
    backends = get_registry().backends()
    snp = backends["snp"]
    assert snp.distribution == "guestmem-snp"
    info = {t.type: t for t in snp.vm_types}
    sev, es, snp_t = info[uapi.KVM_X86_SEV_VM], info[uapi.KVM_X86_SEV_ES_VM], info[uapi.KVM_X86_SNP_VM]
    assert (sev.has_private_mem, sev.readonly_mem, sev.pre_fault_allowed) == (False, True, True)
    assert (es.has_private_mem, es.readonly_mem) == (False, False)
    assert (snp_t.has_private_mem, snp_t.readonly_mem, snp_t.pre_fault_allowed) == (True, False, False)
    assert (snp_t.nr_memslot_as_ids, snp_t.gmem_folio_order) == (1, 0)
    huge = backends["snp-hugepage"].vm_type(uapi.KVM_X86_SNP_VM)
    assert huge is not None and huge.gmem_folio_order == uapi.PMD_ORDER


@pytest.mark.parametrize(
    ("vm_type", "flags"),
    [(uapi.KVM_X86_SEV_VM, 0x3), (uapi.KVM_X86_SEV_ES_VM, 0x3), (uapi.KVM_X86_SNP_VM, 0x1)],
)
def test_cap3_no_init_shared_for_snp(vm_type: int, flags: int) -> None:
    """CAP-3: KVM_CAP_GUEST_MEMFD_FLAGS is MMAP only for SNP; INIT_SHARED create is EINVAL."""
    with guestmem.open("snp") as kvm, kvm.create_vm(vm_type) as vm:
        assert vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == flags
        if flags == 0x1:
            with pytest.raises(KvmError) as info:
                vm.create_guest_memfd(MIB, uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED)
            assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("vm_type", [uapi.KVM_X86_SEV_ES_VM, uapi.KVM_X86_SNP_VM])
def test_s4_no_readonly_memslots(vm_type: int) -> None:
    """S-4: no READONLY memslots with protected state (SEV-ES, SNP)."""
    with guestmem.open("snp") as kvm, kvm.create_vm(vm_type) as vm:
        assert vm.check_extension(uapi.KVM_CAP_READONLY_MEM) == 0
        mem = kvm.mmap_anonymous(MIB)
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region2(0, uapi.KVM_MEM_READONLY, 0, MIB, mem.address)
        assert info.value.errno == errno.EINVAL


def test_pf2_pre_fault_refused_on_snp_until_launch_finish() -> None:
    """PF-2: KVM_PRE_FAULT_MEMORY on an SNP VM is EOPNOTSUPP until SNP_LAUNCH_FINISH.

    sev.c ``snp_launch_finish`` sets ``kvm->arch.pre_fault_allowed``: afterwards a
    pre-fault assigns the RMP entries like a first access does.
    """
    snp = make_snp_vm(launch=False)
    snp.private(0, MIB)
    with pytest.raises(KvmError) as info:
        snp.vcpu.pre_fault_memory(0, MIB)
    assert info.value.errno == errno.EOPNOTSUPP
    snp.sev.snp_launch_start()
    snp.sev.snp_launch_finish()
    assert snp.vcpu.pre_fault_memory(0, MIB) == 0
    assert snp.vm.is_mapped(MIB // 4096 - 1)


def test_exit_hypercall_capability(snp: SnpVm) -> None:
    assert snp.vm.check_extension(uapi.KVM_CAP_EXIT_HYPERCALL) == 1 << 12
    with pytest.raises(KvmError):
        snp.sev.enable_cap_exit_hypercall(1 << 3)


# --- KVM_SEV_INIT2 and ASIDs ---------------------------------------------------------------------
def test_init2_allocates_an_snp_asid_once() -> None:
    snp = make_snp_vm(init=False)
    sev = snp.sev
    with pytest.raises(KvmError) as info:  # vCPUs exist already
        sev.init2()
    assert info.value.errno == errno.EINVAL
    with guestmem.open("snp") as kvm, kvm.create_vm(uapi.KVM_X86_SNP_VM) as vm:
        s = guestmem_snp.sev(vm)
        with pytest.raises(KvmError):
            s.init2(ghcb_version=1)  # SNP needs GHCB v2
        s.init2()
        assert s.asid in s.host.asids.range_for(es=True, snp=True)
        with pytest.raises(KvmError):
            s.init2()


def test_init2_on_an_snp_guest_is_eperm_others_einval() -> None:
    """sev_mem_enc_ioctl: an initialised SNP VM takes only SNP commands (EPERM); SEV-ES re-init EINVAL."""
    with guestmem.open("snp") as kvm:
        for vm_type, err in ((uapi.KVM_X86_SNP_VM, errno.EPERM), (uapi.KVM_X86_SEV_ES_VM, errno.EINVAL)):
            with kvm.create_vm(vm_type) as vm:
                s = guestmem_snp.sev(vm)
                s.init2()
                with pytest.raises(KvmError) as info:
                    s.init2()
                assert info.value.errno == err


def test_init2_vmsa_features_must_be_supported() -> None:
    """__sev_guest_init: vmsa_features outside the supported set -> EINVAL; Secure TSC is SNP-only."""
    with guestmem.open("snp") as kvm:
        for vm_type, features, ok in (
            (uapi.KVM_X86_SNP_VM, SVM_SEV_FEAT_DEBUG_SWAP | SVM_SEV_FEAT_SECURE_TSC, True),
            (uapi.KVM_X86_SNP_VM, 1 << 0, False),  # SNP_ACTIVE is KVM's to set
            (uapi.KVM_X86_SNP_VM, 1 << 12, False),
            (uapi.KVM_X86_SEV_ES_VM, SVM_SEV_FEAT_DEBUG_SWAP, True),
            (uapi.KVM_X86_SEV_ES_VM, SVM_SEV_FEAT_SECURE_TSC, False),
        ):
            with kvm.create_vm(vm_type) as vm:
                s = guestmem_snp.sev(vm)
                if ok:
                    s.init2(vmsa_features=features)
                    assert s.state.vmsa_features & features == features
                else:
                    with pytest.raises(KvmError) as info:
                        s.init2(vmsa_features=features)
                    assert info.value.errno == errno.EINVAL and not s.state.active


def test_init2_of_an_snp_vm_allocates_the_guest_request_firmware_page() -> None:
    """snp_guest_req_init: the response bounce page is a Firmware page until snp_guest_req_cleanup."""
    kvm: Any = guestmem.open("snp")
    vm = kvm.create_vm(uapi.KVM_X86_SNP_VM)
    s = guestmem_snp.sev(vm)
    rmp = s.host.rmp
    assert rmp.assigned_pages() == 0
    s.init2()
    resp = s.guest_resp_pfn
    assert resp is not None and rmp.lookup(resp).state is RmpState.FIRMWARE
    assert s.state.guest_req_pfn is not None and not rmp.is_assigned(s.state.guest_req_pfn)
    vm.close()
    assert rmp.assigned_pages() == 0 and s.host.freed.get(resp)
    assert vm.counters["psp_commands"] == 1  # its SNP_PAGE_RECLAIM
    with kvm.create_vm(uapi.KVM_X86_SEV_ES_VM) as es:
        guestmem_snp.sev(es).init2()
        assert guestmem_snp.sev(es).guest_resp_pfn is None and rmp.assigned_pages() == 0


def test_sev_vm_gets_an_sev_asid_and_no_vmsa_features() -> None:
    with guestmem.open("snp") as kvm, kvm.create_vm(uapi.KVM_X86_SEV_VM) as vm:
        s = guestmem_snp.sev(vm)
        with pytest.raises(KvmError):
            s.init2(vmsa_features=1)
        s.init2()
        assert s.asid >= s.host.asids.min_sev_asid


def test_asid_freed_at_destroy_and_recycled_after_flush() -> None:
    """2.1: a destroyed VM's ASID waits for WBINVD + DF_FLUSH before reuse; exhaustion is EBUSY."""
    kvm: Any = guestmem.open("snp")
    host = snp_host(kvm)
    host.asids = AsidAllocator(max_sev_asid=10, min_sev_asid=3)  # SNP ASIDs 1..2
    vms: list[Any] = [kvm.create_vm(uapi.KVM_X86_SNP_VM) for _ in range(3)]
    guestmem_snp.sev(vms[0]).init2()
    guestmem_snp.sev(vms[1]).init2()
    with pytest.raises(KvmError) as info:
        guestmem_snp.sev(vms[2]).init2()
    assert info.value.errno == errno.EBUSY
    first = guestmem_snp.sev(vms[0]).asid
    vms[0].close()
    assert host.asids.awaiting_flush(first)
    guestmem_snp.sev(vms[2]).init2()
    assert guestmem_snp.sev(vms[2]).asid == first
    assert vms[2].counters["wbinvd"] == 1 and vms[2].counters["df_flush"] == 1


def test_memory_encrypt_op_on_a_non_sev_vm_is_enotty() -> None:
    with guestmem.open("sw") as kvm, kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM) as vm:
        with pytest.raises(KvmError) as info:
            guestmem_snp.sev(vm)
        assert info.value.errno == errno.ENOTTY


# --- prepare, mapping level, invalidate --------------------------------------------------------
def test_first_private_fault_assigns_a_4k_entry(snp: SnpVm) -> None:
    """2.2 row 1 at 6.18 (H-1): order-0 folio -> 4K Guest-Invalid entry; NPT at 4K."""
    snp.private(0, MIB)
    snp.vcpu.access(0x3000, private=True)
    entry = snp.rmp.lookup(snp.pfn(0x3000))
    assert entry.state is RmpState.GUEST_INVALID
    assert (entry.asid, entry.gpa, entry.level) == (snp.sev.asid, 0x3000, uapi.PG_LEVEL_4K)
    assert snp.vm.counters["rmpupdate"] == 1
    assert snp.sev.host.direct_map_split.get(entry.pfn // 512)  # adjust_direct_map
    snp.vcpu.access(0x3000, private=True)  # prepared once per folio lifetime
    assert snp.vm.counters["rmpupdate"] == 1


def test_hugepage_folio_gets_a_2m_entry(snp_huge: SnpVm) -> None:
    """2.2 row 1: 2M iff the folio is 2M and all 512 entries are unassigned."""
    snp = snp_huge
    snp.private(0, 4 * MIB)
    snp.vcpu.access(2 * MIB + 0x5000, private=True)
    entry = snp.rmp.lookup(snp.pfn(2 * MIB + 0x5000))
    assert (entry.level, entry.gpa) == (uapi.PG_LEVEL_2M, 2 * MIB)
    assert snp.state.max_mapping_level(entry.pfn, True) == uapi.PG_LEVEL_2M
    assert snp.vm.counters["direct_map_splits"] == 0


def test_every_4k_rmpupdate_splits_the_direct_map(snp_huge: SnpVm) -> None:
    """rmpupdate() -> adjust_direct_map(): a 4K RMPUPDATE (private or shared) splits its 2M block.

    The 2M entry leaves the direct map whole; freeing a 4K hole in it (PSMASH, then a 4K
    RMPUPDATE to shared) splits it; so does the 4K firmware page of SNP_LAUNCH_START.
    """
    snp = snp_huge
    snp.private(0, 2 * MIB)
    snp.vcpu.access(0, private=True)
    assert snp.vm.counters["direct_map_splits"] == 0
    snp.gmem.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, 0x3000, PAGE)
    assert snp.vm.counters["psmash"] == 1 and snp.vm.counters["direct_map_splits"] == 1
    gctx = snp.sev.gctx_pfn  # made by the launch of the fixture
    assert gctx is not None and snp.sev.host.direct_map_split.get(gctx // 512)


def test_no_rmp_entry_before_init2() -> None:
    """sev_gmem_prepare does nothing until the VM is an SNP guest (KVM_SEV_INIT2); no guest
    access reaches it before, either: KVM_RUN is EINVAL (svm_vcpu_pre_run, SNP-2.1)."""
    snp = make_snp_vm(init=False)
    snp.private(0, MIB)
    with pytest.raises(KvmError) as info:
        snp.vcpu.access(0, private=True)
    assert (info.value.errno, info.value.rule) == (errno.EINVAL, "SNP-2.1")
    assert snp.vm.gmem_pfn(0) is None
    pfn = snp.kvm.host.alloc(1)
    snp.state.gmem_prepare(0, pfn, 0, 1)
    assert not snp.rmp.is_assigned(pfn)


def test_punch_hole_reclaims_rmp_and_flushes(snp: SnpVm) -> None:
    """2.6: the freed folio's entry goes back to Hypervisor, with a clflush."""
    snp.private(0, MIB)
    snp.vcpu.access(0, private=True)
    pfn = snp.pfn(0)
    snp.gmem.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, 0, MIB)
    assert not snp.rmp.is_assigned(pfn)
    assert snp.vm.counters["clflush"] == 1 and snp.vm.counters["rmpupdate"] == 2


def test_partial_free_of_a_2m_entry_psmashes(snp_huge: SnpVm) -> None:
    """2.6: a partly freed 2M RMP page is PSMASHed, then only the freed part is reclaimed."""
    snp = snp_huge
    snp.private(0, 2 * MIB)
    snp.vcpu.access(0, private=True)
    base = snp.pfn(0)
    rmp = snp.rmp
    # kvm_arch_gmem_invalidate on part of the folio (as a partial free would reach it)
    snp.state.gmem_invalidate(base + 16, base + 32)
    assert snp.vm.counters["psmash"] == 1
    assert not rmp.is_assigned(base + 16) and not rmp.is_assigned(base + 31)
    assert rmp.lookup(base + 15).level == uapi.PG_LEVEL_4K and rmp.lookup(base + 32).assigned


def test_whole_2m_free_is_one_2m_update(snp_huge: SnpVm) -> None:
    snp = snp_huge
    snp.private(0, 4 * MIB)
    snp.vcpu.access(0, private=True)
    snp.vcpu.access(2 * MIB, private=True)
    before = snp.vm.counters["rmpupdate"]
    snp.gmem.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, 0, 4 * MIB)
    assert snp.vm.counters["rmpupdate"] - before == 2
    assert snp.vm.counters["psmash"] == 0
    assert snp.vm.counters["clflush_bytes"] == 4 * MIB


def test_vm_teardown_leaves_no_assigned_entry() -> None:
    snp = make_snp_vm(launch=False)
    snp.private(0, MIB)
    snp.sev.snp_launch_start()
    snp.sev.launch_update_data(0, b"x" * 4096)
    snp.sev.snp_launch_finish()
    snp.vcpu.access(0x10000, private=True)
    rmp = snp.rmp
    assert rmp.assigned_pages(snp.sev.asid) == 3  # launched page, VMSA, faulted page
    snp.gmem.close()
    snp.vcpu.close()
    snp.vm.close()
    assert rmp.assigned_pages() == 0
    assert not snp.sev.host.freed_while_assigned and not snp.sev.host.leaked


# --- host mappability and host accesses -----------------------------------------------------------
def test_private_pages_are_never_host_mappable() -> None:
    """2.5: a gmem mmap of an SNP VM faults SIGBUS on private pages (and on the rest: M-4)."""
    kvm: Any = guestmem.open("snp")
    vm = kvm.create_vm(uapi.KVM_X86_SNP_VM)
    guestmem_snp.sev(vm).init2()
    gmem = vm.create_guest_memfd(MIB, uapi.GUEST_MEMFD_FLAG_MMAP)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, MIB, 0, gmem, 0)
    vm.set_memory_attributes(0, MIB, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vcpu = vm.create_vcpu(0)
    guestmem_snp.sev(vm).snp_launch_start()
    guestmem_snp.sev(vm).snp_launch_finish()
    vcpu.access(0, private=True)
    mapping = gmem.mmap(MIB)
    with pytest.raises(HostSigbus, match="host-mappability"):
        mapping.write(0, b"x")
    assert kvm.host.crashed is None


def test_host_write_to_assigned_page_is_an_rmp_pf_host_crash(snp: SnpVm) -> None:
    """2.2 illegal access: a host write to an assigned page -> RMP #PF, recorded as host crash."""
    snp.private(0, MIB)
    snp.vcpu.access(0, private=True)
    pfn = snp.pfn(0)
    policy = get_registry().backends()["snp"].policy
    assert policy is not None
    host = guestmem.backend.view(snp.kvm)
    assert policy.guestmem_host_access(host=host, pfn=pfn, write=False) is None  # type: ignore[attr-defined]
    with pytest.raises(HostCrash, match="RMP #PF"):
        snp.sev.host_kernel_write(pfn, b"oops")
    assert "RMP #PF" in (snp.kvm.host.crashed or "")
    with pytest.raises(HostCrash):
        snp.vm.set_memory_attributes(0, MIB, 0)


def test_host_write_to_shared_page_is_fine(snp: SnpVm) -> None:
    snp.vcpu.access(0, data=b"shared", private=False)
    pfn = snp.vcpu.translate(0)
    snp.sev.host_kernel_write(pfn, b"SHARED")
    assert snp.vcpu.access(0, 6, private=False) == b"SHARED"


def test_partial_frees_at_both_ends_psmash_two_2m_pages(snp_huge: SnpVm) -> None:
    """2.6: the range's head and tail each split their 2M entry; nothing outside is reclaimed."""
    snp = snp_huge
    snp.private(0, 4 * MIB)
    snp.vcpu.access(0, private=True)
    snp.vcpu.access(2 * MIB, private=True)
    base = snp.pfn(0)
    assert snp.pfn(2 * MIB) == base + 512  # the folios are contiguous on the host
    snp.state.gmem_invalidate(base + 500, base + 520)
    rmp = snp.rmp
    assert snp.vm.counters["psmash"] == 2
    assert [rmp.is_assigned(base + i) for i in (499, 500, 519, 520)] == [True, False, False, True]
    assert rmp.lookup(base + 1000).level == uapi.PG_LEVEL_4K


def test_unreclaimable_entry_is_freed_anyway_and_a_later_host_write_crashes(snp: SnpVm) -> None:
    """2.2/2.6: RMPUPDATE fails (immutable) -> WARN, the folio is still freed; host write -> RMP #PF."""
    snp.private(0, MIB)
    pfn = snp.kvm.host.alloc(1)
    assert snp.rmp.make_private(pfn, 0x9000, uapi.PG_LEVEL_4K, snp.sev.asid, immutable=True) == 0
    snp.state.gmem_invalidate(pfn, pfn + 1)
    assert snp.vm.counters["rmp_update_failures"] == 1
    assert snp.sev.host.freed_while_assigned.get(pfn)
    with pytest.raises(HostCrash, match="Pre-Guest"):
        snp.sev.host_kernel_write(pfn, b"\0")


def test_rmp_changes_reach_ownership_observers() -> None:
    """Every RMP change is fanned out through guestmem_ownership_update (table "rmp")."""
    seen: list[tuple[str, int, int, bool, bool]] = []
    owners: list[tuple[Owner, Owner]] = []

    class Observer:
        @guestmem.hookimpl
        def guestmem_ownership_update(self, event: OwnershipEvent) -> None:
            seen.append((event.table, event.pfn, event.npages, event.old is None, event.new is None))
            owners.append((event.old_owner, event.new_owner))

    observer = Observer()
    registry = get_registry()
    registry.add_plugin(observer, distribution="test-observer")
    try:
        snp2 = make_snp_vm()
        snp2.private(0, MIB)
        snp2.vcpu.access(0, private=True)
        pfn = snp2.pfn(0)
        snp2.gmem.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, 0, MIB)
    finally:
        registry.remove_plugin(observer)
    assert ("rmp", pfn, 1, True, False) in seen  # prepare: Hypervisor -> Guest-Invalid
    assert ("rmp", pfn, 1, False, True) in seen  # invalidate: back to Hypervisor
    assert (Owner.HOST, Owner.GUEST) in owners and (Owner.GUEST, Owner.HOST) in owners
    assert (Owner.HOST, Owner.HYPERVISOR) in owners  # INIT2's guest-request firmware page


def test_guest_side_needs_an_snp_vm() -> None:
    with guestmem.open("snp") as kvm, kvm.create_vm(uapi.KVM_X86_SEV_ES_VM) as vm:
        guestmem_snp.sev(vm).init2()
        vcpu: Any = vm.create_vcpu(0)
        with pytest.raises(KvmError) as info:
            guestmem_snp.guest(vcpu)
        assert info.value.errno == errno.ENOTTY
        assert vcpu.hypercall(0x80000010) == -1000  # no PSC NAE event for SEV-ES: -KVM_ENOSYS


def test_invariant_checker_holds_through_an_snp_lifecycle() -> None:
    """The core's model invariants hold with the SNP hooks in play."""
    from guestmem.invariants import InvariantChecker

    checker = InvariantChecker()
    registry = get_registry()
    registry.add_plugin(checker, distribution="test-invariants")
    try:
        snp = make_snp_vm("snp-hugepage")
        snp.private(0, 4 * MIB)
        g = snp.guest
        assert g.pvalidate_range(0, 2 * MIB) == 0
        assert g.pvalidate_range(2 * MIB, 2 * MIB, uapi.PG_LEVEL_2M) == 0
        snp.gmem.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, 0, 4 * MIB)
        snp.vm.set_memory_attributes(0, 4 * MIB, 0)
    finally:
        registry.remove_plugin(checker)
    assert checker.checked > 5


def test_no_2m_entry_when_a_subpage_is_already_assigned(snp_huge: SnpVm) -> None:
    """is_large_rmp_possible: one assigned pfn in the 2M block forces 4K entries for the rest."""
    snp = snp_huge
    base = snp.kvm.host.alloc(512)
    assert base % 512 == 0
    other = snp.rmp.make_private(base + 7, 0x7000_0000, uapi.PG_LEVEL_4K, snp.sev.asid, immutable=False)
    assert other == 0
    snp.state.gmem_prepare(0x400, base, uapi.PMD_ORDER, 512)
    assert snp.rmp.lookup(base).level == uapi.PG_LEVEL_4K
    assert snp.rmp.lookup(base + 8).gpa == (0x400 + 8) << 12
    assert snp.rmp.lookup(base + 7).gpa == 0x7000_0000  # left alone
    assert snp.vm.counters["rmpupdate"] == 511


@pytest.mark.parametrize("assigned", [None, 7, 0], ids=["fresh", "subpage-assigned", "head-assigned"])
def test_a_run_of_large_folios_is_prepared_as_each_folio_in_turn(assigned: int | None) -> None:
    """``range_faults``: one ``sev_gmem_prepare`` of three 2 MiB folios leaves the RMP as three
    calls of one folio each: a 2M entry per fresh folio, 4K entries for the unassigned pages
    of a folio with an assigned subpage, nothing for a folio whose first page is assigned."""
    ranged, stepped = make_snp_vm("snp-hugepage"), make_snp_vm("snp-hugepage")
    for snp, calls in ((ranged, [(0, 3)]), (stepped, [(0, 1), (1, 1), (2, 1)])):
        base = snp.kvm.host.alloc(3 * 512)
        if assigned is not None:
            gpa, asid = 0x7000_0000, snp.sev.asid
            assert (
                snp.rmp.make_private(base + 512 + assigned, gpa, uapi.PG_LEVEL_4K, asid, immutable=False) == 0
            )
        for first, n in calls:
            snp.state.gmem_prepare(0x400 + first * 512, base + first * 512, uapi.PMD_ORDER, n * 512)
    assert list(ranged.rmp.runs()) == list(stepped.rmp.runs())
    assert ranged.vm.counters == stepped.vm.counters
    assert ranged.vm.counters["rmpupdate"] == {None: 3, 7: 2 + 511, 0: 2}[assigned]
