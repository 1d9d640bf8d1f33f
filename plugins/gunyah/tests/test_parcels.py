"""Memory parcels on their own: every state (INIT, SHARING, SHARED) and transition
(create, append, accept, release, reclaim, donate, notify), every refusal with its RM error,
sanitize at create, accept, release and reclaim (``memparcel.c``: ``memparcel_construct``,
``add_sgl_to_mp``, ``memparcel_do_append``, ``memparcel_do_accept``,
``memparcel_do_release``, ``memparcel_do_reclaim``, ``memparcel_notify``)."""

from __future__ import annotations

from typing import Any

import pytest

from guestmem_gunyah import abi
from guestmem_gunyah.abi import Access, Notification, RmError, TransType
from guestmem_gunyah.hyp import HLOS_MEMORY, ExtentKind, Hypervisor
from guestmem_gunyah.rm import ParcelState, ResourceManager, RmCallError

HLOS = abi.VMID_HLOS
PAGE = abi.PAGE_SIZE
RWX, RW, R = abi.MEM_RIGHTS_RWX, abi.MEM_RIGHTS_RW, abi.MEM_RIGHTS_R
PA = 0x200000000  # HLOS memory: IPA == PA
LEND, SHARE = TransType.LEND, TransType.SHARE


class Zeroes:
    def __init__(self) -> None:
        self.zeroed: list[tuple[int, int]] = []

    def __call__(self, pfn: int, npages: int) -> None:
        self.zeroed.append((pfn, npages))


@pytest.fixture
def zeroes() -> Zeroes:
    return Zeroes()


@pytest.fixture
def rm(zeroes: Zeroes) -> ResourceManager:
    return ResourceManager(Hypervisor(), zero=zeroes)


@pytest.fixture
def vm(rm: ResourceManager) -> int:
    vmid = rm.vm_alloc_vmid(HLOS)
    rm.vm_config_image(HLOS, vmid, 0, abi.MEMPARCEL_INVALID_HANDLE, 0, 0, 0, 0)
    rm.vm_init(HLOS, vmid)
    rm.vm_start(HLOS, vmid)
    return vmid


def expect(error: RmError, fn: Any, *args: Any, **kwargs: Any) -> RmCallError:
    with pytest.raises(RmCallError) as info:
        fn(*args, **kwargs)
    assert info.value.error == error, info.value
    assert info.value.errno == abi.rm_error_remap(error)
    assert info.value.rule == "Gunyah-4.2"
    return info.value


def pfn(offset: int = 0) -> int:
    return (PA >> 12) + offset


def test_lend_accept_release_reclaim(rm: ResourceManager, vm: int) -> None:
    """SHARING after a complete LEND; SHARED when accepted (mapped at the IPA the guest
    names); SHARING again when released; gone when reclaimed, the pages the HLOS's."""
    handle = rm.mem_lend(HLOS, [(vm, RW)], [(PA, 2 * PAGE)])
    parcel = rm.parcels[handle]
    assert parcel.state == ParcelState.SHARING and parcel.npages == 2
    owner = rm.hyp.owner(pfn())
    assert owner.kind == ExtentKind.PARCEL and not rm.hyp.host_accessible(pfn(1))
    assert rm.mem_accept(
        vm,
        handle,
        trans=LEND,
        sgl=[(1 << 30, 2 * PAGE)],
        flags=abi.MEM_ACCEPT_FLAG_DONE | abi.MEM_ACCEPT_FLAG_MAP_CONTIGUOUS,
    ) == [(1 << 30, 2 * PAGE)]
    assert parcel.state == ParcelState.SHARED and parcel.share_count == 1
    assert rm.hyp.lookup(vm, (1 << 30) >> 12) == (pfn(), rm.hyp.stage2(vm).get((1 << 30) >> 12))
    assert rm.hyp.stage2(vm).get((1 << 30) >> 12).access == Access.RW
    expect(RmError.MEM_INUSE, rm.mem_reclaim, HLOS, handle)
    rm.mem_release(vm, handle)
    assert parcel.state == ParcelState.SHARING and not rm.hyp.stage2(vm)
    rm.mem_reclaim(HLOS, handle)
    assert handle not in rm.parcels and rm.hyp.owner(pfn()) == HLOS_MEMORY
    assert rm.vms[HLOS].mp_count == 0


