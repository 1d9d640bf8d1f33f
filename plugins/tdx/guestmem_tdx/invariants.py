"""TDX invariants a VMM's tests can assert (:func:`check_tdx_host`, :func:`check_tdx_vm`)
or check after every event (:class:`TdxChecker`).

Of the TDX module alone (after every event):

- ``sept-pamt``: every S-EPT leaf maps a ``PT_REG`` page its TD owns, at that gfn, and
  every ``PT_REG`` page of a TD is mapped by exactly that leaf;
- ``sept-table``: every S-EPT page-table page is ``PT_EPT`` of its TD, and back;
- ``chldcnt``: a TD's child count is the number of pages it owns besides its TDR;
- ``kot``: a TD holds its HKID in the KOT until TEARDOWN;
- ``pamt-freed``: no page the module gives a TD is back in the host's page allocator,
  unless KVM leaked it (the kernel keeps such pages forever);
- ``private-host-mapped``: no page the module gives a TD is mapped into host userspace.

Of KVM and the module together (after every uAPI operation, when the mirror root and the
S-EPT must agree; not checked on a bugged VM, whose state KVM no longer vouches for):

- ``mirror-sept``: every private leaf of the mirror root is an S-EPT leaf at the same
  pfn, or, before FINALIZE, one counted in ``nr_premapped`` (and the count is exact);
  every S-EPT leaf is in the mirror root;
- ``hkid``: the KeyIDs in use are those of the TDs holding one, plus leaked ones;
- ``td-state``: ``TD_STATE_RUNNABLE`` iff the module's TD is ``OP_STATE_RUNNABLE``.

All checks walk stored ranges, never pages.
"""

from __future__ import annotations

from typing import Any

from guestmem.backend import HostView, TraceEvent, VmView, hookimpl, view
from guestmem.invariants import InvariantViolation
from guestmem_tdx.host import TdxHost
from guestmem_tdx.kvm import KvmTdx, TdState
from guestmem_tdx.module import Lifecycle, OpState, Td
from guestmem_tdx.sept import PamtType


def _fail(name: str, where: str, detail: str) -> InvariantViolation:
    return InvariantViolation(f"{name}{where}: {detail}")


def check_tdx_host(kvm: Any, after: str = "") -> None:
    """Check the TDX module of the host behind *kvm* (a ``Kvm`` or its view)."""
    host: HostView = view(kvm)
    state = host.arch
    if not isinstance(state, TdxHost):
        return
    where = f" after {after}" if after else ""
    module = state.module
    owned: dict[int, int] = {}
    for s, e, entry in module.pamt.items():
        td = module.tds.get(entry.owner)
        if td is None:
            raise _fail("pamt-owner", where, f"pfns [{s:#x}, {e:#x}) belong to a TD that is gone")
        if entry.pt is not PamtType.TDR:
            owned[td.tdr] = owned.get(td.tdr, 0) + e - s
        if entry.pt is PamtType.REG:
            _check_reg(td, s, e, entry.gfn_delta, where)
        for gs, ge in host.unallocated(s, e):
            if not _leaked(state, gs, ge):
                raise _fail(
                    "pamt-freed", where, f"pfns [{gs:#x}, {ge:#x}) are free but TD-owned ({entry.pt.value})"
                )
    for td in module.tds.values():
        _check_td(module.pamt, td, owned.get(td.tdr, 0), module.kot, where)
    for vm in host.vms():
        _check_host_mapped(state, vm, where)


def _check_reg(td: Td, start: int, end: int, gfn_delta: int | None, where: str) -> None:
    if gfn_delta is None:
        raise _fail("sept-pamt", where, f"PT_REG pfns [{start:#x}, {end:#x}) have no gpa")
    for s, _, leaf in td.runs(start + gfn_delta, end + gfn_delta):
        if leaf is None or leaf.delta != -gfn_delta:
            raise _fail("sept-pamt", where, f"PT_REG pfn {s - gfn_delta:#x} is not mapped at gfn {s:#x}")


