"""Snapshots: ``kvm.snapshot()`` and ``vm.snapshot()`` as frozen values, range-based, that
round-trip through guestmem's converter and change exactly when the state does."""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest
from gmem_helpers import GMEM, PAGE, PRIVATE, MiB, gmem_slot, plugin, throwaway_backend, x86_type

import guestmem
from guestmem import BackendError, uapi
from guestmem.conformance.stress import stress_vm_type
from guestmem.conformance.vmm import KitVmm
from guestmem.serialize import snapshot_from_json, snapshot_to_json, structure, unstructure
from guestmem.snapshot import FolioRun, HostSnapshot, Span, VmSnapshot

TiB = 1 << 40
BACKENDS = ["sw", "snp", "snp-hugepage", "tdx", "pkvm", "gunyah", "cca"]


def round_trip(snapshot: Any) -> Any:
    """snapshot -> unstructure -> JSON text -> structure."""
    return structure(json.loads(json.dumps(unstructure(snapshot))), type(snapshot))


@pytest.mark.parametrize("backend", BACKENDS)
def test_snapshots_round_trip_on_every_backend(backend: str) -> None:
    """A guest that stored, converted and was mapped by the host: its host and VM snapshots
    survive unstructure -> JSON -> structure unchanged; the hardware backends' tables
    (``guestmem_snapshot``) are in them."""
    if backend not in guestmem.backends():
        pytest.skip(f"backend {backend!r} is not installed")
    info = stress_vm_type(backend)
    with guestmem.open(backend) as kvm:
        kit = KitVmm(kvm, info, 0x10000000, 16 * PAGE)
        try:
            kit.write(kit.ram.gpa_of(1), b"private bytes", private=info.private)
            if info.private and kit.conversion_not_applicable() is None:
                kit.convert(kit.ram.gpa_of(2), PAGE, private=False)
                kit.write(kit.ram.gpa_of(2), b"shared bytes", private=False)
            kvm.mmap_anonymous(MiB).write(0, b"host bytes")
            host, vm = kvm.snapshot(), kit.vm.snapshot()
            assert isinstance(host, HostSnapshot) and isinstance(vm, VmSnapshot)
            assert host.vms[0] == vm
            for snap in (host, vm):
                assert round_trip(snap) == snap
                assert snapshot_from_json(snapshot_to_json(snap)) == snap
            if backend != "sw":
                assert host.arch is not None and vm.arch is not None, "the backend's tables"
            assert any(m.kind == "anon" and m.memory for m in host.mappings)
            assert any(f.prepared for g in vm.gmem for f in g.folios)
        finally:
            kit.close()


def test_a_snapshot_changes_with_the_bytes_of_a_page(kvm: Any, protected_vm: Any) -> None:
    """Equal snapshots, equal state: a store changes the digest of its folio run, a punch
    its folios, a conversion the attributes and leaves; nothing else moves."""
    gmem = gmem_slot(protected_vm, MiB)
    protected_vm.set_memory_attributes(0, MiB, PRIVATE)
    vcpu = protected_vm.create_vcpu(0)
    vcpu.access(0x3000, data=b"one")
    before = protected_vm.snapshot()
    assert protected_vm.snapshot() == before
    vcpu.access(0x3000, data=b"two")
    after = protected_vm.snapshot()
    assert after != before
    assert after.gmem[0].folios[0].digest != before.gmem[0].folios[0].digest
    assert after.leaves == before.leaves and after.memslots == before.memslots
    vcpu.access(0x3000, data=b"one")
    assert protected_vm.snapshot() == before  # the same bytes again: the same digest
    gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0x3000, PAGE)
    punched = protected_vm.snapshot()
    assert not punched.gmem[0].folios and not punched.leaves


def test_digests_follow_the_bytes_not_the_pfns(kvm: Any) -> None:
    """Pages holding the same bytes hash alike whatever their pfns; zero edges of a page's
    stored window do not count (a stored zero is no byte); where a byte lies does."""
    host = kvm.host  # the core's tests look inside the model
    a, b, c, d = (host.alloc(1) for _ in range(4))
    host.write(a, 4, b"same")
    host.write(b, 0, b"\0\0\0\0same\0\0")
    host.write(c, 0, b"same")
    host.write(d, 8, b"\0")
    assert host.digest(a, 1) == host.digest(b, 1) != host.digest(c, 1)
    assert host.digest(d, 1) == host.digest(host.alloc(1), 1)  # a stored zero reads as none
    assert host.digest(a, 1) != host.digest(a, 2)  # the length counts


