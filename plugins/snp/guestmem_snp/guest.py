"""The guest side of an SNP VM: PVALIDATE, page-state changes, MAP_GPA_RANGE, accesses.

``guestmem_snp.guest(vcpu)`` returns a :class:`SnpGuest` that executes guest
instructions on that vCPU.  Requests that need the VMM leave as
:class:`~guestmem_snp.HypercallExit` (``KVM_EXIT_HYPERCALL``, ``nr ==
KVM_HC_MAP_GPA_RANGE``) raised out of the ``guestmem_hypercall`` hook; the VMM handles
it and re-enters the vCPU with :meth:`SnpGuest.resume` (``run->hypercall.ret``), which
returns what the guest finally sees or raises the next exit.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from guestmem import uapi
from guestmem.backend import VcpuView, VmView, view
from guestmem.errors import KvmError
from guestmem_snp.ghcb import (
    KVM_HC_MAP_GPA_RANGE,
    SVM_EXIT_VMGEXIT,
    SVM_VMGEXIT_PSC,
    PscBuffer,
    PscEntry,
    ghcb_msr_psc_req,
)
from guestmem_snp.rmp import (
    PTRS_PER_PMD,
    PVALIDATE_FAIL_INPUT,
    PVALIDATE_FAIL_SIZEMISMATCH,
    RmpViolation,
)
from guestmem_snp.sev import SevVcpu, SevVm, as_sev

if TYPE_CHECKING:
    from collections.abc import Iterable

PAGE_SHIFT = uapi.PAGE_SHIFT
PAGE_SIZE = uapi.PAGE_SIZE


class UnvalidatedAccess(Exception):
    """The guest touched a private page whose RMP entry is not validated: #VC in the guest."""

    def __init__(self, gpa: int) -> None:
        self.gpa = gpa
        super().__init__(f"#VC: private access to unvalidated gpa {gpa:#x}")


