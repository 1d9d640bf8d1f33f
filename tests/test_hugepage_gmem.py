"""The opt-in hugepage guest_memfd policy (VmTypeInfo.gmem_folio_order = 9).

Not 6.18 behaviour (H-1: order-0 folios only): these tests pin how the model extends the
kernel rules when a backend opts in: the folio order bounds the mapping level (G-6,
``kvm_max_level_for_order``), and a partial punch splits the folio.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from gmem_helpers import plugin as registered
from hypothesis import given, settings
from hypothesis import strategies as st

import guestmem
from guestmem import uapi
from guestmem.conformance import CONVERSION_SLOT_PAGES, ConversionReference, conversion_programs
from guestmem.invariants import InvariantChecker

MiB = 1 << 20
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE


class _Recorder:
    def __init__(self) -> None:
        self.prepared: list[tuple[int, int]] = []
        self.freed: list[tuple[int, int]] = []

    @guestmem.hookimpl
    def guestmem_gmem_prepare(self, vm: Any, gfn: int, pfn: int, order: int) -> None:
        self.prepared.append((gfn, order))

    @guestmem.hookimpl
    def guestmem_gmem_invalidate(self, vm: Any, start_pfn: int, end_pfn: int) -> None:
        self.freed.append((start_pfn, end_pfn))


class _HugeBackend:
    def __init__(self) -> None:
        self.policy = _Recorder()

    @guestmem.hookimpl
    def guestmem_register_backends(self, register: Any) -> None:
        register(
            guestmem.Backend(
                name="huge-test",
                summary="SW_PROTECTED with 2 MiB gmem folios",
                vm_types=[
                    guestmem.VmTypeInfo(
                        type=1, name="HUGE", has_private_mem=True, nr_memslot_as_ids=1, gmem_folio_order=9
                    )
                ],
                policy=self.policy,
            )
        )


@pytest.fixture
def huge() -> Iterator[tuple[Any, Any, Any, _Recorder]]:
    plugin = _HugeBackend()
    registry = guestmem.get_registry()
    registry.add_plugin(plugin, distribution="test-huge")
    try:
        with guestmem.open("huge-test") as kvm:
            vm = kvm.create_vm(1)
            gmem = vm.create_guest_memfd(8 * MiB)
            vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, 8 * MiB, 0, gmem, 0)
            vm.set_memory_attributes(0, 8 * MiB, PRIVATE)
            yield vm, gmem, vm.create_vcpu(0), plugin.policy
    finally:
        registry.remove_plugin(plugin)


def test_folio_order_bounds_the_mapping_level(huge: Any) -> None:
    vm, _, vcpu, rec = huge
    vcpu.access(0x1000, data=b"x")
    assert rec.prepared == [(0, 9)]  # one prepare for the whole 2 MiB folio
    assert vm.mapping_level(1) == uapi.PG_LEVEL_2M
    vm.set_memory_attributes(0x3000, 0x1000, 0)  # H-3: a mixed frame maps 4K
    vcpu.access(0x1000, 1)
    assert vm.mapping_level(1) == uapi.PG_LEVEL_4K


def test_partial_punch_splits_and_frees_only_the_hole(huge: Any) -> None:
    vm, gmem, vcpu, rec = huge
    vcpu.access(0x5000, data=b"keep")
    base = vm.gmem_pfn(0)
    gmem.fallocate(PUNCH, 0x1000, 0x2000)
    assert rec.freed == [(base + 1, base + 3)]
    assert vcpu.access(0x5000, 4) == b"keep"  # the rest of the folio lives on
    vcpu.access(0x2000, data=b"new")  # the hole gets an order-0 page
    assert rec.prepared[-1] == (2, 0)
    assert vm.gmem_pfn(2) not in range(base, base + 512)
    assert vm.mapping_level(2) == uapi.PG_LEVEL_4K


def test_gfn_and_userspace_addr_incongruent_disallows_huge_gmem_mappings(huge: Any) -> None:
    """``kvm_alloc_memslot_metadata``: when ``base_gfn`` and ``userspace_addr`` disagree modulo a
    frame, ``disallow_lpage`` is set for the whole slot at that level, gmem slots included, so
    even a 2 MiB folio maps 4 KiB."""
    vm, gmem, vcpu, _ = huge
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, 0, 0, gmem, 0)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, 8 * MiB, 0x1000, gmem, 0)
    vcpu.access(0x1000, data=b"x")
    assert vm.mapping_level(1) == uapi.PG_LEVEL_4K


# --- conversions and punches never lose data -------------------------------------------------
PAGE = uapi.PAGE_SIZE


class _GreedyPolicy(_Recorder):
    """Asks every private fault for a 2 MiB mapping, as snp-hugepage's ``guestmem_fault`` once
    did from the VM type's folio order, whatever the folio at hand: the core must ignore a
    level raised above what the folio allows (``Fault``: "a value raised above what the core
    computed is ignored")."""

    @guestmem.hookimpl
    def guestmem_fault(self, vm: Any, fault: Any) -> None:
        if fault.is_private:
            fault.max_level = max(fault.max_level, uapi.PG_LEVEL_2M)


@contextlib.contextmanager
def _huge_host(policy: _Recorder) -> Iterator[Any]:
    """A fresh host of the huge-test backend driven by *policy*, with the core's invariant
    checker registered."""
    backend = _HugeBackend()
    backend.policy = policy
    with registered(backend), registered(InvariantChecker()), guestmem.open("huge-test") as kvm:
        yield kvm


def _conversion_vm(kvm: Any, vm_type: int = 1) -> tuple[Any, Any, Any]:
    """A private-memory VM with the conversion kit's memslot, all private, and vCPU 0."""
    vm = kvm.create_vm(vm_type)
    size = CONVERSION_SLOT_PAGES * PAGE
    gmem = vm.create_guest_memfd(size)
    vm.set_user_memory_region2(
        0, uapi.KVM_MEM_GUEST_MEMFD, 0, size, kvm.mmap_anonymous(size).address, gmem, 0
    )
    vm.set_memory_attributes(0, size, PRIVATE)
    return vm, gmem, vm.create_vcpu(0)


@pytest.mark.parametrize("policy", [_Recorder, _GreedyPolicy])
def test_rewritten_page_survives_a_punch_elsewhere_in_its_folio(policy: type[_Recorder]) -> None:
    """The snp-hugepage data loss of issue 9, on a sw-like VM type with 2 MiB folios: convert
    a page to shared and punch it (the folio splits), convert it back, touch a neighbour in
    the same 2 MiB, write the page, then punch an unrelated page of the same 2 MiB.  The page
    keeps what was written; with a policy that raised the mapping level above the split
    folio's, the core once mapped a 2 MiB leaf over the freed pfn here."""
    with _huge_host(policy()) as kvm:
        vm, gmem, v = _conversion_vm(kvm)
        v.access(0x1000, data=b"secret")
        vm.set_memory_attributes(0x1000, 0x1000, 0)
        gmem.fallocate(PUNCH, 0x1000, 0x1000)
        assert v.access(0x1000, 6, private=False) == bytes(6)
        vm.set_memory_attributes(0x1000, 0x1000, PRIVATE)
        assert v.access(0x1000, 6, private=True) == bytes(6)  # punched: a fresh folio
        v.access(0x2000, 6, private=True)
        v.access(0x1000, data=b"AAAA", private=True)
        gmem.fallocate(PUNCH, 0x100000, 0x1000)
        assert v.access(0x1000, 4, private=True) == b"AAAA"


@settings(max_examples=150, deadline=None)
@given(program=conversion_programs(), greedy=st.booleans())
def test_conversions_never_lose_data_with_large_folios(program: list[Any], greedy: bool) -> None:
    """Random store/load/convert/punch programs on 2 MiB folios read back exactly what
    :class:`guestmem.conformance.ConversionReference` says (punched pages zero, pages
    converted without a punch as they were), with the core's invariants checked after every
    event; also under a policy asking for more than the folios allow."""
    with _huge_host(_GreedyPolicy() if greedy else _Recorder()) as kvm:
        vm, gmem, vcpu = _conversion_vm(kvm)
        ConversionReference(vm, vcpu, gmem).run(program)


@settings(max_examples=40, deadline=None)
@given(program=conversion_programs())
def test_conversions_never_lose_data_on_sw(program: list[Any]) -> None:
    """The same programs on sw's SW_PROTECTED VM (order-0 folios, Linux 6.18)."""
    with registered(InvariantChecker()), guestmem.open("sw") as kvm:
        vm, gmem, vcpu = _conversion_vm(kvm, uapi.KVM_X86_SW_PROTECTED_VM)
        ConversionReference(vm, vcpu, gmem).run(program)
