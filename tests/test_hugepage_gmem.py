"""The opt-in hugepage guest_memfd policy (VmTypeInfo.gmem_folio_order = 9).

Not 6.18 behaviour (H-1: order-0 folios only): these tests pin how the model extends the
kernel rules when a backend opts in: the folio order bounds the mapping level (G-6,
``kvm_max_level_for_order``), and a partial punch splits the folio.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import guestmem
from guestmem import uapi

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
