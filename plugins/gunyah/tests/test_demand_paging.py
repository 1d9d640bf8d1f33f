"""Demand paging and reclaim: ``gunyah_gmem_demand_page``, ``gunyah_vm_provide_folio``,
``gunyah_vm_reclaim_range``, bindings (``gunyah_gmem_modify_mapping``), and the aborts the
hypervisor injects (``handle_inst_data_abort`` -> ``inject_inst_data_abort``)."""

from __future__ import annotations

import errno
from typing import Any

import pytest

import guestmem
from guestmem import KvmError, MmioExit, uapi
from guestmem.backend import Owner, OwnershipEvent, hookimpl, view
from guestmem.errors import EHWPOISON
from guestmem_gunyah import PageFaultExit, SyncExternalAbort, abi, create_guest_mem, gunyah
from guestmem_gunyah.abi import Access, RmError
from guestmem_gunyah.hyp import MEMEXTENT_TABLE, ExtentKind

from .conftest import LEND, LENT_GPA, PAGE, RWX, SHARE, SHARED_GPA, SIZE, Guest, machine, observing

LENT_GFN = LENT_GPA >> 12
SHARED_GFN = SHARED_GPA >> 12
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE


class Events:
    def __init__(self) -> None:
        self.events: list[OwnershipEvent] = []

    @hookimpl
    def guestmem_ownership_update(self, event: OwnershipEvent) -> None:
        self.events.append(event)


def test_a_lent_page_is_donated_to_protected_and_mapped_private(guest: Guest) -> None:
    """Lend: ``DONATE_TO_PROTECTED`` host private -> guest private, mapped RWX with
    ``MAP_FLAG_PRIVATE``; the folio leaves the host's direct map; contents kept."""
    m = guest.mmap(guest.lent)
    m.write(3 * PAGE, b"from the vmm")
    m.madvise(uapi.MADV_DONTNEED, 0, SIZE)  # Gunyah's guest_memfd lends no folio the host maps
    with observing(Events(), "events") as seen:
        assert guest.vcpu.access(LENT_GPA + 3 * PAGE, 12) == b"from the vmm"
    pfn = guest.vm.gmem_pfn(LENT_GFN + 3)
    hyp = machine(guest.kvm).hyp
    assert hyp.owner(pfn).kind == ExtentKind.GUEST_PRIVATE
    assert hyp.lookup(guest.gh.vmid, LENT_GFN + 3) == (pfn, hyp.stage2(guest.gh.vmid).get(LENT_GFN + 3))
    assert hyp.stage2(guest.gh.vmid).get(LENT_GFN + 3).access == Access.RWX
    assert not view(guest.kvm).direct_map_valid(pfn)
    donation = [e for e in seen.events if e.table == MEMEXTENT_TABLE and e.pfn == pfn]
    assert [(e.old_owner, e.new_owner) for e in donation] == [(Owner.HOST, Owner.GUEST)]
    c = guest.vm.counters
    assert c["gunyah.hvc.memextent_donate"] == 1 and c["gunyah.hvc.addrspace_map"] == 1


def test_a_shared_page_is_donated_to_sibling_and_stays_with_the_host(guest: Guest) -> None:
    """Share: ``DONATE_TO_SIBLING`` host shared -> guest shared, mapped RW with
    ``MAP_FLAG_VMMIO``; the host keeps it: both see the same bytes."""
    m = guest.mmap(guest.shared)
    m.write(PAGE, b"host")
    assert guest.vcpu.access(SHARED_GPA + PAGE, 4) == b"host"
    guest.vcpu.access(SHARED_GPA + 2 * PAGE, data=b"guest")
    assert m.read(2 * PAGE, 5) == b"guest"
    pfn = guest.vm.gmem_pfn(SHARED_GFN + 2)
    hyp = machine(guest.kvm).hyp
    entry = hyp.stage2(guest.gh.vmid).get(SHARED_GFN + 2)
    assert hyp.owner(pfn).kind == ExtentKind.GUEST_SHARED and entry.access == Access.RW and entry.vmmio
    assert hyp.host_accessible(pfn) and view(guest.kvm).direct_map_valid(pfn)