def _check_td(pamt: Any, td: Td, owned: int, kot: dict[int, Any], where: str) -> None:
    for s, e, leaf in td.leaves.items():
        if not leaf.state.is_leaf:
            continue
        for ps, _, entry in _runs(pamt, s + leaf.delta, e + leaf.delta):
            if entry is None or entry.pt is not PamtType.REG or entry.owner != td.tdr:
                raise _fail(
                    "sept-pamt",
                    where,
                    f"S-EPT leaves at gfn {ps - leaf.delta:#x} map a page that is not the TD's PT_REG",
                )
            if entry.gfn_delta != -leaf.delta:
                raise _fail("sept-pamt", where, f"pfn {ps:#x} is mapped at two gpas")
    for level, table in td.tables.items():
        for s, e, (delta, _) in table.items():
            for ps, _, entry in _runs(pamt, s + delta, e + delta):
                if entry is None or entry.pt is not PamtType.EPT or entry.owner != td.tdr:
                    raise _fail("sept-table", where, f"level-{level} S-EPT pages from {ps:#x} are not PT_EPT")
    if td.chldcnt != owned:
        raise _fail("chldcnt", where, f"TD {td.tdr:#x} counts {td.chldcnt} child pages, the PAMT {owned}")
    if (td.hkid in kot and kot[td.hkid].td is td) == (td.lifecycle is Lifecycle.TEARDOWN):
        raise _fail("kot", where, f"TD {td.tdr:#x} in {td.lifecycle.value} and its HKID {td.hkid}")


def _runs(pamt: Any, start: int, end: int) -> Any:
    pos = start
    for s, e, entry in pamt.items(start, end):
        if s > pos:
            yield pos, s, None
        yield s, e, entry
        pos = e
    if pos < end:
        yield pos, end, None


def _check_host_mapped(state: TdxHost, vm: VmView, where: str) -> None:
    for gmem in vm.bound_gmem():
        for folio in gmem.host_mapped_folios():
            if next(state.module.pamt.items(folio.pfn, folio.pfn + folio.end - folio.start), None):
                raise _fail(
                    "private-host-mapped",
                    where,
                    f"TD pages of gmem [{folio.start:#x}, {folio.end:#x}) are host-mapped",
                )


def check_tdx_vm(vm: Any, after: str = "") -> None:
    """Check KVM's view of a TD against the module (*vm*: a ``Vm`` or its view)."""
    vm = view(vm)
    tdx = vm.arch
    if not isinstance(tdx, KvmTdx) or vm.bugged:
        return
    where = f" after {after}" if after else ""
    td = tdx.td
    keyids = tdx.host.keyids
    if tdx.hkid_assigned and tdx.hkid not in keyids.in_use:
        raise _fail("hkid", where, f"HKID {tdx.hkid} is assigned but free in the pool")
    if td is None or tdx.state is TdState.UNINITIALIZED:
        return
    if (tdx.state is TdState.RUNNABLE) != (td.op_state is OpState.RUNNABLE):
        raise _fail("td-state", where, f"KVM says {tdx.state.value}, the module {td.op_state.value}")
    premapped = 0
    for leaf in vm.leaves():
        if not leaf.private:
            continue
        delta = leaf.pfn - leaf.gfn
        for s, e, sept in td.runs(leaf.gfn, leaf.end_gfn):
            if sept is None and tdx.state is not TdState.RUNNABLE:
                premapped += e - s
            elif sept is None or sept.delta != delta:
                raise _fail("mirror-sept", where, f"private leaves at gfn {s:#x} are not in the S-EPT")
    if premapped != tdx.nr_premapped:
        raise _fail("mirror-sept", where, f"{premapped} premapped leaves, nr_premapped {tdx.nr_premapped}")
    for s, e, sept in td.leaves.items():
        for leaf in vm.leaves(s, e):
            if not leaf.private or leaf.pfn - leaf.gfn != sept.delta:
                raise _fail(
                    "mirror-sept", where, f"S-EPT leaves at gfn {leaf.gfn:#x} are not in the mirror root"
                )
        mapped = sum(leaf.npages for leaf in vm.leaves(s, e))
        if mapped != e - s and not _leaked(tdx.host, s + sept.delta, e + sept.delta):
            raise _fail("mirror-sept", where, f"S-EPT leaves in gfns [{s:#x}, {e:#x}) KVM lost track of")


def _leaked(host: TdxHost, start: int, end: int) -> bool:
    return next(host.leaked.gaps(start, end), None) is None


def check_tdx(kvm: Any, after: str = "") -> None:
    """Every TDX invariant of the host behind *kvm* and of its TDs."""
    host: HostView = view(kvm)
    check_tdx_host(host, after)
    for vm in host.vms():
        check_tdx_vm(vm, after)


class TdxChecker:
    """An observer: the module checks after every event, all checks after every operation."""

    def __init__(self) -> None:
        self.checked = 0

    @hookimpl
    def guestmem_trace(self, host: HostView, vm: VmView | None, event: TraceEvent) -> None:
        if event.kind == "ownership_update" or not isinstance(host.arch, TdxHost):
            return  # ownership updates come while the module is changing its tables
        check_tdx_host(host, event.kind)
        self.checked += 1

    @hookimpl
    def guestmem_operation_done(self, host: HostView, operation: str) -> None:
        if not isinstance(host.arch, TdxHost):
            return
        check_tdx(host, operation)
        self.checked += 1
