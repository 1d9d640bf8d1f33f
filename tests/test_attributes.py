"""KVM_SET_MEMORY_ATTRIBUTES: spec 2.I (A-1..A-12) and the attribute protocol of spec 3.5."""

from __future__ import annotations

import errno
from typing import Any

import attrs
import pytest
from gmem_helpers import (
    PAGE,
    PRIVATE,
    MiB,
    anon_slot,
    gmem_slot,
    plugin,
    throwaway_backend,
    vm_state,
    x86_type,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import guestmem
from guestmem import KvmError, uapi
from guestmem.model.profile import UPSTREAM_6_18


def rejects(vm: Any, address: int, size: int, attributes: int, flags: int = 0, *, rule: str) -> None:
    """The ioctl fails with EINVAL by *rule* (or ENOTTY for A-1) and nothing changes."""
    before = vm_state(vm)
    with pytest.raises(KvmError) as info:
        vm.set_memory_attributes(address, size, attributes, flags)
    err = errno.ENOTTY if rule == "A-1" else errno.EINVAL
    assert (info.value.errno, info.value.rule) == (err, rule), info.value
    assert vm_state(vm) == before


class AttrObserver:
    """Observer recording the attribute pre/post hook calls (spec 3.6)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, int, int]] = []

    @guestmem.hookimpl
    def guestmem_pre_set_memory_attributes(self, vm: Any, range: Any) -> None:  # noqa: A002
        vm = vm._vm  # the core's tests look inside the model
        assert vm.mmu.invalidate_in_progress == 1
        self.calls.append(("pre", range.slot.id, range.start, range.end, range.attributes))

    @guestmem.hookimpl
    def guestmem_post_set_memory_attributes(self, vm: Any, range: Any) -> None:  # noqa: A002
        vm = vm._vm  # the core's tests look inside the model
        assert vm.attributes.covers(range.start, range.end, range.attributes or None)
        self.calls.append(("post", range.slot.id, range.start, range.end, range.attributes))


# --- A-1 .. A-6 checks and their order ------------------------------------------------------
def test_A1_not_built_is_ENOTTY() -> None:
    """A-1: without CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES the ioctl falls to the arch: ENOTTY."""
    profile = attrs.evolve(UPSTREAM_6_18, name="no-attrs", memory_attributes=False)
    with guestmem.open("sw", profile=profile) as kvm, kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM) as vm:
        rejects(vm, 0, PAGE, PRIVATE, rule="A-1")


def test_A1_before_A3() -> None:
    """A-1 wins over every argument check (the ioctl does not exist)."""
    profile = attrs.evolve(UPSTREAM_6_18, name="no-attrs", memory_attributes=False)
    with guestmem.open("sw", profile=profile) as kvm, kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM) as vm:
        rejects(vm, 1, 0, 1 << 9, 1, rule="A-1")


def test_A2_fields_are_stored_as_c_stores_them(protected_vm: Any) -> None:
    """A-2: each argument is a ``__u64`` field: a wider value is taken modulo 2**64 and
    the kernel's checks see that (-PAGE + PAGE wraps: A-5; 2**64 is a size of 0: A-5; a
    PRIVATE with bit 64 set is PRIVATE); a non-integer is a TypeError naming it."""
    rejects(protected_vm, -PAGE, PAGE, PRIVATE, rule="A-5")
    rejects(protected_vm, 0, 1 << 64, PRIVATE, rule="A-5")
    protected_vm.set_memory_attributes(0, PAGE, PRIVATE + (1 << 64), flags=1 << 64)
    assert protected_vm.is_private(0)
    for args, name in (((0.0, PAGE, 0), "address"), ((0, None, 0), "size"), ((0, PAGE, "8"), "attributes")):
        with pytest.raises(TypeError, match=name):
            protected_vm.set_memory_attributes(*args)
    assert protected_vm.is_private(0)


@pytest.mark.parametrize("flags", [1, 1 << 63])
def test_A3_flags_must_be_zero(protected_vm: Any, flags: int) -> None:
    """A-3: flags != 0 is EINVAL."""
    rejects(protected_vm, 0, PAGE, PRIVATE, flags, rule="A-3")


def test_A3_before_A4(default_vm: Any) -> None:
    """A-3 (flags) wins over A-4 (unsupported attribute)."""
    rejects(default_vm, 0, PAGE, PRIVATE, 1, rule="A-3")


def test_A4_private_on_vm_without_private_mem(default_vm: Any) -> None:
    """A-4: PRIVATE is unsupported on a VM without private memory (DEFAULT)."""
    rejects(default_vm, 0, PAGE, PRIVATE, rule="A-4")


@pytest.mark.parametrize("attributes", [1, 1 << 2, 1 << 4, PRIVATE | 1, 1 << 63])
def test_A4_unknown_attribute_bits(protected_vm: Any, attributes: int) -> None:
    """A-4: only PRIVATE (1 << 3) is supported."""
    rejects(protected_vm, 0, PAGE, attributes, rule="A-4")


def test_A4_zero_always_passes(default_vm: Any) -> None:
    """A-4: attributes == 0 passes even on a VM without private memory."""
    default_vm.set_memory_attributes(0, PAGE, 0)
    assert not default_vm.attributes


def test_A4_before_A5(default_vm: Any) -> None:
    """A-4 wins over A-5 (size 0)."""
    rejects(default_vm, 0, 0, PRIVATE, rule="A-4")


@pytest.mark.parametrize(
    ("address", "size"),
    [(0, 0), (uapi.U64_MAX - PAGE + 1, 2 * PAGE), (PAGE, uapi.U64_MAX)],
    ids=["size0", "wraps", "wraps-big"],
)
def test_A5_size_zero_or_wrap(protected_vm: Any, address: int, size: int) -> None:
    """A-5: size == 0 or address + size wrapping u64 is EINVAL."""
    rejects(protected_vm, address, size, PRIVATE, rule="A-5")


def test_A5_before_A6(protected_vm: Any) -> None:
    """A-5 (size 0) wins over A-6 (unaligned address)."""
    rejects(protected_vm, 1, 0, PRIVATE, rule="A-5")


@pytest.mark.parametrize(("address", "size"), [(1, PAGE), (0, PAGE + 1), (PAGE // 2, PAGE // 2)])
def test_A6_unaligned(protected_vm: Any, address: int, size: int) -> None:
    """A-6: address or size not page aligned is EINVAL."""
    rejects(protected_vm, address, size, PRIVATE, rule="A-6")


# --- A-7 / A-8 / A-12 ----------------------------------------------------------------------------
def test_A12_default_all_shared(protected_vm: Any) -> None:
    """A-12: a new VM has every gfn shared (attribute 0)."""
    assert not protected_vm.attributes
    assert not any(protected_vm.is_private(g) for g in (0, 1, 1 << 20, protected_vm.max_gfn))


def test_A7_no_memslot_needed_and_no_invalidation(protected_vm: Any) -> None:
    """A-7: attributes need no memslot; with none overlapping, begin/end never run (3.5)."""
    vm = protected_vm
    vm.set_memory_attributes(4 * MiB, 2 * PAGE, PRIVATE)
    assert [vm.is_private(g) for g in (1023, 1024, 1025, 1026)] == [False, True, True, False]
    assert vm.mmu.invalidate_seq == 0
    assert vm.mmu.invalidate_in_progress == 0


def test_A7_attributes_persist_across_slot_delete_and_create(protected_vm: Any) -> None:
    """A-7: attributes are per VM per gfn, independent of memslots (delete and re-create)."""
    vm = protected_vm
    gmem = gmem_slot(vm, MiB)
    vm.set_memory_attributes(PAGE, PAGE, PRIVATE)
    vm.set_user_memory_region2(0, 0, 0, 0, 0)
    assert vm.is_private(1)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, MiB, 0, gmem, 0)
    assert vm.is_private(1) and not vm.is_private(0)
    vcpu = vm.create_vcpu(0)
    vcpu.access(PAGE, data=b"p")  # private fault on gmem
    assert vm.mmu.lookup(1)[1].private


def test_A8_noop_bumps_nothing(protected_vm: Any) -> None:
    """A-8: a range that already has exactly the value: 0, no invalidation, mappings stay."""
    vm = protected_vm
    gmem_slot(vm, MiB)
    vm.set_memory_attributes(0, MiB, PRIVATE)
    vm.create_vcpu(0).access(0, data=b"x")
    before = vm_state(vm)
    counters = dict(vm.counters)
    obs = AttrObserver()
    with plugin(obs):
        vm.set_memory_attributes(0, MiB, PRIVATE)
        vm.set_memory_attributes(PAGE, PAGE, PRIVATE)
        vm.set_memory_attributes(2 * MiB, MiB, 0)  # never set: already 0
    assert vm_state(vm) == before
    assert obs.calls == []
    assert vm.counters.get("remote_tlb_flushes", 0) == counters.get("remote_tlb_flushes", 0)


def test_A8_partial_match_is_not_a_noop(protected_vm: Any) -> None:
    """A-8 applies only if the whole range already matches."""
    vm = protected_vm
    gmem_slot(vm, MiB)
    vm.set_memory_attributes(0, PAGE, PRIVATE)
    seq = vm.mmu.invalidate_seq
    vm.set_memory_attributes(0, 2 * PAGE, PRIVATE)
    assert vm.mmu.invalidate_seq == seq + 1
    assert vm.is_private(1)


# --- effect ---------------------------------------------------------------------------
def test_A10_to_private_zaps_shared_mappings_in_range_only(protected_vm: Any) -> None:
    """A-10: setting PRIVATE zaps the range's (shared) leaves, bumps mmu_invalidate_seq once."""
    vm = protected_vm
    anon_slot(vm, MiB)
    vcpu = vm.create_vcpu(0)
    for gpa in (0, PAGE, 2 * PAGE):
        vcpu.access(gpa, data=b"s")
    assert [vm.is_mapped(g) for g in range(3)] == [True, True, True]
    seq = vm.mmu.invalidate_seq
    vm.set_memory_attributes(PAGE, PAGE, PRIVATE)
    assert [vm.is_mapped(g) for g in range(3)] == [True, False, True]
    assert vm.mmu.invalidate_seq == seq + 1
    assert vm.mmu.invalidate_in_progress == 0