def test_share_keeps_the_owners_access_and_names_it(rm: ResourceManager, vm: int) -> None:
    """SHARE: the owner must be in the ACL (and must not be in a LEND's)."""
    expect(RmError.ARGUMENT_INVALID, rm.mem_share, HLOS, [(vm, RW)], [(PA, PAGE)])
    expect(RmError.ARGUMENT_INVALID, rm.mem_lend, HLOS, [(vm, RW), (HLOS, RWX)], [(PA, PAGE)])
    handle = rm.mem_share(HLOS, [(vm, RW), (HLOS, RWX)], [(PA, PAGE)])
    assert rm.hyp.host_accessible(pfn()) and rm.hyp.owner(pfn()).shared
    expect(RmError.DENIED, rm.mem_accept, HLOS, handle, trans=SHARE)  # the owner does not accept
    ipas = rm.mem_accept(vm, handle, trans=SHARE)
    assert ipas[0][0] >= 1 << 36  # the RM's allocator picked the IPA
    rm.mem_release(vm, handle)
    rm.mem_reclaim(HLOS, handle)
    assert not rm.hyp.memdb


def test_create_refusals_in_the_rms_order(rm: ResourceManager, vm: int) -> None:
    expect(RmError.ARGUMENT_INVALID, rm.mem_lend, HLOS, [], [(PA, PAGE)])
    expect(RmError.ARGUMENT_INVALID, rm.mem_lend, HLOS, [(vm, RW)], [])
    expect(RmError.ARGUMENT_INVALID, rm.mem_donate, HLOS, [(vm, RWX), (0x81, RWX)], [(PA, PAGE)])
    expect(RmError.ARGUMENT_INVALID, rm.mem_lend, HLOS, [(vm, RW)], [(PA, PAGE)] * 513)
    io = {"mem_type": abi.MEM_TYPE_IO}
    expect(
        RmError.ARGUMENT_INVALID,
        rm.mem_lend,
        HLOS,
        [(vm, RW)],
        [(PA, PAGE)],
        flags=abi.MEM_CREATE_FLAG_SANITIZE,
        **io,
    )
    expect(RmError.ARGUMENT_INVALID, rm.mem_lend, HLOS, [(vm, RW), (vm, R)], [(PA, PAGE)])
    expect(RmError.ARGUMENT_INVALID, rm.mem_lend, HLOS, [(0x99, RW)], [(PA, PAGE)])
    expect(RmError.ARGUMENT_INVALID, rm.mem_lend, HLOS, [(vm, abi.MEM_RIGHTS_W)], [(PA, PAGE)])
    expect(RmError.ARGUMENT_INVALID, rm.mem_lend, HLOS, [(vm, RWX)], [(PA, PAGE)], **io)
    expect(RmError.DENIED, rm.mem_donate, HLOS, [(vm, RW)], [(PA, PAGE)])  # full rights or nothing
    expect(RmError.ARGUMENT_INVALID, rm.mem_lend, HLOS, [(vm, RW)], [(PA + 1, PAGE)])
    expect(RmError.ARGUMENT_INVALID, rm.mem_lend, HLOS, [(vm, RW)], [(abi.ADDR_LIMIT, PAGE)])
    assert not rm.parcels and not rm.hyp.memdb


