"""``HostMapping.madvise`` in the model: what MADV_DONTNEED and MADV_REMOVE do to guests.

The semantics and errnos every backend shares are in the conformance kit
(``GmemConformance.test_madvise_*``), which runs on sw here and on the real kernel in
``plugins/linux``.
"""

from __future__ import annotations

from typing import Any

from guestmem import uapi

PAGE = uapi.PAGE_SIZE
MiB = 1 << 20
DONTNEED = uapi.MADV_DONTNEED
REMOVE = uapi.MADV_REMOVE


def test_remove_on_a_gmem_mapping_is_a_punch_hole(kvm: Any, default_vm: Any) -> None:
    """kvm_gmem_fallocate through madvise_remove: counted, traced and zapping the guest."""
    flags = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
    gmem = default_vm.create_guest_memfd(MiB, flags)
    view = gmem.mmap(MiB)
    default_vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, MiB, view.address, gmem, 0)
    vcpu = default_vm.create_vcpu(0)
    vcpu.access(PAGE, data=b"guest")
    assert default_vm.is_mapped(1)
    view.madvise(REMOVE, PAGE, PAGE)
    assert not default_vm.is_mapped(1)
    assert default_vm.counters["punch_hole"] == 1
    assert vcpu.access(PAGE, 5) == bytes(5)


def test_dontneed_on_anonymous_memory_zaps_the_guest_mapping(kvm: Any, default_vm: Any) -> None:
    """The MMU notifier: a guest mapping of a slot whose hva range was advised goes."""
    shared = kvm.mmap_anonymous(MiB)
    default_vm.set_user_memory_region(0, 0, 0, MiB, shared.address)
    vcpu = default_vm.create_vcpu(0)
    vcpu.access(0, data=b"x")
    assert default_vm.is_mapped(0)
    shared.madvise(DONTNEED, 0, PAGE)
    assert not default_vm.is_mapped(0)
    assert vcpu.access(0, 1) == b"x"  # refaulted: shmem kept the page
