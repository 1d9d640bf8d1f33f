"""The portable intents on an SEV-SNP host (``Backend(intents=SnpIntents())``).

What a VMM and a Linux SNP guest do for each intent (backends.md section 2):

* launch: ``KVM_SEV_INIT2`` right after ``KVM_CREATE_VM`` (before any vCPU), guest RAM as
  guest_memfd plus shared anonymous memory, all of it private, the vCPUs, then
  ``KVM_SEV_SNP_LAUNCH_START``; ``launch.populate`` is ``KVM_SEV_SNP_LAUNCH_UPDATE``
  (``NORMAL`` pages, measured, or ``UNMEASURED``), encrypting in place; the launch ends
  with ``KVM_SEV_SNP_LAUNCH_FINISH`` (VMSAs measured, the launch digest);
* ``guest.convert`` to shared: the guest rescinds the validation of the pages it had
  validated (``PVALIDATE``, validate=0), then asks for a page-state change; to private:
  the page-state change, then ``PVALIDATE`` (``snp_set_memory_shared`` /
  ``_private`` in ``arch/x86/coco/sev``).  A change is a GHCB ``SVM_VMGEXIT_PSC`` request
  of at most *entries* entries (Linux guests send 64, KVM takes 253) which KVM coalesces
  into ``KVM_HC_MAP_GPA_RANGE`` exits, or with ``coalesce = false`` one GHCB MSR-protocol
  request per 4 KiB page;
* ``guest.accept`` is what ``snp_accept_memory`` does: a page-state change to private and
  ``PVALIDATE`` of every page (2 MiB PVALIDATEs fall back to 4 KiB ones where the RMP
  entry is 4 KiB, as Linux does);
* private loads and stores of pages the guest has not validated raise
  :class:`~guestmem_snp.guest.UnvalidatedAccess` (the guest's #VC), at which a Linux guest
  terminates; a guest launched with ``accept_on_fault`` (the conformance kit's) accepts
  the page and goes on.

The guest's own record of what it validated is kept per VM (Linux keeps it in its
page tables and the unaccepted-memory bitmap), so a conversion to shared rescinds only
pages that are validated.  The host's ordinary VM types (DEFAULT, SW_PROTECTED) are the
core's: :class:`guestmem.backend.X86Intents` translates them, as on ``sw``.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from functools import partial
from typing import Any

from guestmem import uapi
from guestmem.api import Vcpu
from guestmem.backend import GuestVm, RangeMap, X86Intents, view
from guestmem.errors import HypercallExit, KvmError
from guestmem_snp.ghcb import (
    GHCB_MSR_INFO_MASK,
    GHCB_MSR_PSC_RESP,
    SNP_PAGE_STATE_PRIVATE,
    SNP_PAGE_STATE_SHARED,
    VMGEXIT_PSC_MAX_COUNT,
    PscEntry,
)
from guestmem_snp.guest import SnpGuest, UnvalidatedAccess
from guestmem_snp.rmp import PTRS_PER_PMD, PVALIDATE_FAIL_NOUPDATE
from guestmem_snp.sev import KVM_SEV_SNP_PAGE_TYPE_NORMAL, KVM_SEV_SNP_PAGE_TYPE_UNMEASURED, Sev

PAGE_SHIFT = uapi.PAGE_SHIFT
PAGE_SIZE = uapi.PAGE_SIZE
HUGE = 1 << 21


class PageStateChangeFailed(Exception):
    """KVM answered a page-state change with an error: a Linux guest terminates."""

    def __init__(self, result: int) -> None:
        super().__init__(f"page-state change failed: sw_exit_info_2 = {result:#x}")
        self.result = result


class SnpIntents(X86Intents):
    """SEV-SNP's translation of the portable intents (see the module docstring)."""

    #: ``"private"`` is ``KVM_X86_SNP_VM``; ``"default"`` a VM without private memory.
    private_vm_type = uapi.KVM_X86_SNP_VM

    # --- state of the guest --------------------------------------------------------------------
    @staticmethod
    def sev(guest: GuestVm) -> Sev:
        """The VM's SEV commands."""
        found = guest.arch.get("snp.sev")
        if found is None:
            found = guest.arch["snp.sev"] = Sev(guest.vm)
        assert isinstance(found, Sev)
        return found

    @staticmethod
    def validated(guest: GuestVm) -> RangeMap[bool]:
        """The gfns the guest validated (its own bookkeeping)."""
        found = guest.arch.get("snp.validated")
        if found is None:
            found = guest.arch["snp.validated"] = RangeMap()
        assert isinstance(found, RangeMap)
        return found

    @staticmethod
    def cpu(guest: GuestVm, vcpu: Vcpu) -> SnpGuest:
        """The guest side of *vcpu*."""
        return SnpGuest(vcpu)

    @staticmethod
    def _snp(guest: GuestVm) -> bool:
        return guest.vm_type.type == uapi.KVM_X86_SNP_VM

    # --- the launch --------------------------------------------------------------------------------
    def vm_init(self, guest: GuestVm) -> None:
        """``KVM_SEV_INIT2`` (the ASID) before anything else, then the base's exit setup."""
        if guest.vm_type.type in (uapi.KVM_X86_SEV_VM, uapi.KVM_X86_SEV_ES_VM, uapi.KVM_X86_SNP_VM):
            self.sev(guest).init2()
        super().vm_init(guest)

    def launch_start(self, guest: GuestVm) -> str:
        """``KVM_SEV_SNP_LAUNCH_START``: the guest context and the ASID binding."""
        if not self._snp(guest):
            return ""
        sev = self.sev(guest)
        sev.snp_launch_start()
        return f"SNP launch started (ASID {sev.asid})"

    def populate(self, guest: GuestVm, gpa: int, data: bytes, measure: bool | None) -> str:
        """``KVM_SEV_SNP_LAUNCH_UPDATE`` of *data* (padded to pages), in place."""
        if not self._snp(guest):
            return super().populate(guest, gpa, data, measure)
        padded = data + bytes(-len(data) % PAGE_SIZE)
        page_type = KVM_SEV_SNP_PAGE_TYPE_UNMEASURED if measure is False else KVM_SEV_SNP_PAGE_TYPE_NORMAL
        gfn = gpa >> PAGE_SHIFT
        with view(guest.vm).host.operation():
            self.sev(guest).launch_update_data(gpa, padded, page_type)
            self.validated(guest).set(gfn, gfn + len(padded) // PAGE_SIZE, True)  # LAUNCH_UPDATE validates
        kind = "unmeasured" if measure is False else "measured"
        return f"LAUNCH_UPDATE of {len(padded) // PAGE_SIZE} page(s), {kind}"

    def launch_finish(self, guest: GuestVm) -> str:
        """``KVM_SEV_SNP_LAUNCH_FINISH``: VMSAs measured; returns the launch digest."""
        if not self._snp(guest):
            return ""
        digest = self.sev(guest).snp_launch_finish()
        return f"launch digest {digest.hex()[:16]}..."

    # --- the guest -----------------------------------------------------------------------------------
    def _psc(
        self,
        guest: GuestVm,
        gpa: int,
        size: int,
        *,
        private: bool,
        page_size: int,
        coalesce: bool,
        entries: int,
    ) -> int:
        """The page-state change requests for ``[gpa, gpa + size)``; returns how many."""
        vcpu = guest.vcpu()
        cpu = self.cpu(guest, vcpu)
        op = SNP_PAGE_STATE_PRIVATE if private else SNP_PAGE_STATE_SHARED
        requests = 0
        if not coalesce:  # GHCB MSR protocol: one 4 KiB page per request
            for gfn in range(gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT):
                value = guest.run(partial(cpu.psc_msr, gfn, op), vcpu)
                requests += 1
                if value & GHCB_MSR_INFO_MASK != GHCB_MSR_PSC_RESP or value >> 32:
                    raise PageStateChangeFailed(value)
            return requests
        huge = page_size == HUGE
        step = PTRS_PER_PMD if huge else 1
        gfns = range(gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT, step)
        per_request = max(1, min(entries, VMGEXIT_PSC_MAX_COUNT))
        for first in range(0, len(gfns), per_request):
            batch = [
                PscEntry(gfn=g, operation=op, pagesize=int(huge)) for g in gfns[first : first + per_request]
            ]
            result = guest.run(partial(cpu.page_state_change, batch), vcpu)
            requests += 1
            if result:
                raise PageStateChangeFailed(result)
        return requests

    def _pvalidate(self, guest: GuestVm, gpa: int, size: int, page_size: int, validate: bool) -> int:
        """PVALIDATE ``[gpa, gpa + size)``; rescinding touches only validated pages.  The
        instructions and the guest's bookkeeping of what it validated are one operation of
        the host: the guest kernel keeps it under its own lock, and its vCPUs may be threads."""
        with view(guest.vm).host.operation():
            return self._pvalidate_runs(guest, gpa, size, page_size, validate)

    def _pvalidate_runs(self, guest: GuestVm, gpa: int, size: int, page_size: int, validate: bool) -> int:
        cpu = self.cpu(guest, guest.vcpu())
        level = uapi.PG_LEVEL_2M if page_size == HUGE else uapi.PG_LEVEL_4K
        done = self.validated(guest)
        gfn, end = gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT
        runs = [(gfn, end)] if validate else [(s, e) for s, e, _ in done.items(gfn, end)]
        for s, e in runs:
            run_level = level
            if run_level == uapi.PG_LEVEL_2M and (s % PTRS_PER_PMD or e % PTRS_PER_PMD):
                run_level = uapi.PG_LEVEL_4K
            rc = cpu.pvalidate_range(s << PAGE_SHIFT, (e - s) << PAGE_SHIFT, run_level, validate)
            if rc == PVALIDATE_FAIL_NOUPDATE and not validate:
                rc = self._rescind_each(cpu, s, e)
            if rc:
                raise KvmError(errno.EINVAL, "", f"PVALIDATE of gpa {s << PAGE_SHIFT:#x} failed with {rc}")
        done.set(gfn, end, True if validate else None)
        return sum(e - s for s, e in runs)

    @staticmethod
    def _rescind_each(cpu: SnpGuest, start: int, end: int) -> int:
        """Rescind the validation of gfns ``[start, end)`` one 4 KiB page at a time: a page
        the host took away since the guest validated it (a punch: the next fault
        assigned a new, unvalidated page) has nothing to rescind (``FAIL_NOUPDATE``)."""
        for gfn in range(start, end):
            rc = cpu.pvalidate(gfn << PAGE_SHIFT, uapi.PG_LEVEL_4K, validate=False)
            if rc not in (0, PVALIDATE_FAIL_NOUPDATE):
                return rc
        return 0

    def convert(
        self, guest: GuestVm, gpa: int, size: int, *, private: bool, page_size: int, coalesce: bool
    ) -> str:
        if not self._snp(guest):
            return super().convert(guest, gpa, size, private=private, page_size=page_size, coalesce=coalesce)
        rescinded = 0 if private else self._pvalidate(guest, gpa, size, page_size, validate=False)
        requests = self._psc(
            guest, gpa, size, private=private, page_size=page_size, coalesce=coalesce, entries=64
        )
        validated = self._pvalidate(guest, gpa, size, page_size, validate=True) if private else 0
        kind = "PSC" if coalesce else "MSR-protocol PSC"
        pvalidated = f", {validated} page(s) validated" if private else f", {rescinded} rescinded"
        return f"{requests} {kind} request(s){pvalidated}"

    def accept(
        self, guest: GuestVm, gpa: int, size: int, *, page_size: int, coalesce: bool, entries: int
    ) -> str:
        """``snp_accept_memory``: page-state change to private, then PVALIDATE."""
        if not self._snp(guest):
            return super().accept(guest, gpa, size, page_size=page_size, coalesce=coalesce, entries=entries)
        requests = self._psc(
            guest, gpa, size, private=True, page_size=page_size, coalesce=coalesce, entries=entries
        )
        self._pvalidate(guest, gpa, size, page_size, validate=True)
        return f"{requests} PSC request(s), {size >> PAGE_SHIFT} page(s) validated"

    def unaccepted(self, guest: GuestVm, exc: BaseException) -> int | None:
        """The gpa of a private access's #VC for a page that is not validated."""
        return exc.gpa if isinstance(exc, UnvalidatedAccess) and self._snp(guest) else None

    def side(self, guest: GuestVm, gpa: int, private: bool | None) -> bool | None:
        """The guest's C-bit: what it converted the page to (the attribute it asked for)."""
        if private is not None or not self._snp(guest):
            return private
        vm = view(guest.vm)
        with vm.host.operation():
            return bool(vm.is_private(gpa >> PAGE_SHIFT))

    def read(self, guest: GuestVm, gpa: int, length: int, *, private: bool | None) -> bytes:
        """A guest load; a private one checks the page is validated (#VC otherwise)."""
        if not self._snp(guest):
            return super().read(guest, gpa, length, private=private)
        side = bool(self.side(guest, gpa, private))
        vcpu = guest.vcpu()
        cpu = self.cpu(guest, vcpu)
        return guest.run(lambda: cpu.read(gpa, length, private=side), vcpu)

    def write(self, guest: GuestVm, gpa: int, data: bytes, *, private: bool | None) -> None:
        """A guest store; a private one checks the page is validated (#VC otherwise)."""
        if not self._snp(guest):
            super().write(guest, gpa, data, private=private)
            return
        side = bool(self.side(guest, gpa, private))
        vcpu = guest.vcpu()
        cpu = self.cpu(guest, vcpu)
        guest.run(lambda: cpu.write(gpa, data, private=side), vcpu)

    def resume(self, guest: GuestVm, vcpu: Vcpu, exit: HypercallExit, ret: int) -> Any:  # noqa: A002
        """Re-enter through the GHCB protocol state of the vCPU (``snp_complete_psc``)."""
        if not self._snp(guest):
            return super().resume(guest, vcpu, exit, ret)
        return self.cpu(guest, vcpu).resume(ret)

    # --- capabilities and costs ----------------------------------------------------------------------
    def capabilities(self, guest: GuestVm) -> frozenset[str]:
        found = super().capabilities(guest)
        if self._snp(guest):
            found |= {"conversion", "acceptance", "populate", "launch_measurement"}
        return found

    def costs(self, counters: Mapping[str, int]) -> dict[str, int]:
        """RMPUPDATE and PSMASH are table updates, PSP commands firmware, PVALIDATE the
        guest's; clflush and WBINVD join the flushes."""
        found = super().costs(counters)
        get = counters.get
        found["hw_table_updates"] += get("rmpupdate", 0) + get("psmash", 0)
        found["firmware_commands"] += get("psp_commands", 0)
        found["guest_instructions"] += get("pvalidate", 0)
        found["tlb_flushes"] += get("clflush", 0) + get("wbinvd", 0)
        return found

    def cost_details(self, counters: Mapping[str, int]) -> dict[str, int]:
        """The SEV-SNP operations behind the categories."""
        names = {
            "RMPUPDATE": "rmpupdate",
            "PSMASH": "psmash",
            "PVALIDATE": "pvalidate",
            "PSP commands": "psp_commands",
        }
        return {label: counters.get(name, 0) for label, name in names.items()}
