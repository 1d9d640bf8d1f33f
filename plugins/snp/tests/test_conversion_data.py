"""No written data is lost to conversions and punches on SNP VMs, 2 MiB folios included.

Issue 9: on ``snp-hugepage`` a page rewritten after a shared round trip read back zeros once
an unrelated page of its 2 MiB folio was punched (a ``guestmem_fault`` hook raised the
mapping level above the split folio's, and a 2 MiB leaf mapped freed pfns).  That ran in a VM
that never saw ``KVM_SEV_INIT2``, where no RMP entry bounds the level; the launch gate
(SNP-2.1) now refuses such a vCPU, and on an SNP guest the RMP page size bounds the level as
well (a partial free PSMASHes the 2 MiB entry).  The core's own regression test is in
``tests/test_hugepage_gmem.py``; these check that SNP guests lose nothing either, with the
RMP and the core's invariants checked after every event (they fail if both the core's
clamp and the RMP bound are removed).
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings

import guestmem
import guestmem_snp
from guestmem import uapi
from guestmem.conformance import CONVERSION_SLOT_PAGES, ConversionReference, conversion_programs
from guestmem.errors import KvmError
from guestmem.invariants import InvariantChecker
from guestmem.registry import get_registry

PAGE = uapi.PAGE_SIZE
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
HOSTS = ["snp", "snp-hugepage"]


@contextlib.contextmanager
def checked_host(backend: str) -> Iterator[Any]:
    """A fresh host with the RMP checker and the core's invariant checker registered."""
    registry = get_registry()
    checkers = [guestmem_snp.RmpChecker(), InvariantChecker()]
    for checker in checkers:
        registry.add_plugin(checker, distribution="test-conversion-data")
    try:
        with guestmem.open(backend) as kvm:
            yield kvm
    finally:
        for checker in checkers:
            registry.remove_plugin(checker)


def launched_vm(kvm: Any) -> tuple[Any, Any, Any]:
    """An SNP VM through INIT2 and an empty launch, with the conversion kit's memslot (all
    private) and vCPU 0."""
    vm = kvm.create_vm(uapi.KVM_X86_SNP_VM)
    sev = guestmem_snp.sev(vm)
    sev.init2()
    size = CONVERSION_SLOT_PAGES * PAGE
    gmem = vm.create_guest_memfd(size)
    vm.set_user_memory_region2(
        0, uapi.KVM_MEM_GUEST_MEMFD, 0, size, kvm.mmap_anonymous(size).address, gmem, 0
    )
    vm.set_memory_attributes(0, size, PRIVATE)
    vcpu = vm.create_vcpu(0)
    sev.snp_launch_start()
    sev.snp_launch_finish()
    return vm, gmem, vcpu


@pytest.mark.parametrize("backend", HOSTS)
def test_issue_9_reproducer_after_the_launch(backend: str) -> None:
    """The reproducer of issue 9 on an SNP VM that went through INIT2 and the launch: the
    rewritten page keeps "AAAA" when an unrelated page of its 2 MiB is punched."""
    with checked_host(backend) as kvm:
        vm, g, v = launched_vm(kvm)
        v.access(0x1000, data=b"secret")
        vm.set_memory_attributes(0x1000, 0x1000, 0)
        g.fallocate(PUNCH, 0x1000, 0x1000)
        v.access(0x1000, 6, private=False)
        vm.set_memory_attributes(0x1000, 0x1000, PRIVATE)
        v.access(0x1000, 6, private=True)
        v.access(0x2000, 6, private=True)
        v.access(0x1000, data=b"AAAA", private=True)
        g.fallocate(PUNCH, 0x100000, 0x1000)
        assert v.access(0x1000, 4, private=True) == b"AAAA"
        guestmem_snp.check_rmp(vm)


@pytest.mark.parametrize("backend", HOSTS)
def test_issue_9_reproducer_as_written_meets_the_launch_gate(backend: str) -> None:
    """The reproducer as the issue wrote it runs the vCPU of an SNP VM that never saw
    KVM_SEV_INIT2: the kernel refuses that KVM_RUN (EINVAL, SNP-2.1) and nothing is faulted in."""
    kvm = guestmem.open(backend)
    vm = kvm.create_vm(uapi.KVM_X86_SNP_VM)
    g = vm.create_guest_memfd(4 << 20)
    sh = kvm.mmap_anonymous(4 << 20)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, 4 << 20, sh.address, g, 0)
    vm.set_memory_attributes(0, 4 << 20, 8)
    v = vm.create_vcpu(0)
    with pytest.raises(KvmError) as info:
        v.access(0x1000, data=b"secret")
    assert (info.value.errno, info.value.rule) == (errno.EINVAL, "SNP-2.1")
    assert vm.gmem_pfn(1) is None


@pytest.mark.parametrize("backend", HOSTS)
@settings(max_examples=60, deadline=None)
@given(program=conversion_programs())
def test_conversions_never_lose_data(backend: str, program: list[Any]) -> None:
    """Random store/load/convert/punch programs on a launched SNP VM read back what
    :class:`guestmem.conformance.ConversionReference` says: punched pages zero, pages
    converted without a punch as they were (the RMP keeps their entries; the shared side is
    the VMM's memory); no RMP-assigned entry on a freed page, no stale stage-2 leaf."""
    with checked_host(backend) as kvm:
        vm, gmem, vcpu = launched_vm(kvm)
        ConversionReference(vm, vcpu, gmem).run(program)
        guestmem_snp.check_rmp(vm)
