"""An observer checking Gunyah's isolation invariants while a scenario runs.

Register it like any plugin (next to :class:`guestmem.invariants.InvariantChecker`)::

    checker = GunyahChecker()
    guestmem.get_registry().add_plugin(checker, name="gunyah-isolation")

After every trace event of a ``gunyah`` host, and after every operation of the uAPI face
(or of the Gunyah face: RM RPCs, parcels), it checks, reading the hypervisor's and the
RM's tables directly and the core through its views (backends.md 4.2, 4.5):

* **G-1 stage-2 from owner**: every page a VM's stage-2 maps belongs (memdb) to the
  extent the mapping came from;
* **G-2 core mirrors stage-2**: every stage-2 leaf the core holds for a Gunyah VM is
  mapped by the hypervisor to the same page (the core never reaches what Gunyah took);
* **G-3 lent pages are the guest's**: a page of a guest private extent or of a lend parcel
  is out of the host's direct map (the first and last page of each run are read: the host
  view answers page by page) and in no host userspace mapping;
* **G-4 freed pages are the host's**: a page no longer allocated belongs to the HLOS and
  no stage-2 maps it;
* **G-5 the driver's records** (between operations): every ``mm`` entry of a running VM is
  what its stage-2 maps, from the right extent;
* **G-6 teardown** (between operations): a destroyed VM left nothing: no VMID, no extent,
  no parcel.

A violation raises :class:`GunyahViolation` (an ``InvariantViolation``), which the core
reports when the operation that broke the invariant finishes.  ``checked`` counts checks.
"""

from __future__ import annotations

from collections import Counter

from guestmem.backend import HostView, OwnershipEvent, TraceEvent, VmView, hookimpl
from guestmem.invariants import InvariantViolation
from guestmem_gunyah.driver import GunyahHost, GunyahVm
from guestmem_gunyah.hyp import HLOS_MEMORY, Extent, ExtentKind


class GunyahViolation(InvariantViolation):
    """A Gunyah isolation invariant was broken."""


