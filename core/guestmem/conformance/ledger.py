"""The leak check: who holds each page, from the backend's own ownership events.

:class:`OwnershipLedger` is an observer plugin.  Every ``guestmem_ownership_update`` a
backend emits (its RMP, S-EPT, stage-2 or granule table changing) is recorded in the
core's shared terms, :class:`~guestmem.backend.Owner`, per host and table.  Once every
object of a test is closed, :func:`check_released` holds the backend to what the kernel
promises when guest memory goes away (``kvm_gmem_free_folio``, ``kvm_destroy_vm``):

- ``ownership-released``: no table still gives a page to a guest, the hypervisor or both
  sides (``Owner.GUEST``, ``Owner.HYPERVISOR``, ``Owner.SHARED``): the host owns every
  page again and the tables are empty;
- ``pages-freed``: every host page allocated since the baseline (guest_memfd folios,
  control pages, page tables) went back to the allocator.

A backend that never reports ownership passes the first check trivially; the second
looks at the host's memory itself (:meth:`~guestmem.backend.HostView.unallocated`).

While a test runs, the ledger also cross-checks the tables against the model after every
uAPI operation (:func:`check_ownership`), so a backend whose table and behaviour disagree
fails at the operation that made them disagree.

Events are keyed by ``(table, pfn)``: a table keyed by gfn (see
:attr:`~guestmem.backend.OwnershipEvent.pfn`) is checked the same way, and its guest
frame numbers never meet host pfns, which the model hands out above 4 GiB.
"""

from __future__ import annotations

from typing import Any

from guestmem.backend import HostView, Owner, OwnershipEvent, RangeMap, VmView, hookimpl, view
from guestmem.invariants import InvariantViolation

#: The highest pfn the checks look at (52-bit physical addresses).
PFN_LIMIT = 1 << 40


class LeakError(AssertionError):
    """Pages the backend did not give back (names the check and the pages)."""


class OwnershipLedger:
    """Observer: the last :class:`Owner` each table gave each page, per host.

    ``events`` counts what it recorded.  Register it with ``Registry.add_plugin`` (the kit
    does, for every test).
    """

    def __init__(self, *, cross_check: bool = True) -> None:
        #: id(host view) -> table -> pfn runs -> last owner (HOST included)
        self._tables: dict[int, dict[str, RangeMap[Owner]]] = {}
        #: The hosts seen, kept alive so that no later host reuses one's id.
        self._hosts: list[HostView] = []
        self.events = 0
        self.cross_check = cross_check
        #: Cross-checks run (one per VM per operation of a host with tables).
        self.checked = 0

    @hookimpl
    def guestmem_ownership_update(self, host: HostView, vm: VmView | None, event: OwnershipEvent) -> None:
        if id(host) not in self._tables:
            self._hosts.append(host)
        table = self._tables.setdefault(id(host), {}).setdefault(event.table, RangeMap())
        table.set(event.pfn, event.pfn + event.npages, event.new_owner)
        self.events += 1

    @hookimpl
    def guestmem_operation_done(self, host: HostView, operation: str) -> None:
        if not self.cross_check or not self.tables(host):
            return
        for vm in host.vms():
            check_ownership(vm, self, operation)
            self.checked += 1

    def tables(self, host: Any) -> dict[str, RangeMap[Owner]]:
        """The tables *host* (a ``Kvm`` or its view) reported, by name."""
        return self._tables.get(id(view(host)), {})

    def owner(self, host: Any, pfn: int) -> dict[str, Owner]:
        """The last owner every table of *host* gave *pfn*, by table (tables that never
        mentioned it are left out)."""
        found = {}
        for name, table in self.tables(host).items():
            owner = table.get(pfn)
            if owner is not None:
                found[name] = owner
        return found

    def held(self, host: Any) -> list[tuple[str, int, int, Owner]]:
        """``(table, start, end, owner)`` of every run some table does not give the host."""
        return [
            (name, s, e, owner)
            for name, table in sorted(self.tables(host).items())
            for s, e, owner in table.items()
            if owner is not Owner.HOST
        ]


