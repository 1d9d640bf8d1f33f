"""The memory map of a VM: its gpa range as bands of attribute, gmem state, stage-2 and owner.

A :class:`MemoryMap` is what a report draws for one VM after one step: over the gfns its
memslots cover, four layers of :class:`Band` runs:

* ``attribute``: ``private`` / ``shared`` (``KVM_SET_MEMORY_ATTRIBUTES``; absent on VM
  types without attributes, such as arm64's);
* ``gmem``: the guest_memfd page behind each gfn: ``hole``, ``allocated``, ``prepared``,
  ``poisoned``, or ``anonymous`` for a memslot without guest_memfd;
* ``stage2``: the leaf mapping it: ``private 4K``, ``shared 2M``... or nothing;
* ``owner``: who the hardware ownership table gives the page to, in the backend-neutral
  terms of :class:`guestmem.backend.Owner` (from the ``guestmem_ownership_update`` events
  an :class:`OwnerTracker` saw), ``host`` where no table says otherwise.

Everything is read through the public views (:func:`guestmem.backend.view`), so it costs
what the stored ranges cost, whatever the guest's size.  The real kernel's internal state
cannot be observed: its VMs have no map.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs

from guestmem import uapi
from guestmem.backend import HostView, OwnershipEvent, RangeMap, VmView, hookimpl, view

__all__ = ["LAYERS", "Band", "MemoryMap", "OwnerTracker", "snapshot"]

#: The layers of a map, in drawing order.
LAYERS = ("attribute", "gmem", "stage2", "owner")
#: Most bands a layer keeps; beyond it the rest is one ``"..."`` band (a report stays small).
MAX_BANDS = 4096
_LEVEL = {uapi.PG_LEVEL_4K: "4K", uapi.PG_LEVEL_2M: "2M", uapi.PG_LEVEL_1G: "1G"}


@attrs.frozen
class Band:
    """Gfns ``[start, end)`` share ``value`` in one layer."""

    start: int
    end: int
    value: str


@attrs.frozen
class MemoryMap:
    """One VM's map after one step: ``layers[name]`` is a list of bands over ``[start, end)``."""

    vm: str
    start: int
    end: int
    layers: dict[str, list[Band]]


class OwnerTracker:
    """An observer keeping, per host, the owner each ownership event gave a pfn range."""

    def __init__(self) -> None:
        self._owners: dict[int, RangeMap[str]] = {}

    @hookimpl
    def guestmem_ownership_update(self, host: HostView, event: OwnershipEvent) -> None:
        table = self._owners.setdefault(id(host), RangeMap())
        table.set(event.pfn, event.pfn + event.npages, event.new_owner.value)

    def owners(self, host: HostView) -> RangeMap[str]:
        """The pfn -> owner map of *host* (empty if it saw no event: a backend without an
        ownership table)."""
        return self._owners.get(id(host), RangeMap())


def _merge(bands: Iterator[Band]) -> list[Band]:
    out: list[Band] = []
    for band in bands:
        if band.start >= band.end:
            continue
        if out and out[-1].end == band.start and out[-1].value == band.value:
            out[-1] = Band(out[-1].start, band.end, band.value)
        else:
            out.append(band)
    if len(out) > MAX_BANDS:
        out = [*out[: MAX_BANDS - 1], Band(out[MAX_BANDS - 1].start, out[-1].end, "...")]
    return out


def _fill(start: int, end: int, bands: list[Band], gap: str) -> Iterator[Band]:
    pos = start
    for band in bands:
        if band.start > pos:
            yield Band(pos, band.start, gap)
        yield band
        pos = band.end
    if pos < end:
        yield Band(pos, end, gap)


def snapshot(vm: Any, name: str = "vm", owners: OwnerTracker | None = None) -> MemoryMap | None:
    """The map of *vm* (a model ``Vm`` or its view); None for the real kernel's VMs."""
    try:
        v: VmView = view(vm)
    except TypeError:
        return None
    if v.destroyed:
        return None
    slots = v.memslots()
    if not slots:
        return MemoryMap(name, 0, 0, {layer: [] for layer in LAYERS})
    start, end = min(s.base_gfn for s in slots), max(s.end_gfn for s in slots)
    layers: dict[str, list[Band]] = {}
    if v.type_info.memory_attributes:
        layers["attribute"] = _merge(
            Band(s, e, "private" if a & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE else "shared")
            for s, e, a in v.attribute_runs(start, end)
        )
    table = owners.owners(v.host) if owners is not None else None
    if table is not None and not table:
        table = None  # no ownership table changed on this host (sw): no owner layer
    gmem: list[Band] = []
    owner: list[Band] = []
    for slot in sorted(slots, key=lambda s: s.base_gfn):
        inode = slot.gmem
        if inode is None:
            gmem.append(Band(slot.base_gfn, slot.end_gfn, "anonymous" if not slot.has_gmem else "released"))
            continue
        offset = slot.base_gfn - slot.gmem_pgoff
        folios: list[Band] = []
        for folio in inode.folios(slot.gmem_pgoff, slot.gmem_pgoff + slot.npages):
            state = "poisoned" if folio.poisoned else "prepared" if folio.prepared else "allocated"
            folios.append(Band(folio.start + offset, folio.end + offset, state))
            if table is not None:
                pfn_end = folio.pfn + folio.end - folio.start
                pos = folio.pfn
                for s, e, who in table.items(folio.pfn, pfn_end):
                    if s > pos:
                        owner.append(
                            Band(
                                pos - folio.pfn + folio.start + offset,
                                s - folio.pfn + folio.start + offset,
                                "host",
                            )
                        )
                    owner.append(
                        Band(s - folio.pfn + folio.start + offset, e - folio.pfn + folio.start + offset, who)
                    )
                    pos = e
                if pos < pfn_end:
                    owner.append(Band(pos - folio.pfn + folio.start + offset, folio.end + offset, "host"))
        gmem.extend(_fill(slot.base_gfn, slot.end_gfn, folios, "hole"))
    layers["gmem"] = _merge(iter(gmem))
    layers["stage2"] = _merge(
        Band(
            leaf.gfn, leaf.end_gfn, f"{'private' if leaf.private else 'shared'} {_LEVEL.get(leaf.level, '?')}"
        )
        for leaf in v.leaves(start, end)
    )
    if table is not None:
        layers["owner"] = _merge(iter(sorted(owner, key=lambda b: b.start)))
    return MemoryMap(name, start, end, layers)
