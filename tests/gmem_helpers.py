"""Helpers for the rule tests: VM state snapshots and throwaway plugins.

Imported by the test modules (pytest puts ``tests/`` on ``sys.path``); not a test module.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import guestmem
from guestmem import uapi
from guestmem.intents import Intents

PAGE = uapi.PAGE_SIZE
MiB = 1 << 20
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
GMEM = uapi.KVM_MEM_GUEST_MEMFD
READONLY = uapi.KVM_MEM_READONLY
LOG_DIRTY = uapi.KVM_MEM_LOG_DIRTY_PAGES
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED
#: The conformance kit's deep tests (a VM type with private memory runs them all).
DEEP = (
    "test_conversion_private_to_shared_to_private",
    "test_conversion_shared_to_private_to_shared",
    "test_host_access_after_conversion",
    "test_memslot_move_with_mapped_pages",
    "test_memslot_delete_with_mapped_pages",
    "test_gmem_release_while_bound",
    "test_leak_check_after_a_lifecycle",
    "test_stateful_machine",
)


def vm_state(vm: Any, *gmems: Any) -> dict[str, Any]:
    """Everything a memslot, attribute or gmem ioctl may change, as comparable values.

    The host's snapshot (``kvm.snapshot()``: memslots, attributes, stage-2 leaves, every
    guest_memfd's files, bindings and pages with their bytes, host mappings, descriptors,
    allocated memory, VM references, the backend's tables), and what no snapshot shows:
    the MMU invalidation counters and the references of *gmems*' files.
    """
    return {
        "snapshot": vm.kvm.snapshot(),
        "mmu": (vm.mmu.invalidate_in_progress, vm.mmu.invalidate_seq),
        "file_refs": [g.file.refs for g in gmems],
    }


@contextmanager
def plugin(obj: object, distribution: str = "guestmem-tests") -> Iterator[object]:
    """Register *obj* as a plugin for the duration of the block (removed in ``finally``)."""
    registry = guestmem.get_registry()
    registry.add_plugin(obj, distribution=distribution)
    try:
        yield obj
    finally:
        registry.remove_plugin(obj)


class BackendPlugin:
    """A throwaway backend plugin: registers one backend whose policy is *policy* (and
    whose translation of the portable intents is *intents*, the generic base if None)."""

    def __init__(
        self,
        name: str,
        vm_types: tuple[guestmem.VmTypeInfo, ...],
        policy: object,
        *,
        range_faults: bool = False,
        intents: Intents | None = None,
    ) -> None:
        self.name = name
        self.vm_types = vm_types
        self.policy = policy
        self.range_faults = range_faults
        self.intents = intents

    @guestmem.hookimpl
    def guestmem_register_backends(self, register: Callable[[guestmem.Backend], None]) -> None:
        register(
            guestmem.Backend(
                name=self.name,
                summary="throwaway test backend",
                vm_types=self.vm_types,
                policy=self.policy,
                range_faults=self.range_faults,
                intents=self.intents,
            )
        )


class NoHooks:
    """A policy implementing no hook."""


def x86_type(vm_type: int = 1, **overrides: Any) -> guestmem.VmTypeInfo:
    """A VmTypeInfo like sw's (SW_PROTECTED for type 1, DEFAULT for 0) with *overrides*."""
    private = vm_type != 0
    fields: dict[str, Any] = {
        "type": vm_type,
        "name": f"TEST_VM_{vm_type}",
        "has_private_mem": private,
        "nr_memslot_as_ids": 1 if private else 2,
    }
    fields.update(overrides)
    return guestmem.VmTypeInfo(**fields)


def arm64_type(vm_type: int = 0, **overrides: Any) -> guestmem.VmTypeInfo:
    """An arm64 VmTypeInfo as 6.18 has one (no attributes, gmem-only memslots) with *overrides*."""
    fields: dict[str, Any] = {
        "type": vm_type,
        "name": f"ARM_VM_{vm_type:#x}",
        "arch": "arm64",
        "memory_attributes": False,
        "gmem_slot_requires_mmap": True,
        "nr_memslot_as_ids": 1,
    }
    fields.update(overrides)
    return guestmem.VmTypeInfo(**fields)


@contextmanager
def throwaway_backend(
    name: str,
    *vm_types: guestmem.VmTypeInfo,
    policy: object | None = None,
    range_faults: bool = False,
    **open_options: Any,
) -> Iterator[Any]:
    """Register a throwaway backend and yield its opened ``/dev/kvm``; all undone on exit."""
    backend = BackendPlugin(name, vm_types or (x86_type(),), policy or NoHooks(), range_faults=range_faults)
    with plugin(backend):
        kvm = guestmem.open(name, **open_options)
        try:
            yield kvm
        finally:
            kvm.close()


def gmem_slot(
    vm: Any, size: int, *, slot: int = 0, gpa: int = 0, flags: int = 0, offset: int = 0, gmem: Any = None
) -> Any:
    """Create a guest_memfd (unless *gmem* is given) and bind it as memslot *slot* at *gpa*."""
    if gmem is None:
        gmem = vm.create_guest_memfd(size + offset, flags)
    vm.set_user_memory_region2(slot, GMEM, gpa, size, 0, gmem, offset)
    return gmem


def anon_slot(vm: Any, size: int, *, slot: int = 0, gpa: int = 0, flags: int = 0, align: int = PAGE) -> int:
    """A plain (hva) memslot backed by anonymous host memory aligned to *align*; returns the hva."""
    mapping = vm.kvm.mmap_anonymous(size + align)
    hva = (mapping.address + align - 1) // align * align
    vm.set_user_memory_region2(slot, flags, gpa, size, hva)
    return hva


def junit_outcomes(path: Path) -> dict[str, str]:
    """What a pytest run's ``--junitxml`` report says of each test: ``"Class::test"`` (the
    class's own name, the test's with its parameters) to ``passed``, ``skipped``,
    ``failed`` or ``error``.  Tests that check what a run of the kit did assert on these,
    not on pytest's totals, which change whenever the kit gains a test."""
    outcomes: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        key = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        tags = {child.tag for child in case}
        outcome = next((tag for tag in ("failure", "error", "skipped") if tag in tags), "passed")
        outcome = {"failure": "failed"}.get(outcome, outcome)
        if outcomes.get(key) not in ("failed", "error"):  # a teardown error repeats the test
            outcomes[key] = outcome
    return outcomes
