"""The Gunyah hypervisor's memory objects: the memory database, memextents, addrspaces.

What the hypervisor keeps for memory (``quic/gunyah-hypervisor``, 12/2023):

* the **memory database** (``memdb``): which object owns each physical page.  Pages the
  host (HLOS) was given at boot belong to its memory; a **memextent** owns the pages
  donated into it (``memextent_donate``: ``hyp/mem/memextent/src/hypercalls.c``
  ``hypercall_memextent_donate``; ``memextent_sparse.c`` ``donate_memextents_common``
  moves ownership with ``memdb_update`` and fails with ``ERROR_MEMDB_NOT_OWNER`` when a
  page is not the donor's);
* each VM's **addrspace** (its stage-2): a page is mapped into it from a memextent that
  owns the page (``addrspace_map`` of a sparse extent maps only the pages the extent owns,
  ``memextent_map_partial_sparse``).  A donation moves the donor extent's mappings away
  with the pages (``do_mapping_transfer``).

The Linux driver reaches these through capabilities the RM hands it
(``VM_GET_HYP_RESOURCES``): one addrspace and four extents per VM, "host private" and
"host shared" (the HLOS memory it donates from) and "guest private" and "guest shared"
(``vm_mgr.c``: ``GUNYAH_VM_MEM_EXTENT_*_LABEL``).  The donate types Linux uses are the
driver's ``TO_PROTECTED`` / ``FROM_PROTECTED`` (host private <-> guest private) and
``TO_SIBLING`` (host shared <-> guest shared); the public 12/2023 hypervisor names only
to_child/to_parent/to_sibling (backends.md 4.2).

The HLOS's own stage-2 is not kept page by page: the HLOS maps its own memory, memory in a
shared extent or share parcel, and parcels it accepted (:meth:`Hypervisor.host_accessible`).
A page it cannot reach is one a guest or a lend parcel owns.

This module is pure (no core model): pages are pfns, addresses gfns, tables
:class:`guestmem.backend.RangeMap`.  Every ownership change reaches ``listener``; costs
reach ``count`` (hypercalls by name; a run stands for ``calls`` hypercalls, as the driver
issues one per folio).
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from guestmem.backend import RangeMap
from guestmem.errors import KvmError
from guestmem_gunyah import abi
from guestmem_gunyah.abi import Access, DonateType, HypError

#: Ownership table name in ``OwnershipEvent``s (the memdb, by pfn).
MEMEXTENT_TABLE = "gunyah.memextent"
#: Rule tag of a refused hypercall.
RULE = "Gunyah-4.2"


class HypCallError(KvmError):
    """A hypercall failed: ``error`` is the hypervisor's code, ``errno`` Linux's
    ``gunyah_error_remap`` of it."""

    def __init__(self, error: HypError, call: str, why: str) -> None:
        self.error = error
        self.call = call
        super().__init__(abi.gunyah_error_remap(error), RULE, f"{call}: {error.name}: {why}")


class ExtentKind(enum.Enum):
    """Who a memdb entry gives a page to."""

    #: The HLOS's own memory (the parent of every host extent).
    HLOS = "hlos"
    #: A VM's "guest private" extent (lent, demand paged).
    GUEST_PRIVATE = "guest_private"
    #: A VM's "guest shared" extent (shared, demand paged).
    GUEST_SHARED = "guest_shared"
    #: A memparcel's extent (``memparcel_construct`` -> ``vm_memory_create_extent``).
    PARCEL = "parcel"


@attrs.frozen
class Extent:
    """A memdb owner: an extent of a VM, a parcel's extent, or the HLOS's memory."""

    kind: ExtentKind
    #: The VM the extent serves (the parcel's owner for a parcel).
    vmid: int = abi.VMID_HLOS
    #: The parcel handle (parcels only).
    handle: int = 0
    #: A parcel whose owner keeps access (``TRANS_TYPE_SHARE``).
    shared: bool = False


#: The owner of every page no extent holds.
HLOS_MEMORY = Extent(ExtentKind.HLOS)


class CapKind(enum.Enum):
    """The kinds of capability the model's cspace holds."""

    ADDRSPACE = "addrspace"
    HOST_PRIVATE = "host_private"
    HOST_SHARED = "host_shared"
    GUEST_PRIVATE = "guest_private"
    GUEST_SHARED = "guest_shared"
    PARCEL = "parcel"


