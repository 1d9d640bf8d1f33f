"""Fixtures: the observers every realm test runs under, and a realm the VMM has set up."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import guestmem
from guestmem import uapi
from guestmem.conformance import OwnershipLedger
from guestmem.invariants import InvariantChecker
from guestmem_cca.invariants import GranuleChecker
from guestmem_cca.rmi import (
    KVM_CAP_ARM_RME,
    KVM_CAP_ARM_RME_ACTIVATE_REALM,
    KVM_CAP_ARM_RME_CREATE_REALM,
    KVM_CAP_ARM_RME_INIT_RIPAS_REALM,
    KVM_VM_TYPE_ARM_REALM,
)

PAGE = uapi.PAGE_SIZE
GPA = 0x40000000
SIZE = 16 * PAGE


@pytest.fixture
def observers() -> Iterator[tuple[GranuleChecker, OwnershipLedger]]:
    """The granule checker, the core's invariant checker and the ownership ledger."""
    registry = guestmem.get_registry()
    granules, ledger, checker = GranuleChecker(), OwnershipLedger(), InvariantChecker()
    for plugin in (granules, ledger, checker):
        registry.add_plugin(plugin, name=f"cca-test-{id(plugin):x}")
    try:
        yield granules, ledger
    finally:
        for plugin in (checker, ledger, granules):
            registry.remove_plugin(plugin)


@pytest.fixture
def kvm(observers: Any) -> Iterator[Any]:
    with guestmem.open("cca") as k:
        yield k


def rme(vm: Any, command: int, *args: int) -> int:
    """``KVM_ENABLE_CAP(KVM_CAP_ARM_RME, command, ...)``."""
    result: int = vm.enable_cap(KVM_CAP_ARM_RME, command, *args)
    return result


class Realm:
    """A realm as kvmtool sets one up: created, RAM at GPA (guest_memfd, its shared side
    anonymous memory, private), a vCPU, RIPAS RAM; activated unless told not to."""

    def __init__(self, kvm: Any, *, activate: bool = True) -> None:
        self.kvm = kvm
        self.vm = kvm.create_vm(KVM_VM_TYPE_ARM_REALM)
        rme(self.vm, KVM_CAP_ARM_RME_CREATE_REALM)
        self.gmem = self.vm.create_guest_memfd(SIZE)
        self.shared = kvm.mmap_anonymous(SIZE)
        self.vm.set_user_memory_region2(
            0, uapi.KVM_MEM_GUEST_MEMFD, GPA, SIZE, self.shared.address, self.gmem, 0
        )
        self.vm.set_memory_attributes(GPA, SIZE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        self.vcpu = self.vm.create_vcpu(0)
        rme(self.vm, KVM_CAP_ARM_RME_INIT_RIPAS_REALM, GPA, SIZE)
        if activate:
            rme(self.vm, KVM_CAP_ARM_RME_ACTIVATE_REALM)

    def close(self) -> None:
        """vCPU, VM, mapping, guest_memfd: as a VMM exits."""
        self.vcpu.close()
        self.vm.close()
        self.shared.close()
        self.gmem.close()


@pytest.fixture
def realm(kvm: Any) -> Iterator[Realm]:
    r = Realm(kvm)
    yield r
    if not r.vcpu.closed:
        r.close()