class GunyahChecker:
    """Observer: G-1..G-4 after every event, G-5 and G-6 after every operation."""

    def __init__(self) -> None:
        self.checked: Counter[str] = Counter()
        self.violations: list[str] = []

    def _fail(self, message: str) -> None:
        self.violations.append(message)
        raise GunyahViolation(message)

    # --- hooks -------------------------------------------------------------------------------
    @hookimpl
    def guestmem_trace(self, host: HostView, vm: VmView | None, event: TraceEvent) -> None:
        """After each event of a gunyah host, but not in the middle of a table change."""
        if isinstance(host.arch, GunyahHost) and event.kind != "ownership_update":
            self.check(host.arch, f"after {event.kind}")

    @hookimpl
    def guestmem_ownership_update(self, host: HostView, vm: VmView | None, event: OwnershipEvent) -> None:
        """Counts the memextent changes seen."""
        if isinstance(host.arch, GunyahHost):
            self.checked["ownership_updates"] += 1

    @hookimpl
    def guestmem_operation_done(self, host: HostView, operation: str) -> None:
        """Everything, the driver's records included, once an operation finished."""
        if isinstance(host.arch, GunyahHost):
            self.check(host.arch, f"after {operation}", between_operations=True)

    # --- the checks -------------------------------------------------------------------------------
    def check(self, machine: GunyahHost, where: str, *, between_operations: bool = False) -> None:
        """Run the checks on *machine* (raises :class:`GunyahViolation`)."""
        self._stage2_from_owner(machine, where)
        self._core_mirrors_stage2(machine, where)
        self._lent_pages(machine, where)
        self._freed_pages(machine, where)
        if between_operations:
            for state in list(machine.vms.values()):
                if state.view.destroyed:
                    self._teardown(machine, state, where)
                else:
                    self._driver_records(machine, state, where)

    def _stage2_from_owner(self, machine: GunyahHost, where: str) -> None:
        hyp = machine.hyp
        for vmid, stage2 in hyp.addrspaces.items():
            for s, e, entry in stage2.items():
                self.checked["G-1"] += 1
                for ps, pe, owner in hyp.owner_runs(s + entry.delta, e - s):
                    if owner != entry.extent:
                        self._fail(
                            f"G-1 {where}: VM {vmid:#x} maps pfns [{ps:#x}, {pe:#x}) from "
                            f"{entry.extent.kind.value}, but {owner.kind.value} owns them"
                        )

    def _core_mirrors_stage2(self, machine: GunyahHost, where: str) -> None:
        for state in machine.vms.values():
            if state.view.destroyed:
                continue
            stage2 = machine.hyp.stage2(state.vmid)
            for leaf in state.view.leaves():
                self.checked["G-2"] += 1
                delta = leaf.pfn - leaf.gfn
                mapped = sum(
                    e - s for s, e, entry in stage2.items(leaf.gfn, leaf.end_gfn) if entry.delta == delta
                )
                if mapped != leaf.npages:
                    self._fail(
                        f"G-2 {where}: the core maps gfns [{leaf.gfn:#x}, {leaf.end_gfn:#x}) of VM "
                        f"{state.vmid:#x}, the hypervisor's stage-2 does not map them to those pages"
                    )

    def _lent_pages(self, machine: GunyahHost, where: str) -> None:
        host, hyp = machine.host, machine.hyp
        lent = [(s, e) for s, e, owner in hyp.memdb.items() if _lent(owner)]
        for s, e in lent:
            self.checked["G-3"] += 1
            # The host view answers page by page: the ends of each run stand for it (the
            # driver changes the direct map run by run).
            for pfn in (s, e - 1):
                if host.direct_map_valid(pfn):
                    self._fail(f"G-3 {where}: lent pfn {pfn:#x} is in the host's direct map")
        if not lent:
            return
        for state in machine.vms.values():
            if state.view.destroyed:
                continue
            for gmem in state.view.bound_gmem():
                for folio in gmem.host_mapped_folios():
                    for ps, pe, owner in hyp.owner_runs(folio.pfn, folio.end - folio.start):
                        if _lent(owner) and any(hyp.hlos_borrowed.gaps(ps, pe)):
                            self._fail(f"G-3 {where}: the host maps lent pfns [{ps:#x}, {pe:#x})")

    def _freed_pages(self, machine: GunyahHost, where: str) -> None:
        host, hyp = machine.host, machine.hyp
        for s, e, owner in hyp.memdb.items():
            self.checked["G-4"] += 1
            for fs, fe in host.unallocated(s, e):
                self._fail(f"G-4 {where}: freed pfns [{fs:#x}, {fe:#x}) still belong to {owner.kind.value}")
        for vmid, stage2 in hyp.addrspaces.items():
            for s, e, entry in stage2.items():
                for fs, _ in host.unallocated(s + entry.delta, e + entry.delta):
                    self._fail(f"G-4 {where}: VM {vmid:#x} maps freed pfn {fs:#x}")

    def _driver_records(self, machine: GunyahHost, state: GunyahVm, where: str) -> None:
        stage2 = machine.hyp.stage2(state.vmid)
        for s, e, provided in state.mm.items():
            self.checked["G-5"] += 1
            kind = ExtentKind.GUEST_SHARED if provided.share else ExtentKind.GUEST_PRIVATE
            mapped = sum(
                ee - ss
                for ss, ee, entry in stage2.items(s, e)
                if entry.delta == provided.delta and entry.extent.kind == kind
            )
            if mapped != e - s:
                self._fail(
                    f"G-5 {where}: VM {state.vmid:#x}'s driver provided gfns [{s:#x}, {e:#x}) "
                    f"that its stage-2 does not map from the {kind.value} extent"
                )

    def _teardown(self, machine: GunyahHost, state: GunyahVm, where: str) -> None:
        self.checked["G-6"] += 1
        vmid = state.vmid
        if state.mm:
            self._fail(f"G-6 {where}: destroyed VM {vmid:#x} still has provided pages")
        if vmid in machine.rm.vms or vmid in machine.hyp.addrspaces:
            self._fail(f"G-6 {where}: destroyed VM {vmid:#x} still has its VMID or addrspace")
        for _, _, owner in machine.hyp.memdb.items():
            if owner != HLOS_MEMORY and owner.vmid == vmid:
                self._fail(f"G-6 {where}: destroyed VM {vmid:#x} still owns memory ({owner.kind.value})")
        for parcel in machine.rm.parcels.values():
            if any(info.vmid == vmid for info in parcel.acl):
                self._fail(f"G-6 {where}: parcel {parcel.handle:#x} still names destroyed VM {vmid:#x}")


def _lent(owner: Extent) -> bool:
    """A page the host may not reach: a guest's private extent's, a lend or donate parcel's."""
    return owner.kind == ExtentKind.GUEST_PRIVATE or (owner.kind == ExtentKind.PARCEL and not owner.shared)