@attrs.frozen
class Cap:
    """An object in the cspace: an addrspace, or an extent (of a VM or a parcel)."""

    kind: CapKind
    vmid: int
    handle: int = 0

    @property
    def extent(self) -> Extent:
        """The memdb owner this extent capability stands for."""
        if self.kind in (CapKind.HOST_PRIVATE, CapKind.HOST_SHARED):
            return HLOS_MEMORY
        if self.kind == CapKind.GUEST_PRIVATE:
            return Extent(ExtentKind.GUEST_PRIVATE, self.vmid)
        if self.kind == CapKind.GUEST_SHARED:
            return Extent(ExtentKind.GUEST_SHARED, self.vmid)
        raise ValueError(f"{self.kind} is no VM extent")


@attrs.frozen
class S2Entry:
    """A stage-2 mapping run: ``pfn = gfn + delta``, from memdb owner ``extent``."""

    delta: int
    extent: Extent
    access: Access
    #: ``GUNYAH_ADDRSPACE_MAP_FLAG_VMMIO``: a fault the hypervisor cannot resolve exits as
    #: a VMMIO access (shared memory), not a page fault.
    vmmio: bool = False


@attrs.frozen
class VmResources:
    """The capabilities ``VM_GET_HYP_RESOURCES`` gives the driver for one VM."""

    addrspace: int
    host_private: int
    host_shared: int
    guest_private: int
    guest_shared: int


#: ``listener(table, pfn, npages, old, new, vmid)``: memdb owners changed.
Listener = Callable[[str, int, int, Any, Any, int | None], None]
#: ``count(name, n, vmid)``: add *n* to a cost counter (of *vmid*, None for the host).
CountFn = Callable[[str, int, "int | None"], None]
#: ``on_unmap(vmid, gfn, npages)``: the RM removed part of a VM's stage-2.
UnmapFn = Callable[[int, int, int], None]


