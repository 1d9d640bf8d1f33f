"""The portable intents on an Intel TDX host (``Backend(intents=TdxIntents())``).

What a VMM (QEMU) and a Linux TD do for each intent (backends.md section 1):

* launch: a ``"private"`` VM is ``KVM_X86_TDX_VM``.  Right after ``KVM_CREATE_VM`` the
  VMM enables ``KVM_CAP_EXIT_HYPERCALL`` for ``KVM_HC_MAP_GPA_RANGE`` (MapGPA reaches
  userspace) and issues ``KVM_TDX_INIT_VM`` (QEMU's ``tdx_pre_create_vcpu``: the HKID,
  TDR/TDCS, TD_PARAMS) before any vCPU exists; guest RAM is guest_memfd plus shared
  anonymous memory, all of it private; once the vCPUs exist each gets
  ``KVM_TDX_INIT_VCPU``; ``launch.populate`` is ``KVM_TDX_INIT_MEM_REGION`` (TDH.MEM.PAGE.ADD
  copies the image in, ``KVM_TDX_MEASURE_MEMORY_REGION`` adds 16 TDH.MR.EXTEND per page);
  the launch ends with ``KVM_TDX_FINALIZE_VM`` (TDH.MR.FINALIZE freezes MRTD), QEMU's
  ``tdx_finalize_vm``;
* ``guest.convert`` is Linux's ``tdx_enc_status_changed``: TDG.VP.VMCALL<MapGPA> of the
  range with the shared bit set (shared) or clear (private), in 2 MiB
  ``KVM_EXIT_HYPERCALL`` exits the VMM loop answers as QEMU's ``kvm_convert_memory`` does
  (attributes, then ``PUNCH_HOLE`` of the private side or ``MADV_REMOVE`` of the shared
  one), resumed from R11 on ``TDVMCALL_STATUS_RETRY`` (``tdx_map_gpa``); memory made
  private is then accepted.  ``coalesce = false`` is one MapGPA per 4 KiB page;
* ``guest.accept`` is TDG.MEM.PAGE.ACCEPT: with 4 KiB pages one ACCEPT per page; with
  2 MiB pages Linux's ``tdx_accept_memory``, which tries 1 GiB and 2 MiB ACCEPTs first (on
  Linux 6.18 KVM maps private memory at 4 KiB only: each is a size mismatch, and 4 KiB
  ACCEPTs follow).  An ACCEPT of a page not yet AUGed exits to KVM, which maps it
  (TDH.MEM.SEPT.ADD, TDH.MEM.PAGE.AUG).  TDX has no requests to batch: ``entries`` and
  ``coalesce`` change nothing;
* a private load or store of a page the TD has not accepted is an EPT violation: with
  ``SEPT_VE_DISABLE`` (Linux TDs) KVM kills the TD (``EIO``, ``TDX-1.2``);
  ``guest.touch`` stores to each page, so it stops there.  A TD launched with
  ``accept_on_fault`` (the conformance kit's) has no ``SEPT_VE_DISABLE``: the module
  injects #VE instead, and the TD accepts the page and runs the access again.

A TD's private pages are never host-mappable and a conversion never keeps contents
(ACCEPT zeroes a page; a page made shared is punched out of guest_memfd).  The host's
ordinary VM types (``KVM_X86_DEFAULT_VM``, ``KVM_X86_SW_PROTECTED_VM``) are the core's:
:class:`guestmem.backend.X86Intents` translates them, as on ``sw``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from guestmem import uapi
from guestmem.api import Vcpu
from guestmem.backend import GuestVm, VmView, X86Intents, view
from guestmem.errors import HypercallExit
from guestmem_tdx import abi
from guestmem_tdx import status as st
from guestmem_tdx.guest import TdxGuest
from guestmem_tdx.kvm import PendingAccessVe, as_tdx
from guestmem_tdx.sept import SeptState
from guestmem_tdx.vmm import Tdx

PAGE_SHIFT = uapi.PAGE_SHIFT
PAGE_SIZE = uapi.PAGE_SIZE
HUGE = 1 << 21

#: SEAMCALLs that change the Secure-EPT or the PAMT (the TDX module's ownership tables).
TABLE_SEAMCALLS = (
    "TDH.MEM.SEPT.ADD",
    "TDH.MEM.SEPT.REMOVE",
    "TDH.MEM.PAGE.ADD",
    "TDH.MEM.PAGE.AUG",
    "TDH.MEM.PAGE.DEMOTE",
    "TDH.MEM.PAGE.PROMOTE",
    "TDH.MEM.RANGE.BLOCK",
    "TDH.MEM.RANGE.UNBLOCK",
    "TDH.MEM.PAGE.REMOVE",
    "TDH.PHYMEM.PAGE.RECLAIM",
)
#: SEAMCALLs that flush: TLB tracking epochs and cache write-backs.
FLUSH_SEAMCALLS = ("TDH.MEM.TRACK", "TDH.PHYMEM.PAGE.WBINVD", "TDH.PHYMEM.CACHE.WB")


class AcceptFailed(Exception):
    """TDG.MEM.PAGE.ACCEPT failed: a Linux TD panics ("Failed to accept memory")."""

    def __init__(self, gpa: int, status: int | None) -> None:
        shown = "" if status is None else f": {st.status_name(status)}"
        super().__init__(f"TDG.MEM.PAGE.ACCEPT from gpa {gpa:#x} failed{shown}")
        self.gpa = gpa
        self.status = status


class MapGpaFailed(Exception):
    """TDG.VP.VMCALL<MapGPA> did not convert the range: Linux's ``set_memory_*`` fails."""

    def __init__(self, gpa: int, size: int, r11: int) -> None:
        super().__init__(f"MapGPA of [{gpa:#x}, +{size:#x}) failed (R11 = {r11:#x})")
        self.gpa = gpa
        self.r11 = r11