def test_a_failing_sgl_entry_gives_back_what_the_call_added(rm: ResourceManager, vm: int) -> None:
    """``add_sgl_to_mp``: memory the owner does not own is MEM_INVALID; the regions this
    call already donated go back."""
    taken = rm.mem_lend(HLOS, [(vm, RW)], [(PA + 4 * PAGE, PAGE)])
    expect(RmError.MEM_INVALID, rm.mem_lend, HLOS, [(vm, RW)], [(PA, 2 * PAGE), (PA + 4 * PAGE, PAGE)])
    assert rm.hyp.owner(pfn()) == HLOS_MEMORY and list(rm.parcels) == [taken]


def test_the_parcel_limit_per_vm(rm: ResourceManager, vm: int) -> None:
    """``MAX_MEMPARCEL_PER_VM``: the 65th parcel is DENIED."""
    for i in range(abi.MAX_MEMPARCEL_PER_VM):
        rm.mem_lend(HLOS, [(vm, RW)], [(PA + i * PAGE, PAGE)])
    expect(RmError.DENIED, rm.mem_lend, HLOS, [(vm, RW)], [(PA + 100 * PAGE, PAGE)])


def test_append_completes_an_init_parcel(rm: ResourceManager, vm: int) -> None:
    """INIT with ``MEM_CREATE_FLAG_APPEND``; appends by the owner only (DENIED), while INIT
    (DENIED), non-empty (ARGUMENT_INVALID); ``DONE`` makes it SHARING."""
    handle = rm.mem_lend(HLOS, [(vm, RW)], [(PA, PAGE)], flags=abi.MEM_CREATE_FLAG_APPEND)
    assert rm.parcels[handle].state == ParcelState.INIT
    expect(RmError.ARGUMENT_INVALID, rm.mem_append, HLOS, handle, [])
    expect(RmError.HANDLE_INVALID, rm.mem_append, HLOS, 0x77, [(PA + PAGE, PAGE)])
    expect(RmError.DENIED, rm.mem_append, vm, handle, [(PA + PAGE, PAGE)])
    rm.mem_append(HLOS, handle, [(PA + PAGE, PAGE)])
    assert rm.parcels[handle].state == ParcelState.INIT
    rm.mem_append(HLOS, handle, [(PA + 2 * PAGE, PAGE)], abi.MEM_APPEND_FLAG_DONE)
    assert rm.parcels[handle].state == ParcelState.SHARING and rm.parcels[handle].npages == 3
    expect(RmError.DENIED, rm.mem_append, HLOS, handle, [(PA + 3 * PAGE, PAGE)])
    rm.mem_reclaim(HLOS, handle)  # an INIT or SHARING parcel can be reclaimed


def test_accept_refusals(rm: ResourceManager, vm: int) -> None:
    other = rm.vm_alloc_vmid(HLOS)
    handle = rm.mem_lend(HLOS, [(vm, R)], [(PA, PAGE)], label=7)
    expect(RmError.HANDLE_INVALID, rm.mem_accept, vm, 0x77, trans=LEND)
    expect(RmError.ARGUMENT_INVALID, rm.mem_accept, vm, handle, trans=SHARE)
    expect(RmError.ARGUMENT_INVALID, rm.mem_accept, vm, handle, trans=LEND, mem_type=abi.MEM_TYPE_IO)
    flags = abi.MEM_ACCEPT_FLAG_DONE
    expect(
        RmError.VALIDATE_FAILED,
        rm.mem_accept,
        vm,
        handle,
        trans=LEND,
        flags=flags | abi.MEM_ACCEPT_FLAG_VALIDATE_SANITIZED,
    )
    expect(
        RmError.VALIDATE_FAILED,
        rm.mem_accept,
        vm,
        handle,
        trans=LEND,
        flags=flags | abi.MEM_ACCEPT_FLAG_VALIDATE_LABEL,
        label=8,
    )
    expect(
        RmError.VALIDATE_FAILED,
        rm.mem_accept,
        vm,
        handle,
        trans=LEND,
        flags=flags | abi.MEM_ACCEPT_FLAG_VALIDATE_ACL_ATTR,
        acl=[(vm, RW)],
    )
    expect(RmError.DENIED, rm.mem_accept, vm, handle, trans=LEND, flags=flags | abi.MEM_ACCEPT_FLAG_MAP_OTHER)
    expect(RmError.ARGUMENT_INVALID, rm.mem_accept, vm, handle, trans=LEND, map_vmid=other)
    expect(RmError.VMID_INVALID, rm.mem_accept, other, handle, trans=LEND)
    expect(
        RmError.ARGUMENT_INVALID,
        rm.mem_accept,
        vm,
        handle,
        trans=LEND,
        flags=flags | abi.MEM_ACCEPT_FLAG_SANITIZE,
    )
    expect(RmError.ARGUMENT_INVALID, rm.mem_accept, vm, handle, trans=LEND, sgl=[(1 << 30, 2 * PAGE)])
    expect(RmError.ARGUMENT_INVALID, rm.mem_accept, vm, handle, trans=LEND, sgl=[(1 << 30, PAGE)] * 2)
    assert rm.parcels[handle].state == ParcelState.SHARING
    good = abi.MEM_ACCEPT_FLAG_VALIDATE_LABEL | abi.MEM_ACCEPT_FLAG_VALIDATE_ACL_ATTR | flags
    rm.mem_accept(vm, handle, trans=LEND, flags=good, label=7, acl=[(vm, R)])
    expect(RmError.DENIED, rm.mem_accept, vm, handle, trans=LEND)  # mapped already


