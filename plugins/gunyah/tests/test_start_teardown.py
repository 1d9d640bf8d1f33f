"""VM identity and lifecycle through the driver: ``gunyah_vm_start``'s sequence and its
failures, ``gunyah_vm_ensure_started``, ``_gunyah_vm_put``'s order, VM exits
(``drivers/virt/gunyah/vm_mgr.c``)."""

from __future__ import annotations

import errno
from typing import Any

import pytest

import guestmem
from guestmem import KvmError, uapi
from guestmem_gunyah import VmStatusExit, abi, gunyah, gunyah_state, rm
from guestmem_gunyah.abi import RmError, Rpc, VmStatus
from guestmem_gunyah.hyp import ExtentKind
from guestmem_gunyah.invariants import GunyahChecker, GunyahViolation
from guestmem_gunyah.rm import RmCallError

from .conftest import LENT_GPA, PAGE, SHARED_GPA, SIZE, Guest, machine, observing


class CallLog:
    """Records, in order, the RM RPCs and hypercalls a machine makes (wrapping its cost hook)."""

    def __init__(self, kvm: Any) -> None:
        self.calls: list[str] = []
        m = machine(kvm)
        inner = m.rm.count_fn
        assert inner is not None

        def count(name: str, n: int, vmid: int | None) -> None:
            if name.startswith(("rm.", "hvc.")):
                self.calls.append(name)
            inner(name, n, vmid)

        m.rm.count_fn = m.hyp.count_fn = count

    def rpcs(self) -> list[str]:
        return [c.removeprefix("rm.") for c in self.calls if c.startswith("rm.")]


def rpc_counts(vm: Any) -> dict[str, int]:
    return {k.removeprefix("gunyah.rm."): v for k, v in vm.counters.items() if k.startswith("gunyah.rm.")}


def test_start_sequence_of_gunyah_vm_start(guest: Guest) -> None:
    """VMID, DTB parcel lent (MEM_LEND), CONFIG_IMAGE, demand paging for the lent binding,
    address layout, INIT (READY), hypervisor resources, START (RUNNING), in that order; the
    DTB pages are the VM's memory from then on."""
    gh, vm = guest.gh, guest.vm
    log = CallLog(guest.kvm)
    assert gh.status == VmStatus.NO_STATE and gh.vmid == abi.GUNYAH_VMID_INVAL
    gh.start()
    assert gh.status == VmStatus.RUNNING and gh.vmid == abi.VMID_DYNAMIC_BASE
    assert log.rpcs() == [
        "VM_ALLOC_VMID",
        "MEM_LEND",
        "VM_CONFIG_IMAGE",
        "VM_SET_DEMAND_PAGING",
        "VM_SET_ADDRESS_LAYOUT",
        "VM_INIT",
        "VM_GET_HYP_RESOURCES",
        "VM_START",
    ]
    m = machine(guest.kvm)
    assert m.counters["rm.VM_ALLOC_VMID"] == 1  # the VM has no VMID to charge it to yet
    assert rpc_counts(vm)["VM_START"] == 1
    rm_vm = m.rm.vms[gh.vmid]
    assert rm_vm.state == VmStatus.RUNNING and rm_vm.demand_paging == [(LENT_GPA, SIZE)]
    dtb_pfn = vm.gmem_pfn(LENT_GPA >> 12)
    assert m.hyp.owner(dtb_pfn).kind == ExtentKind.GUEST_PRIVATE and not m.rm.parcels
    gh.start()  # started already: nothing more
    assert rpc_counts(vm)["VM_START"] == 1


def test_the_first_vcpu_run_starts_the_vm(guest: Guest) -> None:
    guest.vcpu.access(LENT_GPA + PAGE, 4)
    assert guest.gh.status == VmStatus.RUNNING


