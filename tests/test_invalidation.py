"""The MMU invalidation protocol: spec 3.1-3.3 and 3.5 (counters, fault retry, balance)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from gmem_helpers import PAGE, PRIVATE, MiB, anon_slot, gmem_slot, plugin
from hypothesis import given, settings
from hypothesis import strategies as st

import guestmem
from guestmem import GuestExit, KvmError, MemoryFault, uapi

PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
KEEP = uapi.FALLOC_FL_KEEP_SIZE


class ConvertDuringPrepare:
    """Observer: while gmem prepares *gfn*'s folio, userspace converts the gfn to shared."""

    def __init__(self, vm: Any, gfn: int) -> None:
        self.vm, self.gfn, self.fired = vm, gfn, False

    @guestmem.hookimpl
    def guestmem_gmem_prepare(self, vm: Any, gfn: int, pfn: int, order: int) -> None:
        vm = vm._vm  # the core's tests look inside the model
        if vm is self.vm and gfn == self.gfn and not self.fired:
            self.fired = True
            vm.set_memory_attributes(gfn * PAGE, PAGE, 0)


class PunchDuringFault:
    """Observer: just before the leaf is installed, the gmem page is punched out."""

    def __init__(self, gmem: Any, index: int) -> None:
        self.gmem, self.index, self.fired = gmem, index, False
        self.stale_pfn: int | None = None

    @guestmem.hookimpl
    def guestmem_fault(self, vm: Any, fault: Any) -> None:
        if not self.fired and fault.is_private:
            self.fired = True
            self.stale_pfn = fault.pfn
            self.gmem.fallocate(PUNCH, self.index * PAGE, PAGE)


class AccessDuringInvalidation:
    """Observer: inside an invalidation (unmap hook), the guest touches gfns."""

    def __init__(self, vcpu: Any, gfns: list[int]) -> None:
        self.vcpu, self.gfns = vcpu, gfns
        self.results: dict[int, Any] = {}
        self.seen: list[tuple[int, int, int]] = []

    @guestmem.hookimpl
    def guestmem_unmap_gfn_range(self, vm: Any, range: Any) -> None:  # noqa: A002
        vm = vm._vm  # the core's tests look inside the model
        if vm is not self.vcpu.vm or self.results:
            return
        self.seen.append((vm.mmu.invalidate_in_progress, vm.mmu.range_start, vm.mmu.range_end))
        for gfn in self.gfns:
            try:
                self.results[gfn] = self.vcpu.access(gfn * PAGE, 1)
            except (KvmError, GuestExit) as exc:
                self.results[gfn] = exc


@pytest.fixture
def pvm(protected_vm: Any) -> Any:
    """SW_PROTECTED VM, 1 MiB gmem slot at 0 (all private) and 1 MiB anon slot at 4 MiB."""
    protected_vm.gmem_fd = gmem_slot(protected_vm, MiB)
    protected_vm.set_memory_attributes(0, MiB, PRIVATE)
    anon_slot(protected_vm, MiB, slot=1, gpa=4 * MiB)
    return protected_vm


def balanced(vm: Any) -> None:
    assert vm.mmu.invalidate_in_progress == 0


# --- 3.3 fault-side retry -------------------------------------------------------------------------
def test_3_3_conversion_racing_a_fault_makes_it_exit(pvm: Any) -> None:
    """3.3: a conversion during the fault (here inside gmem prepare) bumps mmu_invalidate_seq;
    the fault retries, sees the new attribute and exits with the G-2 memory fault, mapping nothing."""
    race = ConvertDuringPrepare(pvm, 3)
    with plugin(race), pytest.raises(MemoryFault) as info:
        pvm.create_vcpu(0).access(3 * PAGE + 8, 1)
    assert race.fired
    exc = info.value
    assert (exc.errno, exc.rule, exc.gpa, exc.size, exc.flags) == (
        errno.EFAULT,
        "G-2",
        3 * PAGE,
        PAGE,
        uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE,
    )
    assert not pvm.is_mapped(3)
    assert pvm.counters["fault_retries"] >= 1
    balanced(pvm)