def test_a_store_to_a_read_only_binding_is_refused(kvm: Any) -> None:
    """``gunyah_gmem_demand_page``: a write without ``GUNYAH_MEM_ALLOW_WRITE`` is -EPERM: a
    page-fault exit; read it is mapped R (share) / RX (lend) and a later store is refused
    the same way.  Resuming with ``GUNYAH_VCPU_RESUME_FAULT`` injects the abort."""
    g = Guest(kvm, share_flags=abi.GUNYAH_MEM_ALLOW_READ | abi.GUNYAH_MEM_FORCE_SHARE)
    with pytest.raises(PageFaultExit) as info:
        g.vcpu.access(SHARED_GPA, data=b"x")
    exit_ = info.value
    assert (exit_.exit_reason, exit_.phys_addr, exit_.attempt) == (
        abi.GUNYAH_VCPU_EXIT_PAGE_FAULT,
        SHARED_GPA,
        -errno.EPERM,
    )
    assert g.vcpu.access(SHARED_GPA, 1) == b"\0"
    assert machine(kvm).hyp.stage2(g.gh.vmid).get(SHARED_GFN).access == Access.R
    with pytest.raises(PageFaultExit):
        g.vcpu.access(SHARED_GPA, data=b"x")
    with pytest.raises(SyncExternalAbort) as abort:
        g.gh.resume_fault(exit_)
    assert abort.value.ipa == SHARED_GPA and abort.value.write
    assert g.vm.counters["gunyah.exits.page_fault"] == 2 and g.vm.counters["gunyah.aborts_injected"] == 1
    g.teardown()


def test_a_lent_binding_added_after_start_is_not_demand_paged(guest: Guest) -> None:
    """Only the lent bindings of ``VM_START`` time were registered
    (``gunyah_gmem_setup_demand_paging``): the hypervisor has nobody to ask about a later
    one and injects an abort; a later shared binding still faults through (VMMIO path)."""
    guest.gh.start()
    late = create_guest_mem(guest.vm, SIZE)
    guest.gh.map_mem(late, LENT_GPA + 64 * SIZE, 0, SIZE, LEND)
    with pytest.raises(SyncExternalAbort) as info:
        guest.vcpu.access(LENT_GPA + 64 * SIZE, 1)
    assert "demand paged" in info.value.why
    late_shared = create_guest_mem(guest.vm, SIZE)
    guest.gh.map_mem(late_shared, LENT_GPA + 80 * SIZE, 0, SIZE, SHARE)
    guest.vcpu.access(LENT_GPA + 80 * SIZE, data=b"ok")
    guest.vm.set_user_memory_region2(2, 0, LENT_GPA + 64 * SIZE, 0)
    guest.vm.set_user_memory_region2(3, 0, LENT_GPA + 80 * SIZE, 0)
    late.close()
    late_shared.close()


def test_an_ipa_outside_every_binding_is_vmmio(guest: Guest) -> None:
    with pytest.raises(MmioExit):
        guest.vcpu.access(LENT_GPA + 256 * SIZE, 4)


@pytest.mark.parametrize("driver", ["launder", "sigbus"])
def test_lending_a_folio_the_host_maps(kvm: Any, driver: str) -> None:
    """Gunyah's guest_memfd refuses it (``folio_mapped``: -EPERM, a page-fault exit); the
    library unmaps the host first (``guest_memfd_make_inaccessible``)."""
    from guestmem_gunyah import Driver, set_driver

    set_driver(kvm, Driver(driver))
    g = Guest(kvm)
    m = g.mmap(g.lent)
    m.write(5 * PAGE, b"vmm")
    if driver == "launder":
        with pytest.raises(PageFaultExit) as info:
            g.vcpu.access(LENT_GPA + 5 * PAGE, 3)
        assert info.value.attempt == -errno.EPERM
        m.madvise(uapi.MADV_DONTNEED, 5 * PAGE, PAGE)
    assert g.vcpu.access(LENT_GPA + 5 * PAGE, 3) == b"vmm"
    assert not view(g.lent).host_mapped(5)
    g.teardown()


def test_a_run_is_provided_in_one_step_but_counted_per_folio(guest: Guest) -> None:
    """``Backend.range_faults``: a bulk touch of the lent binding is one donation and one
    map per run, counted as the driver's per-folio hypercalls; a host-mapped folio ends the
    run before it."""
    m = guest.mmap(guest.lent)
    m.write(200 * PAGE, b"busy")
    with observing(Events(), "events") as seen:
        mapped = guest.gh.touch(LENT_GPA, SIZE)
    assert mapped == 200 * PAGE  # the DTB page, then [1, 200): stops at the mapped folio
    donations = [e for e in seen.events if e.table == MEMEXTENT_TABLE and e.new_owner == Owner.GUEST]
    assert len(donations) == 2  # the DTB page at start, then one run of 199 pages
    c = guest.vm.counters
    assert c["gunyah.demand_paged_pages"] == 199 and c["gunyah.hvc.memextent_donate"] == 199
    assert c["gunyah.hvc.addrspace_map"] == 199


