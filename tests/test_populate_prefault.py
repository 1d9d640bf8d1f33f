"""kvm_gmem_populate (spec 2.L, P-1..P-5) and KVM_PRE_FAULT_MEMORY (spec 2.M, PF-1..PF-4)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from gmem_helpers import MMAP, PAGE, PRIVATE, MiB, anon_slot, gmem_slot, plugin, throwaway_backend, x86_type

import guestmem
from guestmem import KvmError, MemoryFault, uapi
from guestmem.errors import EHWPOISON
from guestmem.model.profile import UPSTREAM_6_18


class LaunchPolicy:
    """A backend policy whose post_populate copies *src* into the folio (as SNP/TDX do)."""

    def __init__(self) -> None:
        self.populated: list[tuple[int, int, bytes | None, int, Any]] = []
        self.fail_gfn: int | None = None

    @guestmem.hookimpl
    def guestmem_post_populate(
        self, vm: Any, gfn: int, pfn: int, src: bytes | None, order: int, opaque: Any
    ) -> int:
        if gfn == self.fail_gfn:
            raise KvmError(errno.EIO, "P-5", "measurement failed")
        self.populated.append((gfn, pfn, src, order, opaque))
        if src is not None:
            vm.host.write(pfn, 0, src[: PAGE << order])
        return 0


class PrepareCounter:
    """Observer counting ``guestmem_gmem_prepare``."""

    def __init__(self) -> None:
        self.gfns: list[int] = []

    @guestmem.hookimpl
    def guestmem_gmem_prepare(self, vm: Any, gfn: int, pfn: int, order: int) -> None:
        self.gfns.append(gfn)


@pytest.fixture
def launch() -> Iterator[tuple[Any, LaunchPolicy, Any]]:
    """(vm, policy, gmem): a private-mem VM of a throwaway backend, gmem slot of 16 pages at 0,
    pages 0..7 private."""
    policy = LaunchPolicy()
    with throwaway_backend("t-launch", x86_type(1), policy=policy) as kvm, kvm.create_vm(1) as vm:
        gmem = gmem_slot(vm, 16 * PAGE)
        vm.set_memory_attributes(0, 8 * PAGE, PRIVATE)
        yield vm, policy, gmem


def populate_fails(vm: Any, gfn: int, npages: int, err: int, rule: str) -> None:
    with pytest.raises(KvmError) as info:
        vm.gmem_populate(gfn, None, npages)
    assert (info.value.errno, info.value.rule) == (err, rule), info.value
    assert vm.mmu.invalidate_in_progress == 0


# --- P-1 .. P-5 ------------------------------------------------------------------------------
@pytest.mark.parametrize("npages", [0, -1])
def test_P1_npages_must_be_positive(launch: Any, npages: int) -> None:
    """P-1: npages <= 0 is EINVAL."""
    vm, policy, _ = launch
    populate_fails(vm, 0, npages, errno.EINVAL, "P-1")
    assert policy.populated == []


def test_P2_no_gmem_slot(launch: Any) -> None:
    """P-2: the gfn is in no memslot, or in one without gmem: EINVAL."""
    vm, _, _ = launch
    populate_fails(vm, 1000, 1, errno.EINVAL, "P-2")
    anon_slot(vm, 4 * PAGE, slot=1, gpa=MiB)
    vm.set_memory_attributes(MiB, PAGE, PRIVATE)
    populate_fails(vm, MiB // PAGE, 1, errno.EINVAL, "P-2")


def test_P2_gmem_file_closed_is_EFAULT(launch: Any) -> None:
    """P-2: the slot's gmem file was released: EFAULT."""
    vm, _, gmem = launch
    gmem.close()
    populate_fails(vm, 0, 1, errno.EFAULT, "P-2")


def test_P2_npages_clamped_to_slot_end(launch: Any) -> None:
    """P-2: npages is clamped to the end of the memslot."""
    vm, policy, _ = launch
    vm.set_memory_attributes(0, 16 * PAGE, PRIVATE)
    assert vm.gmem_populate(12, None, 100) == 4
    assert [p[0] for p in policy.populated] == [12, 13, 14, 15]


def test_P3_shared_gfn_is_EINVAL(launch: Any) -> None:
    """P-3: a gfn that is not PRIVATE is EINVAL (nothing populated)."""
    vm, policy, gmem = launch
    populate_fails(vm, 8, 1, errno.EINVAL, "P-3")
    assert policy.populated == []
    assert not gmem.file.inode.is_prepared(8)


