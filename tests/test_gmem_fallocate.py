"""fallocate on a guest_memfd (spec 2.D, FA-1..FA-11).

The order of checks is VFS (FA-1) -> mode (FA-2, FA-3) -> alignment (FA-4) -> allocate's size
check (FA-5); inputs below break two rules at once to pin which one wins.  FA-6's -EINTR on a
pending signal is not modelled (the model has no signals).
"""

from __future__ import annotations

import errno
import time
from typing import Any

import pytest
from gmem_support import (
    INIT_SHARED,
    KEEP,
    MMAP,
    PAGE,
    PRIVATE,
    PUNCH,
    bind,
    inode_state,
    pattern,
    raises_kvm,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import guestmem
from guestmem import uapi

COLLAPSE_RANGE = 0x08
ZERO_RANGE = 0x10
# FALLOC_FL_MODE_MASK | KEEP_SIZE of 6.18 (NO_HIDE_STALE, 0x04, is not a valid mode bit).
_VFS_MODES = 0x01 | 0x02 | 0x08 | 0x10 | 0x20 | 0x40 | 0x80


@pytest.fixture
def gmem(default_vm: Any) -> Any:
    """A 16-page guest_memfd of a DEFAULT VM."""
    return default_vm.create_guest_memfd(16 * PAGE)


@pytest.fixture
def shared_gmem(default_vm: Any) -> Any:
    """A 16-page MMAP|INIT_SHARED guest_memfd of a DEFAULT VM (host-mappable everywhere)."""
    return default_vm.create_guest_memfd(16 * PAGE, MMAP | INIT_SHARED)


@pytest.mark.parametrize(("offset", "length"), [(-PAGE, PAGE), (0, 0), (0, -PAGE), (-1, 0)])
@pytest.mark.parametrize("mode", [KEEP, PUNCH])
def test_FA1_negative_offset_or_bad_len_EINVAL(gmem: Any, mode: int, offset: int, length: int) -> None:
    """FA-1: offset < 0 or len <= 0 is EINVAL (VFS), for allocate and punch."""
    with raises_kvm(errno.EINVAL, "FA-1"):
        gmem.fallocate(mode, offset, length)
    assert inode_state(gmem) == []


@pytest.mark.parametrize("mode", [0, 0x40, uapi.FALLOC_FL_PUNCH_HOLE])
def test_FA1_len_checked_before_mode(gmem: Any, mode: int) -> None:
    """FA-1 before FA-2/FA-3: a zero length with a bad mode is EINVAL, not EOPNOTSUPP."""
    with raises_kvm(errno.EINVAL, "FA-1"):
        gmem.fallocate(mode, 0, 0)


@pytest.mark.parametrize("mode", [0, ZERO_RANGE, COLLAPSE_RANGE])
def test_FA2_without_keep_size_EOPNOTSUPP(gmem: Any, mode: int) -> None:
    """FA-2: a mode lacking FALLOC_FL_KEEP_SIZE is EOPNOTSUPP (the size can't change)."""
    with raises_kvm(errno.EOPNOTSUPP):
        gmem.fallocate(mode, 0, PAGE)
    assert inode_state(gmem) == []


def test_FA2_plain_allocate_mode_names_FA2(gmem: Any) -> None:
    """FA-2: mode 0 (plain allocate, which would grow i_size) is refused by guest_memfd itself."""
    with raises_kvm(errno.EOPNOTSUPP, "FA-2"):
        gmem.fallocate(0, 0, PAGE)


@pytest.mark.parametrize("extra", [ZERO_RANGE, 0x20, 0x40, COLLAPSE_RANGE, 0x100])
def test_FA3_bits_beyond_keep_size_and_punch_EOPNOTSUPP(gmem: Any, extra: int) -> None:
    """FA-3: KEEP_SIZE with any bit other than PUNCH_HOLE is EOPNOTSUPP; nothing allocated."""
    with raises_kvm(errno.EOPNOTSUPP):
        gmem.fallocate(KEEP | extra, 0, PAGE)
    assert inode_state(gmem) == []


def test_FA2_FA3_mode_checked_before_alignment(gmem: Any) -> None:
    """FA-2/FA-3 before FA-4: a bad mode with an unaligned range is EOPNOTSUPP, not EINVAL."""
    with raises_kvm(errno.EOPNOTSUPP, "FA-2"):
        gmem.fallocate(0, 1, 1)
    with raises_kvm(errno.EOPNOTSUPP, "FA-3"):
        gmem.fallocate(KEEP | ZERO_RANGE, 1, 1)


@pytest.mark.parametrize(("offset", "length"), [(1, PAGE), (0, 1), (PAGE, PAGE + 1), (PAGE - 1, PAGE + 1)])
@pytest.mark.parametrize("mode", [KEEP, PUNCH])
def test_FA4_unaligned_EINVAL(gmem: Any, mode: int, offset: int, length: int) -> None:
    """FA-4: an unaligned offset or length is EINVAL for allocate and for punch."""
    with raises_kvm(errno.EINVAL, "FA-4"):
        gmem.fallocate(mode, offset, length)
    assert inode_state(gmem) == []


def test_FA4_alignment_checked_before_size(gmem: Any) -> None:
    """FA-4 before FA-5: unaligned *and* beyond the end reports the alignment rule."""
    with raises_kvm(errno.EINVAL, "FA-4"):
        gmem.fallocate(KEEP, 32 * PAGE + 1, PAGE)


@pytest.mark.parametrize(
    ("offset", "length"), [(16 * PAGE, PAGE), (15 * PAGE, 2 * PAGE), (0, 17 * PAGE), (100 * PAGE, PAGE)]
)
def test_FA5_allocate_beyond_size_EINVAL_nothing_allocated(gmem: Any, offset: int, length: int) -> None:
    """FA-5: allocate with offset + len > i_size (offset at or past EOF too) is EINVAL, and
    nothing is allocated, not even the in-range part."""
    host_pages = gmem.kvm.host.allocated_pages
    with raises_kvm(errno.EINVAL, "FA-5"):
        gmem.fallocate(KEEP, offset, length)
    assert inode_state(gmem) == []
    assert gmem.kvm.host.allocated_pages == host_pages


def test_FA6_allocate_instantiates_exactly_the_range(gmem: Any) -> None:
    """FA-6: allocate instantiates folios for pages [offset>>12, (offset+len)>>12) only."""
    gmem.fallocate(KEEP, 2 * PAGE, 3 * PAGE)
    inode = gmem.file.inode
    assert [i for i in range(16) if inode.pfn(i) is not None] == [2, 3, 4]
    assert inode.allocated_pages() == 3
    gmem.fallocate(KEEP, 0, 16 * PAGE)  # the whole file, up to exactly i_size
    assert inode.allocated_pages() == 16


def test_FA6_allocate_keeps_existing_folios_and_data(shared_gmem: Any) -> None:
    """FA-6: existing folios are untouched by allocate: same pfns, data preserved."""
    inode = shared_gmem.file.inode
    view = shared_gmem.mmap(16 * PAGE)
    view.write(5 * PAGE + 7, pattern(5))
    pfn = inode.pfn(5)
    shared_gmem.fallocate(KEEP, 0, 16 * PAGE)
    assert inode.pfn(5) == pfn
    assert view.read(5 * PAGE + 7, 16) == pattern(5)
    assert view.read(4 * PAGE, 16) == bytes(16)


def test_FA6_allocate_does_not_zero_or_prepare(gmem: Any) -> None:
    """FA-6: new folios are not zeroed or prepared by allocate (zeroing is lazy, G-11/M-5)."""
    gmem.fallocate(KEEP, 0, 4 * PAGE)
    inode = gmem.file.inode
    assert not any(inode.is_prepared(i) for i in range(4))
    assert gmem.file.vm.counters["zeroed_bytes"] == 0


@pytest.mark.parametrize(
    ("offset", "length"), [(16 * PAGE, PAGE), (15 * PAGE, 4 * PAGE), (1 << 40, PAGE), (0, 1 << 50)]
)
def test_FA7_punch_beyond_eof_succeeds(shared_gmem: Any, offset: int, length: int) -> None:
    """FA-7: punching a hole has no size check: ranges past EOF succeed (returns 0)."""
    shared_gmem.fallocate(KEEP, 0, 16 * PAGE)
    shared_gmem.fallocate(PUNCH, offset, length)
    inode = shared_gmem.file.inode
    kept = [i for i in range(16) if inode.pfn(i) is not None]
    assert kept == [i for i in range(16) if not offset <= i * PAGE < offset + length]
    assert shared_gmem.fstat().st_size == 16 * PAGE


def test_FA8_punch_frees_folios_and_host_reads_zeroes(shared_gmem: Any) -> None:
    """FA-8/L-5: punch frees the folios (host pfns released); a later host read sees a fresh
    zeroed page; pages outside the hole keep their data."""
    host = shared_gmem.kvm.host
    inode = shared_gmem.file.inode
    view = shared_gmem.mmap(16 * PAGE)
    for i in (3, 4, 5):
        view.write(i * PAGE, pattern(i))
    old = inode.pfn(4)
    shared_gmem.fallocate(PUNCH, 4 * PAGE, PAGE)
    assert inode.pfn(4) is None and not host.is_allocated(old)
    assert view.read(4 * PAGE, 16) == bytes(16)
    assert inode.pfn(4) not in (None, old)
    assert view.read(3 * PAGE, 16) == pattern(3)
    assert view.read(5 * PAGE, 16) == pattern(5)


def test_FA8_punch_zeroes_seen_by_private_guest_access(protected_vm: Any) -> None:
    """FA-8: after a punch the guest's next private access sees zeroes (fresh folio), and its
    old stage-2 mapping was zapped by the invalidation."""
    vm = protected_vm
    gmem = vm.create_guest_memfd(16 * PAGE)
    bind(vm, gmem, 0, 16 * PAGE)
    vm.set_memory_attributes(0, 16 * PAGE, PRIVATE)
    vcpu = vm.create_vcpu(0)
    vcpu.access(2 * PAGE, data=pattern(2))
    vcpu.access(3 * PAGE, data=pattern(3))
    old = vm.gmem_pfn(2)
    seq = vm.mmu.invalidate_seq
    gmem.fallocate(PUNCH, 2 * PAGE, PAGE)
    assert not vm.is_mapped(2) and vm.is_mapped(3)
    assert vm.mmu.invalidate_seq > seq and vm.mmu.invalidate_in_progress == 0
    assert vcpu.access(2 * PAGE, 16) == bytes(16)
    assert vm.gmem_pfn(2) != old
    assert vcpu.access(3 * PAGE, 16) == pattern(3)


def test_FA8_punch_zeroes_seen_by_guest_on_gmem_only_slot(default_vm: Any) -> None:
    """FA-8 with M-7: on a gmem-only slot, data written by the host is seen by the guest, and
    after a punch both the host mapping and the guest read zeroes."""
    vm = default_vm
    gmem = vm.create_guest_memfd(16 * PAGE, MMAP | INIT_SHARED)
    bind(vm, gmem, 0, 16 * PAGE)
    view = gmem.mmap(16 * PAGE)
    vcpu = vm.create_vcpu(0)
    view.write(6 * PAGE, pattern(6))
    assert vcpu.access(6 * PAGE, 16) == pattern(6)
    gmem.fallocate(PUNCH, 6 * PAGE, PAGE)
    assert not vm.is_mapped(6)
    assert vcpu.access(6 * PAGE, 16) == bytes(16)
    assert view.read(6 * PAGE, 16) == bytes(16)


def test_FA9_punch_zaps_only_bound_gfns_of_the_hole(protected_vm: Any) -> None:
    """FA-9: the zap covers, per bound slot, base_gfn + [max(pgoff,start), min(pgoff+npages,end))
    - pgoff; gfns outside the hole (or bound elsewhere) stay mapped."""
    vm = protected_vm
    gmem = vm.create_guest_memfd(16 * PAGE)
    # slot 0: gmem pages [0, 8) at gfn 0x100; slot 1: pages [8, 16) at gfn 0x400.
    bind(vm, gmem, 0x100 * PAGE, 8 * PAGE, offset=0, slot=0)
    bind(vm, gmem, 0x400 * PAGE, 8 * PAGE, offset=8 * PAGE, slot=1)
    vm.set_memory_attributes(0, 0x1000 * PAGE, PRIVATE)
    vcpu = vm.create_vcpu(0)
    gfns = [*range(0x100, 0x108), *range(0x400, 0x408)]
    for gfn in gfns:
        vcpu.access(gfn * PAGE)
    gmem.fallocate(PUNCH, 6 * PAGE, 4 * PAGE)  # pages 6..9: gfns 0x106, 0x107, 0x400, 0x401
    zapped = {0x106, 0x107, 0x400, 0x401}
    assert [g for g in gfns if not vm.is_mapped(g)] == sorted(zapped)


def test_FA9_invalidate_filter_by_init_shared(default_vm: Any) -> None:
    """FA-9: the invalidation filter is SHARED for INIT_SHARED files, PRIVATE otherwise; the
    x86 direct root zaps every SPTE in range regardless."""
    assert default_vm.create_guest_memfd(PAGE).file.inode.invalidate_filter == uapi.KVM_FILTER_PRIVATE
    shared = default_vm.create_guest_memfd(PAGE, MMAP | INIT_SHARED)
    assert shared.file.inode.invalidate_filter == uapi.KVM_FILTER_SHARED


def test_FA10_success_updates_mtime_failure_does_not(gmem: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """FA-10: a successful allocate or punch updates mtime/ctime (file_modified); a rejected
    fallocate leaves them alone."""
    start = gmem.fstat().st_mtime_ns
    monkeypatch.setattr(time, "time_ns", lambda: start + 5 * 10**9)
    with raises_kvm(errno.EINVAL, "FA-5"):
        gmem.fallocate(KEEP, 0, 32 * PAGE)
    assert gmem.fstat().st_mtime_ns == start
    gmem.fallocate(KEEP, 0, PAGE)
    st = gmem.fstat()
    assert st.st_mtime_ns == st.st_ctime_ns == start + 5 * 10**9
    monkeypatch.setattr(time, "time_ns", lambda: start + 9 * 10**9)
    gmem.fallocate(PUNCH, 0, PAGE)
    assert gmem.fstat().st_mtime_ns == start + 9 * 10**9


def test_FA11_fallocate_after_vm_fd_closed(kvm: Any) -> None:
    """FA-11 (L-1): with the VM fd closed but the gmem fd open, allocate and punch still work."""
    vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    gmem = vm.create_guest_memfd(4 * PAGE)
    vm.close()
    assert not vm.destroyed
    gmem.fallocate(KEEP, 0, 4 * PAGE)
    assert gmem.file.inode.allocated_pages() == 4
    gmem.fallocate(PUNCH, PAGE, PAGE)
    assert gmem.file.inode.allocated_pages() == 3
    gmem.close()
    assert vm.destroyed


def _expected_fallocate_error(
    mode: int, offset: int, length: int, size: int
) -> tuple[int, str | None] | None:
    """The (errno, rule) the VFS + kvm_gmem_fallocate checks give, in their order; None = success.

    A rule of None means only the errno is pinned (VFS mode checks whose rule tag is generic).
    """
    if offset < 0 or length <= 0:
        return errno.EINVAL, "FA-1"
    if mode & ~_VFS_MODES:
        return errno.EOPNOTSUPP, None
    # vfs_fallocate: modes are exclusive; PUNCH_HOLE needs KEEP_SIZE, COLLAPSE (0x08),
    # INSERT (0x20) and WRITE_ZEROES (0x80) refuse it; all before EFBIG.
    single = mode & ~KEEP
    if single not in (0, 0x10, 0x40, uapi.FALLOC_FL_PUNCH_HOLE, 0x08, 0x20, 0x80):
        return errno.EOPNOTSUPP, None
    if single == uapi.FALLOC_FL_PUNCH_HOLE and not mode & KEEP:
        return errno.EOPNOTSUPP, None
    if single in (0x08, 0x20, 0x80) and mode & KEEP:
        return errno.EOPNOTSUPP, None
    if offset + length > uapi.LOFF_MAX:
        return errno.EFBIG, None
    if not mode & KEEP:
        return errno.EOPNOTSUPP, "FA-2"
    if mode & ~PUNCH:
        return errno.EOPNOTSUPP, None  # FA-3 (6.18's VFS refuses some of these combinations first)
    if offset % PAGE or length % PAGE:
        return errno.EINVAL, "FA-4"
    if not mode & uapi.FALLOC_FL_PUNCH_HOLE and offset + length > size:
        return errno.EINVAL, "FA-5"
    return None


_offsets = st.one_of(
    st.integers(-2, 20).map(lambda p: p * PAGE),
    st.tuples(st.integers(-1, 20), st.integers(1, PAGE - 1)).map(lambda t: t[0] * PAGE + t[1]),
    st.sampled_from([uapi.LOFF_MAX - PAGE + 1, uapi.LOFF_MAX & ~(PAGE - 1), 1 << 62]),
)
_modes = st.lists(st.sampled_from([1 << b for b in range(9)]), max_size=3).map(sum)


@settings(max_examples=300, deadline=None)
@given(mode=_modes, offset=_offsets, length=_offsets)
def test_FA1_to_FA5_check_order_property(mode: int, offset: int, length: int) -> None:
    """FA-1..FA-5: for any mode/offset/len, the first failing check in the kernel's order decides
    the errno (and the rule where guest_memfd's own check decides); a rejected call changes
    nothing, an accepted one leaves i_size alone."""
    with guestmem.open("sw") as k:
        gmem = k.create_vm(uapi.KVM_X86_DEFAULT_VM).create_guest_memfd(16 * PAGE)
        gmem.fallocate(KEEP, 4 * PAGE, 4 * PAGE)
        before = (inode_state(gmem), gmem.fstat().st_mtime_ns)
        want = _expected_fallocate_error(mode, offset, length, 16 * PAGE)
        if want is None:
            gmem.fallocate(mode, offset, length)
            assert gmem.fstat().st_size == 16 * PAGE
            return
        with raises_kvm(*want):
            gmem.fallocate(mode, offset, length)
        assert (inode_state(gmem), gmem.fstat().st_mtime_ns) == before
