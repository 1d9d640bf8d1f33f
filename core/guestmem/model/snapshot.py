"""Building :mod:`guestmem.snapshot` values from the model, run by run.

Each builder walks the range maps the model keeps (memslots, attributes, leaves, folios,
bindings, faulted host pages, allocations), so a snapshot costs what those runs cost.
The caller holds the host lock (``ModelKvm.snapshot`` and ``ModelVm.snapshot`` run as an
operation).  A backend's tables come from its ``guestmem_snapshot`` hook, made JSON data
through guestmem's converter right away, so that a snapshot compares and round-trips as
plain data.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from guestmem.errors import BackendError
from guestmem.snapshot import (
    AttributeRun,
    BindingRun,
    FdState,
    FolioRun,
    GmemFileState,
    GmemState,
    HostSnapshot,
    MappingState,
    MemoryRun,
    MemslotState,
    Span,
    VcpuState,
    VmSnapshot,
)

if TYPE_CHECKING:
    from guestmem.model.gmem import GmemInode
    from guestmem.model.kvm import ModelKvm
    from guestmem.model.vm import ModelVm

_THP_PAGES = 512


def host_snapshot(kvm: ModelKvm) -> HostSnapshot:
    """``kvm.snapshot()``: every VM, mapping, descriptor, allocation, and the backend's
    host-wide tables."""
    from guestmem.model.files import ModelGuestMemfd
    from guestmem.model.mapping import AnonVma, GmemVma
    from guestmem.model.vm import ModelVm

    host = kvm.host
    mappings = []
    for vma in kvm.mm.vmas():
        if isinstance(vma, GmemVma):
            faulted = tuple(Span(s, e) for s, e, _ in vma.faulted.items())
            mappings.append(
                MappingState(vma.address, vma.length, "gmem", vma.file.inode.ino, vma.pgoff, faulted)
            )
        elif isinstance(vma, AnonVma):
            memory = tuple(
                MemoryRun(first, first + _THP_PAGES, pfn, host.digest(pfn, _THP_PAGES))
                for first, pfn in vma.chunks()
            )
            mappings.append(MappingState(vma.address, vma.length, "anon", memory=memory))
    fds = []
    for fd, obj in sorted(kvm.fd_table().items()):
        if isinstance(obj, ModelVm):
            fds.append(FdState(fd, "vm", obj.vm_id))
        elif isinstance(obj, ModelGuestMemfd):
            fds.append(FdState(fd, "gmem", obj.file.inode.ino))
        else:
            fds.append(FdState(fd, "kvm"))
    return HostSnapshot(
        backend=kvm.backend,
        profile=kvm.profile.name,
        crashed=host.crashed,
        vms=tuple(vm_snapshot(vm) for vm in sorted(kvm.vms, key=lambda vm: vm.vm_id)),
        mappings=tuple(mappings),
        fds=tuple(fds),
        allocated=tuple(Span(s, e) for s, e in host.allocated_runs()),
        arch=_arch(kvm, None),
    )


def vm_snapshot(vm: ModelVm) -> VmSnapshot:
    """``vm.snapshot()``: memslots, attributes, leaves, vCPUs, the guest_memfd inodes it
    created, and the backend's tables for it."""
    memslots = tuple(
        MemslotState(
            slot.as_id,
            slot.id,
            slot.base_gfn,
            slot.npages,
            slot.flags,
            slot.userspace_addr,
            None if slot.gmem_file is None else slot.gmem_file.inode.ino,
            slot.gmem_pgoff,
        )
        for slot in vm.slots.in_order()
    )
    return VmSnapshot(
        vm_id=vm.vm_id,
        vm_type=vm.vm_type,
        fd=None if vm.fd_closed else vm.fd,
        dead=vm.dead,
        bugged=vm.bugged,
        destroyed=vm.destroyed,
        refs=vm.refs,
        memslots=memslots,
        attributes=tuple(AttributeRun(s, e, value) for s, e, value in vm.attributes.items()),
        leaves=tuple(vm.mmu.leaves()),
        vcpus=tuple(VcpuState(i, vm.vcpus[i].closed) for i in sorted(vm.vcpus)),
        gmem=tuple(gmem_state(inode) for inode in _inodes(vm)),
        pre_fault_allowed=vm.pre_fault_allowed,
        hypercall_exit_enabled=vm.hypercall_exit_enabled,
        arch=_arch(vm.kvm, vm),
    )


def gmem_state(inode: GmemInode) -> GmemState:
    """One guest_memfd inode: folio runs with their digests, files, host-mapped pages."""
    host = inode.host
    folios = tuple(
        FolioRun(s, e, s + folio.delta, folio.uptodate, folio.hwpoison, host.digest(s + folio.delta, e - s))
        for s, e, folio in inode.pages.items()
    )
    files = tuple(
        GmemFileState(
            view.vm.vm_id,
            tuple(BindingRun(s, e, slot.as_id, slot.id) for s, e, slot in view.bindings.items()),
        )
        for view in inode.views
    )
    mapped = sorted((s, e) for vma in inode.vmas for s, e, _ in vma.faulted.items())
    return GmemState(
        inode.ino, inode.size, inode.flags, inode.owner.vm_id, folios, files, tuple(_merged(mapped))
    )


def _merged(runs: list[tuple[int, int]]) -> list[Span]:
    """Sorted runs, overlapping or touching ones merged (several mappings of one page)."""
    out: list[Span] = []
    for s, e in runs:
        if out and s <= out[-1].end:
            if e > out[-1].end:
                out[-1] = Span(out[-1].start, e)
        else:
            out.append(Span(s, e))
    return out


def _inodes(vm: ModelVm) -> list[GmemInode]:
    """The live guest_memfd inodes *vm* created: reachable through an fd, a memslot or a
    host mapping (an inode none of them holds is gone), by inode number."""
    from guestmem.model.files import ModelGuestMemfd
    from guestmem.model.mapping import GmemVma

    kvm = vm.kvm
    found: dict[int, GmemInode] = {}
    files = [obj.file for obj in kvm.fd_table().values() if isinstance(obj, ModelGuestMemfd)]
    files += [slot.gmem_file for slot in vm.slots.in_order() if slot.gmem_file is not None]
    files += [vma.file for vma in kvm.mm.vmas() if isinstance(vma, GmemVma)]
    for file in files:
        inode = file.inode
        if inode.owner is vm and not inode.evicted:
            found[inode.ino] = inode
    return [found[ino] for ino in sorted(found)]


def _arch(kvm: ModelKvm, vm: ModelVm | None) -> Any:
    """What the backend's ``guestmem_snapshot`` says, as JSON data (None: nothing)."""
    value = kvm.hooks.snapshot(kvm.view, None if vm is None else vm.view)
    if value is None:
        return None
    from guestmem.serialize import unstructure

    try:
        return json.loads(json.dumps(unstructure(value), allow_nan=False))
    except (TypeError, ValueError) as exc:
        info = kvm.backend_info
        raise BackendError(f"backend {info.name!r}", info.distribution, "guestmem_snapshot", exc) from exc