def test_P3_stops_at_first_shared_gfn_with_partial_progress(launch: Any) -> None:
    """P-3/P-5: pages 6, 7 private, 8 shared: returns 2 (progress wins over the error)."""
    vm, _, gmem = launch
    assert vm.gmem_populate(6, None, 4) == 2
    inode = gmem.file.inode
    assert [inode.is_prepared(i) for i in (6, 7, 8)] == [True, True, False]


def test_P4_already_prepared_is_EEXIST(launch: Any) -> None:
    """P-4 [6.18]: a folio already uptodate (guest-touched or populated) is EEXIST."""
    vm, _, _ = launch
    vm.create_vcpu(0).access(0, 1)
    populate_fails(vm, 0, 1, errno.EEXIST, "P-4")
    assert vm.gmem_populate(1, None, 1) == 1
    populate_fails(vm, 1, 1, errno.EEXIST, "P-4")


def test_P4_before_P3_prepared_shared_page_is_EEXIST(launch: Any) -> None:
    """P-4 before P-3 (kernel order): a shared gfn whose folio is prepared reports EEXIST."""
    vm, _, _ = launch
    vm.create_vcpu(0).access(2 * PAGE, 1)  # private: prepared
    vm.set_memory_attributes(2 * PAGE, PAGE, 0)  # shared now; the folio stays prepared
    populate_fails(vm, 2, 1, errno.EEXIST, "P-4")


def test_P3_leaves_the_folio_allocated(launch: Any) -> None:
    """P-3: the attribute check runs after __kvm_gmem_get_pfn, so the folio is allocated anyway."""
    vm, _, gmem = launch
    inode = gmem.file.inode
    assert inode.pfn(9) is None
    populate_fails(vm, 9, 1, errno.EINVAL, "P-3")
    assert inode.pfn(9) is not None and not inode.is_prepared(9)


def test_P4_poison_is_reported_before_prepared(launch: Any) -> None:
    """E-2 before P-4: a poisoned folio fails in __kvm_gmem_get_pfn (EHWPOISON) even if prepared."""
    vm, _, gmem = launch
    assert vm.gmem_populate(0, None, 1) == 1
    gmem.inject_memory_failure(0)
    populate_fails(vm, 0, 1, EHWPOISON, "E-2")


def test_P5_success_marks_prepared_and_guest_sees_src(launch: Any) -> None:
    """P-5: post_populate per folio with gfn/pfn/src/order/opaque; folios prepared; no prepare later."""
    vm, policy, gmem = launch
    src = b"".join(bytes([i + 1]) * PAGE for i in range(3))
    counter = PrepareCounter()
    with plugin(counter):
        assert vm.gmem_populate(2, src, 3, opaque="launch-ctx") == 3
        assert vm.create_vcpu(0).access(3 * PAGE, 4) == b"\x02" * 4
    inode = gmem.file.inode
    assert policy.populated == [
        (2 + i, inode.pfn(2 + i), src[i * PAGE : (i + 1) * PAGE], 0, "launch-ctx") for i in range(3)
    ]
    assert all(inode.is_prepared(i) for i in (2, 3, 4))
    assert counter.gfns == []  # populated folios are never prepared again (G-11)
    assert vm.counters["gmem_populated_pages"] == 3


def test_P5_callback_error_after_progress_returns_count(launch: Any) -> None:
    """P-5: an error on the 2nd page returns 1; the failing page is not prepared."""
    vm, policy, gmem = launch
    policy.fail_gfn = 1
    assert vm.gmem_populate(0, None, 4) == 1
    assert [gmem.file.inode.is_prepared(i) for i in (0, 1)] == [True, False]


def test_P5_callback_error_without_progress_is_raised(launch: Any) -> None:
    """P-5: an error on the first page is the result."""
    vm, policy, gmem = launch
    policy.fail_gfn = 0
    populate_fails(vm, 0, 4, errno.EIO, "P-5")
    assert not gmem.file.inode.is_prepared(0)


