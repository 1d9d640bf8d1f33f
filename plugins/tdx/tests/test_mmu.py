"""Private leaves of a TD through the mirror root: AUG at 4 KiB on fault, removal as
``tdx_sept_remove_private_spte`` does it, and KVM's reaction to every SEAMCALL error
(``KVM_BUG_ON``: the VM is bugged and the page leaked; ``TDX_OPERAND_BUSY``: one retry
with vCPU entry blocked)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from tdx_helpers import MIB, PAGE, PRIVATE, PUNCH, TdVm, make_td

import guestmem
from guestmem import uapi
from guestmem.backend import view
from guestmem.errors import KvmError
from guestmem_tdx import check_tdx
from guestmem_tdx import status as st
from guestmem_tdx.sept import PamtType, SeptState


def _accepted(td: TdVm, gpa: int, size: int) -> None:
    assert td.guest.accept_range(gpa, size) == 0


def _td(td: TdVm) -> Any:
    return td.tdx.td


def test_private_fault_augs_4k_leaves(td: TdVm) -> None:
    """A private fault of a running TD: SEPT.ADD for each missing level (PDPT, PD, PT:
    each a host page, PT_EPT), then TDH.MEM.PAGE.AUG at 4 KiB only
    (``tdx_gmem_private_max_mapping_level``), the page PENDING and PT_REG."""
    assert td.vcpu.pre_fault_memory(2 * MIB, 2 * MIB) == 0
    c = td.vm.counters
    assert (c["seamcall.TDH.MEM.SEPT.ADD"], c["seamcall.TDH.MEM.PAGE.AUG"]) == (3, 512)
    assert td.vm.mapping_level(512) == uapi.PG_LEVEL_4K
    pfn = td.pfn(2 * MIB)
    leaf = _td(td).leaf(512)
    assert leaf.state is SeptState.PENDING and 512 + leaf.delta == pfn
    entry = td.module.pamt_entry(pfn)
    assert entry.pt is PamtType.REG and entry.owner == _td(td).tdr
    check_tdx(td.kvm)


def test_shared_faults_do_not_touch_the_sept(td: TdVm) -> None:
    """A shared access maps the shared EPT only (the direct root): no SEAMCALL."""
    td.vm.set_memory_attributes(0, 2 * MIB, 0)
    before = td.vm.counters["seamcalls"]
    td.guest.write(0x1000 | td.guest.shared_bit, b"shared")
    assert td.shared.read(0x1000, 6) == b"shared"
    assert td.vm.counters["seamcalls"] == before and not _td(td).leaves


@pytest.mark.parametrize("nvcpus", [1, 8])
def test_removal_costs_per_4k_leaf(nvcpus: int) -> None:
    """``tdx_sept_remove_private_spte`` per leaf: BLOCK, TRACK (epoch + 1, every vCPU
    kicked), REMOVE, PHYMEM.PAGE.WBINVD with the HKID, a MOVDIR64B clear: no batching."""
    td = make_td(nvcpus=nvcpus, finalize=True)
    _accepted(td, MIB, 64 * PAGE)
    td.guest.write(MIB, b"secret")
    pfn = td.pfn(MIB)
    epoch = _td(td).epoch
    td.gmem.fallocate(PUNCH, MIB, 64 * PAGE)
    c = td.vm.counters
    for leaf in ("RANGE.BLOCK", "TRACK", "PAGE.REMOVE"):
        assert c[f"seamcall.TDH.MEM.{leaf}"] == 64
    assert c["seamcall.TDH.PHYMEM.PAGE.WBINVD"] == 64 and c["tdx.page_clears"] == 64
    assert c["tdx.vcpu_kicks"] == 64 * nvcpus and _td(td).epoch == epoch + 64
    assert not _td(td).leaves and td.module.pamt_entry(pfn) is None
    assert not td.kvm.backend_view.is_allocated(pfn)
    check_tdx(td.kvm)
    td.close()


def test_conversion_to_shared_zaps_the_mirror_root_only_for_private(td: TdVm) -> None:
    """KVM_SET_MEMORY_ATTRIBUTES to shared unmaps the private side (KVM_FILTER_PRIVATE):
    the leaves are removed from the S-EPT; the gmem page stays allocated until punched."""
    _accepted(td, 0, 4 * PAGE)
    pfn = td.pfn(0)
    td.vm.set_memory_attributes(0, 4 * PAGE, 0)
    assert td.vm.counters["seamcall.TDH.MEM.PAGE.REMOVE"] == 4
    assert td.module.pamt_entry(pfn) is None and td.kvm.backend_view.is_allocated(pfn)


def test_a_shared_zap_never_reaches_the_sept(td: TdVm) -> None:
    """The host mmu notifier (munmap of the shared mapping) zaps with KVM_FILTER_SHARED:
    private leaves in the same gfns stay, no SEAMCALL."""
    _accepted(td, 0, 4 * PAGE)
    before = td.vm.counters["seamcalls"]
    td.shared.close()
    assert td.vm.counters["seamcalls"] == before
    assert _td(td).leaf_state(0) is SeptState.MAPPED


def test_memslot_delete_removes_private_leaves(td: TdVm) -> None:
    """``kvm_mmu_zap_memslot`` reaches the mirror root: every private leaf of the slot goes."""
    _accepted(td, 0, 8 * PAGE)
    td.vm.set_user_memory_region2(0, 0, 0, 0, 0)
    assert td.vm.counters["seamcall.TDH.MEM.PAGE.REMOVE"] == 8 and not _td(td).leaves


def test_pre_finalize_zap_of_added_page_needs_no_track() -> None:
    """Before FINALIZE no vCPU ran: a PAGE.ADDed page is BLOCKed and REMOVEd without TRACK
    (``tdx_track`` returns early)."""
    td = make_td(payload=b"x" * 3 * PAGE)
    td.gmem.fallocate(PUNCH, 0, 3 * PAGE)
    c = td.vm.counters
    assert (c["seamcall.TDH.MEM.RANGE.BLOCK"], c["seamcall.TDH.MEM.PAGE.REMOVE"]) == (3, 3)
    assert c["seamcall.TDH.MEM.TRACK"] == 0 and not _td(td).leaves
    td.close()


# --- KVM's reaction to SEAMCALL errors ------------------------------------------------------------
@pytest.mark.parametrize("leaf", ["TDH.MEM.RANGE.BLOCK", "TDH.MEM.TRACK", "TDH.MEM.PAGE.REMOVE"])
def test_busy_zap_is_retried_once_with_vcpus_out(td: TdVm, leaf: str) -> None:
    """TDX_OPERAND_BUSY from BLOCK, TRACK or REMOVE: ``tdx_no_vcpus_enter_start`` kicks every
    vCPU and the SEAMCALL is retried once, successfully: nothing is lost."""
    _accepted(td, 0, 4 * PAGE)
    td.module.inject(leaf, st.TDX_OPERAND_BUSY)
    td.gmem.fallocate(PUNCH, 0, 4 * PAGE)
    assert td.vm.counters["tdx.no_vcpus_enter"] == 1
    assert td.vm.counters[f"seamcall.{leaf}"] == 5
    assert not view(td.vm).dead and not _td(td).leaves and not td.host.leaked
    check_tdx(td.kvm)


@pytest.mark.parametrize(
    ("leaf", "times"),
    [
        ("TDH.MEM.RANGE.BLOCK", 2),  # busy twice: the retry fails too
        ("TDH.MEM.RANGE.BLOCK", 1),
        ("TDH.MEM.PAGE.REMOVE", 1),
        ("TDH.PHYMEM.PAGE.WBINVD", 1),
        ("TDH.MEM.TRACK", 1),  # KVM_BUG_ON; the REMOVE that follows is not tracked
    ],
)
def test_a_failed_zap_bugs_the_vm_and_leaks_the_page(td: TdVm, leaf: str, times: int) -> None:
    """Any other failure is ``KVM_BUG_ON``: the VM is bugged (every vCPU ioctl: EIO) and the
    page that could not be taken back is leaked; the other leaves are still removed."""
    _accepted(td, 0, 4 * PAGE)
    pfn = td.pfn(0)
    status = st.TDX_OPERAND_BUSY if times == 2 else st.with_operand(st.TDX_EPT_WALK_FAILED, 1)
    td.module.inject(leaf, status, times)
    td.gmem.fallocate(PUNCH, 0, 4 * PAGE)
    assert view(td.vm).bugged
    with pytest.raises(KvmError) as info:
        td.vcpu.access(0x10000, 1)
    assert info.value.errno == errno.EIO
    assert td.host.leaked.get(pfn) is not None
    assert _td(td).mapped_pages() == (0 if leaf == "TDH.PHYMEM.PAGE.WBINVD" else 1)
    assert td.vm.counters["tdx.removed_pages"] == 3
    check_tdx(td.kvm)  # the leaked page is freed by gmem in the model, kept by the kernel


def test_busy_aug_refaults(td: TdVm) -> None:
    """TDH.MEM.PAGE.AUG busy: -EBUSY, RET_PF_RETRY; the vCPU faults again and succeeds."""
    td.module.inject("TDH.MEM.PAGE.AUG", st.TDX_OPERAND_BUSY, 2)
    _accepted(td, 0, PAGE)
    assert td.vm.counters["seamcall.TDH.MEM.PAGE.AUG"] == 3 and td.vm.counters["fault_retries"] == 2


@pytest.mark.parametrize("leaf", ["TDH.MEM.PAGE.AUG", "TDH.MEM.SEPT.ADD"])
def test_a_failed_map_bugs_the_vm(td: TdVm, leaf: str) -> None:
    """``tdx_mem_page_aug``/``tdx_sept_link_private_spt``: any error but busy is KVM_BUG_ON
    (-EIO): KVM_RUN fails with EIO and nothing is mapped."""
    td.module.inject(leaf, st.with_operand(st.TDX_EPT_ENTRY_STATE_INCORRECT, 1))
    with pytest.raises(KvmError) as info:
        td.guest.accept(0)
    assert info.value.errno == errno.EIO and view(td.vm).bugged
    assert not td.vm.is_mapped(0)


def test_zap_after_hkid_release_is_a_kvm_bug() -> None:
    """6.18 releases the HKID after every guest_memfd is gone, so a private leaf left in the
    mirror root at that point is ``KVM_BUG_ON(!is_hkid_assigned)``; the page is leaked."""
    td = make_td(finalize=True)
    _accepted(td, 0, PAGE)
    pfn = td.pfn(0)
    td.state.mmu_release_hkid()  # what KVM_TDX_TERMINATE_VM would do; 6.18 has no such ioctl
    td.vm.set_memory_attributes(0, PAGE, 0)
    assert view(td.vm).bugged and td.host.leaked.get(pfn) is not None


def test_kicks_follow_the_vcpus() -> None:
    """Each TRACK kicks every vCPU of the TD (``kvm_make_all_cpus_request``)."""
    td = make_td(nvcpus=3, finalize=True)
    assert guestmem.backend.view(td.vm).vcpus()
    _accepted(td, 0, 2 * PAGE)
    td.vm.set_memory_attributes(0, 2 * PAGE, 0)
    assert td.vm.counters["tdx.vcpu_kicks"] == 2 * 3
    td.vm.set_memory_attributes(0, 2 * PAGE, PRIVATE)
    td.close()
