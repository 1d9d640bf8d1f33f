"""Shared fixtures: a gunyah host, both invariant checkers, a VM with a lent and a shared
binding (the arch face), and helpers to reach the machine's tables."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest

import guestmem
from guestmem.backend import view
from guestmem.invariants import InvariantChecker
from guestmem_gunyah import GunyahFace, abi, create_guest_mem, gunyah
from guestmem_gunyah.driver import GunyahHost
from guestmem_gunyah.invariants import GunyahChecker

PAGE = abi.PAGE_SIZE
MiB = 1 << 20
#: Gunyah guests' memory starts at 1 GiB.
LENT_GPA = 1 << 30
SHARED_GPA = LENT_GPA + 16 * MiB
SIZE = 1 * MiB
RWX = abi.GUNYAH_MEM_ALLOW_RWX
LEND = RWX | abi.GUNYAH_MEM_FORCE_LEND
SHARE = abi.GUNYAH_MEM_ALLOW_READ | abi.GUNYAH_MEM_ALLOW_WRITE | abi.GUNYAH_MEM_FORCE_SHARE
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
def checkers() -> Iterator[tuple[InvariantChecker, GunyahChecker]]:
    """The core's invariant checker and the Gunyah checker, after every event."""
    with (
        observing(InvariantChecker(), "core-invariants") as core,
        observing(GunyahChecker(), "gunyah") as mine,
    ):
        yield core, mine
    assert mine.violations == []


@pytest.fixture
def kvm(checkers: tuple[InvariantChecker, GunyahChecker]) -> Iterator[Any]:
    with guestmem.open("gunyah") as kvm:
        yield kvm


def machine(kvm: Any) -> GunyahHost:
    """The host's Gunyah machine (hypervisor, RM, driver settings)."""
    arch = view(kvm).arch
    assert isinstance(arch, GunyahHost)
    return arch


class Guest:
    """A VM with a lent binding at ``LENT_GPA`` and a shared one at ``SHARED_GPA`` (1 MiB
    each, from their own guest memory files), a DTB page at the start of the lent one."""

    def __init__(
        self, kvm: Any, *, lend_flags: int = LEND, share_flags: int = SHARE, dtb: bool = True
    ) -> None:
        self.kvm = kvm
        self.vm = kvm.create_vm(abi.GUNYAH_VM_TYPE)
        self.gh: GunyahFace = gunyah(self.vm)
        self.lent = create_guest_mem(self.vm, SIZE)
        self.shared = create_guest_mem(self.vm, SIZE)
        self.gh.map_mem(self.lent, LENT_GPA, 0, SIZE, lend_flags)
        self.gh.map_mem(self.shared, SHARED_GPA, 0, SIZE, share_flags)
        if dtb:
            self.gh.set_dtb_config(LENT_GPA, PAGE)
        self.vcpu = self.vm.create_vcpu(0)
        self.maps: list[Any] = []

    def mmap(self, gmem: Any, length: int = SIZE, offset: int = 0) -> Any:
        """A host mapping of *gmem*, closed at teardown."""
        mapping = gmem.mmap(length, offset)
        self.maps.append(mapping)
        return mapping

    def teardown(self) -> None:
        """Release in the order a VMM does: vCPU, VM fd, mappings, guest memory."""
        self.vcpu.close()
        self.vm.close()
        for mapping in self.maps:
            mapping.close()
        self.lent.close()
        self.shared.close()


@pytest.fixture
def guest(kvm: Any) -> Iterator[Guest]:
    g = Guest(kvm)
    yield g
    g.teardown()  # every close is idempotent
