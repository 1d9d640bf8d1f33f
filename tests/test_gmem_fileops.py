"""Plain file operations on a guest_memfd fd (spec 2.C, F-1..F-4)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from gmem_support import MMAP, PAGE, PRIVATE, bind, pattern, raises_kvm
from hypothesis import given, settings
from hypothesis import strategies as st

import guestmem
from guestmem import uapi


@pytest.mark.parametrize("op", ["read", "write"])
def test_F1_read_and_write_fail_EINVAL(default_vm: Any, op: str) -> None:
    """F-1: guest_memfd has no read/write file ops; both fail (EINVAL) and allocate nothing."""
    gmem = default_vm.create_guest_memfd(PAGE)
    with raises_kvm(errno.EINVAL, "F-1"):
        gmem.read(8) if op == "read" else gmem.write(b"x" * 8)
    assert gmem.file.inode.allocated_pages() == 0


def test_F2_fstat_size_blksize_and_distinct_ino(default_vm: Any) -> None:
    """F-2: st_size is the create size, st_blksize is PAGE_SIZE, st_ino differs per create."""
    sizes = [PAGE, 3 * PAGE, 1 << 30]
    stats = [default_vm.create_guest_memfd(size).fstat() for size in sizes]
    assert [s.st_size for s in stats] == sizes
    assert {s.st_blksize for s in stats} == {PAGE}
    assert len({s.st_ino for s in stats}) == len(sizes)


@pytest.mark.parametrize("new_size", [0, PAGE, 2 * PAGE, 8 * PAGE])
def test_F3_truncate_EINVAL_size_never_changes(default_vm: Any, new_size: int) -> None:
    """F-3: ftruncate (setattr) is EINVAL, even to the current size; the size never changes."""
    gmem = default_vm.create_guest_memfd(2 * PAGE)
    with raises_kvm(errno.EINVAL, "F-3"):
        gmem.truncate(new_size)
    assert gmem.fstat().st_size == gmem.file.inode.size == 2 * PAGE


def test_F4_binding_by_fd_number_binds_the_file(protected_vm: Any) -> None:
    """F-4: a raw fd number is resolved to its file at bind time (fget)."""
    vm = protected_vm
    gmem = vm.create_guest_memfd(4 * PAGE)
    bind(vm, gmem.fileno(), 0, 4 * PAGE)
    assert vm.memslots[(0, 0)].gmem_file is gmem.file


def test_F4_slot_keeps_the_file_when_its_fd_number_is_reused(kvm: Any) -> None:
    """F-4: the slot holds the struct file, not the fd number: after the fd is closed (the file
    kept alive by a host mapping, L-6) and the number reused by another guest_memfd, the guest
    still reaches the first file's pages, and binding the number now means the new file."""
    vm = kvm.create_vm(0)
    first = vm.create_guest_memfd(4 * PAGE, MMAP)
    keep = first.mmap(4 * PAGE)  # a file reference that outlives the fd
    bind(vm, first, 0, 4 * PAGE, slot=0)
    number = first.fileno()
    first.close()
    second = vm.create_guest_memfd(4 * PAGE, MMAP)
    assert second.fileno() == number
    slot = vm.memslots[(0, 0)]
    assert slot.gmem_file is first.file and not first.file.released

    vcpu = vm.create_vcpu(0)
    vcpu.access(0, data=pattern(1))  # gmem-only slot: served from gmem (M-7)
    assert first.file.inode.pfn(0) is not None
    assert second.file.inode.pfn(0) is None
    assert vcpu.access(0, 16) == pattern(1)

    bind(vm, number, 0x100000, 4 * PAGE, slot=1)
    assert vm.memslots[(0, 1)].gmem_file is second.file
    keep.close()


def test_F4_closed_fd_number_is_EBADF(protected_vm: Any) -> None:
    """F-4 with B-1: once the number is closed (and not reused), binding it fails with EBADF."""
    vm = protected_vm
    gmem = vm.create_guest_memfd(PAGE)
    number = gmem.fileno()
    gmem.close()
    with raises_kvm(errno.EBADF, "B-1"):
        bind(vm, number, 0, PAGE)
    assert not vm.memslots
    vm.set_memory_attributes(0, PAGE, PRIVATE)  # the VM is still usable


def test_F4_dup_is_another_descriptor_of_the_same_file(protected_vm: Any) -> None:
    """F-4: dup(2) gives a new fd number on the same file; the file lives until both close."""
    gmem = protected_vm.create_guest_memfd(1 << 20)
    twin = gmem.dup()
    assert twin.fileno() != gmem.fileno()
    assert twin.fstat().st_ino == gmem.fstat().st_ino
    gmem.close()
    bind(protected_vm, twin, 0, 1 << 20)
    assert not twin.file.released
    twin.close()
    assert twin.file.released
    with pytest.raises(OSError) as info:
        twin.dup()
    assert info.value.errno == errno.EBADF


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=60))
def test_fd_numbers_are_the_lowest_free(picks: list[int]) -> None:
    """F-*: each new file gets the lowest unused descriptor number (get_unused_fd_flags),
    however files were closed before."""
    with guestmem.open("sw") as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        used = {vm.fileno(), kvm.fileno()}
        files: list[Any] = []
        for pick in picks:
            if files and pick % 3 == 0:
                victim = files.pop(pick % len(files))
                used.discard(victim.fileno())
                victim.close()
            else:
                gmem = vm.create_guest_memfd(PAGE)
                assert gmem.fileno() == min(set(range(3, len(used) + 4)) - used)
                used.add(gmem.fileno())
                files.append(gmem)