def check_ownership(vm: Any, ledger: OwnershipLedger, after: str = "") -> None:
    """Cross-check the backend's tables (as *ledger* recorded them) against *vm*'s mappings;
    raise :class:`~guestmem.invariants.InvariantViolation` naming the first disagreement:

    - ``private-leaf-owned``: on a VM whose attributes decide privateness, no private
      stage-2 leaf maps a page a table gives the host, and no shared leaf one a table gives
      the guest privately;
    - ``host-map-owned``: no host userspace mapping of guest_memfd holds a page a table
      gives a guest privately (the host never maps private memory).
    """
    vm = view(vm)
    where = f" after {after}" if after else ""
    tables = ledger.tables(vm.host)
    if vm.has_private_mem:
        for leaf in vm.leaves():
            wrong = Owner.HOST if leaf.private else Owner.GUEST
            _refuse(
                tables,
                leaf.pfn,
                leaf.pfn + leaf.npages,
                wrong,
                f"private-leaf-owned{where}: "
                f"{'private' if leaf.private else 'shared'} leaf at gfn {leaf.gfn:#x}",
            )
    for gmem in vm.bound_gmem():
        for folio in gmem.host_mapped_folios():
            _refuse(
                tables,
                folio.pfn,
                folio.pfn + folio.end - folio.start,
                Owner.GUEST,
                f"host-map-owned{where}: host maps gmem pages [{folio.start:#x}, {folio.end:#x})",
            )


def _refuse(tables: dict[str, RangeMap[Owner]], start: int, end: int, wrong: Owner, what: str) -> None:
    for name, table in tables.items():
        for s, e, owner in table.items(start, end):
            if owner is wrong and not (wrong is Owner.HOST and _claimed(tables, name, s, e)):
                raise InvariantViolation(f"{what}, but {name} gives pfns [{s:#x}, {e:#x}) to {wrong.value}")


def _claimed(tables: dict[str, RangeMap[Owner]], but: str, start: int, end: int) -> bool:
    """Another table than *but* gives every page of ``[start, end)`` to someone else than
    the host: a page one table released (a TDX S-EPT page-table page reclaimed) and another
    now holds (the same pfn given to a TD as guest memory) is not the host's."""
    claims = RangeMap[bool]()
    for name, table in tables.items():
        if name != but:
            for s, e, owner in table.items(start, end):
                if owner is not Owner.HOST:
                    claims.set(s, e, True)
    pos = start
    for s, e, _ in claims.items(start, end):
        if s > pos:
            return False
        pos = e
    return pos >= end


def has_views(obj: Any) -> bool:
    """*obj* is an object of a model backend (the real kernel's have no views)."""
    try:
        view(obj)
    except TypeError:
        return False
    return True


def allocated(host: Any) -> list[tuple[int, int]]:
    """The runs ``[s, e)`` of allocated host pages of *host* (a ``Kvm`` or its view); empty
    for the real kernel, whose memory the kit cannot see."""
    if not has_views(host):
        return []
    runs = []
    pos = 0
    for s, e in view(host).unallocated(0, PFN_LIMIT):
        if s > pos:
            runs.append((pos, s))
        pos = e
    if pos < PFN_LIMIT:
        runs.append((pos, PFN_LIMIT))
    return runs


def _subtract(runs: list[tuple[int, int]], minus: list[tuple[int, int]]) -> list[tuple[int, int]]:
    holes = RangeMap[bool]()
    for s, e in runs:
        holes.set(s, e, True)
    for s, e in minus:
        holes.erase(s, e)
    return [(s, e) for s, e, _ in holes.items()]


def check_released(host: Any, ledger: OwnershipLedger, baseline: list[tuple[int, int]]) -> None:
    """Raise :class:`LeakError` unless every page came back: no table entry gives a page
    to anyone but the host, and no host page allocated since *baseline* (what
    :func:`allocated` said before the test) is still allocated.

    Call it once every VM, guest_memfd, vCPU and mapping of *host* is closed.  The real
    kernel's host (no views) passes: its memory is not the kit's to see.
    """
    if not has_views(host):
        return
    held = ledger.held(host)
    if held:
        shown = ", ".join(f"{t} [{s:#x}, {e:#x}) {o.value}" for t, s, e, o in held[:4])
        raise LeakError(f"ownership-released: after closing everything the tables still hold {shown}")
    leaked = _subtract(allocated(host), baseline)
    if leaked:
        pages = sum(e - s for s, e in leaked)
        shown = ", ".join(f"[{s:#x}, {e:#x})" for s, e in leaked[:4])
        raise LeakError(
            f"pages-freed: {pages} host page(s) allocated during the test were never freed: {shown}"
        )