def test_accept_without_done_shares_but_does_not_map(rm: ResourceManager, vm: int) -> None:
    """``finish_accept`` without ``DONE``: IPAs allocated, the VM shares the parcel, nothing
    mapped; a second accept with ``DONE`` maps."""
    handle = rm.mem_lend(HLOS, [(vm, RW)], [(PA, PAGE)])
    rm.mem_accept(vm, handle, trans=LEND, flags=0, sgl=[(1 << 30, PAGE)])
    parcel = rm.parcels[handle]
    assert parcel.state == ParcelState.SHARED and not rm.hyp.stage2(vm)
    rm.mem_accept(vm, handle, trans=LEND)
    assert rm.hyp.lookup(vm, (1 << 30) >> 12) is not None and parcel.share_count == 1


def test_release_refusals(rm: ResourceManager, vm: int) -> None:
    handle = rm.mem_lend(HLOS, [(vm, R)], [(PA, PAGE)])
    expect(RmError.HANDLE_INVALID, rm.mem_release, vm, 0x77)
    expect(RmError.MEM_RELEASED, rm.mem_release, vm, handle)  # never accepted
    expect(RmError.VMID_INVALID, rm.mem_release, 0x99, handle)  # no such VM
    other = rm.vm_alloc_vmid(HLOS)
    expect(RmError.HANDLE_INVALID, rm.mem_release, other, handle)  # not in the ACL
    rm.mem_accept(vm, handle, trans=LEND)
    expect(RmError.ARGUMENT_INVALID, rm.mem_release, vm, handle, abi.MEM_RELEASE_FLAG_SANITIZE)  # no W
    rm.set_lock(handle, True)
    expect(RmError.DENIED, rm.mem_release, vm, handle)
    rm.set_lock(handle, False)
    rm.mem_release(vm, handle)
    expect(RmError.MEM_RELEASED, rm.mem_release, vm, handle)
    share = rm.mem_share(HLOS, [(vm, RW), (HLOS, RWX)], [(PA + PAGE, PAGE)])
    expect(RmError.DENIED, rm.mem_release, HLOS, share)  # the owner reclaims


def test_reclaim_refusals(rm: ResourceManager, vm: int) -> None:
    handle = rm.mem_lend(HLOS, [(vm, RW)], [(PA, PAGE)])
    expect(RmError.HANDLE_INVALID, rm.mem_reclaim, HLOS, 0x77)
    expect(RmError.DENIED, rm.mem_reclaim, vm, handle)
    rm.set_lock(handle, True)
    expect(RmError.DENIED, rm.mem_reclaim, HLOS, handle)
    rm.set_lock(handle, False)
    io = rm.mem_lend(HLOS, [(vm, RW)], [(PA + PAGE, PAGE)], mem_type=abi.MEM_TYPE_IO)
    expect(RmError.ARGUMENT_INVALID, rm.mem_reclaim, HLOS, io, abi.MEM_RECLAIM_FLAG_SANITIZE)
    assert set(rm.parcels) == {handle, io}