def test_a_terabyte_guest_snapshot_costs_its_runs() -> None:
    """A 1 TiB guest that touched a thousand pages: a snapshot holds about a thousand runs of
    each kind, and its JSON is a few hundred KiB, not a page table of a terabyte."""
    with guestmem.open("sw") as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = vm.create_guest_memfd(TiB)
        vm.set_user_memory_region2(0, GMEM, 0, TiB, 0, gmem, 0)
        vm.set_memory_attributes(0, TiB, PRIVATE)
        vcpu = vm.create_vcpu(0)
        for i in range(1000):
            vcpu.access((i * 7919) << 12, data=b"touched")
        snap = kvm.snapshot()
        assert len(snap.vms[0].leaves) == 1000 and len(snap.vms[0].gmem[0].folios) == 1000
        assert snap.vms[0].attributes[0].end == TiB >> 12
        assert len(snapshot_to_json(snap)) < 1 << 20


def test_a_snapshot_lists_descriptors_mappings_and_allocations(kvm: Any, default_vm: Any) -> None:
    gmem = default_vm.create_guest_memfd(MiB, uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED)
    mapping = gmem.mmap(MiB)
    mapping.write(2 * PAGE, b"host")
    snap = kvm.snapshot()
    kinds = {(fd.kind, fd.fd) for fd in snap.fds}
    assert ("vm", default_vm.fileno()) in kinds and ("gmem", gmem.fileno()) in kinds
    assert ("kvm", kvm.fileno()) in kinds
    gmem_map = next(m for m in snap.mappings if m.kind == "gmem")
    assert gmem_map.faulted == (Span(2, 3),) and gmem_map.address == mapping.address
    state = snap.vms[0].gmem[0]
    assert state.host_mapped == (Span(2, 3),) and state.folios[0] == FolioRun(
        2, 3, state.folios[0].pfn, True, False, state.folios[0].digest
    )
    assert any(s.start <= state.folios[0].pfn < s.end for s in snap.allocated)


class BadSnapshot:
    """A policy whose tables do not convert to JSON."""

    @guestmem.hookimpl
    def guestmem_snapshot(self) -> object:
        return {"table": object()}


class TableSnapshot:
    """A policy reporting a table per VM and a host-wide one."""

    @guestmem.hookimpl
    def guestmem_snapshot(self, vm: Any) -> object:
        return {"scope": "host"} if vm is None else [{"vm": vm.vm_id, "pages": (1, 2)}]


def test_the_backend_tables_are_json_data() -> None:
    """``guestmem_snapshot``: what the policy returns becomes JSON data (tuples lists); a
    value that does not convert is a BackendError naming the backend."""
    with throwaway_backend("t-snap", x86_type(1), policy=TableSnapshot()) as kvm:
        vm = kvm.create_vm(1)
        snap = kvm.snapshot()
        assert snap.arch == {"scope": "host"} and snap.vms[0].arch == [{"vm": vm.vm_id, "pages": [1, 2]}]
        assert round_trip(snap) == snap
    with (
        throwaway_backend("t-snap-bad", x86_type(1), policy=BadSnapshot()) as kvm,
        pytest.raises(BackendError, match="guestmem_snapshot"),
    ):
        kvm.snapshot()


class NoteOperations:
    """Observer: counts operations done."""

    def __init__(self) -> None:
        self.done: list[str] = []

    @guestmem.hookimpl
    def guestmem_operation_done(self, operation: str) -> None:
        self.done.append(operation)


def test_a_snapshot_is_an_operation_that_changes_nothing(kvm: Any, protected_vm: Any) -> None:
    """A snapshot runs under the host lock as one operation (another thread's ioctl waits
    for it) and changes no state a later snapshot shows, closed and dead VMs included."""
    notes = NoteOperations()
    with plugin(notes):
        first = kvm.snapshot()
    assert notes.done == ["operation"]
    assert kvm.snapshot() == first
    vcpu = protected_vm.create_vcpu(0)
    vcpu.close()
    assert protected_vm.snapshot().vcpus[0].closed


def test_snapshot_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="not a snapshot"):
        snapshot_from_json('{"snapshot": "disk"}')
    with pytest.raises(ValueError, match="vm_id"):
        snapshot_from_json('{"snapshot": "vm", "vm_type": 0}')
    assert errno.EINVAL  # the module's imports stay used