def test_A10_to_shared_zaps_private_mappings(protected_vm: Any) -> None:
    """A-10: clearing PRIVATE zaps the private leaves of the range; the next access is shared."""
    vm = protected_vm
    gmem_slot(vm, MiB)
    vm.set_memory_attributes(0, MiB, PRIVATE)
    vcpu = vm.create_vcpu(0)
    vcpu.access(0, data=b"p")
    vcpu.access(PAGE, data=b"q")
    seq = vm.mmu.invalidate_seq
    vm.set_memory_attributes(0, PAGE, 0)
    assert not vm.is_mapped(0) and vm.is_mapped(1)
    assert vm.mmu.invalidate_seq == seq + 1
    assert not vm.is_private(0)
    assert vm.attributes.get(0) is None  # 0 is stored as "no entry" (xa_erase)


def test_A10_hooks_once_per_overlapping_slot_with_clipped_range(protected_vm: Any) -> None:
    """A-10 / 3.5: pre and post hooks run once per memslot overlapping the range, range ∩ slot."""
    vm = protected_vm
    gmem_slot(vm, MiB, slot=0, gpa=0)
    gmem_slot(vm, MiB, slot=1, gpa=2 * MiB)
    obs = AttrObserver()
    with plugin(obs):
        vm.set_memory_attributes(MiB // 2, 2 * MiB, PRIVATE)  # gpa [0.5 MiB, 2.5 MiB)
    first = ((MiB // 2) >> 12, MiB >> 12)
    second = ((2 * MiB) >> 12, (2 * MiB + MiB // 2) >> 12)
    assert obs.calls == [
        ("pre", 0, *first, PRIVATE),
        ("pre", 1, *second, PRIVATE),
        ("post", 0, *first, PRIVATE),
        ("post", 1, *second, PRIVATE),
    ]
    assert vm.mmu.invalidate_seq == 1


def test_A10_no_overlapping_slot_stores_without_invalidation(protected_vm: Any) -> None:
    """3.5: with slots elsewhere, a change outside them calls no hook and bumps nothing."""
    vm = protected_vm
    gmem_slot(vm, MiB)
    obs = AttrObserver()
    with plugin(obs):
        vm.set_memory_attributes(8 * MiB, MiB, PRIVATE)
    assert obs.calls == []
    assert vm.mmu.invalidate_seq == 0
    assert vm.is_private((8 * MiB) >> 12)


def test_A11_gmem_contents_untouched(protected_vm: Any) -> None:
    """A-11: attribute changes neither allocate nor free nor clear guest_memfd pages."""
    vm = protected_vm
    gmem = gmem_slot(vm, MiB)
    vm.set_memory_attributes(0, MiB, PRIVATE)
    vm.create_vcpu(0).access(0, data=b"secret")
    pages = list(gmem.file.inode.pages.items())
    vm.set_memory_attributes(0, MiB, 0)
    vm.set_memory_attributes(0, MiB, PRIVATE)
    assert list(gmem.file.inode.pages.items()) == pages
    pfn = vm.gmem_pfn(0)
    assert vm.host.read(pfn, 0, 6) == b"secret"


# --- property: the RangeMap against a per-gfn dict ------------------------------------------------
_ops = st.lists(
    st.tuples(st.integers(0, 40), st.integers(1, 12), st.sampled_from([0, PRIVATE])), min_size=1, max_size=25
)


@settings(max_examples=60, deadline=None)
@given(ops=_ops)
def test_A7_A8_attributes_match_naive_model(ops: list[tuple[int, int, int]]) -> None:
    """A-7/A-8/A-10: after any sequence of changes, attributes equal a naive per-gfn dict, and
    mmu_invalidate_seq rose exactly for the changes that were not no-ops and touched a slot."""
    with guestmem.open("sw") as kvm, kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM) as vm:
        gmem_slot(vm, 16 * PAGE, gpa=8 * PAGE)  # gfns [8, 24)
        naive: dict[int, int] = {}
        seq = 0
        for start, n, value in ops:
            noop = all(naive.get(g, 0) == value for g in range(start, start + n))
            touches_slot = start < 24 and start + n > 8
            vm.set_memory_attributes(start * PAGE, n * PAGE, value)
            for g in range(start, start + n):
                naive[g] = value
            if not noop and touches_slot:
                seq += 1
            assert vm.mmu.invalidate_seq == seq
            assert vm.mmu.invalidate_in_progress == 0
        for g in range(0, 60):
            assert vm.is_private(g) == bool(naive.get(g, 0))
        assert all(v == PRIVATE for _, _, v in vm.attributes.items())


def test_A1_architecture_without_attributes_is_ENOTTY() -> None:
    """A-1: the ioctl exists on x86 only; a VM type whose arch lacks it gets ENOTTY."""
    info = x86_type(1, memory_attributes=False)
    with throwaway_backend("t-noattr", info) as kvm, kvm.create_vm(1) as vm:
        assert vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == 0
        rejects(vm, 0, PAGE, PRIVATE, rule="A-1")


class FilterObserver:
    """Observer recording ``range.attr_filter`` of the pre hook."""

    def __init__(self) -> None:
        self.filters: list[int] = []

    @guestmem.hookimpl
    def guestmem_pre_set_memory_attributes(self, vm: Any, range: Any) -> None:  # noqa: A002
        self.filters.append(range.attr_filter)


def test_A10_pre_hook_filter_names_the_old_type(protected_vm: Any) -> None:
    """A-10: going PRIVATE zaps the old (shared) type, filter SHARED; going shared, PRIVATE."""
    gmem_slot(protected_vm, MiB)
    obs = FilterObserver()
    with plugin(obs):
        protected_vm.set_memory_attributes(0, PAGE, PRIVATE)
        protected_vm.set_memory_attributes(0, PAGE, 0)
    assert obs.filters == [uapi.KVM_FILTER_SHARED, uapi.KVM_FILTER_PRIVATE]


def test_A7_64GiB_guest_attributes_are_ranges(protected_vm: Any) -> None:
    """A-7/A-10 at scale: converting a 64 GiB guest back and forth keeps a handful of ranges."""
    vm = protected_vm
    size = 64 << 30
    gmem_slot(vm, size)
    vm.set_memory_attributes(0, size, PRIVATE)
    vcpu = vm.create_vcpu(0)
    for gpa in range(0, size, 1 << 30):
        vcpu.access(gpa, 1)
    vm.set_memory_attributes(PAGE, size - 2 * PAGE, 0)
    assert len(list(vm.attributes.items())) == 2
    assert vm.mmu.mapped_pages() == 1  # only gfn 0 kept its private leaf
    vm.set_memory_attributes(0, size, PRIVATE)
    assert list(vm.attributes.items()) == [(0, size // PAGE, PRIVATE)]
    vm.set_user_memory_region2(0, 0, 0, 0, 0)
    assert vm.mmu.invalidate_in_progress == 0


# --- x86 kvm_arch_pre/post_set_memory_attributes (A-10, spec 3.5, 3.6) ---------------------------
class UnmapAndPostSpy:
    """Observer: the ``kvm_unmap_gfn_range`` calls and the MMU counters each hook saw."""

    def __init__(self) -> None:
        self.unmaps: list[tuple[int, int, int, int, int, int]] = []
        self.posts: list[tuple[int, int]] = []

    @guestmem.hookimpl
    def guestmem_unmap_gfn_range(self, vm: Any, range: Any) -> None:  # noqa: A002
        vm = vm._vm  # the core's tests look inside the model
        mmu = vm.mmu
        busy, lo, hi = mmu.invalidate_in_progress, mmu.range_start, mmu.range_end
        self.unmaps.append((range.start, range.end, range.attr_filter, busy, lo, hi))

    @guestmem.hookimpl
    def guestmem_post_set_memory_attributes(self, vm: Any, range: Any) -> None:  # noqa: A002
        vm = vm._vm  # the core's tests look inside the model
        self.posts.append((vm.mmu.invalidate_in_progress, vm.mmu.invalidate_seq))


def test_A10_pre_hook_unmaps_the_old_type_through_kvm_unmap_gfn_range(protected_vm: Any) -> None:
    """A-10 / x86 ``kvm_arch_pre_set_memory_attributes``: the old attribute's mappings go through
    ``kvm_unmap_gfn_range`` (the ``guestmem_unmap_gfn_range`` hook), once per overlapping slot,
    inside the invalidation, with filter SHARED when becoming private and PRIVATE when shared."""
    gmem_slot(protected_vm, MiB)
    gmem_slot(protected_vm, MiB, slot=1, gpa=MiB)
    spy = UnmapAndPostSpy()
    with plugin(spy):
        protected_vm.set_memory_attributes(MiB - 2 * PAGE, 4 * PAGE, PRIVATE)
        to_private = list(spy.unmaps)
        spy.unmaps.clear()
        protected_vm.set_memory_attributes(MiB - 2 * PAGE, 4 * PAGE, 0)
    slot_end = MiB // PAGE
    assert [(s, e, f, n) for s, e, f, n, _, _ in to_private] == [
        (slot_end - 2, slot_end, uapi.KVM_FILTER_SHARED, 1),
        (slot_end, slot_end + 2, uapi.KVM_FILTER_SHARED, 1),
    ]
    assert [(s, e, f) for s, e, f, _, _, _ in spy.unmaps] == [
        (slot_end - 2, slot_end, uapi.KVM_FILTER_PRIVATE),
        (slot_end, slot_end + 2, uapi.KVM_FILTER_PRIVATE),
    ]
    assert protected_vm.mmu.invalidate_in_progress == 0


def test_A10_head_and_tail_hugepage_frames_join_the_invalidation(protected_vm: Any) -> None:
    """H-4 / ``kvm_arch_pre_set_memory_attributes``: the 2M frames holding the head and the tail
    of the range, wholly inside the slot and not mixed, are added to the in-progress range, so
    no fault maps them huge meanwhile; a frame that is already mixed or leaves the slot is not."""
    gmem_slot(protected_vm, 4 * MiB)
    frame = 512  # pages in a 2M frame
    spy = UnmapAndPostSpy()
    with plugin(spy):
        protected_vm.set_memory_attributes(3 * PAGE, (frame + 2) * PAGE, PRIVATE)  # gfns [3, 517)
    ((_, _, _, _, start, end),) = spy.unmaps
    assert (start, end) == (0, 2 * frame)
    spy.unmaps.clear()
    gmem_slot(protected_vm, MiB, slot=1, gpa=5 * MiB)  # gfns [1280, 1536): frame [1024, 1536) leaves it
    with plugin(spy):
        protected_vm.set_memory_attributes(600 * PAGE, 4 * PAGE, PRIVATE)  # frame [512, 1024) is mixed
        protected_vm.set_memory_attributes(1290 * PAGE, 2 * PAGE, PRIVATE)
    assert [(start, end) for _, _, _, _, start, end in spy.unmaps] == [(600, 604), (1290, 1292)]


def test_A10_post_hooks_run_after_the_invalidation_ended(protected_vm: Any) -> None:
    """3.5: the post pass's ``on_lock`` is ``kvm_mmu_invalidate_end``, so
    ``kvm_arch_post_set_memory_attributes`` runs with the sequence already bumped and nothing
    in progress, once per slot; the sequence moves by exactly one per conversion."""
    gmem_slot(protected_vm, MiB)
    gmem_slot(protected_vm, MiB, slot=1, gpa=MiB)
    seq = protected_vm.mmu.invalidate_seq
    spy = UnmapAndPostSpy()
    with plugin(spy):
        protected_vm.set_memory_attributes(0, 2 * MiB, PRIVATE)
    assert spy.posts == [(0, seq + 1), (0, seq + 1)]
    assert protected_vm.mmu.invalidate_seq == seq + 1