def test_3_3_punch_racing_a_fault_never_maps_the_freed_page(pvm: Any) -> None:
    """3.3: a punch hole between pfn resolution and install invalidates the fault; the retry maps
    the fresh folio, never the freed pfn."""
    race = PunchDuringFault(pvm.gmem_fd, 2)
    with plugin(race):
        assert pvm.create_vcpu(0).access(2 * PAGE, 4) == bytes(4)
    assert race.fired and race.stale_pfn is not None
    pfn = pvm.mmu.lookup(2)[0]
    assert pfn == pvm.gmem_pfn(2) != race.stale_pfn
    assert not pvm.host.is_allocated(race.stale_pfn)
    balanced(pvm)


def test_3_3_fault_inside_covering_invalidation_never_installs(pvm: Any) -> None:
    """3.3: while an invalidation covering the gfn is in progress a fault cannot install a leaf;
    a gfn outside the in-progress range faults in normally."""
    vcpu = pvm.create_vcpu(0)
    vcpu.access(0, 1)
    spy = AccessDuringInvalidation(vcpu, [1, 200])
    with plugin(spy):
        pvm.gmem_fd.fallocate(PUNCH, 0, 64 * PAGE)
    assert spy.seen and spy.seen[0] == (1, 0, 64)
    blocked = spy.results[1]
    assert isinstance(blocked, KvmError) and blocked.errno == errno.EAGAIN
    assert not pvm.is_mapped(1)
    assert spy.results[200] == bytes(1) and pvm.is_mapped(200)
    balanced(pvm)


# --- 3.1 / 3.2 / 3.5 counters per operation -----------------------------------------------------
def test_3_2_punch_hole_counts_once_per_view_with_bindings(pvm: Any) -> None:
    """3.2: punching a bound range is one begin/end (seq + 1); an unbound file range is none."""
    seq = pvm.mmu.invalidate_seq
    pvm.gmem_fd.fallocate(PUNCH, 0, 4 * PAGE)
    assert pvm.mmu.invalidate_seq == seq + 1
    pvm.gmem_fd.fallocate(PUNCH, 2 * MiB, 4 * PAGE)  # beyond EOF: no binding there (FA-7)
    assert pvm.mmu.invalidate_seq == seq + 1
    balanced(pvm)


def test_3_2_unbound_file_invalidates_nothing(protected_vm: Any) -> None:
    """3.2: a view without bindings in range takes no MMU invalidation at all."""
    gmem = protected_vm.create_guest_memfd(MiB)
    gmem.fallocate(KEEP, 0, MiB)
    gmem.fallocate(PUNCH, 0, MiB)
    gmem.inject_memory_failure(0)
    gmem.close()
    assert protected_vm.mmu.invalidate_seq == 0
    balanced(protected_vm)


@pytest.mark.parametrize(
    "operation",
    ["punch", "memory-failure", "release", "delete-slot", "move-slot", "convert", "host-zap"],
)
def test_3_1_every_invalidating_operation_is_balanced_and_bumps_seq(pvm: Any, operation: str) -> None:
    """3.1: begin/end pairs: after each operation in_progress is 0 and seq rose by exactly one.

    Memslot delete and move zap without an MMU invalidation (``kvm_invalidate_memslot`` ->
    ``kvm_mmu_zap_memslot`` -> ``kvm_unmap_gfn_range`` under mmu_lock): seq does not move."""
    vm = pvm
    vcpu = vm.create_vcpu(0)
    vcpu.access(0, 1)
    vcpu.access(4 * MiB, 1)
    seq = vm.mmu.invalidate_seq
    slot1 = vm.memslots[(0, 1)]
    if operation == "punch":
        vm.gmem_fd.fallocate(PUNCH, 0, PAGE)
        gone = 0
    elif operation == "memory-failure":
        vm.gmem_fd.inject_memory_failure(0)
        gone = 0
    elif operation == "release":
        vm.gmem_fd.close()
        gone = 0
    elif operation == "delete-slot":
        vm.set_user_memory_region2(1, 0, 4 * MiB, 0, 0)
        gone = (4 * MiB) >> 12
    elif operation == "move-slot":
        vm.set_user_memory_region2(1, 0, 8 * MiB, MiB, slot1.userspace_addr)
        gone = (4 * MiB) >> 12
    elif operation == "convert":
        vm.set_memory_attributes(0, PAGE, 0)
        gone = 0
    else:
        vma = vm.kvm.mm.find(slot1.userspace_addr)
        vma.madv_dontneed(0, PAGE)
        gone = (4 * MiB) >> 12
    assert not vm.is_mapped(gone)
    assert vm.mmu.invalidate_seq == seq + (0 if operation in ("delete-slot", "move-slot") else 1)
    balanced(vm)