def test_without_a_dtb_config(kvm: Any) -> None:
    """The kernel cannot start a VM without GUNYAH_VM_SET_DTB_CONFIG
    (``gunyah_gmem_share_parcel`` of 0 pages: EINVAL), and the VM keeps its VMID in LOAD;
    the uAPI face's VM starts without an image (the model's RM extension)."""
    strict = Guest(kvm, dtb=False)
    strict.gh.state.require_dtb = True
    with pytest.raises(KvmError) as info:
        strict.gh.start()
    assert info.value.errno == errno.EINVAL
    assert strict.gh.status == VmStatus.LOAD
    with pytest.raises(KvmError) as again:  # ensure_started does not start twice
        strict.vcpu.access(LENT_GPA, 1)
    assert again.value.errno == errno.ENODEV
    lenient = Guest(kvm, dtb=False)
    lenient.vcpu.access(LENT_GPA, data=b"x")
    assert lenient.gh.status == VmStatus.RUNNING and "MEM_LEND" not in rpc_counts(lenient.vm)
    vmids = {strict.gh.vmid, lenient.gh.vmid}
    strict.teardown()
    lenient.teardown()
    assert not vmids & set(machine(kvm).rm.vms)  # a VM in LOAD is deallocated too


@pytest.mark.parametrize(
    ("rpc", "status"),
    [(Rpc.MEM_LEND, VmStatus.LOAD), (Rpc.VM_CONFIG_IMAGE, VmStatus.LOAD), (Rpc.VM_START, VmStatus.READY)],
)
def test_a_failed_start_is_cleaned_up_by_the_teardown(kvm: Any, rpc: Rpc, status: VmStatus) -> None:
    """The VM keeps the status it reached; ``_gunyah_vm_put`` reclaims the DTB parcel
    (LOAD, READY, INIT_FAILED), resets (READY, INIT_FAILED) and frees the VMID.  The
    failures are injected as the driver's ``ALLOW_ERROR_INJECTION`` does: the RPC never
    reaches the RM."""
    g = Guest(kvm)
    m = machine(kvm)
    m.rm.inject[rpc] = RmError.NOMEM
    with pytest.raises(RmCallError) as info:
        g.gh.start()
    assert info.value.errno == errno.ENOMEM
    assert g.gh.status == status
    assert len(m.rm.parcels) == (rpc != Rpc.MEM_LEND) and not g.gh.state.mm  # parcel_to_paged rolled back
    vmid = g.gh.vmid
    g.teardown()
    assert vmid not in m.rm.vms and not m.rm.parcels and not m.hyp.memdb
    if rpc == Rpc.VM_CONFIG_IMAGE:
        assert not m.warnings
    counts = {r: n for r, n in m.counters.items() if r.startswith("rm.")}
    assert counts.get("rm.VM_RESET", 0) == 0  # charged to the VM, not the host


@pytest.mark.parametrize("rpc", [Rpc.VM_SET_DEMAND_PAGING, Rpc.VM_INIT])
def test_a_vm_that_failed_after_config_image_leaks_its_vmid(rpc: Rpc) -> None:
    """A driver flaw the model reproduces: CONFIG_IMAGE moved the RM to INIT while the
    driver still says LOAD (or, after a VM_INIT that never reached the RM, INIT_FAILED);
    ``_gunyah_vm_put`` then cannot reset or deallocate (the RM wants EXITED/READY/
    INIT_FAILED, and LOAD or RESET): "Failed to deallocate vmid".  The Gunyah checker
    reports the VMID the destroyed VM left behind (G-6)."""
    with guestmem.open("gunyah") as kvm:
        g = Guest(kvm)
        m = machine(kvm)
        m.rm.inject[rpc] = RmError.NOMEM
        with pytest.raises(RmCallError):
            g.gh.start()
        vmid = g.gh.vmid
        assert m.rm.vms[vmid].state == VmStatus.INIT
        with observing(GunyahChecker(), "gunyah") as checker, pytest.raises(GunyahViolation, match="G-6"):
            g.teardown()
        assert vmid in m.rm.vms and any("deallocate vmid" in w for w in m.warnings)
        assert checker.violations


