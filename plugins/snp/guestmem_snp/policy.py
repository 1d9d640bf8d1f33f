"""The SEV-SNP arch policy: the hook implementations a VM of the ``snp`` backends reaches.

Each hook is the kernel function named in its docstring (spec 3.6, backends.md 6.1);
the work is done by the VM's :class:`~guestmem_snp.sev.SevVm` (``vm.arch``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from guestmem import hookimpl, uapi
from guestmem.errors import HypercallExit
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
from guestmem_snp.sev import SevVm

if TYPE_CHECKING:
    from collections.abc import Callable

    from guestmem.model.mmu import Fault
    from guestmem.model.vm import ModelVm

_SEV_TYPES = frozenset({uapi.KVM_X86_SEV_VM, uapi.KVM_X86_SEV_ES_VM, uapi.KVM_X86_SNP_VM})


def _sev(vm: Any) -> SevVm | None:
    arch = getattr(vm, "arch", None)
    return arch if isinstance(arch, SevVm) else None


class SnpPolicy:
    """Hook implementations for SEV, SEV-ES and SNP VMs."""

    # --- VM lifetime -------------------------------------------------------------------------
    @hookimpl
    def guestmem_vm_init(self, vm: ModelVm) -> SevVm | None:
        """``svm_vm_init``: SEV state; the ASID comes with ``KVM_SEV_INIT2``."""
        if vm.vm_type not in _SEV_TYPES:
            return None
        return SevVm(vm)

    @hookimpl
    def guestmem_vm_destroy(self, vm: ModelVm) -> None:
        """``sev_vm_destroy``: decommission, reclaim VMSAs and GCTX, free the ASID."""
        sev = _sev(vm)
        if sev is not None:
            sev.destroy()

    @hookimpl
    def guestmem_check_extension(self, vm: ModelVm | None, cap: int) -> int | None:
        """``KVM_CAP_EXIT_HYPERCALL``: only ``KVM_HC_MAP_GPA_RANGE`` can exit."""
        if cap == uapi.KVM_CAP_EXIT_HYPERCALL:
            return KVM_EXIT_HYPERCALL_VALID_MASK
        return None

    # --- gmem folio lifetime ---------------------------------------------------------------
    @hookimpl
    def guestmem_gmem_prepare(self, vm: ModelVm, gfn: int, pfn: int, order: int) -> None:
        """``sev_gmem_prepare``: RMP assign at the folio's first fault."""
        sev = _sev(vm)
        if sev is not None:
            sev.gmem_prepare(gfn, pfn, order)

    @hookimpl
    def guestmem_gmem_invalidate(self, vm: ModelVm, start_pfn: int, end_pfn: int) -> None:
        """``sev_gmem_invalidate``: RMP back to shared when the folio is freed."""
        sev = _sev(vm)
        if sev is not None:
            sev.gmem_invalidate(start_pfn, end_pfn)

    @hookimpl
    def guestmem_max_mapping_level(self, vm: ModelVm, pfn: int, is_private: bool) -> int | None:
        """``sev_gmem_max_mapping_level``: the RMP page size."""
        sev = _sev(vm)
        return None if sev is None else sev.max_mapping_level(pfn, is_private)

    @hookimpl
    def guestmem_fault(self, vm: ModelVm, fault: Fault) -> None:
        """No RMP change on the fault path; on hugepage gmem, allow the folio's mapping size.

        ``kvm_mmu_faultin_pfn_gmem`` sets ``max_level = kvm_max_level_for_order(max_order)``;
        with order-9 folios (``snp-hugepage``) that is 2M, then limited by the RMP page
        size (``sev_gmem_max_mapping_level``).  Linux 6.18 folios are order 0 (H-1).
        """
        if fault.is_private and vm.type_info.gmem_folio_order >= uapi.PMD_ORDER and _sev(vm) is not None:
            fault.max_level = max(fault.max_level, uapi.PG_LEVEL_2M)

    # --- host side -----------------------------------------------------------------------------
    @hookimpl
    def guestmem_host_mappable(self, vm: ModelVm, inode: Any, index: int) -> bool | None:
        """Private (RMP-assigned) gmem pages are never host-mappable (2.5)."""
        sev = _sev(vm)
        if sev is None or not sev.snp:
            return None
        pfn = inode.pfn(index)
        if pfn is not None and sev.host.rmp.is_assigned(pfn):
            return False
        return None

    @hookimpl
    def guestmem_host_access(self, vm: ModelVm, pfn: int, write: bool) -> str | None:
        """A host write to an RMP-assigned page is an RMP #PF: the host goes down (2.2)."""
        sev = _sev(vm)
        if sev is None or not write:
            return None  # host reads are not RMP-checked
        return sev.host_write_verdict(pfn)

    # --- population and hypercalls ----------------------------------------------------------
    @hookimpl
    def guestmem_post_populate(
        self, vm: ModelVm, gfn: int, pfn: int, src: bytes | None, order: int, opaque: Any
    ) -> int | None:
        """``sev_gmem_post_populate`` (LAUNCH_UPDATE)."""
        sev = _sev(vm)
        if sev is None:
            return None
        return sev.post_populate(gfn, pfn, src, order, opaque)

    @hookimpl
    def guestmem_hypercall(self, vcpu: Any, nr: int, args: tuple[int, ...]) -> int | None:
        """``KVM_HC_MAP_GPA_RANGE`` and the SNP VMGEXITs that become it (2.3)."""
        sev = _sev(vcpu.vm)
        if sev is None:
            return None
        state = sev.vcpu_state(vcpu.vcpu_id)
        exits = bool(sev.hypercall_exit_enabled & KVM_EXIT_HYPERCALL_VALID_MASK)
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
            sev.vm.count("psc_requests")
            engine = state.engine

            def resume(ret: int) -> int:
                return _exit_or_value(sev, vcpu, engine.complete(buf, ret, exits), resume, psc=True)

            return _exit_or_value(sev, vcpu, engine.begin(buf, exits), resume, psc=True)
        if nr == SVM_EXIT_VMGEXIT and args and args[0] & GHCB_MSR_INFO_MASK == GHCB_MSR_PSC_REQ:
            sev.vm.count("psc_requests")
            return _exit_or_value(sev, vcpu, begin_psc_msr(args[0], exits), complete_psc_msr, psc=True)
        return None


def _exit_or_value(
    sev: SevVm, vcpu: Any, result: int | MapGpaRange, on_resume: Callable[[int], int], psc: bool = False
) -> int:
    """Return *result* to the guest, or leave to userspace with ``KVM_EXIT_HYPERCALL``."""
    if isinstance(result, int):
        return result
    sev.vcpu_state(vcpu.vcpu_id).pending = on_resume
    sev.vm.count("userspace_exits")
    if psc:
        sev.vm.count("psc_exits")
    sev.vm.trace(
        "hypercall_exit", nr=KVM_HC_MAP_GPA_RANGE, gpa=result.gpa, npages=result.npages, attrs=result.attrs
    )
    raise HypercallExit(KVM_HC_MAP_GPA_RANGE, result.args)