def test_3_1_host_zap_outside_slots_invalidates_nothing(pvm: Any) -> None:
    """3.1: an mmu notifier range no memslot maps takes no invalidation."""
    seq = pvm.mmu.invalidate_seq
    other = pvm.kvm.mmap_anonymous(MiB)
    other.write(0, b"x")
    other.madvise(uapi.MADV_DONTNEED, 0, MiB)
    assert pvm.mmu.invalidate_seq == seq


# --- property ------------------------------------------------------------------------------------
_op = st.one_of(
    st.tuples(st.just("access"), st.integers(0, 31), st.booleans()),
    st.tuples(st.just("attr"), st.integers(0, 31), st.integers(1, 8), st.booleans()),
    st.tuples(st.just("punch"), st.integers(0, 31), st.integers(1, 8)),
    st.tuples(st.just("alloc"), st.integers(0, 31), st.integers(1, 8)),
    st.tuples(st.just("prefault"), st.integers(0, 31), st.integers(1, 8)),
    st.tuples(st.just("reslot"), st.integers(0, 1)),
    st.tuples(st.just("hostzap"), st.integers(0, 15), st.integers(1, 4)),
)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(_op, min_size=1, max_size=30))
def test_3_protocol_invariants_hold_after_every_operation(ops: list[tuple[Any, ...]]) -> None:
    """3.1-3.5: after any operation the counters are balanced, and every stage-2 leaf is current:
    its gfn is in a memslot, its privateness equals the attribute, a private leaf maps the gfn's
    gmem pfn, and every mapped pfn is still allocated."""
    with guestmem.open("sw") as kvm, kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM) as vm:
        gmem = vm.create_guest_memfd(32 * PAGE)
        host = kvm.mmap_anonymous(16 * PAGE)
        vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, 16 * PAGE, host.address, gmem, 0)
        vm.set_user_memory_region2(1, uapi.KVM_MEM_GUEST_MEMFD, 16 * PAGE, 16 * PAGE, 0, gmem, 16 * PAGE)
        vcpu = vm.create_vcpu(0)
        for op in ops:
            kind = op[0]
            try:
                if kind == "access":
                    vcpu.access(op[1] * PAGE, 1, write=op[2], data=b"w" if op[2] else None)
                elif kind == "attr":
                    vm.set_memory_attributes(op[1] * PAGE, op[2] * PAGE, PRIVATE if op[3] else 0)
                elif kind == "punch":
                    gmem.fallocate(PUNCH, op[1] * PAGE, op[2] * PAGE)
                elif kind == "alloc":
                    gmem.fallocate(KEEP, op[1] * PAGE, min(op[2], 32 - op[1]) * PAGE)
                elif kind == "prefault":
                    vcpu.pre_fault_memory(op[1] * PAGE, op[2] * PAGE)
                elif kind == "reslot":
                    slot = op[1]
                    vm.set_user_memory_region2(slot, 0, 0, 0, 0)
                    vm.set_user_memory_region2(
                        slot,
                        uapi.KVM_MEM_GUEST_MEMFD,
                        16 * PAGE * slot,
                        16 * PAGE,
                        host.address if slot == 0 else 0,
                        gmem,
                        16 * PAGE * slot,
                    )
                else:
                    host.madvise(uapi.MADV_DONTNEED, op[1] * PAGE, op[2] * PAGE)
            except (KvmError, GuestExit):
                pass
            assert vm.mmu.invalidate_in_progress == 0
            for start, end, spte in vm.mmu.sptes.items():
                for gfn in range(start, end):
                    slot = vm.slot_for_gfn(gfn)
                    assert slot is not None
                    assert spte.private == vm.is_private(gfn), (op, gfn)
                    pfn = gfn + spte.delta
                    if spte.private:
                        assert pfn == vm.gmem_pfn(gfn), (op, gfn)
                    assert vm.host.is_allocated(pfn), (op, gfn)