class TdxIntents(X86Intents):
    """TDX's translation of the portable intents (see the module docstring)."""

    #: ``"private"`` is ``KVM_X86_TDX_VM``; ``"default"`` a VM without private memory.
    private_vm_type = uapi.KVM_X86_TDX_VM

    @staticmethod
    def _td(guest: GuestVm) -> bool:
        return guest.vm_type.type == uapi.KVM_X86_TDX_VM

    @staticmethod
    def tdx(guest: GuestVm) -> Tdx:
        """The VM's ``KVM_TDX_*`` commands."""
        return Tdx(guest.vm)

    @staticmethod
    def cpu(guest: GuestVm, vcpu: Vcpu) -> TdxGuest:
        """The TD side of *vcpu*."""
        return TdxGuest(vcpu)

    # --- the launch --------------------------------------------------------------------------------
    def vm_init(self, guest: GuestVm) -> None:
        """``KVM_CAP_EXIT_HYPERCALL`` (the base), then ``KVM_TDX_INIT_VM`` before any vCPU:
        ``KVM_CREATE_VCPU`` of a TD is EIO until then."""
        super().vm_init(guest)
        if self._td(guest):
            # A TD that accepts on #VE (accept_on_fault) must take #VE rather than die: no
            # SEPT_VE_DISABLE, which a Linux TD runs without only as a debug TD
            # (disable_sept_ve panics any other).
            attributes = 0 if guest.accept_on_fault else abi.TDX_TD_ATTR_SEPT_VE_DISABLE
            self.tdx(guest).init_vm(attributes=attributes)

    def launch_start(self, guest: GuestVm) -> str:
        """``KVM_TDX_INIT_VCPU`` of every vCPU (TDVPR/TDCX pages, TDH.VP.CREATE/ADDCX/INIT)."""
        if not self._td(guest):
            return ""
        tdx = self.tdx(guest)
        for vcpu in guest.vcpus:
            tdx.init_vcpu(vcpu)
        return f"TD initialised (HKID {tdx.hkid}, {len(guest.vcpus)} vCPU(s))"

    def populate(self, guest: GuestVm, gpa: int, data: bytes, measure: bool | None) -> str:
        """``KVM_TDX_INIT_MEM_REGION`` of *data* (padded to pages): TDH.MEM.PAGE.ADD copies
        each page in (MRTD records its gpa) and, unless *measure* is False, 16 TDH.MR.EXTEND
        hash its content."""
        if not self._td(guest):
            return super().populate(guest, gpa, data, measure)
        measured = measure is not False
        region = self.tdx(guest).init_mem_region(guest.vcpu(), gpa, data, measure=measured)
        npages = (region.gpa - gpa) >> PAGE_SHIFT
        kind = "measured (MR.EXTEND)" if measured else "unmeasured (MRTD has the gpa only)"
        return f"PAGE.ADD of {npages} page(s), {kind}"

    def launch_finish(self, guest: GuestVm) -> str:
        """``KVM_TDX_FINALIZE_VM``: MRTD frozen, the TD runnable."""
        if not self._td(guest):
            return ""
        mrtd = self.tdx(guest).finalize()
        return f"MRTD {mrtd.hex()[:16]}..."

    # --- the guest -----------------------------------------------------------------------------------
    def _first_unaccepted(self, guest: GuestVm, gfn: int, end: int) -> int | None:
        """The first gfn of ``[gfn, end)`` the TD reaches privately and has not accepted
        (its S-EPT leaf is not MAPPED), or None."""
        with view(guest.vm).host.operation():
            return self._unaccepted_run(guest, gfn, end)

    def _unaccepted_run(self, guest: GuestVm, gfn: int, end: int) -> int | None:
        vm: VmView = view(guest.vm)
        td = as_tdx(guest.vm).td
        for s, e, attributes in vm.attribute_runs(gfn, end):
            if not attributes & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE:
                continue
            if td is None:
                return s
            for rs, _, leaf in td.runs(s, e):
                if leaf is None or leaf.state is not SeptState.MAPPED:
                    return rs
        return None

    def _accept(self, guest: GuestVm, gpa: int, size: int, page_size: int) -> None:
        """ACCEPT ``[gpa, gpa + size)`` in *page_size* units (see the module docstring);
        an exit the VMM answers re-enters the TD at the ACCEPT that exited."""
        vcpu = guest.vcpu()
        cpu = self.cpu(guest, vcpu)
        end = gpa + size
        at = [gpa]

        def accept() -> int | None:
            start = at[0]
            try:
                if page_size == HUGE:
                    return None if cpu.accept_memory(start, end) else -1
                return int(cpu.accept_range(start, end - start))
            except BaseException:
                at[0] = cpu.position
                raise

        status = guest.run(accept, vcpu)
        if status:
            raise AcceptFailed(cpu.position, None if status == -1 else status)

    def accept(
        self, guest: GuestVm, gpa: int, size: int, *, page_size: int, coalesce: bool, entries: int
    ) -> str:
        """TDG.MEM.PAGE.ACCEPT of the range (``tdx_accept_memory`` for 2 MiB units)."""
        if not self._td(guest):
            return super().accept(guest, gpa, size, page_size=page_size, coalesce=coalesce, entries=entries)
        self._accept(guest, gpa, size, page_size)
        how = "tdx_accept_memory (1G, 2M, then 4K ACCEPTs)" if page_size == HUGE else "4K ACCEPTs"
        return f"{size >> PAGE_SHIFT} page(s) accepted by {how}"

    def _map_gpa(self, guest: GuestVm, gpa: int, size: int, private: bool) -> None:
        """``tdx_map_gpa`` of one range, each TDG.VP.VMCALL run by the VMM loop."""
        vcpu = guest.vcpu()
        cpu = self.cpu(guest, vcpu)
        run: Callable[[Callable[[], int]], int] = partial(guest.run, vcpu=vcpu)
        if not cpu.map_gpa_range(gpa, gpa + size, private=private, run=run):
            raise MapGpaFailed(gpa, size, cpu.r11)

    def convert(
        self, guest: GuestVm, gpa: int, size: int, *, private: bool, page_size: int, coalesce: bool
    ) -> str:
        """MapGPA (the VMM converts and discards on the exits), then ACCEPT if private."""
        if not self._td(guest):
            return super().convert(guest, gpa, size, private=private, page_size=page_size, coalesce=coalesce)
        step = size if coalesce else PAGE_SIZE
        for start in range(gpa, gpa + size, step):
            self._map_gpa(guest, start, step, private)
        calls = size // step
        if not private:
            return f"{calls} MapGPA call(s) to shared"
        self._accept(guest, gpa, size, page_size)
        return f"{calls} MapGPA call(s) to private, {size >> PAGE_SHIFT} page(s) accepted"

    def unaccepted(self, guest: GuestVm, exc: BaseException) -> int | None:
        """The gpa of the #VE the TDX module injected for a PENDING page (a TD without
        ``SEPT_VE_DISABLE``: :class:`~guestmem_tdx.kvm.PendingAccessVe`)."""
        return exc.gpa if isinstance(exc, PendingAccessVe) else None

    def touch(self, guest: GuestVm, gpa: int, size: int) -> int:
        """The TD's first stores: accepted memory faults in as runs; the first private page
        it has not accepted is a store the TD does not survive (``tdx_handle_ept_violation``)."""
        if not self._td(guest):
            return super().touch(guest, gpa, size)
        gfn, end = gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT
        vcpu = guest.vcpu()
        while gfn < end:
            bad = self._first_unaccepted(guest, gfn, end)
            stop = end if bad is None else bad
            if stop > gfn:
                super().touch(guest, gfn << PAGE_SHIFT, (stop - gfn) << PAGE_SHIFT)
            if bad is None:
                break
            guest.run(partial(vcpu.access, bad << PAGE_SHIFT, data=b"\x00", private=True), vcpu)
            gfn = bad + 1
        return end - (gpa >> PAGE_SHIFT)

    def resume(self, guest: GuestVm, vcpu: Vcpu, exit: HypercallExit, ret: int) -> Any:  # noqa: A002
        """Re-enter the TD with ``run->hypercall.ret = ret`` (``tdx_complete_vmcall_map_gpa``):
        the next MapGPA chunk's exit, or the R10 its TDG.VP.VMCALL returns."""
        if not self._td(guest):
            return super().resume(guest, vcpu, exit, ret)
        return self.cpu(guest, vcpu).resume(ret)

    # --- capabilities and costs ----------------------------------------------------------------------
    def capabilities(self, guest: GuestVm) -> frozenset[str]:
        """A TD converts, accepts, is populated and measured; never in place."""
        found = super().capabilities(guest)
        if self._td(guest):
            found |= {"conversion", "acceptance", "populate", "launch_measurement"}
        return found

    def costs(self, counters: Mapping[str, int]) -> dict[str, int]:
        """S-EPT and PAMT SEAMCALLs are table updates, the others (TD and vCPU management,
        MR.EXTEND, key and cache management) firmware commands; TRACK, WBINVD, CACHE.WB and
        the vCPU kicks flushes; ACCEPT the guest's instruction; the pages KVM clears
        (MOVDIR64B) and the TD zeroes at ACCEPT are zeroed bytes."""
        found = super().costs(counters)
        get = counters.get
        table = sum(get(f"seamcall.{leaf}", 0) for leaf in TABLE_SEAMCALLS)
        flushes = sum(get(f"seamcall.{leaf}", 0) for leaf in FLUSH_SEAMCALLS)
        found["hw_table_updates"] += table
        found["firmware_commands"] += get("seamcalls", 0) - table - flushes
        found["guest_instructions"] += get("tdcall.TDG.MEM.PAGE.ACCEPT", 0)
        found["tlb_flushes"] += flushes + get("tdx.vcpu_kicks", 0)
        found["zeroed_bytes"] += get("tdx.cleared_bytes", 0) + get("tdx.accept_zeroed_bytes", 0)
        return found

    def cost_details(self, counters: Mapping[str, int]) -> dict[str, int]:
        """The TDX operations behind the categories."""
        names = {
            "SEAMCALLs": "seamcalls",
            "TDH.MEM.PAGE.AUG": "seamcall.TDH.MEM.PAGE.AUG",
            "TDH.MEM.PAGE.ADD": "seamcall.TDH.MEM.PAGE.ADD",
            "TDH.MR.EXTEND": "seamcall.TDH.MR.EXTEND",
            "TDH.MEM.PAGE.REMOVE": "seamcall.TDH.MEM.PAGE.REMOVE",
            "TDG.MEM.PAGE.ACCEPT": "tdcall.TDG.MEM.PAGE.ACCEPT",
            "EPT-violation exits": "ept_violation_exits",
        }
        return {label: counters.get(name, 0) for label, name in names.items()}
