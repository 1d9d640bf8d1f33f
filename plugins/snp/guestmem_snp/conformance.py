"""How the conformance kit drives SEV-SNP VMs: the ``guestmem_conformance_options`` of
guestmem-snp and the kit's VMM driver for SNP VMs.

An SNP guest's memory is private only once the VM is initialised (``KVM_SEV_INIT2``: the
RMP is in force), launched (``SNP_LAUNCH_START`` / ``SNP_LAUNCH_FINISH``) and validated
by the guest (PVALIDATE); the guest converts with a page-state change request that exits
to userspace as ``KVM_HC_MAP_GPA_RANGE``, and the VMM converts destructively as QEMU's
``kvm_convert_memory`` does (backends.md 2.3).  :class:`SnpKitVmm` is that guest and VMM;
it has the methods of ``guestmem.conformance.KitVmm`` it changes, and the kit supplies
the rest (this package imports only the public API).
"""

from __future__ import annotations

from typing import Any

from guestmem import uapi
from guestmem.backend import Backend, VmTypeInfo, hookimpl
from guestmem.errors import HypercallExit, KvmError
from guestmem_snp.ghcb import (
    GHCB_MSR_PSC_RESP,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    SNP_PAGE_STATE_PRIVATE,
    SNP_PAGE_STATE_SHARED,
)
from guestmem_snp.guest import SnpGuest, UnvalidatedAccess
from guestmem_snp.invariants import RmpChecker
from guestmem_snp.rmp import PVALIDATE_FAIL_NOUPDATE
from guestmem_snp.sev import Sev

PAGE = uapi.PAGE_SIZE
PAGE_SHIFT = uapi.PAGE_SHIFT
#: #VCs one guest access answers with PVALIDATE before giving up (the VMM punching the
#: page again each time).
_VC_RETRIES = 16


class SnpKitVmm:
    """The kit's VMM and guest of an SNP VM: INIT2, a launch before the first run, PVALIDATE
    before a private page is used, page-state changes through the GHCB MSR protocol."""

    vm: Any

    def setup(self) -> None:
        """``KVM_SEV_INIT2`` before any vCPU, and ``KVM_HC_MAP_GPA_RANGE`` exits enabled (the
        guest's page-state changes reach the VMM)."""
        sev = Sev(self.vm)
        sev.init2()
        sev.enable_cap_exit_hypercall(1 << KVM_HC_MAP_GPA_RANGE)
        self._validated: set[int] = set()

    def start(self, vcpu: Any, ram: Any) -> None:
        """The RAM starts private (``KitVmm.start``); the launch then seals the VM."""
        super().start(vcpu, ram)  # type: ignore[misc]
        sev = Sev(self.vm)
        sev.snp_launch_start()
        sev.snp_launch_finish()

    def _access(self, vcpu: Any, gpa: int, private: bool, run: Any) -> Any:
        """Run a guest access; a private one of a page not yet validated takes the #VC the
        guest answers with PVALIDATE, then runs again.  (A Linux guest validates its memory
        once and would stop at a #VC on a page the host took away by punching it; the kit's
        guest validates it again, so that the kit can go on.  Another vCPU may have validated
        it meanwhile: PVALIDATE then leaves it, FAIL_NOUPDATE, and the access runs again all
        the same.)"""
        for _ in range(_VC_RETRIES):
            try:
                return run()
            except UnvalidatedAccess as exc:
                if not private:
                    raise
                page = exc.gpa & ~(PAGE - 1)
                if SnpGuest(vcpu).pvalidate(page) not in (0, PVALIDATE_FAIL_NOUPDATE):
                    raise
                self._validated.add(page >> PAGE_SHIFT)
        return run()

    def guest_write(self, vcpu: Any, gpa: int, data: bytes, *, private: bool) -> None:
        """A store with the C-bit set for *private*."""
        guest = SnpGuest(vcpu)
        self._access(vcpu, gpa, private, lambda: guest.write(gpa, data, private=private))

    def guest_read(self, vcpu: Any, gpa: int, n: int, *, private: bool) -> bytes:
        """A load with the C-bit set for *private*."""
        guest = SnpGuest(vcpu)
        data: bytes = self._access(vcpu, gpa, private, lambda: guest.read(gpa, n, private=private))
        return data

    def convert(self, vcpu: Any, ram: Any, page: int, npages: int, *, private: bool) -> None:
        """What a Linux SNP guest does (``__set_pages_state``): rescind validation of pages
        going shared, a GHCB MSR page-state change per page, which exits to the VMM as
        ``KVM_HC_MAP_GPA_RANGE``; the VMM converts destructively (``KitVmm.convert``) and
        resumes the guest."""
        guest = SnpGuest(vcpu)
        op = SNP_PAGE_STATE_PRIVATE if private else SNP_PAGE_STATE_SHARED
        for gfn in range(ram.gpa_of(page) >> PAGE_SHIFT, (ram.gpa_of(page) >> PAGE_SHIFT) + npages):
            if not private and gfn in self._validated:
                # A page the host took away meanwhile (a punch) came back unvalidated: there
                # is nothing to rescind (PVALIDATE leaves it, FAIL_NOUPDATE).
                if guest.pvalidate(gfn << PAGE_SHIFT, validate=False) not in (0, PVALIDATE_FAIL_NOUPDATE):
                    raise KvmError(0, "", f"PVALIDATE rescind of gfn {gfn:#x} failed")
                self._validated.discard(gfn)
            try:
                answer = guest.psc_msr(gfn, op)
            except HypercallExit as exit_:
                gpa, count, attrs = exit_.args[:3]
                assert exit_.nr == KVM_HC_MAP_GPA_RANGE and gpa == gfn << PAGE_SHIFT and count == 1
                assert bool(attrs & KVM_MAP_GPA_RANGE_ENCRYPTED) == private
                super().convert(vcpu, ram, (gpa - ram.gpa) >> PAGE_SHIFT, 1, private=private)  # type: ignore[misc]
                answer = guest.resume(0)
            if answer != GHCB_MSR_PSC_RESP:
                raise KvmError(0, "", f"page-state change of gfn {gfn:#x} answered {answer:#x}")


@hookimpl
def guestmem_conformance_options(backend: Backend, vm_type: VmTypeInfo) -> dict[str, Any] | None:
    """The kit's settings for the ``snp`` backends: the RMP checker watches every VM, and an
    SNP VM is driven by :class:`SnpKitVmm`."""
    if not backend.name.startswith("snp"):
        return None
    options: dict[str, Any] = {"observers": (RmpChecker,)}
    if vm_type.type == uapi.KVM_X86_SNP_VM:
        options["vmm"] = SnpKitVmm
    return options