class Hypervisor:
    """The memory side of one machine's Gunyah hypervisor."""

    def __init__(
        self,
        *,
        listener: Listener | None = None,
        count: CountFn | None = None,
        on_unmap: UnmapFn | None = None,
    ) -> None:
        #: Hears every memdb change.
        self.listener = listener
        #: Hears every cost.
        self.count_fn = count
        #: Hears every stage-2 removal the RM makes for a VM (not the driver's own unmaps).
        self.on_unmap = on_unmap
        #: pfn -> owner; absent: the HLOS's own memory.
        self.memdb: RangeMap[Extent] = RangeMap()
        #: vmid -> that VM's stage-2 (gfn -> :class:`S2Entry`).
        self.addrspaces: dict[int, RangeMap[S2Entry]] = {}
        #: pfns of other owners the HLOS maps (parcels it accepted), the HLOS's stage-2 beyond
        #: its own memory.
        self.hlos_borrowed: RangeMap[int] = RangeMap()
        self.cspace: dict[int, Cap] = {}
        self._capids = itertools.count(0x1000)
        self.counters: Counter[str] = Counter()

    # --- accounting ------------------------------------------------------------------------
    def count(self, name: str, n: int = 1, vmid: int | None = None) -> None:
        """Add *n* to counter *name*, for *vmid*'s VM if given."""
        self.counters[name] += n
        if self.count_fn is not None:
            self.count_fn(name, n, vmid)

    def _set_owner(self, pfn: int, npages: int, new: Extent, vmid: int | None) -> None:
        old = list(self.owner_runs(pfn, npages))
        self.memdb.set(pfn, pfn + npages, None if new == HLOS_MEMORY else new)
        if self.listener is not None:
            for s, e, extent in old:
                if extent != new:
                    self.listener(MEMEXTENT_TABLE, s, e - s, extent, new, vmid)

    # --- queries ---------------------------------------------------------------------------
    def owner(self, pfn: int) -> Extent:
        """The memdb owner of *pfn*."""
        return self.memdb.get(pfn) or HLOS_MEMORY

    def owner_runs(self, pfn: int, npages: int) -> Iterator[tuple[int, int, Extent]]:
        """``(s, e, owner)`` over ``[pfn, pfn + npages)``, the HLOS's pages included."""
        pos, end = pfn, pfn + npages
        for s, e, extent in self.memdb.items(pfn, end):
            if s > pos:
                yield pos, s, HLOS_MEMORY
            yield s, e, extent
            pos = e
        if pos < end:
            yield pos, end, HLOS_MEMORY

    def owned_by(self, pfn: int, npages: int, extent: Extent) -> bool:
        """Every page of ``[pfn, pfn + npages)`` belongs to *extent*."""
        return all(owner == extent for _, _, owner in self.owner_runs(pfn, npages))

    def host_accessible(self, pfn: int) -> bool:
        """The HLOS's stage-2 maps *pfn*: its own memory, shared memory, accepted parcels."""
        owner = self.owner(pfn)
        if owner.kind in (ExtentKind.HLOS, ExtentKind.GUEST_SHARED) or owner.shared:
            return True
        return self.hlos_borrowed.get(pfn) is not None

    def stage2(self, vmid: int) -> RangeMap[S2Entry]:
        """The stage-2 of *vmid* (empty if it has no addrspace)."""
        return self.addrspaces.get(vmid) or RangeMap()

    def lookup(self, vmid: int, gfn: int) -> tuple[int, S2Entry] | None:
        """``(pfn, entry)`` *vmid*'s stage-2 maps *gfn* to, or None."""
        entry = self.stage2(vmid).get(gfn)
        return None if entry is None else (gfn + entry.delta, entry)

    # --- capabilities ------------------------------------------------------------------------
    def _new_cap(self, cap: Cap) -> int:
        capid = next(self._capids)
        self.cspace[capid] = cap
        return capid

    def create_vm_objects(self, vmid: int) -> VmResources:
        """The addrspace and extents the RM creates for a VM at ``VM_INIT``."""
        self.addrspaces[vmid] = RangeMap()
        return VmResources(
            self._new_cap(Cap(CapKind.ADDRSPACE, vmid)),
            self._new_cap(Cap(CapKind.HOST_PRIVATE, vmid)),
            self._new_cap(Cap(CapKind.HOST_SHARED, vmid)),
            self._new_cap(Cap(CapKind.GUEST_PRIVATE, vmid)),
            self._new_cap(Cap(CapKind.GUEST_SHARED, vmid)),
        )

    def _cap(self, capid: int, call: str, kinds: tuple[CapKind, ...]) -> Cap:
        cap = self.cspace.get(capid)
        if cap is None:
            raise HypCallError(HypError.CSPACE_CAP_NULL, call, f"no capability {capid:#x}")
        if cap.kind not in kinds:
            raise HypCallError(
                HypError.CSPACE_WRONG_OBJ_TYPE, call, f"capability {capid:#x} is a {cap.kind.value}"
            )
        return cap

    # --- hypercalls ---------------------------------------------------------------------------
    def memextent_donate(
        self, options: int, from_cap: int, to_cap: int, pfn: int, npages: int, *, calls: int = 1
    ) -> None:
        """``hypercall_memextent_donate``: pages ``[pfn, pfn + npages)`` change extent.

        ``TO_PROTECTED`` host private -> guest private, ``FROM_PROTECTED`` back, and
        ``TO_SIBLING`` between a VM's host shared and guest shared extents.  Every page must
        be the donor's (``ERROR_MEMDB_NOT_OWNER``); the donor's stage-2 mappings of them go
        with them.  Without ``NOSYNC`` the call waits for the EL2 mapping updates
        (``rcu_sync``): counted as a sync.
        """
        call = "memextent_donate"
        if options & ~(abi.GUNYAH_MEMEXTENT_OPTION_TYPE_MASK | abi.GUNYAH_MEMEXTENT_OPTION_NOSYNC):
            raise HypCallError(HypError.ARG_INVAL, call, f"reserved option bits in {options:#x}")
        kind = options & abi.GUNYAH_MEMEXTENT_OPTION_TYPE_MASK
        extents = (CapKind.HOST_PRIVATE, CapKind.HOST_SHARED, CapKind.GUEST_PRIVATE, CapKind.GUEST_SHARED)
        src = self._cap(from_cap, call, extents)
        dst = self._cap(to_cap, call, extents)
        pairs = {
            DonateType.TO_PROTECTED: (CapKind.HOST_PRIVATE, CapKind.GUEST_PRIVATE),
            DonateType.FROM_PROTECTED: (CapKind.GUEST_PRIVATE, CapKind.HOST_PRIVATE),
        }
        if kind in pairs:
            ok = (src.kind, dst.kind) == pairs[DonateType(kind)]
        elif kind == DonateType.TO_SIBLING:
            ok = {src.kind, dst.kind} == {CapKind.HOST_SHARED, CapKind.GUEST_SHARED}
        else:
            raise HypCallError(HypError.ARG_INVAL, call, f"donate type {kind} is not modelled")
        if not ok or src.vmid != dst.vmid:
            raise HypCallError(
                HypError.ARG_INVAL, call, f"{src.kind.value} -> {dst.kind.value} is not a {kind} donation"
            )
        if not self.owned_by(pfn, npages, src.extent):
            raise HypCallError(
                HypError.MEMDB_NOT_OWNER, call, f"pfns [{pfn:#x}, {pfn + npages:#x}) are not the donor's"
            )
        self._drop_mappings(src.extent, pfn, npages)
        self._set_owner(pfn, npages, dst.extent, src.vmid)
        self.count("hvc.memextent_donate", calls, src.vmid)
        self.count("donated_pages", npages, src.vmid)
        self._sync(options & abi.GUNYAH_MEMEXTENT_OPTION_NOSYNC, calls, src.vmid)

    def addrspace_map(
        self,
        as_cap: int,
        extent_cap: int,
        gfn: int,
        access: Access,
        flags: int,
        pfn: int,
        npages: int,
        *,
        calls: int = 1,
    ) -> None:
        """``hypercall_addrspace_map``: map the extent's pages at ``gfn`` in the VM's stage-2.

        A sparse extent maps only the pages it owns (``memextent_map_partial_sparse`` walks
        the memdb), so a page another owner holds is left unmapped.  An IPA already mapped is
        refused with ``ERROR_BUSY`` [U: the sources read do not show the page-table code's
        error].
        """
        call = "addrspace_map"
        space = self._cap(as_cap, call, (CapKind.ADDRSPACE,))
        ext = self._cap(extent_cap, call, (CapKind.GUEST_PRIVATE, CapKind.GUEST_SHARED))
        stage2 = self.addrspaces[space.vmid]
        if stage2.overlaps(gfn, gfn + npages):
            raise HypCallError(HypError.BUSY, call, f"gfns [{gfn:#x}, {gfn + npages:#x}) are mapped")
        extent = ext.extent
        vmmio = bool(flags & (1 << abi.GUNYAH_ADDRSPACE_MAP_FLAG_VMMIO))
        for s, e, owner in list(self.owner_runs(pfn, npages)):
            if owner == extent:
                stage2.set(gfn + s - pfn, gfn + e - pfn, S2Entry(pfn - gfn, extent, access, vmmio))
        self.count("hvc.addrspace_map", calls, space.vmid)

    def addrspace_unmap(
        self, as_cap: int, extent_cap: int, gfn: int, flags: int, pfn: int, npages: int, *, calls: int = 1
    ) -> None:
        """``hypercall_addrspace_unmap``: remove the extent's mapping of ``[gfn, gfn + npages)``.

        The range must be mapped to ``[pfn, ...)`` from this extent (``remove_sparse_mapping``
        finds no such mapping: ``ERROR_ADDR_INVALID``).  ``NOSYNC`` defers the TLB
        invalidation to a later synchronous call.
        """
        call = "addrspace_unmap"
        space = self._cap(as_cap, call, (CapKind.ADDRSPACE,))
        ext = self._cap(extent_cap, call, (CapKind.GUEST_PRIVATE, CapKind.GUEST_SHARED))
        stage2 = self.addrspaces[space.vmid]
        runs = list(stage2.items(gfn, gfn + npages))
        mapped = sum(e - s for s, e, entry in runs if entry.delta == pfn - gfn and entry.extent == ext.extent)
        if mapped != npages:
            raise HypCallError(
                HypError.ADDR_INVAL,
                call,
                f"gfns [{gfn:#x}, {gfn + npages:#x}) are not mapped to pfn {pfn:#x} from this extent",
            )
        stage2.erase(gfn, gfn + npages)
        self.count("hvc.addrspace_unmap", calls, space.vmid)
        self._sync(flags & (1 << abi.GUNYAH_ADDRSPACE_MAP_FLAG_NOSYNC), calls, space.vmid)

    def _sync(self, nosync: int, calls: int, vmid: int | None) -> None:
        if nosync:
            self.count("nosync", calls, vmid)
        else:
            # NOSYNC batching: only the last call of a batch waits for the TLB invalidation.
            self.count("sync", 1, vmid)
            if calls > 1:
                self.count("nosync", calls - 1, vmid)

    def _drop_mappings(self, extent: Extent, pfn: int, npages: int) -> None:
        """``do_mapping_transfer``: the donor extent's mappings of the pages go with them."""
        if extent.kind not in (ExtentKind.GUEST_PRIVATE, ExtentKind.GUEST_SHARED, ExtentKind.PARCEL):
            return
        for vmid, stage2 in self.addrspaces.items():
            if extent.kind != ExtentKind.PARCEL and vmid != extent.vmid:
                continue
            for s, e, entry in list(stage2.items()):
                if entry.extent != extent:
                    continue
                lo, hi = max(s + entry.delta, pfn), min(e + entry.delta, pfn + npages)
                if lo < hi:
                    self._unmap(vmid, lo - entry.delta, hi - lo)
        if extent.kind == ExtentKind.PARCEL:
            self.hlos_borrowed.erase(pfn, pfn + npages)

    # --- what the RM does with its own rights -----------------------------------------------------
    def donate_to_parcel(self, parcel: Extent, source: Extent, pfn: int, npages: int) -> None:
        """``vm_memory_donate_extent(..., true)``: the owner's pages enter the parcel's extent.

        A lend or donate parcel takes the pages from the owner (its mappings go); a share
        parcel keeps the owner's mapping (``add_sgl_to_mp`` maps the owner first).
        """
        if not self.owned_by(pfn, npages, source):
            raise HypCallError(
                HypError.MEMDB_NOT_OWNER, "memextent_donate", "the owner does not own the pages"
            )
        if source.kind != ExtentKind.HLOS:
            stage2 = self.addrspaces[source.vmid]
            for s, e, entry in list(stage2.items()):
                lo, hi = max(s + entry.delta, pfn), min(e + entry.delta, pfn + npages)
                if entry.extent == source and lo < hi:
                    if parcel.shared:
                        stage2.set(lo - entry.delta, hi - entry.delta, attrs.evolve(entry, extent=parcel))
                    else:
                        self._unmap(source.vmid, lo - entry.delta, hi - lo)
        self._set_owner(pfn, npages, parcel, parcel.vmid)
        self.count("rm_donations", 1, None)

    def donate_from_parcel(self, parcel: Extent, target: Extent, pfn: int, npages: int) -> None:
        """``vm_memory_donate_extent(..., false)``: the pages go back to the owner's extent
        (every borrower's mapping of them goes; a share parcel's owner mapping stays)."""
        for vmid, stage2 in self.addrspaces.items():
            for s, e, entry in list(stage2.items()):
                lo, hi = max(s + entry.delta, pfn), min(e + entry.delta, pfn + npages)
                if entry.extent != parcel or lo >= hi:
                    continue
                if vmid == parcel.vmid and parcel.shared:
                    stage2.set(lo - entry.delta, hi - entry.delta, attrs.evolve(entry, extent=target))
                else:
                    self._unmap(vmid, lo - entry.delta, hi - lo)
        self.hlos_borrowed.erase(pfn, pfn + npages)
        self._set_owner(pfn, npages, target, parcel.vmid)
        self.count("rm_donations", 1, None)

    def move_extent(self, parcel: Extent, target: Extent, pfn: int, npages: int) -> None:
        """A donation between two extents the RM holds (donate accept, image parcel to paged):
        ownership changes, every mapping of the old owner goes."""
        self._drop_mappings(parcel, pfn, npages)
        self._set_owner(pfn, npages, target, target.vmid)
        self.count("rm_donations", 1, None)

    def map_for(self, vmid: int, extent: Extent, gfn: int, pfn: int, npages: int, access: Access) -> None:
        """The RM maps *extent*'s pages into *vmid*'s stage-2 (``vm_memory_map_partial``);
        the HLOS maps by physical address."""
        if vmid == abi.VMID_HLOS:
            self.hlos_borrowed.set(pfn, pfn + npages, vmid)
            return
        self.addrspaces[vmid].set(gfn, gfn + npages, S2Entry(pfn - gfn, extent, access))

    def unmap_for(self, vmid: int, gfn: int, pfn: int, npages: int) -> None:
        """``vm_memory_unmap_partial``: the RM takes its mapping away again."""
        if vmid == abi.VMID_HLOS:
            self.hlos_borrowed.erase(pfn, pfn + npages)
            return
        self._unmap(vmid, gfn, npages)

    def _unmap(self, vmid: int, gfn: int, npages: int) -> None:
        """Remove ``[gfn, gfn + npages)`` from *vmid*'s stage-2 for the RM (or a donation),
        telling ``on_unmap``."""
        self.addrspaces[vmid].erase(gfn, gfn + npages)
        if self.on_unmap is not None:
            self.on_unmap(vmid, gfn, npages)

    def zero(self, pfn: int, npages: int, zero: Callable[[int, int], None] | None, vmid: int | None) -> None:
        """``memextent_zero_range``: sanitize pages."""
        if zero is not None:
            zero(pfn, npages)
        self.count("sanitized_bytes", npages * abi.PAGE_SIZE, vmid)

    def destroy_vm_objects(self, vmid: int, resources: VmResources | None) -> None:
        """VM reset takes the VM's objects down: its stage-2 goes, its extents are deleted and
        their pages return to the parent, the HLOS (``memextent_return_range``)."""
        stage2 = self.addrspaces.get(vmid)
        for s, e, _ in list(stage2.items()) if stage2 is not None else []:
            self._unmap(vmid, s, e - s)
        self.addrspaces.pop(vmid, None)
        for extent in (Extent(ExtentKind.GUEST_PRIVATE, vmid), Extent(ExtentKind.GUEST_SHARED, vmid)):
            for s, e, owner in list(self.memdb.items()):
                if owner == extent:
                    self._set_owner(s, e - s, HLOS_MEMORY, vmid)
        if resources is not None:
            for capid in attrs.astuple(resources):
                self.cspace.pop(capid, None)
