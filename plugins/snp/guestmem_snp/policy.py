"""The SEV-SNP arch policy: the hook implementations a host and VM of the ``snp`` backends reach.

Each hook is the kernel function named in its docstring (spec 3.6, backends.md 6.1); the
work is done by the host's :class:`~guestmem_snp.host.SnpHost` (``host.arch``) and the
VM's :class:`~guestmem_snp.sev.SevVm` (``vm.arch``).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from guestmem import uapi
from guestmem.backend import Fault, GmemView, HostFault, HostView, VcpuView, VmView, hookimpl
from guestmem.errors import HypercallExit, KvmError
from guestmem_snp import snapshot
from guestmem_snp.ghcb import (
    GHCB_MSR_INFO_MASK,
    GHCB_MSR_PSC_REQ,
    KVM_ENOSYS,
    KVM_EXIT_HYPERCALL_VALID_MASK,
    KVM_HC_MAP_GPA_RANGE,
    SVM_EXIT_VMGEXIT,
    SVM_VMGEXIT_PSC,
    MapGpaRange,
    begin_psc_msr,
    check_map_gpa_range,
    complete_psc_msr,
)
from guestmem_snp.host import SnpHost
from guestmem_snp.sev import SEV_VM_TYPES, SevCmd, SevVcpu, SevVm, no_sev_ioctl


def _sev(vm: VmView) -> SevVm | None:
    arch = vm.arch
    return arch if isinstance(arch, SevVm) else None


class SnpPolicy:
    """Hook implementations for SEV, SEV-ES and SNP VMs on an SEV-SNP host."""

    @hookimpl
    def guestmem_snapshot(self, host: HostView, vm: VmView | None) -> Any:
        """The RMP and ASIDs of the host, or a VM's SEV state and RMP entries
        (:mod:`guestmem_snp.snapshot`)."""
        return snapshot.host_state(host) if vm is None else snapshot.vm_state(vm)

    # --- host and VM lifetime ------------------------------------------------------------------
    @hookimpl
    def guestmem_host_init(self, host: HostView) -> SnpHost:
        """``sev_hardware_setup`` / ``snp_rmptable_init``: the host's RMP and ASID space."""
        return SnpHost(host)

    @hookimpl
    def guestmem_vm_init(self, vm: VmView) -> SevVm | None:
        """``svm_vm_init``: SEV state; the ASID comes with ``KVM_SEV_INIT2``."""
        if vm.vm_type not in SEV_VM_TYPES:
            return None
        return SevVm(vm)

    @hookimpl
    def guestmem_vm_destroy(self, vm: VmView) -> None:
        """``sev_vm_destroy``: decommission, reclaim VMSAs and GCTX, free the ASID."""
        sev = _sev(vm)
        if sev is not None:
            sev.destroy()

    @hookimpl
    def guestmem_vcpu_init(self, vcpu: VcpuView) -> SevVcpu | None:
        """``sev_vcpu_create``: the VMSA page of an SEV-ES/SNP guest's vCPU."""
        sev = _sev(vcpu.vm)
        return None if sev is None else sev.vcpu_create(vcpu.vcpu_id)

    @hookimpl
    def guestmem_vcpu_pre_run(self, vcpu: VcpuView) -> None:
        """``kvm_arch_vcpu_ioctl_run``: the pending exit's ``complete_userspace_io`` first
        (with ``run->hypercall.ret`` as userspace left it), then ``svm_vcpu_pre_run`` and
        VMRUN: no guest entry before INIT2 or the SNP launch."""
        sev = _sev(vcpu.vm)
        if sev is not None:
            sev.complete_userspace_io(vcpu.vcpu_id)
            sev.vcpu_pre_run(vcpu.vcpu_id)

    @hookimpl
    def guestmem_vcpu_destroy(self, vcpu: VcpuView) -> None:
        """``sev_free_vcpu``: the VMSA back to the host."""
        sev = _sev(vcpu.vm)
        if sev is not None:
            sev.free_vcpu(vcpu.vcpu_id)

    @hookimpl
    def guestmem_vm_ioctl(self, vm: VmView, request: int, arg: Any) -> int | None:
        """``svm_mem_enc_ioctl``: ``KVM_MEMORY_ENCRYPT_OP`` with a :class:`SevCmd`, on any VM
        of the host (``sev_mem_enc_ioctl``; a VM of another type has no SEV state)."""
        if request != uapi.KVM_MEMORY_ENCRYPT_OP:
            return None
        if not isinstance(arg, SevCmd):
            raise KvmError(errno.EFAULT, "", "KVM_MEMORY_ENCRYPT_OP needs a struct kvm_sev_cmd (SevCmd)")
        sev = _sev(vm)
        return no_sev_ioctl(vm, arg) if sev is None else sev.ioctl(arg)

    # --- gmem folio lifetime -------------------------------------------------------------------
    @hookimpl
    def guestmem_gmem_prepare(self, vm: VmView, gfn: int, pfn: int, order: int, npages: int) -> None:
        """``sev_gmem_prepare``: RMP assign at the folios' first fault (a run of them at once)."""
        sev = _sev(vm)
        if sev is not None:
            sev.gmem_prepare(gfn, pfn, order, npages)

    @hookimpl
    def guestmem_gmem_invalidate(self, vm: VmView, start_pfn: int, end_pfn: int) -> None:
        """``sev_gmem_invalidate``: RMP back to shared when the folio is freed."""
        sev = _sev(vm)
        if sev is not None:
            sev.gmem_invalidate(start_pfn, end_pfn)

    @hookimpl
    def guestmem_fault(self, vm: VmView, fault: Fault) -> None:
        """A run of private faults ends where the RMP page size changes: the core asks
        ``sev_gmem_max_mapping_level`` once per run, so its answer must hold for all of it."""
        sev = _sev(vm)
        if sev is not None and fault.is_private and fault.pfn is not None and fault.npages > 1:
            fault.npages = sev.fault_run(fault.pfn, fault.npages)

    @hookimpl
    def guestmem_max_mapping_level(self, vm: VmView, pfn: int, is_private: bool) -> int | None:
        """``sev_gmem_max_mapping_level``: the RMP page size."""
        sev = _sev(vm)
        return None if sev is None else sev.max_mapping_level(pfn, is_private)

    # --- host side -----------------------------------------------------------------------------
    @hookimpl
    def guestmem_gmem_fault_user_mapping(self, vm: VmView, gmem: GmemView, index: int) -> HostFault | None:
        """Private (RMP-assigned) gmem pages are never host-mappable (2.5)."""
        sev = _sev(vm)
        if sev is None or not sev.snp:
            return None
        pfn = gmem.pfn(index)
        if pfn is not None and sev.host.rmp.is_assigned(pfn):
            return HostFault.SIGBUS
        return None

    @hookimpl
    def guestmem_host_access(self, host: HostView, pfn: int, write: bool) -> str | None:
        """A host write to an RMP-assigned page is an RMP #PF: the host goes down (2.2)."""
        state = host.arch
        if not write or not isinstance(state, SnpHost):
            return None  # host reads are not RMP-checked
        return state.host_write_verdict(pfn)

    # --- population and hypercalls ----------------------------------------------------------
    @hookimpl
    def guestmem_post_populate(
        self, vm: VmView, gfn: int, pfn: int, src: bytes | None, order: int, opaque: Any
    ) -> int | None:
        """``sev_gmem_post_populate`` (LAUNCH_UPDATE)."""
        sev = _sev(vm)
        if sev is None:
            return None
        return sev.post_populate(gfn, pfn, src, order, opaque)

    @hookimpl
    def guestmem_hypercall(self, vcpu: VcpuView, nr: int, args: tuple[int, ...]) -> int | None:
        """``KVM_HC_MAP_GPA_RANGE`` and the SNP VMGEXITs that become it (2.3)."""
        vm = vcpu.vm
        sev = _sev(vm)
        if sev is None:
            return None
        state = sev.vcpu_state(vcpu.vcpu_id)
        exits = bool(vm.hypercall_exit_enabled & KVM_EXIT_HYPERCALL_VALID_MASK)
        if nr == KVM_HC_MAP_GPA_RANGE:
            if not exits:
                return -KVM_ENOSYS
            gpa, npages, attrs = (*args, 0, 0, 0)[:3]
            return _exit_or_value(sev, vcpu, check_map_gpa_range(gpa, npages, attrs), lambda ret: ret)
        if not sev.snp:
            return None
        if nr == SVM_VMGEXIT_PSC:
            buf = state.psc
            if buf is None:
                return None
            vm.count("psc_requests")
            engine = state.engine

            def resume(ret: int) -> int:
                return _exit_or_value(sev, vcpu, engine.complete(buf, ret, exits), resume, psc=True)

            return _exit_or_value(sev, vcpu, engine.begin(buf, exits), resume, psc=True)
        if nr == SVM_EXIT_VMGEXIT and args and args[0] & GHCB_MSR_INFO_MASK == GHCB_MSR_PSC_REQ:
            vm.count("psc_requests")
            return _exit_or_value(sev, vcpu, begin_psc_msr(args[0], exits), complete_psc_msr, psc=True)
        return None


def _exit_or_value(
    sev: SevVm, vcpu: VcpuView, result: int | MapGpaRange, on_resume: Callable[[int], int], psc: bool = False
) -> int:
    """Return *result* to the guest, or leave to userspace with ``KVM_EXIT_HYPERCALL``."""
    if isinstance(result, int):
        return result
    state = sev.vcpu_state(vcpu.vcpu_id)
    state.pending = on_resume
    state.hypercall_ret = 0  # "ensuring that it is zero to not break QEMU" (snp_begin_psc*)
    sev.vm.count("userspace_exits")
    if psc:
        sev.vm.count("psc_exits")
    sev.vm.trace(
        "hypercall_exit", nr=KVM_HC_MAP_GPA_RANGE, gpa=result.gpa, npages=result.npages, attrs=result.attrs
    )
    raise HypercallExit(KVM_HC_MAP_GPA_RANGE, result.args, flags=uapi.KVM_EXIT_HYPERCALL_LONG_MODE)