# --- PF-1 .. PF-4 -------------------------------------------------------------------------------
@pytest.fixture
def pvm(protected_vm: Any) -> Any:
    """SW_PROTECTED VM: gmem slot [0, 1 MiB) first 256 KiB private, anon slot [2 MiB, 6 MiB)."""
    gmem_slot(protected_vm, MiB)
    protected_vm.set_memory_attributes(0, MiB // 4, PRIVATE)
    anon_slot(protected_vm, 4 * MiB, slot=1, gpa=2 * MiB, align=2 * MiB)
    return protected_vm


@pytest.mark.parametrize(
    ("gpa", "size", "flags"),
    [(0, PAGE, 1), (1, PAGE, 0), (0, PAGE + 1, 0), (0, 0, 0), (uapi.U64_MAX - PAGE + 1, 2 * PAGE, 0)],
    ids=["flags", "gpa-unaligned", "size-unaligned", "size0", "wraps"],
)
def test_PF1_bad_arguments_are_EINVAL(pvm: Any, gpa: int, size: int, flags: int) -> None:
    """PF-1: flags != 0, unaligned gpa/size, size 0 or wrap: EINVAL, nothing mapped."""
    vcpu = pvm.create_vcpu(0)
    with pytest.raises(KvmError) as info:
        vcpu.pre_fault_memory(gpa, size, flags)
    assert (info.value.errno, info.value.rule) == (errno.EINVAL, "PF-1")
    assert not pvm.mmu.sptes


def no_tdp_kvm() -> Any:
    return guestmem.open("sw", profile=attrs.evolve(UPSTREAM_6_18, name="no-tdp", tdp_mmu=False))


def test_PF2_without_tdp_mmu_is_EOPNOTSUPP() -> None:
    """PF-2: the non-TDP MMU cannot pre-fault: EOPNOTSUPP (and the cap reports 0)."""
    with no_tdp_kvm() as kvm, kvm.create_vm(uapi.KVM_X86_DEFAULT_VM) as vm:
        assert kvm.check_extension(uapi.KVM_CAP_PRE_FAULT_MEMORY) == 0
        anon_slot(vm, MiB)
        with pytest.raises(KvmError) as info:
            vm.create_vcpu(0).pre_fault_memory(0, PAGE)
        assert (info.value.errno, info.value.rule) == (errno.EOPNOTSUPP, "PF-2")
        assert not vm.mmu.sptes


def test_PF1_before_PF2() -> None:
    """PF-1 (generic argument checks) runs before the arch's PF-2."""
    with no_tdp_kvm() as kvm, kvm.create_vm(uapi.KVM_X86_DEFAULT_VM) as vm:
        with pytest.raises(KvmError) as info:
            vm.create_vcpu(0).pre_fault_memory(0, PAGE, 1)
        assert (info.value.errno, info.value.rule) == (errno.EINVAL, "PF-1")


def test_PF2_vm_type_without_pre_fault_is_EOPNOTSUPP() -> None:
    """PF-2: !pre_fault_allowed (SNP-like VM types) is EOPNOTSUPP."""
    with throwaway_backend("t-nopf", x86_type(1, pre_fault_allowed=False)) as kvm, kvm.create_vm(1) as vm:
        gmem_slot(vm, MiB)
        with pytest.raises(KvmError) as info:
            vm.create_vcpu(0).pre_fault_memory(0, PAGE)
        assert (info.value.errno, info.value.rule) == (errno.EOPNOTSUPP, "PF-2")


def test_PF3_privateness_follows_attributes(pvm: Any) -> None:
    """PF-3: a PRIVATE gfn is pre-faulted private from gmem, a shared one from its hva."""
    vcpu = pvm.create_vcpu(0)
    assert vcpu.pre_fault_memory(0, 2 * PAGE) == 0
    pfn, spte = pvm.mmu.lookup(1)
    assert spte.private and pfn == pvm.gmem_pfn(1)
    assert vcpu.pre_fault_memory(2 * MiB, PAGE) == 0
    assert not pvm.mmu.lookup((2 * MiB) >> 12)[1].private


def test_PF3_shared_gfn_of_gmem_only_slot(default_vm: Any) -> None:
    """PF-3: on a VM without private memory every pre-fault is shared (here served by gmem)."""
    gmem_slot(default_vm, MiB, flags=MMAP)
    assert default_vm.create_vcpu(0).pre_fault_memory(0, PAGE) == 0
    pfn, spte = default_vm.mmu.lookup(0)
    assert not spte.private and pfn == default_vm.gmem_pfn(0)


def test_PF4_no_memslot_is_ENOENT(pvm: Any) -> None:
    """PF-4: no memslot at gpa and no progress: ENOENT."""
    with pytest.raises(KvmError) as info:
        pvm.create_vcpu(0).pre_fault_memory(MiB, PAGE)
    assert (info.value.errno, info.value.rule) == (errno.ENOENT, "PF-4")


def test_PF4_partial_progress_returns_remainder(pvm: Any) -> None:
    """PF-4: mapping stops at the hole after the gmem slot; the remaining size is returned."""
    vcpu = pvm.create_vcpu(0)
    pvm.set_memory_attributes(MiB - 2 * PAGE, 2 * PAGE, PRIVATE)
    left = vcpu.pre_fault_memory(MiB - 2 * PAGE, 5 * PAGE)
    assert left == 3 * PAGE
    assert pvm.is_mapped((MiB >> 12) - 1) and not pvm.is_mapped(MiB >> 12)


def test_PF4_error_without_progress_is_errno_not_exit(protected_vm: Any) -> None:
    """PF-4: a pre-fault failing like a memory-fault exit reports the errno only (no exit)."""
    anon_slot(protected_vm, MiB)
    protected_vm.set_memory_attributes(0, PAGE, PRIVATE)  # private gfn, slot without gmem (G-5)
    with pytest.raises(KvmError) as info:
        protected_vm.create_vcpu(0).pre_fault_memory(0, 2 * PAGE)
    assert info.value.errno == errno.EFAULT
    assert not isinstance(info.value, MemoryFault)


def test_PF4_full_success_returns_zero_and_uses_huge_steps(pvm: Any) -> None:
    """PF-4: all mapped: 0 left; shared THP memory is mapped 2 MiB at a time."""
    vcpu = pvm.create_vcpu(0)
    assert vcpu.pre_fault_memory(2 * MiB, 4 * MiB) == 0
    assert pvm.mapping_level((2 * MiB) >> 12) == uapi.PG_LEVEL_2M
    assert pvm.mmu.mapped_pages() == 1024
    assert pvm.mmu.invalidate_in_progress == 0


def test_PF4_dead_vm_is_EIO(pvm: Any) -> None:
    """PF-4: VM dead: EIO."""
    vcpu = pvm.create_vcpu(0)
    pvm.kill("test")
    with pytest.raises(KvmError) as info:
        vcpu.pre_fault_memory(0, PAGE)
    assert info.value.errno == errno.EIO


def test_PF4_private_gfn_without_memslot_is_EFAULT(protected_vm: Any) -> None:
    """PF-3/PF-4: a PRIVATE gfn with no memslot faults privately (G-4): EFAULT, not ENOENT."""
    protected_vm.set_memory_attributes(8 * MiB, PAGE, PRIVATE)
    with pytest.raises(KvmError) as info:
        protected_vm.create_vcpu(0).pre_fault_memory(8 * MiB, PAGE)
    assert info.value.errno == errno.EFAULT


class _ReturnsErrno(LaunchPolicy):
    """A post_populate that fails by returning ``-EIO`` (the kernel callback's convention)."""

    @guestmem.hookimpl
    def guestmem_post_populate(
        self, vm: Any, gfn: int, pfn: int, src: bytes | None, order: int, opaque: Any
    ) -> int:
        return -errno.EIO if gfn == self.fail_gfn else 0


def test_P5_nonzero_post_populate_return_fails_the_page() -> None:
    """P-5: ``ret = post_populate(...); if (!ret) kvm_gmem_mark_prepared(folio); ... if (ret)
    break``: a nonzero return stops the loop, that folio stays unprepared, and the count of pages
    done is returned (the error if none)."""
    policy = _ReturnsErrno()
    with throwaway_backend("t-populate-ret", x86_type(1), policy=policy) as kvm, kvm.create_vm(1) as vm:
        gmem = gmem_slot(vm, 16 * PAGE)
        vm.set_memory_attributes(0, 8 * PAGE, PRIVATE)
        policy.fail_gfn = 2
        assert vm.gmem_populate(0, None, 4) == 2
        inode = gmem.file.inode
        assert [inode.is_prepared(i) for i in range(3)] == [True, True, False]
        populate_fails(vm, 2, 1, errno.EIO, "P-5")
        assert not inode.is_prepared(2)


class _KillAfterFirstFault:
    """Observer: the backend kills the VM while the first page is being pre-faulted."""

    @guestmem.hookimpl
    def guestmem_fault(self, vm: Any, fault: Any) -> None:
        vm.kill("test")


def test_PF4_vm_killed_during_pre_fault_stops_after_the_mapped_page(protected_vm: Any) -> None:
    """PF-4 / ``kvm_tdp_map_page``: each attempt checks KVM_REQ_VM_DEAD (-EIO); the ioctl stops
    there and, one page being mapped, returns success with the rest left in ``size``."""
    anon_slot(protected_vm, MiB)
    vcpu = protected_vm.create_vcpu(0)
    with plugin(_KillAfterFirstFault()):
        left = vcpu.pre_fault_memory(0, 2 * PAGE)
    assert left == PAGE
    assert protected_vm.is_mapped(0) and not protected_vm.is_mapped(1)