def test_teardown_of_a_running_vm_follows_gunyah_vm_put(guest: Guest) -> None:
    """Stop (EXITED), bindings and everything reclaimed, reset (RESET), VMID freed: every
    page back with the HLOS, in the host's direct map."""
    guest.vcpu.access(LENT_GPA + PAGE, data=b"lent")
    guest.vcpu.access(SHARED_GPA + PAGE, data=b"shared")
    m = machine(guest.kvm)
    vmid = guest.gh.vmid
    state = guest.gh.state
    pfns = [guest.vm.gmem_pfn((LENT_GPA >> 12) + i) for i in range(2)]
    log = CallLog(guest.kvm)
    guest.vcpu.close()
    guest.vm.close()  # the files pin the VM
    guest.shared.close()  # release: its page is reclaimed out of the running VM
    assert state.status == VmStatus.RUNNING and log.calls == ["hvc.addrspace_unmap", "hvc.memextent_donate"]
    del log.calls[:]
    guest.lent.close()  # the last reference: _gunyah_vm_put
    assert log.calls == [
        "hvc.addrspace_unmap",  # the release's reclaim (DTB page and the lent page: one run)
        "hvc.memextent_donate",
        "rm.VM_STOP",
        "rm.VM_RESET",
        "rm.VM_DEALLOC_VMID",
    ]
    assert state.status == VmStatus.RESET and vmid not in m.rm.vms
    assert not m.hyp.memdb and vmid not in m.hyp.addrspaces
    assert all(pfn is not None and m.host.direct_map_valid(pfn) for pfn in pfns)
    assert not m.warnings


def test_a_vm_that_exited_gives_a_status_exit(guest: Guest) -> None:
    """The guest's ``VM_EXIT`` (or the host's ``VM_STOP``): the RM tells the driver
    (``gunyah_vm_rm_notification``); the next run is ``GUNYAH_VCPU_EXIT_STATUS``."""
    guest.vcpu.access(LENT_GPA + PAGE, 1)
    rm(guest.kvm).vm_exit(guest.gh.vmid)
    assert guest.gh.status == VmStatus.EXITED
    with pytest.raises(VmStatusExit) as info:
        guest.vcpu.access(LENT_GPA + PAGE, 1)
    assert info.value.exit_reason == abi.GUNYAH_VCPU_EXIT_STATUS
    assert info.value.status == abi.GUNYAH_VM_STATUS_EXITED
    assert guest.vm.counters["gunyah.exits.status"] == 1


def test_gunyah_vm_ioctls_through_memory_encrypt_op(guest: Guest) -> None:
    """``SET_DTB_CONFIG`` (EOVERFLOW past 2^64), ``START``, ``SET_BOOT_CONTEXT``; an unknown
    request is ENOTTY, as is a command that is no Gunyah ioctl."""
    from guestmem_gunyah.policy import GunyahIoctl

    with pytest.raises(KvmError) as info:
        guest.gh.set_dtb_config(uapi.U64_MAX, 2)
    assert info.value.errno == errno.EOVERFLOW
    reg = abi.GUNYAH_VM_BOOT_CONTEXT_REG(abi.REG_SET_PC, 0)
    guest.gh.set_boot_context(reg, 0x1000)
    assert gunyah_state(guest.vm).exit_info["boot_context"] == [(0x100, 0x1000)]
    for cmd in (GunyahIoctl(0x4799), "not gunyah"):
        with pytest.raises(KvmError) as info:
            guest.vm.memory_encrypt_op(cmd)
        assert info.value.errno == errno.ENOTTY


def test_a_vm_never_started_frees_nothing_it_never_had(kvm: Any) -> None:
    vm = kvm.create_vm(abi.GUNYAH_VM_TYPE)
    state = gunyah(vm).state
    vm.close()
    assert state.status == VmStatus.NO_STATE and not machine(kvm).warnings
    assert rpc_counts(vm) == {}
