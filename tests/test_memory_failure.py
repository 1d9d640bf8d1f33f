"""Hardware memory failure on guest_memfd pages (spec 2.N, E-1, E-2).

``GuestMemfd.inject_memory_failure`` (model only) plays memory_failure() reaching
``kvm_gmem_error_folio`` for the folio at an offset.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
from gmem_helpers import plugin
from gmem_support import INIT_SHARED, MMAP, PAGE, PRIVATE, PUNCH, bind, pattern, raises_kvm

import guestmem
from guestmem import HostSigbus, MemoryFault, uapi
from guestmem.errors import EHWPOISON


@pytest.fixture
def private_guest(protected_vm: Any) -> tuple[Any, Any, Any]:
    """SW_PROTECTED VM, 8-page guest_memfd bound at gpa 0, all private, pages 0..7 touched."""
    vm = protected_vm
    gmem = vm.create_guest_memfd(8 * PAGE)
    bind(vm, gmem, 0, 8 * PAGE)
    vm.set_memory_attributes(0, 8 * PAGE, PRIVATE)
    vcpu = vm.create_vcpu(0)
    for page in range(8):
        vcpu.access(page * PAGE, data=pattern(page))
    return vm, gmem, vcpu


@pytest.fixture
def shared_guest(default_vm: Any) -> tuple[Any, Any, Any, Any]:
    """DEFAULT VM with a gmem-only slot (MMAP|INIT_SHARED, 4 pages at gpa 0) and a host view."""
    vm = default_vm
    gmem = vm.create_guest_memfd(4 * PAGE, MMAP | INIT_SHARED)
    bind(vm, gmem, 0, 4 * PAGE)
    view = gmem.mmap(4 * PAGE)
    for page in range(4):
        view.write(page * PAGE, pattern(page))
    return vm, gmem, vm.create_vcpu(0), view


def test_E1_poison_zaps_sptes_without_truncation(private_guest: tuple[Any, Any, Any]) -> None:
    """E-1: the poisoned folio's SPTEs are zapped through an invalidation, but the folio stays in
    the file (no truncation): same pfn, still allocated; other pages are untouched."""
    vm, gmem, _ = private_guest
    inode = gmem.file.inode
    pfn = inode.pfn(3)
    seq = vm.mmu.invalidate_seq
    gmem.inject_memory_failure(3 * PAGE + 123)
    assert not vm.is_mapped(3)
    assert all(vm.is_mapped(g) for g in range(8) if g != 3)
    assert vm.mmu.invalidate_seq > seq and vm.mmu.invalidate_in_progress == 0
    assert inode.pfn(3) == pfn and vm.kvm.host.is_allocated(pfn)
    assert inode.is_poisoned(3) and not inode.is_poisoned(2)
    assert inode.allocated_pages() == 8


def test_E2_guest_access_to_poisoned_page_is_EHWPOISON(private_guest: tuple[Any, Any, Any]) -> None:
    """E-2: a later guest access to the poisoned page exits with KVM_EXIT_MEMORY_FAULT and
    KVM_RUN errno EHWPOISON (gpa page-aligned, PRIVATE flag); neighbours still work."""
    _, gmem, vcpu = private_guest
    gmem.inject_memory_failure(5 * PAGE)
    with pytest.raises(MemoryFault) as info:
        vcpu.access(5 * PAGE + 0x40, 8)
    exc = info.value
    assert exc.errno == EHWPOISON and exc.rule == "E-2"
    assert exc.exit_reason == uapi.KVM_EXIT_MEMORY_FAULT
    assert (exc.gpa, exc.size, exc.flags) == (5 * PAGE, PAGE, uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    assert vcpu.access(4 * PAGE, 16) == pattern(4)
    assert vcpu.access(6 * PAGE, 16) == pattern(6)


def test_E2_shared_access_on_gmem_only_slot_is_EHWPOISON(shared_guest: tuple[Any, Any, Any, Any]) -> None:
    """E-2: on a gmem-only slot a shared access to the poisoned page is EHWPOISON too (no
    PRIVATE flag)."""
    vm, gmem, vcpu, _ = shared_guest
    assert vcpu.access(PAGE, 16) == pattern(1)
    gmem.inject_memory_failure(PAGE)
    assert not vm.is_mapped(1)
    with pytest.raises(MemoryFault) as info:
        vcpu.access(PAGE)
    assert (info.value.errno, info.value.flags, info.value.gpa) == (EHWPOISON, 0, PAGE)


def test_E1_host_mapping_of_poisoned_page_sigbus(shared_guest: tuple[Any, Any, Any, Any]) -> None:
    """E-1: the poisoned page is unmapped from host VMAs; a host access to it (through the old
    mapping or a new one) is SIGBUS, while its neighbours keep their data."""
    _, gmem, _, view = shared_guest
    inode = gmem.file.inode
    assert inode.host_mapped(2)
    gmem.inject_memory_failure(2 * PAGE)
    assert not inode.host_mapped(2)
    for mapping in (view, gmem.mmap(4 * PAGE)):
        with pytest.raises(HostSigbus) as info:
            mapping.read(2 * PAGE, 1)
        assert info.value.rule == "E-1"
        with pytest.raises(HostSigbus):
            mapping.write(2 * PAGE + 8, b"x")
        assert mapping.read(3 * PAGE, 16) == pattern(3)


def test_E1_poison_survives_slot_delete_and_rebind(private_guest: tuple[Any, Any, Any]) -> None:
    """E-1: poison is a property of the folio (no truncation), so it outlives the binding: a
    rebound slot still gets EHWPOISON."""
    vm, gmem, vcpu = private_guest
    gmem.inject_memory_failure(0)
    vm.set_user_memory_region2(0, 0, 0, 0)
    bind(vm, gmem, 0, 8 * PAGE, slot=1)
    with pytest.raises(MemoryFault) as info:
        vcpu.access(0)
    assert info.value.errno == EHWPOISON


def test_E1_punch_replaces_the_poisoned_folio(private_guest: tuple[Any, Any, Any]) -> None:
    """E-1 with FA-8: punching the poisoned page truncates it; the next access gets a fresh,
    zeroed folio."""
    vm, gmem, vcpu = private_guest
    old = vm.gmem_pfn(7)
    gmem.inject_memory_failure(7 * PAGE)
    gmem.fallocate(PUNCH, 7 * PAGE, PAGE)
    assert vcpu.access(7 * PAGE, 16) == bytes(16)
    assert vm.gmem_pfn(7) != old and not gmem.file.inode.is_poisoned(7)


@pytest.mark.parametrize("offset", [-1, 8 * PAGE, 1 << 40])
def test_E1_injection_outside_the_file_EINVAL(private_guest: tuple[Any, Any, Any], offset: int) -> None:
    """Injection only reaches pages of the file: an offset outside it is EINVAL, nothing poisoned."""
    _, gmem, _ = private_guest
    with raises_kvm(errno.EINVAL, "E-1"):
        gmem.inject_memory_failure(offset)
    assert not any(gmem.file.inode.is_poisoned(i) for i in range(8))


class _PoisonSeenByUnmap:
    """Observer: is the folio already poisoned when its mappings are zapped?"""

    def __init__(self, gmem: Any) -> None:
        self.gmem = gmem
        self.seen: list[bool] = []

    @guestmem.hookimpl
    def guestmem_unmap_gfn_range(self, vm: Any, range: Any) -> None:  # noqa: A002
        self.seen.append(self.gmem.file.inode.is_poisoned(0))


def test_E1_folio_is_poisoned_before_its_mappings_are_zapped(private_guest: tuple[Any, Any, Any]) -> None:
    """E-1: memory_failure() sets PG_hwpoison first, then unmaps the page and calls
    ``error_remove_folio`` (``kvm_gmem_error_folio``: invalidate begin/end): the zap sees it."""
    _, gmem, _ = private_guest
    spy = _PoisonSeenByUnmap(gmem)
    with plugin(spy):
        gmem.inject_memory_failure(0)
    assert spy.seen == [True]
