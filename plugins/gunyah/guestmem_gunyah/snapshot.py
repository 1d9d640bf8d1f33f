"""What ``kvm.snapshot()`` and ``vm.snapshot()`` show of a Gunyah host (``guestmem_snapshot``).

The host: the hypervisor's memory database (who owns each pfn run: the HLOS, a VM's
extent, a parcel), the pages it borrowed from the HLOS, and the resource manager's
memparcels with their ACLs.  A VM: its driver state (VMID, status), its bindings, the
folio runs the driver gave it (``ghvm->mm``), its parcels, and its stage-2 address space.
"""

from __future__ import annotations

from typing import Any

import attrs

from guestmem.backend import HostView, VmView
from guestmem_gunyah.driver import GunyahHost, GunyahVm
from guestmem_gunyah.hyp import Extent


@attrs.frozen
class OwnerRun:
    """pfns ``[start, end)`` owned by a memdb extent: its kind, VM, parcel handle."""

    start: int
    end: int
    kind: str
    vmid: int
    handle: int
    shared: bool


@attrs.frozen
class AclEntry:
    """One VM of a parcel's ACL and what it did with it."""

    vmid: int
    rights: int
    shared: bool
    mapped: bool
    ipas: tuple[int, ...]


@attrs.frozen
class ParcelState:
    """A memparcel of the resource manager."""

    handle: int
    owner: int
    trans: str
    state: str
    label: int
    acl: tuple[AclEntry, ...]
    regions: tuple[tuple[int, int, int], ...]
    locked: bool


@attrs.frozen
class GunyahHostState:
    """The hypervisor's and the resource manager's host-wide state."""

    memdb: tuple[OwnerRun, ...]
    hlos_borrowed: tuple[tuple[int, int, int], ...]
    parcels: tuple[ParcelState, ...]


@attrs.frozen
class MapRun:
    """gfns ``[start, end)`` mapped to pfn ``gfn + delta`` with the driver's or the
    hypervisor's tags."""

    start: int
    end: int
    delta: int
    share: bool
    write: bool


@attrs.frozen
class S2Run:
    """gfns ``[start, end)`` of a VM's address space mapped to pfn ``gfn + delta`` from a
    memdb extent (its kind and VM) with the access rights given."""

    start: int
    end: int
    delta: int
    kind: str
    vmid: int
    access: int
    vmmio: bool


@attrs.frozen
class GunyahVmState:
    """One VM of the Gunyah driver."""

    vmid: int
    status: str
    bindings: tuple[tuple[int, int, int, int], ...]
    provided: tuple[MapRun, ...]
    parcels: tuple[int, ...]
    stage2: tuple[S2Run, ...]


def _owner(s: int, e: int, extent: Extent) -> OwnerRun:
    return OwnerRun(s, e, extent.kind.value, extent.vmid, extent.handle, extent.shared)


def host_state(host: HostView) -> GunyahHostState | None:
    """The host's tables, or None on a host the Gunyah policy did not set up."""
    state = host.arch
    if not isinstance(state, GunyahHost):
        return None
    parcels = tuple(
        ParcelState(
            p.handle,
            p.owner,
            p.trans.name,
            p.state.name,
            p.label,
            tuple(AclEntry(i.vmid, i.rights, i.shared, i.mapped, tuple(i.ipas)) for i in p.acl),
            tuple((r.pfn, r.npages, r.owner_ipa) for r in p.regions),
            p.locked,
        )
        for _, p in sorted(state.rm.parcels.items())
    )
    return GunyahHostState(
        tuple(_owner(s, e, extent) for s, e, extent in state.hyp.memdb.items()),
        tuple((s, e, vmid) for s, e, vmid in state.hyp.hlos_borrowed.items()),
        parcels,
    )


def vm_state(vm: VmView) -> Any:
    """The VM's driver state, or None for a VM the Gunyah policy does not know."""
    state = vm.arch
    if not isinstance(state, GunyahVm):
        return None
    space = state.hyp.addrspaces.get(state.vmid)
    runs = () if space is None else space.items()
    stage2 = tuple(
        S2Run(s, e, entry.delta, entry.extent.kind.value, entry.extent.vmid, int(entry.access), entry.vmmio)
        for s, e, entry in runs
    )
    return GunyahVmState(
        state.vmid,
        state.status.name,
        tuple((b.gfn, b.nr, b.i_off, b.flags) for _, _, b in state.bindings.items()),
        tuple(MapRun(s, e, p.delta, p.share, p.write) for s, e, p in state.mm.items()),
        tuple(sorted(state.parcels)),
        stage2,
    )
