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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# --- large folios (the opt-in hugepage gmem policy): runs of whole folios and huge frames -------
FOLIO = 512
FOLIOS = 3
HUGE_TYPE = x86_type(1, gmem_folio_order=uapi.PMD_ORDER)
_FIRST_FRAME = 0x100000 // FOLIO  # the host's first pfn frame (HostMemory._FIRST_PFN)
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE


class LevelPolicy(RangePolicy):
    """``range_faults`` with a per-pfn ``max_mapping_level`` (SNP's RMP page size): 4K for
    the pfn frames in ``small``; its fault hook ends a run where that answer changes."""

    def __init__(self) -> None:
        super().__init__()
        self.small: set[int] = set()

    @guestmem.hookimpl
    def guestmem_max_mapping_level(self, vm: Any, pfn: int, is_private: bool) -> int | None:
        return L4K if pfn // FOLIO in self.small else None

    @guestmem.hookimpl
    def guestmem_fault(self, vm: Any, fault: Any) -> None:
        first = fault.pfn // FOLIO in self.small
        n = 1
        while n < fault.npages and ((fault.pfn + n) // FOLIO in self.small) == first:
            n += 1
        fault.npages = n
        self.faults.append((fault.gfn, fault.npages))


def _huge_vm(kvm: Any, folios: int) -> tuple[Any, Any]:
    vm = kvm.create_vm(1)
    gmem = gmem_slot(vm, folios * FOLIO * PAGE)
    vm.set_memory_attributes(0, folios * FOLIO * PAGE, PRIVATE)
    return vm, gmem


def test_a_run_of_large_folios_is_one_allocation_prepare_and_fault() -> None:
    """A backend declaring ``range_faults`` on 2 MiB folios: a bulk fault over 8 MiB is one
    ``guestmem_fault``, one ``guestmem_gmem_prepare`` of every folio (order 9, 2048 pages)
    and one leaf range of 2M leaves, counted as four folios, four prepares, four faults:
    what four accesses leave."""
    policy = RangePolicy()
    with throwaway_backend("t-range-huge", HUGE_TYPE, policy=policy, range_faults=True) as kvm:
        ranged, _ = _huge_vm(kvm, 4)
        stepped, _ = _huge_vm(kvm, 4)
        assert ranged.fault_range(0, 4 * FOLIO, private=True) == 4 * FOLIO
        assert policy.faults == [(0, 4 * FOLIO)] and policy.prepared == [(0, 4 * FOLIO)]
        vcpu = stepped.create_vcpu(0)
        for gfn in range(0, 4 * FOLIO, FOLIO):
            vcpu.access(gfn * PAGE, 1)
        assert _state(ranged) == _state(stepped)
        assert [(s, e, spte.level) for s, e, spte in ranged.mmu.sptes.items()] == [(0, 4 * FOLIO, L2M)]
        for key in ("faults", "gmem_prepare", "gmem_folios_allocated"):
            assert ranged.counters[key] == stepped.counters[key] == 4, key


def test_a_per_page_backend_still_sees_one_folio_per_fault() -> None:
    """Without ``range_faults`` a backend implementing the hooks sees every folio's own
    prepare and fault, as before."""
    policy = PerPagePolicy()
    with throwaway_backend("t-perpage-huge", HUGE_TYPE, policy=policy) as kvm:
        vm, _ = _huge_vm(kvm, 3)
        assert vm.fault_range(0, 3 * FOLIO, private=True) == 3 * FOLIO
    assert policy.faults == [(0, 1), (FOLIO, 1), (2 * FOLIO, 1)]
    assert policy.prepared == [(0, FOLIO), (FOLIO, FOLIO), (2 * FOLIO, FOLIO)]


def test_a_run_does_not_take_a_whole_folio_after_a_split_one_at_4k() -> None:
    """What is left of a punched folio is order 0 (mapped 4K) and the whole folio after it,
    in the same stored run, order 9: one access each would map the second 2M, so a bulk
    fault stops at the folio boundary."""
    with throwaway_backend("t-huge-split", HUGE_TYPE, policy=RangePolicy(), range_faults=True) as kvm:
        vm, gmem = _huge_vm(kvm, 2)
        vcpu = vm.create_vcpu(0)
        vcpu.access(0, 1, private=True)
        vcpu.access(FOLIO * PAGE, 1, private=True)
        gmem.fallocate(PUNCH, PAGE, 2 * PAGE)
        guestmem.backend.view(vm).zap_gfn_range(0, 2 * FOLIO)
        assert vm.fault_range(3, 2 * FOLIO - 3, private=True) == 2 * FOLIO - 3
        levels = [(s, e, spte.level) for s, e, spte in vm.mmu.sptes.items()]
        assert levels == [(3, FOLIO, L4K), (FOLIO, 2 * FOLIO, L2M)]


_HUGE_OPS = st.lists(
    st.tuples(
        st.sampled_from(["punch", "shared", "access", "zap", "small"]),
        st.integers(0, FOLIOS * FOLIO - 1),
        st.integers(1, 3 * FOLIO // 2),
    ),
    max_size=6,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_HUGE_OPS, start=st.integers(0, FOLIOS * FOLIO - 1), npages=st.integers(1, FOLIOS * FOLIO))
def test_large_folio_runs_equal_accesses_in_order(
    ops: list[tuple[str, int, int]], start: int, npages: int
) -> None:
    """2.J on 2 MiB folios: after punches (split folios), shared pages, accesses, zaps and a
    per-pfn mapping level, ``fault_range`` leaves the stage-2, the folios, the prepares and
    the counters exactly as the same accesses in order, and stops where they fail."""
    policy = LevelPolicy()
    npages = min(npages, FOLIOS * FOLIO - start)
    with (
        throwaway_backend("t-huge-eq", HUGE_TYPE, policy=policy, range_faults=True) as first,
        guestmem.open("t-huge-eq") as second,
    ):
        runs = []
        for kvm in (first, second):
            vm, gmem = _huge_vm(kvm, FOLIOS)
            runs.append((vm, gmem, vm.create_vcpu(0)))
        for op, gfn, count in ops:
            n = min(count, FOLIOS * FOLIO - gfn)
            if op == "small":
                policy.small.add(_FIRST_FRAME + gfn % 8)
            for vm, gmem, vcpu in runs:
                if op == "punch":
                    gmem.fallocate(PUNCH, gfn * PAGE, n * PAGE)
                elif op == "shared":
                    vm.set_memory_attributes(gfn * PAGE, n * PAGE, 0)
                elif op == "access" and vm.is_private(gfn):
                    vcpu.access(gfn * PAGE, 1, private=True)
                elif op == "zap":
                    guestmem.backend.view(vm).zap_gfn_range(gfn, gfn + n)
        (ranged, rgmem, _), (stepped, sgmem, vcpu) = runs
        policy.prepared.clear()
        try:
            got: int | type = ranged.fault_range(start, npages, private=True)
        except guestmem.KvmError as exc:
            got = type(exc)
        ranged_prepared = sorted(g for gfn, n in policy.prepared for g in range(gfn, gfn + n))
        policy.prepared.clear()
        want: int | type = npages
        gfn = start
        while gfn < start + npages:
            try:
                vcpu.access(gfn * PAGE, 1, private=True)
            except guestmem.KvmError as exc:
                want = type(exc) if gfn == start else gfn - start
                break
            leaf = stepped.mmu.sptes.entry(gfn)  # the accesses to pages it maps cost nothing
            gfn = leaf[1] if leaf is not None else gfn + 1
        if isinstance(got, int) and want == npages:
            want = max(got, npages)  # a huge leaf maps past the end of the range
        assert got == want
        assert ranged_prepared == sorted(g for gfn, n in policy.prepared for g in range(gfn, gfn + n))
        assert _huge_state(ranged, rgmem) == _huge_state(stepped, sgmem)


def _huge_state(vm: Any, gmem: Any) -> tuple[Any, ...]:
    counters = dict(vm.counters)
    counters.pop("memory_fault_exits", None)  # a bulk fault that stops at a page does not exit
    counters.pop("guest_accesses", None)
    leaves = list(vm.mmu.sptes.items())
    folios = list(guestmem.backend.view(gmem).folios())
    return leaves, folios, counters