class SnpGuest:
    """Guest instructions executed on one vCPU of an SNP VM."""

    def __init__(self, vcpu: Any) -> None:
        self.vcpu = vcpu
        self.cpu: VcpuView = view(vcpu)
        self.vm: VmView = self.cpu.vm
        self.sev: SevVm = as_sev(self.vm)
        if not self.sev.snp:
            raise KvmError(errno.ENOTTY, "", "PVALIDATE and page-state changes need an SNP VM")

    @property
    def state(self) -> SevVcpu:
        """This vCPU's SEV state (GHCB, pending exit)."""
        return self.sev.vcpu_state(self.vcpu.vcpu_id)

    # --- exits and re-entry ------------------------------------------------------------------
    def _enter(self) -> None:
        self._run()
        if self.state.pending is not None:
            raise RuntimeError("the vCPU has an unfinished KVM_EXIT_HYPERCALL: resume() it first")

    def _run(self) -> None:
        """``KVM_RUN`` before the guest executes (``kvm_vcpu_ioctl``, ``kvm_arch_vcpu_ioctl_run``):
        an open vCPU fd (EBADF), a live host and VM (EIO, CAP-9), then the SEV checks
        (``svm_vcpu_pre_run``, VMRUN of the VMSA) the policy's ``guestmem_vcpu_pre_run`` makes."""
        self.cpu.check_run()

    def resume(self, ret: int = 0) -> int:
        """Re-enter after a ``KVM_EXIT_HYPERCALL`` with ``run->hypercall.ret = ret``."""
        with self.vm.host.operation():
            return self._resume(ret)

    def _resume(self, ret: int = 0) -> int:
        self._run()
        pending = self.state.pending
        if pending is None:
            raise RuntimeError("resume() without a pending KVM_EXIT_HYPERCALL")
        self.state.pending = None
        return pending(ret)

    # --- page-state change requests --------------------------------------------------------------
    def page_state_change(self, buffer: PscBuffer | Iterable[PscEntry]) -> int:
        """VMGEXIT ``SVM_VMGEXIT_PSC`` with *buffer* in the GHCB; returns ``sw_exit_info_2``."""
        with self.vm.host.operation():
            return self._page_state_change(buffer)

    def _page_state_change(self, buffer: PscBuffer | Iterable[PscEntry]) -> int:
        self._enter()
        self.state.psc = buffer if isinstance(buffer, PscBuffer) else PscBuffer(list(buffer))
        return int(self.vcpu.hypercall(SVM_VMGEXIT_PSC))

    def psc_msr(self, gfn: int, op: int) -> int:
        """GHCB MSR protocol page-state change of one 4 KiB page; returns the GHCB MSR value."""
        with self.vm.host.operation():
            return self._psc_msr(gfn, op)

    def _psc_msr(self, gfn: int, op: int) -> int:
        self._enter()
        return int(self.vcpu.hypercall(SVM_EXIT_VMGEXIT, ghcb_msr_psc_req(gfn, op)))

    def map_gpa_range(self, gpa: int, npages: int, attrs: int) -> int:
        """``vmmcall`` ``KVM_HC_MAP_GPA_RANGE``; returns the hypercall's result."""
        with self.vm.host.operation():
            return self._map_gpa_range(gpa, npages, attrs)

    def _map_gpa_range(self, gpa: int, npages: int, attrs: int) -> int:
        self._enter()
        return int(self.vcpu.hypercall(KVM_HC_MAP_GPA_RANGE, gpa, npages, attrs))

    # --- PVALIDATE ----------------------------------------------------------------------------
    def _translate(self, gpa: int) -> int:
        """The NPT walk of a private access: faults the page in (or raises MemoryFault)."""
        return self.cpu.translate(gpa, private=True)

    def _mapped_run(self, gfn: int, limit: int) -> tuple[int, int]:
        """``(pfn, npages)``: the private mapping at *gfn* and how far it runs contiguously.

        The NPT walks of the PVALIDATEs of ``[gfn, gfn + limit)`` in order: the core faults
        them in as runs (one stage-2 fault per uniform run), raising if *gfn* itself cannot
        be mapped; the result is the leaf run holding *gfn*, at most *limit* pages.
        """
        self.vm.fault_range(gfn, limit, private=True, vcpu=self.cpu)
        leaf = self.vm.leaf(gfn)
        assert leaf is not None, "fault_range mapped gfn"
        return leaf.pfn + gfn - leaf.gfn, max(1, min(limit, leaf.end_gfn - gfn))

    def pvalidate(self, gpa: int, page_size: int = uapi.PG_LEVEL_4K, validate: bool = True) -> int:
        """PVALIDATE one page at *gpa*; returns the instruction's code (0 on success)."""
        size = PAGE_SIZE << (uapi.PMD_ORDER if page_size == uapi.PG_LEVEL_2M else 0)
        return self.pvalidate_range(gpa, size, page_size, validate, fallback=False)

    def pvalidate_range(
        self,
        gpa: int,
        size: int,
        page_size: int = uapi.PG_LEVEL_4K,
        validate: bool = True,
        *,
        fallback: bool = True,
    ) -> int:
        """PVALIDATE every page of ``[gpa, gpa + size)`` with pages of *page_size*.

        The instructions run in order; the result is the code of the first one that did
        not succeed (its predecessors took effect).  A 4K PVALIDATE inside a 2M RMP entry
        takes the #NPF KVM resolves with PSMASH and a 512-gfn zap (``sev_handle_rmp_fault``),
        then succeeds.  With *fallback* a 2M PVALIDATE answered with SIZEMISMATCH is redone
        as 512 4K ones, as Linux guests do.
        """
        with self.vm.host.operation():
            return self._pvalidate_range(gpa, size, page_size, validate, fallback=fallback)

    def _pvalidate_range(
        self,
        gpa: int,
        size: int,
        page_size: int = uapi.PG_LEVEL_4K,
        validate: bool = True,
        *,
        fallback: bool = True,
    ) -> int:
        self._run()
        step = PTRS_PER_PMD if page_size == uapi.PG_LEVEL_2M else 1
        if gpa % PAGE_SIZE or size % (step * PAGE_SIZE) or size <= 0:
            return PVALIDATE_FAIL_INPUT
        rmp = self.sev.host.rmp
        gfn, end = gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT
        while gfn < end:
            pfn, run = self._mapped_run(gfn, end - gfn)
            count = max(1, run // step)
            try:
                rc = rmp.pvalidate(pfn, gfn, self.sev.asid, page_size, validate, count=count)
            except RmpViolation as exc:
                if not exc.size_mismatch:
                    raise
                # The instructions before the faulting one took effect; it is retried.
                done = exc.pfn - pfn
                self.vm.count("pvalidate", done // step + 1)
                self._handle_rmp_fault(exc.pfn, gfn + done)
                gfn += done
                continue
            self.vm.count("pvalidate", count)
            if rc == PVALIDATE_FAIL_SIZEMISMATCH and fallback:
                rc = self.pvalidate_range(gfn << PAGE_SHIFT, step * PAGE_SIZE, uapi.PG_LEVEL_4K, validate)
                if rc:
                    return rc
                gfn += step
                continue
            if rc:
                return rc
            gfn += count * step
        return 0

    def _handle_rmp_fault(self, pfn: int, gfn: int) -> None:
        """``sev_handle_rmp_fault`` for a size mismatch: PSMASH the 2M entry, zap 512 gfns.

        The zap is ``kvm_zap_gfn_range(gfn, gfn + 512)`` from the faulting gfn, not from its
        2M boundary: a huge leaf of the next 2M block that the range reaches goes too.
        """
        rmp = self.sev.host.rmp
        self.vm.count("rmp_npf")
        with self.sev.host.acting(self.vm):
            rmp.psmash(pfn - pfn % PTRS_PER_PMD)
        self.vm.count("psmash")
        self.vm.zap_gfn_range(gfn, gfn + PTRS_PER_PMD)
        self.vm.trace("snp_rmp_fault", gpa=gfn << PAGE_SHIFT, pfn=pfn, psmash=True)

    # --- accesses --------------------------------------------------------------------------------
    def read(self, gpa: int, length: int, *, private: bool = True) -> bytes:
        """A guest load; a private one of an unvalidated page raises :class:`UnvalidatedAccess`."""
        with self.vm.host.operation():
            return self._read(gpa, length, private=private)

    def _read(self, gpa: int, length: int, *, private: bool = True) -> bytes:
        if private:
            self._check_validated(gpa, length)
        data = self.vcpu.access(gpa, length, private=private)
        assert data is not None
        return bytes(data)

    def write(self, gpa: int, data: bytes, *, private: bool = True) -> None:
        """A guest store (C-bit set for *private*)."""
        with self.vm.host.operation():
            self._write(gpa, data, private=private)

    def _write(self, gpa: int, data: bytes, *, private: bool = True) -> None:
        if private:
            self._check_validated(gpa, len(data))
        self.vcpu.access(gpa, data=data, private=private)

    def _check_validated(self, gpa: int, length: int) -> None:
        rmp = self.sev.host.rmp
        for page in range(gpa >> PAGE_SHIFT, (gpa + length + PAGE_SIZE - 1) >> PAGE_SHIFT):
            pfn = self._translate(page << PAGE_SHIFT)
            if not rmp.lookup(pfn).validated:
                raise UnvalidatedAccess(page << PAGE_SHIFT)