@pytest.mark.parametrize("where", ["create", "accept", "release", "reclaim"])
def test_sanitize_zeroes_once_where_asked(rm: ResourceManager, vm: int, zeroes: Zeroes, where: str) -> None:
    """Create: zeroed as donated (``sanitize_create``); accept, release, reclaim: zeroed
    when the owner reclaims (``sanitize_reclaim``); never asked: not zeroed."""
    handle = rm.mem_lend(
        HLOS, [(vm, RW)], [(PA, PAGE)], flags=abi.MEM_CREATE_FLAG_SANITIZE if where == "create" else 0
    )
    assert zeroes.zeroed == ([(pfn(), 1)] if where == "create" else [])
    rm.mem_accept(
        vm,
        handle,
        trans=LEND,
        flags=abi.MEM_ACCEPT_FLAG_DONE | (abi.MEM_ACCEPT_FLAG_SANITIZE if where == "accept" else 0),
    )
    rm.mem_release(vm, handle, abi.MEM_RELEASE_FLAG_SANITIZE if where == "release" else 0)
    rm.mem_reclaim(HLOS, handle, abi.MEM_RECLAIM_FLAG_SANITIZE if where == "reclaim" else 0)
    assert zeroes.zeroed == [(pfn(), 1)]
    assert rm.hyp.counters["sanitized_bytes"] == PAGE


def test_validate_sanitized_accepts_a_parcel_sanitized_at_create(rm: ResourceManager, vm: int) -> None:
    handle = rm.mem_lend(HLOS, [(vm, RW)], [(PA, PAGE)], flags=abi.MEM_CREATE_FLAG_SANITIZE)
    rm.mem_accept(
        vm, handle, trans=LEND, flags=abi.MEM_ACCEPT_FLAG_DONE | abi.MEM_ACCEPT_FLAG_VALIDATE_SANITIZED
    )


def test_donate_moves_the_pages_on_accept_and_deletes_the_parcel(rm: ResourceManager, vm: int) -> None:
    handle = rm.mem_donate(HLOS, [(vm, RWX)], [(PA, PAGE)])
    rm.mem_accept(vm, handle, trans=TransType.DONATE, sgl=[(1 << 30, PAGE)])
    assert handle not in rm.parcels and rm.hyp.owner(pfn()).kind == ExtentKind.GUEST_PRIVATE
    assert rm.hyp.lookup(vm, (1 << 30) >> 12) is not None
    # A VM reset returns a donated page to the HLOS with the rest of the VM's memory.
    rm.vm_stop(HLOS, vm)
    rm.vm_reset(HLOS, vm)
    assert rm.hyp.owner(pfn()) == HLOS_MEMORY


def test_a_guest_lends_its_own_memory_back_to_the_host(rm: ResourceManager, vm: int) -> None:
    """A guest's parcel: its IPAs are looked up in its stage-2; lending takes them out of it,
    reclaiming puts them back."""
    hyp = rm.hyp
    res = rm.vms[vm].resources
    assert res is not None
    gfn = (1 << 30) >> 12
    hyp.memextent_donate(abi.DonateType.TO_PROTECTED, res.host_private, res.guest_private, pfn(), 1)
    hyp.addrspace_map(res.addrspace, res.guest_private, gfn, Access.RWX, 0, pfn(), 1)
    expect(RmError.MEM_INVALID, rm.mem_lend, vm, [(HLOS, RW)], [(1 << 31, PAGE)])
    handle = rm.mem_lend(vm, [(HLOS, RW)], [(1 << 30, PAGE)])
    assert hyp.lookup(vm, gfn) is None and not hyp.host_accessible(pfn())
    rm.mem_accept(HLOS, handle, trans=LEND)
    assert hyp.host_accessible(pfn())
    rm.mem_release(HLOS, handle)
    rm.mem_reclaim(vm, handle)
    assert hyp.lookup(vm, gfn) == (pfn(), hyp.stage2(vm).get(gfn)) and not hyp.host_accessible(pfn())