def test_reclaim_batches_nosync_and_syncs_once(guest: Guest) -> None:
    """``gunyah_vm_reclaim_range``: every unmap and donation but the last is NOSYNC; the
    folios return to the host's direct map; contents are kept (no sanitize)."""
    guest.gh.touch(LENT_GPA, 16 * PAGE)
    guest.vcpu.access(LENT_GPA + 4 * PAGE, data=b"kept")
    c0 = dict(guest.vm.counters)
    pfn = guest.vm.gmem_pfn(LENT_GFN + 4)
    guest.lent.fallocate(PUNCH, 0, 16 * PAGE)  # punch hole launders (reclaims) first
    c = guest.vm.counters
    assert c["gunyah.hvc.addrspace_unmap"] - c0.get("gunyah.hvc.addrspace_unmap", 0) == 16
    assert c["gunyah.sync"] - c0["gunyah.sync"] == 2  # one unmap, one donation
    assert c["gunyah.nosync"] - c0.get("gunyah.nosync", 0) == 30
    assert c["gunyah.reclaimed_pages"] == 16 and not guest.gh.state.mm
    assert machine(guest.kvm).hyp.owner(pfn).kind == ExtentKind.HLOS


def test_memory_failure_reclaims_the_folio(guest: Guest) -> None:
    """``gunyah_gmem_remove_folio`` (``error_remove_folio``) launders, as the library's
    ``gmem_error_folio`` -> ``invalidate_begin`` reclaims: the poisoned folio leaves the guest."""
    guest.vcpu.access(LENT_GPA + 7 * PAGE, data=b"x")
    guest.lent.inject_memory_failure(7 * PAGE)
    assert guest.gh.state.mm.get(LENT_GFN + 7) is None
    with pytest.raises(KvmError) as info:
        guest.vcpu.access(LENT_GPA + 7 * PAGE, 1)
    assert info.value.errno == EHWPOISON


def test_a_guest_touch_of_an_ipa_its_stage2_lost_is_an_abort() -> None:
    """The hypervisor's check on every access (``guestmem_guest_access``): a page its
    stage-2 no longer maps, though the core still has a leaf, is an abort.  The state is
    made by hand (no checker: it is one G-2 forbids)."""
    with guestmem.open("gunyah") as kvm:
        g = Guest(kvm)
        g.vcpu.access(LENT_GPA + PAGE, data=b"x")
        hyp = machine(kvm).hyp
        hyp.addrspaces[g.gh.vmid].erase(LENT_GFN + 1, LENT_GFN + 2)  # behind everyone's back
        with pytest.raises(SyncExternalAbort, match="not in the VM's stage-2") as info:
            g.vcpu.access(LENT_GPA + PAGE, 1)
        assert info.value.vmid == g.gh.vmid and not info.value.write
        assert g.vm.counters["gunyah.aborts_injected"] == 1


def test_a_failed_donation_is_a_page_fault_exit_and_changes_nothing(guest: Guest) -> None:
    """A folio someone else owns (here in a parcel the VMM built) cannot be donated:
    ``MEMDB_NOT_OWNER`` -> -EINVAL to the VMM; the driver records nothing."""
    guest.gh.start()
    guest.gh.share_parcel(LENT_GPA + 9 * PAGE, PAGE)
    with pytest.raises(PageFaultExit) as info:
        guest.vcpu.access(LENT_GPA + 9 * PAGE, 1)
    assert info.value.attempt == -errno.EINVAL
    assert guest.gh.state.mm.get(LENT_GFN + 9) is None


def test_rm_errors_reach_the_vmm_with_the_drivers_errno(guest: Guest) -> None:
    """``gunyah_rm_error_remap``: a parcel of a VM without a VMID names an invalid ACL VM."""
    with pytest.raises(KvmError) as info:
        guest.gh.share_parcel(LENT_GPA + PAGE, PAGE)
    assert info.value.errno == errno.EINVAL
    assert getattr(info.value, "error", None) == RmError.ARGUMENT_INVALID


