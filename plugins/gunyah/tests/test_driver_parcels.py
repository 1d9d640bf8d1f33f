"""The driver's parcels: ``gunyah_gmem_share_parcel`` (one entry per folio, lend or share
by the binding), ``gunyah_rm_mem_share`` (512 entries a message, the rest appended; a
failed append reclaims), ``gunyah_gmem_reclaim_parcel``."""

from __future__ import annotations

import errno

import pytest

from guestmem import KvmError
from guestmem.backend import view
from guestmem_gunyah import RmCallError, abi, create_guest_mem, rm
from guestmem_gunyah.abi import RmError, Rpc, TransType
from guestmem_gunyah.hyp import ExtentKind
from guestmem_gunyah.rm import ParcelState

from .conftest import LEND, LENT_GPA, PAGE, SHARED_GPA, Guest, machine

BIG = 4 << 20  # 1024 folios: one MEM_LEND of 512 entries, one MEM_APPEND of 512


def test_a_parcel_of_more_than_512_folios_is_appended(guest: Guest) -> None:
    guest.gh.start()
    big = create_guest_mem(guest.vm, BIG)
    guest.gh.map_mem(big, LENT_GPA + 64 * BIG, 0, BIG, LEND)
    parcel = guest.gh.share_parcel(LENT_GPA + 64 * BIG, BIG)
    c = guest.vm.counters
    assert (c["gunyah.rm.MEM_LEND"], c["gunyah.rm.MEM_APPEND"]) == (2, 1)  # the DTB's, this one's
    rm_parcel = machine(guest.kvm).rm.parcels[parcel.handle]
    assert rm_parcel.state == ParcelState.SHARING and len(rm_parcel.regions) == BIG // PAGE
    assert all(not view(guest.kvm).direct_map_valid(pfn) for pfn in parcel.pfns[:: BIG // PAGE - 1])
    guest.gh.reclaim_parcel(parcel)
    assert all(view(guest.kvm).direct_map_valid(pfn) for pfn in parcel.pfns[:: BIG // PAGE - 1])
    guest.vm.set_user_memory_region2(2, 0, LENT_GPA + 64 * BIG, 0)
    big.close()


def test_a_failed_append_reclaims_the_parcel_and_restores_the_direct_map(guest: Guest) -> None:
    guest.gh.start()
    big = create_guest_mem(guest.vm, BIG)
    guest.gh.map_mem(big, LENT_GPA + 64 * BIG, 0, BIG, LEND)
    m = machine(guest.kvm)
    m.rm.inject[Rpc.MEM_APPEND] = RmError.NOMEM
    with pytest.raises(RmCallError) as info:
        guest.gh.share_parcel(LENT_GPA + 64 * BIG, BIG)
    assert info.value.errno == errno.ENOMEM
    assert not guest.gh.state.parcels and not m.rm.parcels
    assert guest.vm.counters["gunyah.rm.MEM_RECLAIM"] == 1
    pfn = view(big).pfn(0)
    assert pfn is not None and view(guest.kvm).direct_map_valid(pfn)
    assert m.hyp.owner(pfn).kind == ExtentKind.HLOS
    guest.vm.set_user_memory_region2(2, 0, LENT_GPA + 64 * BIG, 0)
    big.close()


def test_a_parcel_of_a_shared_binding_keeps_the_host_in_its_acl(guest: Guest) -> None:
    """Share: the VM and the host (``gunyah_rm_get_vmid``, RWX) in the ACL, MEM_SHARE; the
    host keeps the folios mapped and in its direct map."""
    guest.gh.start()
    parcel = guest.gh.share_parcel(SHARED_GPA + 4 * PAGE, 2 * PAGE)
    r = rm(guest.kvm)
    rm_parcel = r.parcels[parcel.handle]
    assert rm_parcel.trans == TransType.SHARE
    assert [(i.vmid, i.rights) for i in rm_parcel.acl] == [
        (guest.gh.vmid, abi.MEM_RIGHTS_RW),
        (abi.VMID_HLOS, abi.MEM_RIGHTS_RWX),
    ]
    assert guest.vm.counters["gunyah.rm.MEM_SHARE"] == 1
    assert machine(guest.kvm).counters["rm.VM_GET_VMID"] == 1  # the host asks for its own VMID
    m = guest.mmap(guest.shared)
    m.write(4 * PAGE, b"still the host's")
    r.mem_accept(
        guest.gh.vmid,
        parcel.handle,
        trans=TransType.SHARE,
        sgl=[(SHARED_GPA + 4 * PAGE, PAGE), (SHARED_GPA + 5 * PAGE, PAGE)],
    )
    assert guest.vcpu.access(SHARED_GPA + 4 * PAGE, 16) == b"still the host's"
    with pytest.raises(RmCallError) as info:
        guest.gh.reclaim_parcel(parcel)
    assert info.value.error == RmError.MEM_INUSE
    assert parcel.handle in guest.gh.state.parcels  # the driver keeps what it could not reclaim


def test_share_parcel_refusals(guest: Guest) -> None:
    """``gunyah_gmem_share_parcel``: no pages (EINVAL), outside one binding (ENOENT), a
    host-mapped folio to lend (EPERM)."""
    guest.gh.start()
    for gpa, size, err in [
        (LENT_GPA + PAGE, 0, errno.EINVAL),
        (LENT_GPA + 255 * PAGE, 2 * PAGE, errno.ENOENT),
        (LENT_GPA + 1024 * PAGE, PAGE, errno.ENOENT),
    ]:
        with pytest.raises(KvmError) as info:
            guest.gh.share_parcel(gpa, size)
        assert info.value.errno == err
    m = guest.mmap(guest.lent)
    m.write(30 * PAGE, b"mapped")
    with pytest.raises(KvmError) as info:
        guest.gh.share_parcel(LENT_GPA + 29 * PAGE, 2 * PAGE)
    assert (info.value.errno, info.value.rule) == (errno.EPERM, "Gunyah-4.5")
    assert not guest.gh.state.parcels


def test_a_parcel_of_folios_the_guest_holds_is_refused_and_they_stay_lent(guest: Guest) -> None:
    """The RM refuses to lend pages the HLOS no longer owns (``MEM_INVALID``: EINVAL); the
    driver puts back into the direct map only what the call took out of it: the folios
    demand paging lent stay out of the host's reach (G-3) and the guest's."""
    guest.gh.start()
    assert guest.gh.touch(LENT_GPA + 8 * PAGE, 4 * PAGE, write=True) == 4 * PAGE
    guest.vcpu.access(LENT_GPA + 9 * PAGE, data=b"guest's")
    before = dict(guest.vm.counters)
    with pytest.raises(RmCallError) as info:
        guest.gh.share_parcel(LENT_GPA + 8 * PAGE, 5 * PAGE)  # four lent folios, one not yet
    assert (info.value.errno, info.value.error) == (errno.EINVAL, RmError.MEM_INVALID)
    host = view(guest.kvm)
    pfns = [view(guest.lent).pfn(i) for i in range(8, 13)]  # the last one grabbed by the call
    assert [host.direct_map_valid(pfn) for pfn in pfns] == [False] * 4 + [True]
    assert guest.vm.counters["gunyah.direct_map_invalid"] - before["gunyah.direct_map_invalid"] == 1
    assert guest.vm.counters["gunyah.direct_map_default"] - before.get("gunyah.direct_map_default", 0) == 1
    assert not guest.gh.state.parcels
    assert guest.vcpu.access(LENT_GPA + 9 * PAGE, 7) == b"guest's"


def test_reclaim_parcel_of_a_handle_the_driver_does_not_hold_is_enoent(guest: Guest) -> None:
    """``gunyah_gmem_reclaim_parcel`` takes the driver's parcel; by handle, one this VM's
    driver does not hold (never made, reclaimed already) is ENOENT and changes nothing."""
    guest.gh.start()
    parcel = guest.gh.share_parcel(LENT_GPA + 9 * PAGE, PAGE)
    guest.gh.reclaim_parcel(parcel.handle)
    parcels = dict(rm(guest.kvm).parcels)
    for handle in (parcel.handle, 2, 0xFFFF_FFFF):
        with pytest.raises(KvmError) as info:
            guest.gh.reclaim_parcel(handle, -PAGE)
        assert (info.value.errno, info.value.rule) == (errno.ENOENT, "Gunyah-4.3")
    assert rm(guest.kvm).parcels == parcels
