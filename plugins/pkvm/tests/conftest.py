"""Shared fixtures: a pkvm host, a protected VM with one gmem-only memslot, the checker."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest

import guestmem
from guestmem import uapi
from guestmem_pkvm.abi import KVM_VM_TYPE_ARM_PROTECTED
from guestmem_pkvm.invariants import IsolationChecker

GPA = 0x8000_0000
SIZE = 64 * uapi.PAGE_SIZE
GMEM_FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
T = TypeVar("T")


@contextlib.contextmanager
def observing(plugin: T, name: str) -> Iterator[T]:
    """*plugin* registered as an observer for the block, removed afterwards."""
    registry = guestmem.get_registry()
    registry.add_plugin(plugin, name=f"{name}-{id(plugin):x}")
    try:
        yield plugin
    finally:
        registry.remove_plugin(plugin)


@pytest.fixture
def checker() -> Iterator[IsolationChecker]:
    """The isolation observer, registered for the test and removed afterwards."""
    with observing(IsolationChecker(), "pkvm-isolation") as checker:
        yield checker
    assert checker.violations == []


@pytest.fixture
def kvm() -> Iterator[Any]:
    with guestmem.open("pkvm") as kvm:
        yield kvm


class Guest:
    """A protected VM with gmem ``[GPA, GPA+SIZE)`` (MMAP|INIT_SHARED), a host mapping, vCPU 0."""

    def __init__(self, kvm: Any, vm_type: int = KVM_VM_TYPE_ARM_PROTECTED) -> None:
        self.vm = kvm.create_vm(vm_type)
        self.gmem = self.vm.create_guest_memfd(SIZE, GMEM_FLAGS)
        self.vm.set_user_memory_region2(
            0, uapi.KVM_MEM_GUEST_MEMFD, GPA, SIZE, guest_memfd=self.gmem, guest_memfd_offset=0
        )
        self.map = self.gmem.mmap(SIZE)
        self.vcpu = self.vm.create_vcpu(0)

    def teardown(self) -> None:
        """Release in the order a VMM does: vCPU, VM fd, mapping, then the gmem fd."""
        self.vcpu.close()
        self.vm.close()
        self.map.close()
        self.gmem.close()


@pytest.fixture
def guest(kvm: Any, checker: IsolationChecker) -> Iterator[Guest]:
    g = Guest(kvm)
    yield g
    if not g.vm.destroyed:
        g.teardown()
