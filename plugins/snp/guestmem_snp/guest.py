"""The guest side of an SNP VM: PVALIDATE, page-state changes, MAP_GPA_RANGE, accesses.

``guestmem_snp.guest(vcpu)`` returns a :class:`SnpGuest` that executes guest
instructions on that vCPU.  Requests that need the VMM leave as
:class:`~guestmem_snp.HypercallExit` (``KVM_EXIT_HYPERCALL``, ``nr ==
KVM_HC_MAP_GPA_RANGE``) raised out of the ``guestmem_hypercall`` hook; the VMM handles
it and re-enters the vCPU with :meth:`SnpGuest.resume` (``run->hypercall.ret``), which
returns what the guest finally sees or raises the next exit.

Every instruction runs inside ``KVM_RUN``, and ``KVM_RUN`` first completes an exit left
pending (``kvm_arch_vcpu_ioctl_run`` -> ``complete_userspace_io``) with whatever
``run->hypercall.ret`` holds: 0, as KVM left it, unless :meth:`SnpGuest.resume` wrote
another value.  So an instruction executed while an exit is unanswered first gives the
guest its request's result as successful (or makes the request's next exit, and the
instruction is not executed); a ``resume`` with no exit pending just runs the vCPU.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from guestmem import cabi, uapi
from guestmem.backend import GmemLocation, VcpuView, VmView, view
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
        #: 4 KiB pages from its *gpa* the last :meth:`pvalidate_range` validated.
        self.progress = 0
        self._pos = 0  # the next page of the PVALIDATE loop under way

    @property
    def state(self) -> SevVcpu:
        """This vCPU's SEV state (GHCB, pending exit)."""
        return self.sev.vcpu_state(self.vcpu.vcpu_id)

    # --- exits and re-entry ------------------------------------------------------------------
    def _run(self) -> None:
        """``KVM_RUN`` before the guest executes (``kvm_vcpu_ioctl``, ``kvm_arch_vcpu_ioctl_run``):
        an open vCPU fd (EBADF), a live host and VM (EIO, CAP-9), then, in the policy's
        ``guestmem_vcpu_pre_run``, the pending exit's ``complete_userspace_io`` (which may
        raise the next exit instead of entering) and the SEV checks (``svm_vcpu_pre_run``,
        VMRUN of the VMSA)."""
        self.cpu.check_run()

    def resume(self, ret: int = 0) -> int | None:
        """``KVM_RUN`` after userspace wrote ``run->hypercall.ret = ret`` (a ``__u64``).

        After a ``KVM_EXIT_HYPERCALL`` of this vCPU: what the guest's request finally returns
        to it (``complete_hypercall_exit``: ``rax``; a GHCB page-state change:
        ``sw_exit_info_2``; the MSR protocol: the GHCB MSR), or the next exit raised.  With
        no exit pending, ``complete_userspace_io`` is ``NULL`` and KVM ignores the field: the
        vCPU runs on and None is returned.  The checks of ``KVM_RUN`` come first (EBADF for
        a closed vCPU fd, EIO for a dead VM).
        """
        with self.vm.host.operation():
            return self._resume(ret)

    def _resume(self, ret: int = 0) -> int | None:
        ret = cabi.u64(ret, "ret")
        state = self.sev.vcpus.get(self.cpu.vcpu_id)
        if state is not None:
            state.hypercall_ret, state.completed = ret, None  # userspace's store into kvm_run
        self._run()
        return None if state is None else state.completed

    # --- page-state change requests --------------------------------------------------------------
    def page_state_change(self, buffer: PscBuffer | Iterable[PscEntry]) -> int:
        """VMGEXIT ``SVM_VMGEXIT_PSC`` with *buffer* in the GHCB; returns ``sw_exit_info_2``."""
        with self.vm.host.operation():
            return self._page_state_change(buffer)

    def _page_state_change(self, buffer: PscBuffer | Iterable[PscEntry]) -> int:
        self._run()
        self.state.psc = buffer if isinstance(buffer, PscBuffer) else PscBuffer(list(buffer))
        return int(self.vcpu.hypercall(SVM_VMGEXIT_PSC))

    def psc_msr(self, gfn: int, op: int) -> int:
        """GHCB MSR protocol page-state change of one 4 KiB page; returns the GHCB MSR value."""
        with self.vm.host.operation():
            return self._psc_msr(gfn, op)

    def _psc_msr(self, gfn: int, op: int) -> int:
        gfn, op = cabi.index(gfn, "gfn"), cabi.index(op, "op")
        self._run()
        return int(self.vcpu.hypercall(SVM_EXIT_VMGEXIT, ghcb_msr_psc_req(gfn, op)))

    def map_gpa_range(self, gpa: int, npages: int, attrs: int) -> int:
        """``vmmcall`` ``KVM_HC_MAP_GPA_RANGE``; returns the hypercall's result."""
        with self.vm.host.operation():
            return self._map_gpa_range(gpa, npages, attrs)

    def _map_gpa_range(self, gpa: int, npages: int, attrs: int) -> int:
        self._run()
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
        if leaf is None:
            # Zapped before the instruction ran (a guest_memfd closed meanwhile was released):
            # the NPT walk faults again, and exits if it cannot map the page any more.
            self._translate(gfn << PAGE_SHIFT)
            leaf = self.vm.leaf(gfn)
        assert leaf is not None, "the NPT walk mapped gfn"
        return leaf.pfn + gfn - leaf.gfn, max(1, min(limit, leaf.end_gfn - gfn))

    def pvalidate(self, gpa: int, page_size: int = uapi.PG_LEVEL_4K, validate: bool = True) -> int:
        """PVALIDATE one page at *gpa*; returns the instruction's code (0 on success).

        The NPT walk faults the page in first (all 512 pages of a 2M PVALIDATE).  A 4K
        PVALIDATE inside a 2M RMP entry takes the #NPF KVM resolves with PSMASH and a
        512-gfn zap (``sev_handle_rmp_fault``); the guest executes it again.  Each
        execution counts in ``pvalidate``.  *gpa* is the guest's ``rax`` (a 64-bit register).
        """
        gpa, page_size = cabi.u64(gpa, "gpa"), cabi.index(page_size, "page_size")
        self._run()
        if gpa % PAGE_SIZE:
            return PVALIDATE_FAIL_INPUT
        return self._pvalidate_one(gpa >> PAGE_SHIFT, page_size, validate)

    def _pvalidate_one(self, gfn: int, page_size: int, validate: bool) -> int:
        step = PTRS_PER_PMD if page_size == uapi.PG_LEVEL_2M else 1
        rmp = self.sev.host.rmp
        while True:
            pfn, _ = self._mapped_run(gfn, step)
            try:
                rc = rmp.pvalidate(pfn, gfn, self.sev.asid, page_size, validate)
            except RmpViolation as exc:
                if not exc.size_mismatch:
                    raise
                self.vm.count("pvalidate")
                self._handle_rmp_fault(exc.pfn, gfn)
                continue
            self.vm.count("pvalidate")
            return rc

    def pvalidate_range(
        self,
        gpa: int,
        size: int,
        page_size: int = uapi.PG_LEVEL_4K,
        validate: bool = True,
        *,
        fallback: bool = True,
    ) -> int:
        """PVALIDATE every page of ``[gpa, gpa + size)`` with pages of *page_size*: the
        guest kernel's loop (Linux's ``pvalidate_pages``, under ``snp_accept_memory``).

        The instructions run in order; the result is the code of the first one that did
        not succeed (its predecessors took effect), and :attr:`progress` says how many 4 KiB
        pages from *gpa* were validated before it, also when an exit or an RMP violation
        raises.  With *fallback* a 2M PVALIDATE answered with SIZEMISMATCH is redone as 512
        4K ones, as Linux guests do.  *gpa* is the guest's ``rax`` (a 64-bit register).

        Everything is as :meth:`pvalidate` page by page would leave it (the RMP, the
        stage-2, every counter, the exit and where it happens), at the cost of the runs of
        memory: the instructions of a run the NPT maps are one RMP walk; a run that is not
        mapped yet is faulted in at once when the RMP says that every instruction over it
        succeeds, or is fresh memory whose first use prepares it so; a run of 2M RMP
        entries under 4K PVALIDATEs takes its #NPFs, PSMASHes and zaps as one.
        """
        with self.vm.host.operation():
            return self._pvalidate_range(gpa, size, page_size, validate, fallback=fallback)

    def _pvalidate_range(self, gpa: int, size: int, page_size: int, validate: bool, *, fallback: bool) -> int:
        gpa, size = cabi.u64(gpa, "gpa"), cabi.index(size, "size")
        page_size = cabi.index(page_size, "page_size")
        self._run()
        step = PTRS_PER_PMD if page_size == uapi.PG_LEVEL_2M else 1
        self.progress = 0
        if gpa % PAGE_SIZE or size % (step * PAGE_SIZE) or size <= 0:
            return PVALIDATE_FAIL_INPUT
        start = gpa >> PAGE_SHIFT
        end = (gpa + size) >> PAGE_SHIFT
        self._pos = start
        rc = 0
        try:
            while not rc and self._pos < end:
                rc = self._pvalidate_step(self._pos, end, page_size, validate, fallback)
        finally:
            self.progress = self._pos - start
        return rc

    def _pvalidate_step(self, gfn: int, end: int, level: int, validate: bool, fallback: bool) -> int:
        """The instructions from *gfn* (one at least) up to where the state changes; moves
        ``self._pos`` past those that succeeded and returns the code of one that did not."""
        step = PTRS_PER_PMD if level == uapi.PG_LEVEL_2M else 1
        leaf = self.vm.leaf(gfn)
        if leaf is not None and leaf.private:
            n = (min(end, leaf.end_gfn) - gfn) // step
            if n:
                return self._pvalidate_mapped(
                    gfn, leaf.pfn + gfn - leaf.gfn, n, end, level, validate, fallback
                )
        elif level in (uapi.PG_LEVEL_4K, uapi.PG_LEVEL_2M):
            n = self._faultable(gfn, end, level, validate, fallback)
            if n:
                self.vm.fault_range(gfn, n * step, private=True, vcpu=self.cpu)
                return 0  # validated as mapped pages by the next step
        rc = self._pvalidate_one(gfn, level, validate)
        if rc == PVALIDATE_FAIL_SIZEMISMATCH and fallback:
            return self._fallback(gfn, end, validate)
        if not rc:
            self._pos = gfn + step
        return rc

    def _pvalidate_mapped(
        self, gfn: int, pfn: int, n: int, end: int, level: int, validate: bool, fallback: bool
    ) -> int:
        """*n* instructions over pages the NPT maps contiguously from *gfn* to *pfn*: no
        fault, one RMP walk; a 4K one in a 2M entry and a 2M one on 4K entries are handled
        for the whole run of such entries."""
        step = PTRS_PER_PMD if level == uapi.PG_LEVEL_2M else 1
        rmp = self.sev.host.rmp
        try:
            rc, done = rmp.pvalidate_run(pfn, gfn, self.sev.asid, level, validate, n)
        except RmpViolation as exc:
            done = (exc.pfn - pfn) // step
            self.vm.count("pvalidate", done)
            self._pos = gfn + done * step
            if not exc.size_mismatch:
                raise
            self._rmp_faults(self._pos, exc.pfn, min(end, gfn + n * step), validate)
            return 0
        self.vm.count("pvalidate", done + (1 if rc else 0))
        self._pos = gfn + done * step
        if rc == PVALIDATE_FAIL_SIZEMISMATCH and fallback:
            return self._fallback(self._pos, end, validate)
        return rc

    def _rmp_faults(self, gfn: int, pfn: int, stop: int, validate: bool) -> None:
        """4K PVALIDATEs from *gfn* (mapped to *pfn* up to *stop*) hit a 2M RMP entry: each
        2M block takes a #NPF, ``sev_handle_rmp_fault`` PSMASHes it and zaps its 512 gfns,
        and the PVALIDATE is executed again.  Whole aligned blocks of one stored run whose
        PVALIDATEs then succeed are handled at once, each counted as the kernel does it;
        anything else as one instruction."""
        rmp = self.sev.host.rmp
        blocks = 0
        if gfn % PTRS_PER_PMD == 0 and pfn % PTRS_PER_PMD == 0 and rmp.lookup(pfn).validated != validate:
            blocks = (min(stop, gfn + rmp.run_end(pfn) - pfn) - gfn) // PTRS_PER_PMD
        if blocks < 2:
            self.vm.count("pvalidate")
            self._handle_rmp_fault(pfn, gfn)
            return
        npages = blocks * PTRS_PER_PMD
        self.vm.count("pvalidate", blocks)  # each block's faulting PVALIDATE, executed again later
        self.vm.count("rmp_npf", blocks)
        with self.sev.host.acting(self.vm):
            rc = rmp.psmash_range(pfn, blocks)
        assert rc == 0, "a run of 2M entries"
        self.vm.count("psmash", blocks)
        # kvm_zap_gfn_range per block: one zap here, the TLB flushes counted as the kernel's
        self.vm.zap_gfn_range(gfn, gfn + npages)
        self.vm.count("tlb_flushes", blocks - 1)
        self.vm.count("remote_tlb_flushes", blocks - 1)
        self.vm.trace("snp_rmp_fault", gpa=gfn << PAGE_SHIFT, pfn=pfn, psmash=True, blocks=blocks)

    def _fallback(self, gfn: int, end: int, validate: bool) -> int:
        """A 2M PVALIDATE at *gfn* said SIZEMISMATCH: 512 4K ones (``pvalidate_pages``).
        The 2M PVALIDATEs of the following blocks of the same run of 4K RMP entries say the
        same and their 4K ones succeed: those blocks are done at once."""
        leaf = self.vm.leaf(gfn)
        blocks = 1
        if leaf is not None and leaf.private:
            pfn, stop = leaf.pfn + gfn - leaf.gfn, min(end, leaf.end_gfn)
            blocks = max(1, self._sizemismatch_blocks(gfn, pfn, stop, validate))
        self.vm.count("pvalidate", blocks - 1)  # the 2M attempts after the first
        stop = gfn + blocks * PTRS_PER_PMD
        while self._pos < stop:
            rc = self._pvalidate_step(self._pos, stop, uapi.PG_LEVEL_4K, validate, False)
            if rc:
                return rc
        return 0

    def _sizemismatch_blocks(self, gfn: int, pfn: int, stop: int, validate: bool) -> int:
        """How many whole 2M blocks from *gfn* (backed from *pfn*, up to *stop*) lie in one
        stored run of 4K RMP entries whose 4K PVALIDATEs all succeed: a 2M PVALIDATE of each
        says SIZEMISMATCH, then its 512 4K ones succeed."""
        if gfn % PTRS_PER_PMD:
            return 0
        rmp = self.sev.host.rmp
        entry = rmp.lookup(pfn)
        if not (entry.assigned and entry.level == uapi.PG_LEVEL_4K and not entry.immutable):
            return 0
        if entry.asid != self.sev.asid or entry.gpa != gfn << PAGE_SHIFT or entry.validated == validate:
            return 0
        return (min(stop, gfn + rmp.run_end(pfn) - pfn) - gfn) // PTRS_PER_PMD

    def _faultable(self, gfn: int, end: int, level: int, validate: bool, fallback: bool) -> int:
        """How many PVALIDATEs from *gfn*, whose pages the NPT does not map, may have their
        pages faulted in at once: those that succeed (or, 2M ones, fall back and succeed),
        so the faults are the ones the instructions take one by one.

        Prepared pages: the RMP says, and the fault does not change it.  Pages not yet
        prepared (fresh, never assigned): their first use assigns them Guest-Invalid to this
        guest at their gpa, so every validating PVALIDATE over them succeeds; 4K ones over a
        block that becomes a 2M entry take its #NPF, which zaps 512 gfns from the faulting
        one: an unaligned start is faulted up to its block's end only, so that zap finds
        what it would find.  0: execute one instruction."""
        step = PTRS_PER_PMD if level == uapi.PG_LEVEL_2M else 1
        loc = self.vm.gfn_to_gmem(gfn)
        if loc is None or gfn % step or not self.vm.is_private(gfn):
            return 0
        stop = min(end, loc.slot.end_gfn)
        leaf = next(self.vm.leaves(gfn, stop), None)
        if leaf is not None:
            stop = leaf.gfn
        folio = next(loc.gmem.folios(loc.index, loc.index + stop - gfn), None)
        rmp = self.sev.host.rmp
        if folio is not None and folio.start == loc.index:
            stop = min(stop, gfn + folio.end - folio.start)
            if folio.poisoned:
                return 0
            if folio.prepared:
                n = (stop - gfn) // step
                try:
                    rc, done = rmp.pvalidate_run(
                        folio.pfn, gfn, self.sev.asid, level, validate, n, apply=False
                    )
                except RmpViolation as exc:
                    return (exc.pfn - folio.pfn) // step
                if not done and rc == PVALIDATE_FAIL_SIZEMISMATCH and fallback:
                    return self._sizemismatch_blocks(gfn, folio.pfn, stop, validate)
                return done
            if rmp.any_assigned(folio.pfn, stop - gfn):
                return 0
        elif folio is not None:
            stop = min(stop, gfn + folio.start - loc.index)
        if not validate or (level == uapi.PG_LEVEL_2M and not fallback):
            return 0
        if level == uapi.PG_LEVEL_4K and loc.gmem.owner.type_info.gmem_folio_order >= uapi.PMD_ORDER:
            return self._huge_frames(loc, gfn, stop) * PTRS_PER_PMD
        return (stop - gfn) // step

    def _huge_frames(self, loc: GmemLocation, gfn: int, stop: int) -> int:
        """Fresh 2 MiB folios under 4K PVALIDATEs: each block's first PVALIDATE faults its
        first page, which prepares a 2M RMP entry, then takes the #NPF whose zap drops the
        block's leaves.  Faulting the blocks at once leaves the same leaves for those zaps
        only where that first fault maps the whole block with one 2M leaf: whole blocks,
        each one folio (gfn and page index congruent), in one attribute run, of a memslot
        that allows 2M mappings (``kvm_mmu_hugepage_adjust``: no dirty logging, gfn and
        hva congruent).  How many such blocks from *gfn* up to *stop*."""
        slot = loc.slot
        if gfn % PTRS_PER_PMD or (gfn - loc.index) % PTRS_PER_PMD:
            return 0
        if slot.flags & uapi.KVM_MEM_LOG_DIRTY_PAGES:
            return 0
        if (slot.base_gfn ^ (slot.userspace_addr >> PAGE_SHIFT)) % PTRS_PER_PMD:
            return 0
        run = next(self.vm.attribute_runs(gfn, stop))
        return (min(stop, run[1]) - gfn) // PTRS_PER_PMD

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
        """A guest load; a private one of an unvalidated page raises :class:`UnvalidatedAccess`.
        *gpa* and *length* are checked as :meth:`guestmem.api.Vcpu.access` checks them (a
        negative gpa is EINVAL, before the RMP check's page walk)."""
        with self.vm.host.operation():
            return self._read(gpa, length, private=private)

    def _read(self, gpa: int, length: int, *, private: bool = True) -> bytes:
        gpa, length = cabi.index(gpa, "gpa"), cabi.index(length, "length")
        if private:
            self._check_validated(gpa, length)
        data = self.vcpu.access(gpa, length, private=private)
        assert data is not None
        return bytes(data)

    def write(self, gpa: int, data: bytes, *, private: bool = True) -> None:
        """A guest store of bytes-like *data* (C-bit set for *private*)."""
        with self.vm.host.operation():
            self._write(gpa, data, private=private)

    def _write(self, gpa: int, data: bytes, *, private: bool = True) -> None:
        gpa, data = cabi.index(gpa, "gpa"), cabi.buffer(data, "data")
        if private:
            self._check_validated(gpa, len(data))
        self.vcpu.access(gpa, data=data, private=private)

    def _check_validated(self, gpa: int, length: int) -> None:
        rmp = self.sev.host.rmp
        for page in range(gpa >> PAGE_SHIFT, (gpa + length + PAGE_SIZE - 1) >> PAGE_SHIFT):
            pfn = self._translate(page << PAGE_SHIFT)
            if not rmp.lookup(pfn).validated:
                raise UnvalidatedAccess(page << PAGE_SHIFT)