def test_notify(rm: ResourceManager, vm: int) -> None:
    """``MEM_NOTIFY``: SHARED/RECALL by the owner to VMs of the ACL; ACCEPTED/RELEASED by a
    borrower, matching its state; the mem-info tag must stay the first one."""
    handle = rm.mem_lend(HLOS, [(vm, RW)], [(PA, PAGE)])
    expect(RmError.DENIED, rm.mem_notify, vm, handle, abi.MEM_NOTIFY_FLAG_SHARED, [vm])
    expect(RmError.ARGUMENT_INVALID, rm.mem_notify, HLOS, handle, abi.MEM_NOTIFY_FLAG_SHARED, [])
    expect(RmError.VMID_INVALID, rm.mem_notify, HLOS, handle, abi.MEM_NOTIFY_FLAG_SHARED, [0x99])
    expect(RmError.ARGUMENT_INVALID, rm.mem_notify, HLOS, handle, abi.MEM_NOTIFY_FLAG_SHARED, [HLOS])
    rm.mem_notify(HLOS, handle, abi.MEM_NOTIFY_FLAG_SHARED, [vm], mem_info_tag=5)
    assert rm.vms[vm].inbox[-1][0] == Notification.MEM_SHARED
    expect(
        RmError.ARGUMENT_INVALID,
        rm.mem_notify,
        HLOS,
        handle,
        abi.MEM_NOTIFY_FLAG_RECALL,
        [vm],
        mem_info_tag=6,
    )
    expect(RmError.MEM_RELEASED, rm.mem_notify, vm, handle, abi.MEM_NOTIFY_FLAG_ACCEPTED, mem_info_tag=5)
    rm.mem_accept(vm, handle, trans=LEND)
    expect(RmError.MEM_INUSE, rm.mem_notify, vm, handle, abi.MEM_NOTIFY_FLAG_RELEASED, mem_info_tag=5)
    rm.mem_notify(vm, handle, abi.MEM_NOTIFY_FLAG_ACCEPTED, mem_info_tag=5)
    assert rm.vms[HLOS].inbox[-1] == (Notification.MEM_ACCEPTED, {"handle": handle, "vmid": vm})
    rm.mem_notify(HLOS, handle, abi.MEM_NOTIFY_FLAG_RECALL, [vm], mem_info_tag=5)
    assert rm.vms[vm].inbox[-1][0] == Notification.MEM_RECALL
    expect(RmError.ARGUMENT_INVALID, rm.mem_notify, HLOS, handle, 3, [vm], mem_info_tag=5)
    expect(RmError.HANDLE_INVALID, rm.mem_notify, HLOS, 0x77, abi.MEM_NOTIFY_FLAG_SHARED, [vm])


def test_an_init_parcel_can_be_accepted(rm: ResourceManager, vm: int) -> None:
    """``memparcel_do_accept`` does not look at the state: a parcel still in INIT (appends
    pending) is accepted like a complete one (the spec's table implies otherwise)."""
    handle = rm.mem_lend(HLOS, [(vm, RW)], [(PA, PAGE)], flags=abi.MEM_CREATE_FLAG_APPEND)
    assert rm.parcels[handle].state == ParcelState.INIT
    rm.mem_accept(vm, handle, trans=LEND, sgl=[(1 << 30, PAGE)])
    assert rm.parcels[handle].state == ParcelState.SHARED
    rm.mem_release(vm, handle)
    rm.mem_reclaim(HLOS, handle)
