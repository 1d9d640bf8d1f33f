"""Snapshots: the state of a host or a VM of a model backend, as frozen values.

``kvm.snapshot()`` (:class:`HostSnapshot`) and ``vm.snapshot()`` (:class:`VmSnapshot`) say
what userspace and the hardware could tell about the model at that moment: memslots,
memory attributes, guest_memfd files and their pages (allocated, prepared and poisoned
runs, with a digest of the bytes of each run), host mappings, stage-2 leaves, open file
descriptors, allocated host memory, and the backend's own hardware tables (what its
``guestmem_snapshot`` hook returns: SNP's RMP, TDX's S-EPT and PAMT, pKVM's ownership,
Gunyah's parcels).

Everything is stored as runs, as the model stores it: a snapshot of a 1 TiB guest that
touched a thousand pages is small, and costs what its runs cost.  Two snapshots compare
equal iff nothing they cover changed (contents included, through the digests; host pfns
are never reused, so a page freed and allocated again shows).  They serialise through
guestmem's one converter (:func:`guestmem.serialize.snapshot_to_json`,
:func:`~guestmem.serialize.snapshot_from_json`).

The real kernel's state cannot be read from userspace: ``guestmem-linux`` raises
:class:`NotImplementedError` (see :meth:`guestmem.api.Kvm.snapshot`).
"""

from __future__ import annotations

from typing import Any

import attrs

from guestmem.backend import Leaf

__all__ = [
    "AttributeRun",
    "BindingRun",
    "FdState",
    "FolioRun",
    "GmemFileState",
    "GmemState",
    "HostSnapshot",
    "Leaf",
    "MappingState",
    "MemoryRun",
    "MemslotState",
    "Span",
    "VcpuState",
    "VmSnapshot",
]


def _tuple(items: Any) -> tuple[Any, ...]:
    return tuple(items)


@attrs.frozen
class Span:
    """A run ``[start, end)`` of page indices, gfns or pfns (what the field says)."""

    start: int
    end: int


@attrs.frozen
class AttributeRun:
    """gfns ``[start, end)`` with memory attributes *attributes* (runs of 0 are left out)."""

    start: int
    end: int
    attributes: int


@attrs.frozen
class MemslotState:
    """One memslot as ``KVM_SET_USER_MEMORY_REGION2`` made it."""

    as_id: int
    id: int
    base_gfn: int
    npages: int
    #: ``KVM_MEM_*`` flags.
    flags: int
    userspace_addr: int
    #: The inode number of the bound guest_memfd; None without one, or once the file was
    #: released (L-3).
    gmem_ino: int | None = None
    #: The guest_memfd page index of ``base_gfn``.
    gmem_pgoff: int = 0


@attrs.frozen
class FolioRun:
    """guest_memfd pages ``[start, end)`` backed by host pfns from *pfn* on, in one state,
    with *digest* a hash of their bytes (equal digests: equal bytes)."""

    start: int
    end: int
    pfn: int
    #: Zeroed and handed to ``guestmem_gmem_prepare`` ("uptodate").
    prepared: bool
    #: Hardware-poisoned (E-1).
    poisoned: bool
    digest: str


@attrs.frozen
class BindingRun:
    """guest_memfd pages ``[start, end)`` bound to memslot ``(as_id, slot)`` of a VM."""

    start: int
    end: int
    as_id: int
    slot: int


@attrs.frozen
class GmemFileState:
    """One VM's file (view) of a guest_memfd inode and its bindings."""

    vm_id: int
    bindings: tuple[BindingRun, ...] = attrs.field(converter=_tuple, default=())


@attrs.frozen
class GmemState:
    """A guest_memfd inode: size, flags, the VM that created it, its folios, the VMs' files
    on it and the pages host mappings have faulted in."""

    ino: int
    size: int
    flags: int
    owner_vm: int
    folios: tuple[FolioRun, ...] = attrs.field(converter=_tuple, default=())
    files: tuple[GmemFileState, ...] = attrs.field(converter=_tuple, default=())
    host_mapped: tuple[Span, ...] = attrs.field(converter=_tuple, default=())


