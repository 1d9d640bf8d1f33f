"""``ModelVm.fault_range``: a run of stage-2 faults for backends (spec 2.J, 3.3, H-1..H-3).

The contract: the same end state, counters and errors as the same number of guest
accesses in order; range-based (one hook call, one leaf range) only where the state is
uniform and the backend declares ``Backend.range_faults``.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest
from gmem_helpers import PAGE, PRIVATE, MiB, anon_slot, gmem_slot, throwaway_backend, x86_type

import guestmem
from guestmem import MemoryFault, MmioExit, uapi

L4K, L2M = uapi.PG_LEVEL_4K, uapi.PG_LEVEL_2M
PAGES = 256


class RangePolicy:
    """A backend policy that handles range faults; populate marks folios prepared."""

    range_faults = True

    def __init__(self) -> None:
        self.faults: list[tuple[int, int]] = []
        self.prepares = 0
        self.prepared: list[tuple[int, int]] = []
        self.limit: int | None = None

    @guestmem.hookimpl
    def guestmem_fault(self, vm: Any, fault: Any) -> None:
        if self.limit is not None:
            fault.npages = min(fault.npages, self.limit)
        self.faults.append((fault.gfn, fault.npages))

    @guestmem.hookimpl
    def guestmem_gmem_prepare(self, vm: Any, gfn: int, pfn: int, order: int, npages: int) -> None:
        self.prepares += 1
        self.prepared.append((gfn, npages))

    @guestmem.hookimpl
    def guestmem_post_populate(
        self, vm: Any, gfn: int, pfn: int, src: bytes | None, order: int, opaque: Any
    ) -> int:
        return 0


class PerPagePolicy(RangePolicy):
    """The same hooks, without declaring range support."""

    range_faults = False


def _private_vm(kvm: Any, populated: int = PAGES) -> Any:
    vm = kvm.create_vm(1)
    gmem_slot(vm, 2 * MiB)
    vm.set_memory_attributes(0, 2 * MiB, PRIVATE)
    if populated:
        assert vm.gmem_populate(0, None, populated) == populated
    return vm


@pytest.fixture(params=[RangePolicy, PerPagePolicy], ids=["range", "per-page"])
def backend(request: pytest.FixtureRequest) -> Iterator[tuple[Any, RangePolicy]]:
    policy = request.param()
    name = f"t-range-{request.param.__name__}"
    with throwaway_backend(name, x86_type(1), policy=policy, range_faults=policy.range_faults) as kvm:
        yield kvm, policy


def _state(vm: Any) -> tuple[Any, ...]:
    """Leaves (as ranges, each checked to map the gfn's gmem pfn) and the fault counters."""
    leaves = [
        (s, e, spte.private, spte.writable, spte.level, {g + spte.delta - vm.gmem_pfn(g) for g in (s, e - 1)})
        for s, e, spte in vm.mmu.sptes.items()
    ]
    c = vm.counters
    return (leaves, c["faults"], c["stage2_mapped_pages"], c["gmem_prepare"])


def test_fault_range_equals_accesses_in_order(backend: tuple[Any, RangePolicy]) -> None:
    """2.J: ``fault_range`` leaves the stage-2 and the counters exactly as the same accesses
    by a vCPU, prepared folios and not yet prepared ones (G-11) alike."""
    kvm, _ = backend
    ranged, stepped = _private_vm(kvm, 100), _private_vm(kvm, 100)
    assert ranged.fault_range(0, PAGES, private=True) == PAGES
    vcpu = stepped.create_vcpu(0)
    for gfn in range(PAGES):
        vcpu.access(gfn * PAGE, 1)
    assert _state(ranged) == _state(stepped)
    assert ranged.counters["faults"] == PAGES and ranged.counters["gmem_prepare"] == PAGES - 100
    assert ranged.mmu.invalidate_in_progress == 0


def test_range_backend_sees_one_fault_per_uniform_run() -> None:
    """A backend declaring ``range_faults`` gets one ``guestmem_fault`` per uniform run
    (``fault.npages``), and one ``guestmem_gmem_prepare`` for a run of pages that need one."""
    policy = RangePolicy()
    with throwaway_backend("t-range-runs", x86_type(1), policy=policy, range_faults=True) as kvm:
        vm = _private_vm(kvm, 100)
        assert vm.fault_range(0, 102, private=True) == 102
    assert policy.faults == [(0, 100), (100, 2)]
    assert policy.prepared == [(100, 2)]


def test_range_hook_may_shorten_the_run() -> None:
    """The hook lowering ``fault.npages`` limits that run; the rest is faulted after it."""
    policy = RangePolicy()
    policy.limit = 64
    with throwaway_backend("t-range-limit", x86_type(1), policy=policy, range_faults=True) as kvm:
        vm = _private_vm(kvm)
        assert vm.fault_range(0, 200, private=True) == 200
    assert policy.faults == [(0, 64), (64, 64), (128, 64), (192, 8)]


def test_per_page_backend_sees_every_fault() -> None:
    """Without the declaration the hook sees one single-page fault per page."""
    policy = PerPagePolicy()
    with throwaway_backend("t-range-perpage", x86_type(1), policy=policy) as kvm:
        vm = _private_vm(kvm)
        assert vm.fault_range(0, 8, private=True) == 8
    assert policy.faults == [(gfn, 1) for gfn in range(8)]


def test_G2_first_page_raises_later_page_ends_the_range(backend: tuple[Any, RangePolicy]) -> None:
    """G-2: a privateness mismatch on the first page is the memory-fault exit; further on, the
    range ends there and the pages before it stay mapped."""
    kvm, _ = backend
    vm = _private_vm(kvm)
    vm.set_memory_attributes(8 * PAGE, PAGE, 0)
    assert vm.fault_range(0, 16, private=True) == 8
    with pytest.raises(MemoryFault) as info:
        vm.fault_range(8, 4, private=True)
    assert (info.value.errno, info.value.rule, info.value.gpa) == (errno.EFAULT, "G-2", 8 * PAGE)
    assert vm.is_mapped(7) and not vm.is_mapped(8)


def test_G4_no_memslot(backend: tuple[Any, RangePolicy]) -> None:
    """G-4: a shared access without a memslot is MMIO, a private one a memory-fault exit."""
    kvm, _ = backend
    vm = _private_vm(kvm)
    with pytest.raises(MmioExit):
        vm.fault_range(1 << 20, 4, private=False)
    vm.set_memory_attributes(8 * MiB, PAGE, PRIVATE)
    with pytest.raises(MemoryFault) as info:
        vm.fault_range((8 * MiB) >> 12, 4, private=True)
    assert info.value.rule == "G-4"


def test_already_mapped_pages_count_without_a_fault(backend: tuple[Any, RangePolicy]) -> None:
    """Pages whose leaf already serves the access are passed over, as a vCPU would."""
    kvm, _ = backend
    vm = _private_vm(kvm)
    vm.fault_range(0, 16, private=True)
    faults = vm.counters["faults"]
    assert vm.fault_range(4, 20, private=True) == 20
    assert vm.counters["faults"] == faults + 8


def test_hva_path_maps_like_accesses(default_vm: Any) -> None:
    """H-2: on the hva path the faults are the vCPU's, 2 MiB leaves included."""
    anon_slot(default_vm, 4 * MiB, gpa=4 * MiB, align=2 * MiB)
    assert default_vm.fault_range((4 * MiB) >> 12, 1024, private=False) == 1024
    assert default_vm.mapping_level((4 * MiB) >> 12) == L2M
    assert default_vm.counters["faults"] == 2


def test_dead_vm_is_EIO(protected_vm: Any) -> None:
    """CAP-9: nothing is mapped for a dead VM."""
    gmem_slot(protected_vm, MiB)
    protected_vm.kill("test")
    with pytest.raises(guestmem.KvmError) as info:
        protected_vm.fault_range(0, 4, private=False)
    assert info.value.errno == errno.EIO


class PreRun:
    def __init__(self) -> None:
        self.runs = 0

    @guestmem.hookimpl
    def guestmem_vcpu_pre_run(self, vcpu: Any) -> None:
        self.runs += 1


def test_a_closed_vcpus_accesses_are_EBADF_and_map_nothing() -> None:
    """The accesses of a vCPU run inside its ``KVM_RUN`` (``kvm_vcpu_ioctl``): once its fd is
    closed they fail with EBADF before anything is mapped, through ``fault_range`` as through
    ``VcpuView.check_run``, the checks a backend's guest-side instruction makes; an open vCPU
    passes them and its backend's ``guestmem_vcpu_pre_run`` runs.  A destroyed VM maps
    nothing either (EBADF: no fd reaches it)."""
    policy = PreRun()
    with throwaway_backend("t-closed-vcpu", x86_type(1), policy=policy) as kvm:
        vm = kvm.create_vm(1)
        gmem = gmem_slot(vm, MiB)
        vm.set_memory_attributes(0, MiB, PRIVATE)
        vcpu, other = vm.create_vcpu(0), vm.create_vcpu(1)
        vm_view, vcpu_view = guestmem.backend.view(vm), guestmem.backend.view(vcpu)
        vcpu_view.check_run()
        assert policy.runs == 1
        assert vm_view.fault_range(0, 1, private=True, vcpu=vcpu_view) == 1
        vcpu.close()
        for call in (vcpu_view.check_run, lambda: vm_view.fault_range(1, 4, private=True, vcpu=vcpu_view)):
            with pytest.raises(guestmem.KvmError) as info:
                call()
            assert info.value.errno == errno.EBADF
        assert vm_view.leaf(1) is None and vm.counters["faults"] == 1
        assert vm_view.fault_range(1, 4, private=True, vcpu=guestmem.backend.view(other)) == 4
        other.close()
        vm.close()
        gmem.close()
        assert vm.destroyed
        with pytest.raises(guestmem.KvmError) as info:
            vm_view.fault_range(8, 1, private=True)
        assert info.value.errno == errno.EBADF and vm_view.leaf(8) is None


@pytest.mark.parametrize("npages", [0, -1])
def test_npages_must_be_positive(protected_vm: Any, npages: int) -> None:
    with pytest.raises(ValueError):
        protected_vm.fault_range(0, npages, private=False)


def test_64_GiB_of_prepared_private_memory_is_range_based() -> None:
    """Scale: 64 GiB of populated private memory map as one run and one leaf range."""
    policy = RangePolicy()
    size = 64 << 30
    with throwaway_backend("t-range-64g", x86_type(1), policy=policy, range_faults=True) as kvm:
        vm = kvm.create_vm(1)
        gmem_slot(vm, size)
        vm.set_memory_attributes(0, size, PRIVATE)
        inode = vm.slot_for_gfn(0).gmem_file.inode
        inode.allocate(0, size >> 12)
        inode.set_state(0, size >> 12, uptodate=True)
        assert vm.fault_range(0, size >> 12, private=True) == size >> 12
        assert len(vm.mmu.sptes) == 1 and policy.faults == [(0, size >> 12)]
        assert vm.counters["faults"] == size >> 12


class _InvalidateOnce(RangePolicy):
    """The first range fault's hook sees an invalidation end meanwhile (3.3)."""

    def __init__(self) -> None:
        super().__init__()
        self.fired = False

    @guestmem.hookimpl
    def guestmem_fault(self, vm: Any, fault: Any) -> None:
        self.faults.append((fault.gfn, fault.npages))
        if not self.fired:
            self.fired = True
            vm.zap_gfn_range(1 << 30, (1 << 30) + 1)


def test_3_3_a_stale_run_is_not_installed() -> None:
    """3.3: a run whose ``mmu_invalidate_seq`` moved during its fault is not installed; the
    fault is retried from a fresh start, as a run again."""
    policy = _InvalidateOnce()
    with throwaway_backend("t-range-stale", x86_type(1), policy=policy, range_faults=True) as kvm:
        vm = _private_vm(kvm, 16)
        assert vm.fault_range(0, 16, private=True) == 16
        assert policy.faults == [(0, 16), (0, 16)]
        assert vm.counters["faults"] == 16 and vm.mmu.invalidate_in_progress == 0


def test_only_an_exit_that_leaves_is_counted(protected_vm: Any) -> None:
    """A memory-fault exit is counted when KVM_RUN returns with it: not when a bulk fault
    merely stops at the page, nor for KVM_PRE_FAULT_MEMORY, which reports a plain errno."""
    vm = protected_vm
    gmem_slot(vm, MiB)
    vm.set_memory_attributes(0, 8 * PAGE, PRIVATE)
    assert vm.fault_range(0, 16, private=True) == 8  # stops at the shared gfn 8
    assert vm.counters["memory_fault_exits"] == 0
    anon_slot(vm, MiB, slot=1, gpa=4 * MiB)
    vm.set_memory_attributes(4 * MiB, PAGE, PRIVATE)  # private, but the slot has no guest_memfd
    vcpu = vm.create_vcpu(0)
    with pytest.raises(guestmem.KvmError) as info:
        vcpu.pre_fault_memory(4 * MiB, PAGE)
    assert info.value.rule == "G-5" and not isinstance(info.value, MemoryFault)
    assert vm.counters["memory_fault_exits"] == 0
    with pytest.raises(MemoryFault):
        vcpu.access(8 * PAGE, 1, private=True)
    with pytest.raises(MemoryFault):
        vm.fault_range(8, 4, private=True)
    assert vm.counters["memory_fault_exits"] == 2