def test_map_mem_checks_in_the_drivers_order(kvm: Any) -> None:
    """``gunyah_gmem_modify_mapping``: flags, rights, access policy, alignment (EINVAL);
    ``gunyah_gmem_add_mapping``: the file range bound already (EEXIST), the IPA range bound
    already (EEXIST, the core's S-14); lending needs ``rodata=full`` (EINVAL)."""
    vm = kvm.create_vm(abi.GUNYAH_VM_TYPE)
    gh = gunyah(vm)
    mem = create_guest_mem(vm, 4 * SIZE)
    cases = [
        (mem, LENT_GPA, 0, SIZE, RWX | 1 << 12),
        (mem, LENT_GPA, 0, SIZE, abi.GUNYAH_MEM_FORCE_LEND),
        (mem, LENT_GPA, 0, SIZE, RWX | 0x40),
        (mem, LENT_GPA + 1, 0, SIZE, RWX),
        (12345, LENT_GPA, 0, SIZE, RWX),  # an fd number that is no guest memory file
    ]
    for args in cases:
        with pytest.raises(KvmError) as info:
            gh.map_mem(*args)  # type: ignore[arg-type]
        assert info.value.errno == errno.EINVAL, args
    with pytest.raises(TypeError, match=r"^guest_mem must be a file"):  # no file at all
        gh.map_mem("not a file", LENT_GPA, 0, SIZE, RWX)  # type: ignore[arg-type]
    gh.map_mem(mem, LENT_GPA, 0, SIZE, RWX)
    with pytest.raises(KvmError) as info:
        gh.map_mem(mem, LENT_GPA + 8 * SIZE, SIZE // 2, SIZE, RWX)
    assert info.value.errno == errno.EEXIST
    with pytest.raises(KvmError) as info:
        gh.map_mem(mem, LENT_GPA, SIZE, SIZE, RWX)
    assert info.value.errno == errno.EEXIST
    machine(kvm).can_set_direct_map = False
    with pytest.raises(KvmError) as info:
        gh.map_mem(mem, LENT_GPA + 8 * SIZE, SIZE, SIZE, RWX)
    assert info.value.errno == errno.EINVAL
    gh.map_mem(mem, LENT_GPA + 8 * SIZE, SIZE, SIZE, SHARE)
    assert [b.lend for b in gh.bindings] == [True, False]
    vm.close()
    mem.close()


def test_unmap_mem_removes_or_trims_a_binding(guest: Guest) -> None:
    """``gunyah_gmem_remove_mapping``: the binding with the same flags holding the range;
    its end trimmed (the rest stays bound), a hole in the middle is EINVAL, none: ENOENT."""
    gh = guest.gh
    guest.vcpu.access(LENT_GPA + 200 * PAGE, data=b"kept")
    with pytest.raises(KvmError) as info:
        gh.map_mem(guest.lent, LENT_GPA, 0, PAGE, SHARE | abi.GUNYAH_MEM_UNMAP)
    assert info.value.errno == errno.ENOENT
    with pytest.raises(KvmError) as info:
        gh.map_mem(guest.lent, LENT_GPA + PAGE, PAGE, PAGE, LEND | abi.GUNYAH_MEM_UNMAP)
    assert info.value.errno == errno.EINVAL
    gh.map_mem(guest.lent, LENT_GPA + 128 * PAGE, 128 * PAGE, SIZE - 128 * PAGE, LEND | abi.GUNYAH_MEM_UNMAP)
    assert [(b.gfn, b.nr) for b in gh.bindings if b.lend] == [(LENT_GFN, 128)]
    assert guest.gh.state.mm.get(LENT_GFN + 200) is None  # reclaimed with the trimmed part
    with pytest.raises(MmioExit):
        guest.vcpu.access(LENT_GPA + 200 * PAGE, 1)
    assert guest.vcpu.access(LENT_GPA, 1) is not None
    gh.map_mem(guest.lent, LENT_GPA, 0, 128 * PAGE, LEND | abi.GUNYAH_MEM_UNMAP)
    assert all(not b.lend for b in gh.bindings)


def test_the_uapi_face_has_no_plain_memory(kvm: Any) -> None:
    """A memslot on host memory (no guest_memfd) has no Gunyah counterpart: EINVAL."""
    vm = kvm.create_vm(abi.GUNYAH_VM_TYPE)
    anon = kvm.mmap_anonymous(SIZE)
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region2(0, 0, LENT_GPA, SIZE, anon.address)
    assert (info.value.errno, info.value.rule) == (errno.EINVAL, "Gunyah-uapi")
    vm.close()
    anon.close()