@attrs.frozen
class VcpuState:
    """A vCPU: its id and whether userspace closed its fd."""

    id: int
    closed: bool


@attrs.frozen
class VmSnapshot:
    """One VM (``vm.snapshot()``)."""

    vm_id: int
    #: The ``KVM_CREATE_VM`` type.
    vm_type: int
    #: Its fd number, None once userspace closed it.
    fd: int | None
    #: ``kvm_vm_dead`` (every ioctl EIO), ``KVM_BUG_ON``.
    dead: bool
    bugged: bool
    destroyed: bool
    #: The references that keep it alive (its fd, vCPU fds, guest_memfd files).
    refs: int
    memslots: tuple[MemslotState, ...] = attrs.field(converter=_tuple, default=())
    attributes: tuple[AttributeRun, ...] = attrs.field(converter=_tuple, default=())
    #: Stage-2 leaves as the model stores them (runs of one level, privateness and
    #: writability).
    leaves: tuple[Leaf, ...] = attrs.field(converter=_tuple, default=())
    vcpus: tuple[VcpuState, ...] = attrs.field(converter=_tuple, default=())
    #: The guest_memfd inodes this VM created that are still alive.
    gmem: tuple[GmemState, ...] = attrs.field(converter=_tuple, default=())
    #: ``kvm->arch.pre_fault_allowed`` and ``hypercall_exit_enabled``.
    pre_fault_allowed: bool = True
    hypercall_exit_enabled: int = 0
    #: The backend's tables for this VM (``guestmem_snapshot``), as JSON data.
    arch: Any = None


@attrs.frozen
class MemoryRun:
    """Pages ``[start, end)`` of an anonymous mapping backed by host pfns from *pfn* on,
    whose bytes hash to *digest*."""

    start: int
    end: int
    pfn: int
    digest: str


@attrs.frozen
class MappingState:
    """A host userspace mapping: anonymous memory (with the pages it holds) or a
    guest_memfd range (with the page indices faulted in)."""

    address: int
    length: int
    #: ``"anon"`` or ``"gmem"``.
    kind: str
    #: guest_memfd: the inode and the page index of the mapping's first page.
    ino: int | None = None
    pgoff: int = 0
    #: guest_memfd: page indices with a host PTE.
    faulted: tuple[Span, ...] = attrs.field(converter=_tuple, default=())
    #: anonymous memory: the runs of pages it holds.
    memory: tuple[MemoryRun, ...] = attrs.field(converter=_tuple, default=())


@attrs.frozen
class FdState:
    """An open file descriptor of the host process: ``/dev/kvm`` (``"kvm"``), a VM
    (``"vm"``, *ident* its id) or a guest_memfd (``"gmem"``, *ident* its inode number).
    (The model keeps no descriptor numbers for vCPUs.)"""

    fd: int
    kind: str
    ident: int = 0


@attrs.frozen
class HostSnapshot:
    """One host (``kvm.snapshot()``): its VMs, guest_memfd inodes, mappings, descriptors,
    allocated memory and the backend's host-wide tables."""

    backend: str
    profile: str
    #: The verdict the host went down with, or None.
    crashed: str | None
    vms: tuple[VmSnapshot, ...] = attrs.field(converter=_tuple, default=())
    mappings: tuple[MappingState, ...] = attrs.field(converter=_tuple, default=())
    fds: tuple[FdState, ...] = attrs.field(converter=_tuple, default=())
    #: Host pfn runs allocated (guest_memfd folios, anonymous memory, a backend's pages).
    allocated: tuple[Span, ...] = attrs.field(converter=_tuple, default=())
    #: The backend's host-wide tables (``guestmem_snapshot`` with no VM), as JSON data.
    arch: Any = None
