"""The hypervisor's memory objects on their own: every memextent donation and addrspace
change, and every refusal with its hypervisor error and Linux's errno
(``quic/gunyah-hypervisor`` ``hypercall_memextent_donate``, ``memextent_sparse.c``)."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from guestmem_gunyah import abi
from guestmem_gunyah.abi import Access, DonateType, HypError
from guestmem_gunyah.hyp import (
    HLOS_MEMORY,
    MEMEXTENT_TABLE,
    Extent,
    ExtentKind,
    HypCallError,
    Hypervisor,
    VmResources,
)

VMID = 0x80
NOSYNC = abi.GUNYAH_MEMEXTENT_OPTION_NOSYNC
PRIVATE = 1 << abi.GUNYAH_ADDRSPACE_MAP_FLAG_PRIVATE
UNMAP_NOSYNC = 1 << abi.GUNYAH_ADDRSPACE_MAP_FLAG_NOSYNC
GUEST_PRIVATE = Extent(ExtentKind.GUEST_PRIVATE, VMID)
GUEST_SHARED = Extent(ExtentKind.GUEST_SHARED, VMID)


@pytest.fixture
def hyp() -> tuple[Hypervisor, VmResources, list[tuple[Any, ...]]]:
    events: list[tuple[Any, ...]] = []
    h = Hypervisor(listener=lambda *event: events.append(event))
    return h, h.create_vm_objects(VMID), events


def expect(error: HypError, fn: Any, *args: Any, **kwargs: Any) -> HypCallError:
    with pytest.raises(HypCallError) as info:
        fn(*args, **kwargs)
    assert info.value.error == error
    assert info.value.errno == abi.gunyah_error_remap(error)
    assert info.value.rule == "Gunyah-4.2"
    return info.value


def test_donate_to_protected_and_back(hyp: Any) -> None:
    """``TO_PROTECTED``: host private -> guest private; ``FROM_PROTECTED`` back; each a
    memdb change reported with both owners."""
    h, res, events = hyp
    h.memextent_donate(DonateType.TO_PROTECTED, res.host_private, res.guest_private, 0x100, 4)
    assert h.owner(0x100) == GUEST_PRIVATE and not h.host_accessible(0x103)
    assert h.host_accessible(0x104)
    h.memextent_donate(DonateType.FROM_PROTECTED, res.guest_private, res.host_private, 0x100, 4)
    assert h.owner(0x100) == HLOS_MEMORY and h.host_accessible(0x100)
    assert events == [
        (MEMEXTENT_TABLE, 0x100, 4, HLOS_MEMORY, GUEST_PRIVATE, VMID),
        (MEMEXTENT_TABLE, 0x100, 4, GUEST_PRIVATE, HLOS_MEMORY, VMID),
    ]
    assert h.counters["hvc.memextent_donate"] == 2 and h.counters["sync"] == 2


def test_donate_to_sibling_both_ways_keeps_the_host_mapping(hyp: Any) -> None:
    h, res, _ = hyp
    h.memextent_donate(DonateType.TO_SIBLING, res.host_shared, res.guest_shared, 0x200, 1)
    assert h.owner(0x200) == GUEST_SHARED and h.host_accessible(0x200)
    h.memextent_donate(DonateType.TO_SIBLING, res.guest_shared, res.host_shared, 0x200, 1)
    assert h.owner(0x200) == HLOS_MEMORY


@pytest.mark.parametrize(
    ("kind", "src", "dst"),
    [
        (DonateType.TO_PROTECTED, "host_shared", "guest_private"),
        (DonateType.TO_PROTECTED, "host_private", "guest_shared"),
        (DonateType.FROM_PROTECTED, "host_private", "guest_private"),
        (DonateType.TO_SIBLING, "host_private", "guest_shared"),
        (DonateType.TO_SIBLING, "host_shared", "host_shared"),
    ],
)
def test_donate_between_the_wrong_extents_is_arg_inval(hyp: Any, kind: int, src: str, dst: str) -> None:
    h, res, events = hyp
    expect(HypError.ARG_INVAL, h.memextent_donate, kind, getattr(res, src), getattr(res, dst), 0x100, 1)
    assert not h.memdb and not events  # nothing changed


def test_donate_refusals(hyp: Any) -> None:
    """Reserved option bits and unmodelled types: ARG_INVAL (EINVAL); a missing capability:
    CSPACE_CAP_NULL, an addrspace for an extent: WRONG_OBJ_TYPE (EACCES); a page the donor
    does not own: MEMDB_NOT_OWNER (EINVAL: Linux has no name for it)."""
    h, res, _ = hyp
    expect(HypError.ARG_INVAL, h.memextent_donate, 1 << 8, res.host_private, res.guest_private, 0, 1)
    expect(
        HypError.ARG_INVAL, h.memextent_donate, DonateType.TO_CHILD, res.host_private, res.guest_private, 0, 1
    )
    err = expect(
        HypError.CSPACE_CAP_NULL, h.memextent_donate, DonateType.TO_PROTECTED, 0xDEAD, res.guest_private, 0, 1
    )
    assert err.errno == errno.EACCES
    expect(
        HypError.CSPACE_WRONG_OBJ_TYPE,
        h.memextent_donate,
        DonateType.TO_PROTECTED,
        res.addrspace,
        res.guest_private,
        0,
        1,
    )
    h.memextent_donate(DonateType.TO_PROTECTED, res.host_private, res.guest_private, 0x100, 1)
    err = expect(
        HypError.MEMDB_NOT_OWNER,
        h.memextent_donate,
        DonateType.TO_PROTECTED,
        res.host_private,
        res.guest_private,
        0xFF,
        2,
    )
    assert err.errno == errno.EINVAL
    expect(
        HypError.MEMDB_NOT_OWNER,
        h.memextent_donate,
        DonateType.FROM_PROTECTED,
        res.guest_private,
        res.host_private,
        0x100,
        2,
    )
    assert h.owner(0xFF) == HLOS_MEMORY and h.owner(0x101) == HLOS_MEMORY


def test_addrspace_map_maps_only_what_the_extent_owns(hyp: Any) -> None:
    """``memextent_map_partial_sparse`` walks the memdb: pages the extent does not own stay
    unmapped (no error)."""
    h, res, _ = hyp
    h.memextent_donate(DonateType.TO_PROTECTED, res.host_private, res.guest_private, 0x100, 2)
    h.addrspace_map(res.addrspace, res.guest_private, 0x40000, Access.RWX, PRIVATE, 0x100, 4)
    assert h.lookup(VMID, 0x40001) is not None and h.lookup(VMID, 0x40001)[0] == 0x101
    assert h.lookup(VMID, 0x40002) is None
    expect(
        HypError.BUSY,
        h.addrspace_map,
        res.addrspace,
        res.guest_private,
        0x40000,
        Access.RWX,
        PRIVATE,
        0x100,
        1,
    )
    expect(
        HypError.CSPACE_WRONG_OBJ_TYPE,
        h.addrspace_map,
        res.guest_private,
        res.guest_private,
        0,
        Access.R,
        0,
        0,
        1,
    )
    expect(
        HypError.CSPACE_WRONG_OBJ_TYPE, h.addrspace_map, res.addrspace, res.host_private, 0, Access.R, 0, 0, 1
    )


def test_addrspace_unmap_needs_the_mapping_and_nosync_defers_the_sync(hyp: Any) -> None:
    h, res, _ = hyp
    h.memextent_donate(DonateType.TO_PROTECTED, res.host_private, res.guest_private, 0x100, 4, calls=4)
    h.addrspace_map(res.addrspace, res.guest_private, 0x40000, Access.RWX, PRIVATE, 0x100, 4, calls=4)
    assert h.counters["hvc.memextent_donate"] == 4 and h.counters["hvc.addrspace_map"] == 4
    # NOSYNC batching: three calls deferred, the fourth syncs once (a run of 4 with sync).
    assert (h.counters["nosync"], h.counters["sync"]) == (3, 1)
    expect(HypError.ADDR_INVAL, h.addrspace_unmap, res.addrspace, res.guest_private, 0x40000, 0, 0x200, 1)
    expect(HypError.ADDR_INVAL, h.addrspace_unmap, res.addrspace, res.guest_private, 0x40003, 0, 0x103, 2)
    h.addrspace_unmap(res.addrspace, res.guest_private, 0x40000, UNMAP_NOSYNC, 0x100, 2, calls=2)
    assert (h.counters["nosync"], h.counters["sync"]) == (5, 1)
    h.addrspace_unmap(res.addrspace, res.guest_private, 0x40002, 0, 0x102, 2, calls=2)
    assert (h.counters["nosync"], h.counters["sync"]) == (6, 2)
    assert not h.stage2(VMID)


def test_a_donation_takes_the_donors_mappings_with_it(hyp: Any) -> None:
    """``do_mapping_transfer``: giving pages back unmaps them from the guest."""
    h, res, _ = hyp
    unmapped: list[tuple[int, int, int]] = []
    h.on_unmap = lambda *args: unmapped.append(args)
    h.memextent_donate(DonateType.TO_PROTECTED, res.host_private, res.guest_private, 0x100, 2)
    h.addrspace_map(res.addrspace, res.guest_private, 0x40000, Access.RWX, PRIVATE, 0x100, 2)
    h.memextent_donate(DonateType.FROM_PROTECTED | NOSYNC, res.guest_private, res.host_private, 0x101, 1)
    assert h.lookup(VMID, 0x40000) is not None and h.lookup(VMID, 0x40001) is None
    assert unmapped == [(VMID, 0x40001, 1)]


def test_destroying_a_vms_objects_returns_its_memory_to_the_hlos(hyp: Any) -> None:
    h, res, events = hyp
    h.memextent_donate(DonateType.TO_PROTECTED, res.host_private, res.guest_private, 0x100, 2)
    h.memextent_donate(DonateType.TO_SIBLING, res.host_shared, res.guest_shared, 0x300, 1)
    h.addrspace_map(res.addrspace, res.guest_private, 0x40000, Access.RWX, PRIVATE, 0x100, 2)
    h.destroy_vm_objects(VMID, res)
    assert not h.memdb and VMID not in h.addrspaces and res.addrspace not in h.cspace
    assert events[-1][4] == HLOS_MEMORY


def test_error_remaps_are_the_drivers() -> None:
    """``gunyah_error_remap`` and ``gunyah_rm_error_remap``."""
    assert abi.gunyah_error_remap(HypError.OK) == 0
    assert abi.gunyah_error_remap(HypError.NOMEM) == errno.ENOMEM
    assert abi.gunyah_error_remap(HypError.BUSY) == errno.EBUSY
    assert abi.gunyah_error_remap(HypError.RETRY) == errno.EAGAIN
    assert abi.gunyah_error_remap(HypError.UNIMPLEMENTED) == errno.EOPNOTSUPP
    assert abi.gunyah_error_remap(HypError.ADDR_INVAL) == errno.EINVAL
    rm = abi.RmError
    assert [abi.rm_error_remap(e) for e in (rm.OK, rm.DENIED, rm.NORESOURCE, rm.NOMEM, rm.BUSY)] == [
        0,
        errno.EPERM,
        errno.ENODEV,
        errno.ENOMEM,
        errno.EBUSY,
    ]
    assert abi.rm_error_remap(rm.UNIMPLEMENTED) == errno.EOPNOTSUPP
    assert {abi.rm_error_remap(e) for e in (rm.MEM_INUSE, rm.HANDLE_INVALID, rm.VM_STATE)} == {errno.EINVAL}