# --- memslot delete/move and the mmu notifier (kvm_invalidate_memslot, __kvm_handle_hva_range) ------
class _UnmapCounters:
    """Observer: MMU counters seen by each ``kvm_unmap_gfn_range`` call."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int, int]] = []

    @guestmem.hookimpl
    def guestmem_unmap_gfn_range(self, vm: Any, range: Any) -> None:  # noqa: A002
        vm = vm._vm  # the core's tests look inside the model
        self.seen.append((range.start, range.end, range.attr_filter, vm.mmu.invalidate_in_progress))


def test_S9_delete_zaps_through_kvm_unmap_gfn_range_without_an_invalidation(pvm: Any) -> None:
    """S-9: ``kvm_mmu_zap_memslot`` calls ``kvm_unmap_gfn_range`` over the whole slot, both
    filters, under mmu_lock only: nothing in progress, ``mmu_invalidate_seq`` unchanged."""
    vcpu = pvm.create_vcpu(0)
    vcpu.access(4 * MiB, 1)
    seq = pvm.mmu.invalidate_seq
    spy = _UnmapCounters()
    with plugin(spy):
        pvm.set_user_memory_region2(1, 0, 4 * MiB, 0, 0)
    both = uapi.KVM_FILTER_PRIVATE | uapi.KVM_FILTER_SHARED
    assert spy.seen == [((4 * MiB) >> 12, (5 * MiB) >> 12, both, 0)]
    assert pvm.mmu.invalidate_seq == seq
    assert not pvm.is_mapped((4 * MiB) >> 12)


class _DeleteSlotDuringFault:
    """Observer: while a fault on the slot is being resolved, userspace deletes the slot."""

    def __init__(self) -> None:
        self.fired = False

    @guestmem.hookimpl
    def guestmem_fault(self, vm: Any, fault: Any) -> None:
        vm = vm._vm  # the core's tests look inside the model
        if not self.fired:
            self.fired = True
            vm.set_user_memory_region2(1, 0, 4 * MiB, 0, 0)


def test_3_3_fault_racing_a_slot_delete_installs_nothing(pvm: Any) -> None:
    """3.3 / S-9: SRCU keeps a memslot update from overtaking an in-flight fault, so no leaf of
    the deleted slot survives; the retried access finds no memslot (a shared access: MMIO)."""
    race = _DeleteSlotDuringFault()
    with plugin(race), pytest.raises(GuestExit):
        pvm.create_vcpu(0).access(4 * MiB, 1)
    assert race.fired
    assert not pvm.is_mapped((4 * MiB) >> 12)
    assert pvm.mmu.sptes.first() is None


def test_3_1_one_host_event_is_one_invalidation_per_vm(default_vm: Any) -> None:
    """``kvm_mmu_notifier_invalidate_range_start``: one ``kvm_mmu_invalidate_begin`` per VM at
    the first memslot whose hva range overlaps, then every such slot is unmapped (SHARED
    filter); the seq moves by one however many slots the host range covers."""
    mapping = default_vm.kvm.mmap_anonymous(2 * MiB)
    default_vm.set_user_memory_region2(0, 0, 0, MiB, mapping.address)
    default_vm.set_user_memory_region2(1, 0, 16 * MiB, MiB, mapping.address + MiB)
    vcpu = default_vm.create_vcpu(0)
    vcpu.access(0, 1)
    vcpu.access(16 * MiB, 1)
    seq = default_vm.mmu.invalidate_seq
    spy = _UnmapCounters()
    with plugin(spy):
        mapping.madvise(uapi.MADV_DONTNEED, 0, 2 * MiB)
    assert [(s, e, f, n) for s, e, f, n in spy.seen] == [
        (0, MiB >> 12, uapi.KVM_FILTER_SHARED, 1),
        ((16 * MiB) >> 12, (17 * MiB) >> 12, uapi.KVM_FILTER_SHARED, 1),
    ]
    assert default_vm.mmu.invalidate_seq == seq + 1
    assert not default_vm.is_mapped(0) and not default_vm.is_mapped((16 * MiB) >> 12)


def test_3_1_host_zap_of_a_gmem_only_slots_hva_zaps_its_shared_mappings(default_vm: Any) -> None:
    """``__kvm_handle_hva_range`` walks every memslot in the hva interval tree, gmem-only ones
    included: MADV_DONTNEED on the guest_memfd mapping that is the slot's userspace_addr zaps the
    slot's (gmem-backed, shared) leaves."""
    gmem = default_vm.create_guest_memfd(MiB, uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED)
    host = gmem.mmap(MiB)
    default_vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, MiB, host.address, gmem, 0)
    default_vm.create_vcpu(0).access(0, data=b"g")
    assert host.read(0, 1) == b"g"
    seq = default_vm.mmu.invalidate_seq
    host.madvise(uapi.MADV_DONTNEED, 0, PAGE)
    assert not default_vm.is_mapped(0)
    assert default_vm.mmu.invalidate_seq == seq + 1
