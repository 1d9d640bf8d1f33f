"""The RM's VM management on its own: VMIDs, every state transition of
``vm_mgnt_state_change_valid`` the RPCs make, and every refusal with its RM error
(``quic/gunyah-resource-manager`` ``vm_mgnt.c``, ``vm_creation.c``)."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from guestmem_gunyah import abi
from guestmem_gunyah.abi import Notification, RmError, Rpc, VmStatus
from guestmem_gunyah.hyp import Hypervisor
from guestmem_gunyah.rm import ResourceManager, RmCallError

HLOS = abi.VMID_HLOS
PAGE = abi.PAGE_SIZE


@pytest.fixture
def rm() -> ResourceManager:
    return ResourceManager(Hypervisor())


def expect(error: RmError, fn: Any, *args: Any, **kwargs: Any) -> RmCallError:
    with pytest.raises(RmCallError) as info:
        fn(*args, **kwargs)
    assert info.value.error == error, info.value
    assert info.value.errno == abi.rm_error_remap(error)
    return info.value


def ready(rm: ResourceManager) -> int:
    """A VM in READY: alloc, config (no image), init."""
    vmid = rm.vm_alloc_vmid(HLOS)
    rm.vm_config_image(HLOS, vmid, abi.GUNYAH_RM_VM_AUTH_NONE, abi.MEMPARCEL_INVALID_HANDLE, 0, 0, 0, 0)
    rm.vm_init(HLOS, vmid)
    return vmid


def test_vmids_come_from_the_dynamic_range_and_go_back(rm: ResourceManager) -> None:
    """``vm_mgnt_handle_allocate``: HLOS only (DENIED); 0 picks the lowest free dynamic
    VMID; none left: NORESOURCE (ENODEV); a specific secondary VMID is not free here."""
    assert rm.vm_alloc_vmid(HLOS) == abi.VMID_DYNAMIC_BASE
    assert rm.vm_alloc_vmid(HLOS) == abi.VMID_DYNAMIC_BASE + 1
    assert rm.vms[abi.VMID_DYNAMIC_BASE].state == VmStatus.LOAD
    err = expect(RmError.DENIED, rm.vm_alloc_vmid, abi.VMID_DYNAMIC_BASE)
    assert err.errno == errno.EPERM and err.rule == "Gunyah-4.1"
    assert expect(RmError.NORESOURCE, rm.vm_alloc_vmid, HLOS, 5).errno == errno.ENODEV
    rm.vm_dealloc_vmid(HLOS, abi.VMID_DYNAMIC_BASE)
    assert rm.vm_alloc_vmid(HLOS) == abi.VMID_DYNAMIC_BASE
    while rm.free_dynamic:
        rm.vm_alloc_vmid(HLOS)
    expect(RmError.NORESOURCE, rm.vm_alloc_vmid, HLOS)
    assert len(rm.vms) == 1 + (abi.VMID_DYNAMIC_END - abi.VMID_DYNAMIC_BASE)


def test_the_start_sequence_walks_load_init_ready_running(rm: ResourceManager) -> None:
    owner_heard: list[Any] = []
    rm.subscribe(lambda vmid, n, p: owner_heard.append((vmid, n, p.get("vm_status"))))
    vmid = rm.vm_alloc_vmid(HLOS)
    rm.vm_config_image(HLOS, vmid, abi.GUNYAH_RM_VM_AUTH_NONE, abi.MEMPARCEL_INVALID_HANDLE, 0, 0, 0, 0)
    assert rm.vms[vmid].state == VmStatus.INIT
    rm.vm_set_demand_paging(HLOS, vmid, [(1 << 30, 1 << 20)])
    rm.vm_set_address_layout(HLOS, vmid, abi.GUNYAH_RM_RANGE_ID_IMAGE, 1 << 30, PAGE)
    rm.vm_init(HLOS, vmid)
    assert rm.vms[vmid].state == VmStatus.READY and vmid in rm.hyp.addrspaces
    resources = rm.vm_get_hyp_resources(HLOS, vmid)
    rm.vm_start(HLOS, vmid)
    assert rm.vms[vmid].state == VmStatus.RUNNING
    assert resources.guest_private in rm.hyp.cspace
    assert [s for _, n, s in owner_heard if n == Notification.VM_STATUS] == [
        VmStatus.INIT,
        VmStatus.READY,
        VmStatus.RUNNING,
    ]
    assert rm.vms[vmid].demand_paged((1 << 30) >> 12) and not rm.vms[vmid].demand_paged(0)


def test_creation_rpcs_refuse_out_of_order(rm: ResourceManager) -> None:
    """Each creation RPC: HLOS only (DENIED), a known VM (VMID_INVALID), its owner
    (DENIED), the right state (VM_STATE)."""
    vmid = rm.vm_alloc_vmid(HLOS)
    none = (abi.GUNYAH_RM_VM_AUTH_NONE, abi.MEMPARCEL_INVALID_HANDLE, 0, 0, 0, 0)
    expect(RmError.DENIED, rm.vm_config_image, vmid, vmid, *none)
    expect(RmError.VMID_INVALID, rm.vm_config_image, HLOS, 0x99, *none)
    expect(RmError.VM_STATE, rm.vm_init, HLOS, vmid)  # LOAD, not INIT
    expect(RmError.VM_STATE, rm.vm_set_demand_paging, HLOS, vmid, [(0, PAGE)])
    expect(RmError.VM_STATE, rm.vm_start, HLOS, vmid)
    expect(RmError.VM_STATE, rm.vm_get_hyp_resources, HLOS, vmid)
    rm.vm_config_image(HLOS, vmid, *none)
    expect(RmError.VM_STATE, rm.vm_config_image, HLOS, vmid, *none)  # INIT -> AUTH invalid
    expect(RmError.ARGUMENT_INVALID, rm.vm_set_demand_paging, HLOS, vmid, [(1, PAGE)])
    expect(RmError.ARGUMENT_INVALID, rm.vm_set_address_layout, HLOS, vmid, 7, 0, PAGE)
    expect(RmError.DENIED, rm.vm_get_hyp_resources, 0x81, vmid)
    rm.vm_init(HLOS, vmid)
    expect(RmError.DENIED, rm.vm_start, abi.VMID_HYP, vmid)  # legacy VM_START from the hypervisor
    expect(RmError.DENIED, rm.vm_start, vmid, vmid)
    assert rm.vms[vmid].state == VmStatus.READY


def test_config_image_failures_leave_the_vm_init_failed(rm: ResourceManager) -> None:
    """No parcel shared with the VM: MEM_INVALID; ranges outside it: ARGUMENT_INVALID;
    either way INIT_FAILED, which only a reset leaves."""
    vmid = rm.vm_alloc_vmid(HLOS)
    expect(RmError.MEM_INVALID, rm.vm_config_image, HLOS, vmid, 0, 0x1234, 0, 0, 0, PAGE)
    assert rm.vms[vmid].state == VmStatus.INIT_FAILED
    expect(RmError.VM_STATE, rm.vm_dealloc_vmid, HLOS, vmid)
    rm.vm_reset(HLOS, vmid)
    assert rm.vms[vmid].state == VmStatus.RESET
    handle = rm.mem_lend(HLOS, [(vmid, abi.MEM_RIGHTS_RWX)], [(0x200000000, PAGE)])
    expect(RmError.ARGUMENT_INVALID, rm.vm_config_image, HLOS, vmid, 0, handle, 0, 0, 0, 2 * PAGE)
    assert rm.vms[vmid].state == VmStatus.INIT_FAILED


def test_an_injected_start_failure_leaves_init_failed(rm: ResourceManager) -> None:
    vmid = ready(rm)
    rm.inject[Rpc.VM_START] = RmError.NORESOURCE
    expect(RmError.NORESOURCE, rm.vm_start, HLOS, vmid)
    # The RPC did not reach the VM; a second try goes through.
    rm.vm_start(HLOS, vmid)
    assert rm.vms[vmid].state == VmStatus.RUNNING


def test_stop_exit_reset_dealloc(rm: ResourceManager) -> None:
    """``VM_STOP`` (forced): RUNNING -> EXITED, the owner told; a non-owner gets
    VMID_INVALID, another state VM_STATE.  ``VM_RESET`` from EXITED -> RESET;
    ``VM_DEALLOC_VMID`` of a RESET VM frees the VMID."""
    vmid = ready(rm)
    expect(RmError.VM_STATE, rm.vm_stop, HLOS, vmid)  # READY cannot exit
    rm.vm_start(HLOS, vmid)
    expect(RmError.VMID_INVALID, rm.vm_stop, 0x81, vmid)
    expect(RmError.VM_STATE, rm.vm_reset, HLOS, vmid)  # RUNNING cannot reset
    expect(RmError.VM_STATE, rm.vm_dealloc_vmid, HLOS, vmid)
    rm.vm_stop(HLOS, vmid, 0)  # not forced: the guest is asked
    assert rm.vms[vmid].state == VmStatus.RUNNING and rm.vms[vmid].inbox[-1][0] == Notification.VM_STATUS
    rm.vm_stop(HLOS, vmid)
    assert rm.vms[vmid].state == VmStatus.EXITED
    assert rm.vms[HLOS].inbox[-1][0] == Notification.VM_EXITED
    expect(RmError.VMID_INVALID, rm.vm_reset, 0x81, vmid)
    rm.vm_reset(HLOS, vmid)
    assert rm.vms[vmid].state == VmStatus.RESET and vmid not in rm.hyp.addrspaces
    expect(RmError.DENIED, rm.vm_dealloc_vmid, 0x81, vmid)
    rm.vm_dealloc_vmid(HLOS, vmid)
    assert vmid not in rm.vms and vmid in rm.free_dynamic
    expect(RmError.VMID_INVALID, rm.vm_dealloc_vmid, HLOS, vmid)


def test_a_guest_exits_itself(rm: ResourceManager) -> None:
    """``VM_EXIT`` (``vm_mgnt_handle_exit``): the guest's own RPC, RUNNING -> EXITED."""
    vmid = ready(rm)
    expect(RmError.VM_STATE, rm.vm_exit, vmid)
    rm.vm_start(HLOS, vmid)
    rm.vm_exit(vmid)
    assert rm.vms[vmid].state == VmStatus.EXITED
    assert rm.vms[HLOS].inbox[-1] == (Notification.VM_EXITED, {"vmid": vmid, "exit_type": "VM_EXIT"})
    assert rm.get_vmid(vmid) == vmid


def test_reset_releases_the_parcels_the_vm_accepted_last_first(rm: ResourceManager) -> None:
    """``vm_reset_handle_release_memparcels``: each accepted parcel released, its owner told."""
    vmid = ready(rm)
    rm.vm_start(HLOS, vmid)
    handles = [
        rm.mem_lend(HLOS, [(vmid, abi.MEM_RIGHTS_RW)], [(0x200000000 + i * PAGE, PAGE)]) for i in range(2)
    ]
    for handle in handles:
        rm.mem_accept(vmid, handle, trans=abi.TransType.LEND)
    rm.vm_stop(HLOS, vmid)
    rm.vm_reset(HLOS, vmid)
    released = [p["handle"] for n, p in rm.vms[HLOS].inbox if n == Notification.MEM_RELEASED]
    assert released == handles[::-1]
    for handle in handles:
        assert rm.parcels[handle].share_count == 0
        rm.mem_reclaim(HLOS, handle)
    assert not rm.hyp.memdb
