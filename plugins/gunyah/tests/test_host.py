"""Host mappability (backends.md 4.5): what the host may touch of guest memory, by driver
generation (``gunyah_gmem_host_fault`` launders, the library's ``gmem_fault`` is SIGBUS),
its kernel's direct map, and what a punch hole or a release does to lent folios."""

from __future__ import annotations

from typing import Any

import pytest

import guestmem
from guestmem import HostCrash, HostSigbus, uapi
from guestmem.backend import view
from guestmem_gunyah import Driver, abi, rm, set_driver
from guestmem_gunyah.abi import TransType
from guestmem_gunyah.hyp import ExtentKind

from .conftest import LENT_GPA, PAGE, SIZE, Guest, machine

LENT_GFN = LENT_GPA >> 12
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE


def test_a_host_fault_on_a_lent_folio_launders_it(guest: Guest) -> None:
    """Gunyah's guest_memfd: the folio is reclaimed from the guest (unmap, donate back,
    direct map restored) and mapped; contents kept; the guest's next touch lends it again."""
    guest.vcpu.access(LENT_GPA + 2 * PAGE, data=b"guest data")
    pfn = guest.vm.gmem_pfn(LENT_GFN + 2)
    m = guest.mmap(guest.lent)
    assert m.read(2 * PAGE, 10) == b"guest data"
    hyp = machine(guest.kvm).hyp
    assert hyp.owner(pfn).kind == ExtentKind.HLOS and view(guest.kvm).direct_map_valid(pfn)
    assert guest.vm.counters["gunyah.host_fault_launders"] == 1
    assert guest.vm.counters["host_fault_reclaims"] == 1
    assert view(guest.vm).leaf(LENT_GFN + 2) is None
    m.madvise(uapi.MADV_DONTNEED, 2 * PAGE, PAGE)
    assert guest.vcpu.access(LENT_GPA + 2 * PAGE, 10) == b"guest data"
    assert hyp.owner(pfn).kind == ExtentKind.GUEST_PRIVATE


def test_a_host_fault_on_a_lent_folio_is_sigbus_with_the_library(kvm: Any) -> None:
    set_driver(kvm, Driver.LIBRARY)
    g = Guest(kvm)
    g.vcpu.access(LENT_GPA + 2 * PAGE, data=b"secret")
    m = g.mmap(g.lent)
    with pytest.raises(HostSigbus) as info:
        m.read(2 * PAGE, 1)
    assert info.value.rule == "host-mappability"
    assert g.vcpu.access(LENT_GPA + 2 * PAGE, 6) == b"secret"  # the guest keeps it
    assert m.read(3 * PAGE, 1) == b"\0"  # a folio not lent is the host's
    g.teardown()


@pytest.mark.parametrize("driver", list(Driver))
def test_a_host_fault_on_a_dtb_parcel_folio_before_start(driver: Driver) -> None:
    """Gunyah's guest_memfd finds no ``mm`` entry for a parcel's folio: launder returns 0,
    ``PG_private`` is still set: ``BUG_ON`` (a host crash); the library: SIGBUS."""
    with guestmem.open("gunyah") as kvm:
        set_driver(kvm, driver)
        g = Guest(kvm)
        machine(kvm).rm.inject[abi.Rpc.VM_CONFIG_IMAGE] = abi.RmError.NOMEM
        with pytest.raises(guestmem.KvmError):
            g.gh.start()  # the DTB parcel is lent, the VM never ran
        m = g.mmap(g.lent)
        if driver == Driver.LIBRARY:
            with pytest.raises(HostSigbus):
                m.read(0, 1)
        else:
            with pytest.raises(HostCrash, match="BUG_ON"):
                m.read(0, 1)


def test_the_host_kernel_cannot_write_a_lent_page(guest: Guest) -> None:
    """Lent folios are out of the direct map: a kernel write is a kernel page fault."""
    guest.vcpu.access(LENT_GPA + PAGE, 1)
    pfn = guest.vm.gmem_pfn(LENT_GFN + 1)
    host = view(guest.kvm)
    assert not host.direct_map_valid(pfn)
    with pytest.raises(HostCrash, match="direct map"):
        host.kernel_write(pfn, 0, b"x")


def test_the_hypervisor_aborts_the_hlos_touching_a_lent_page() -> None:
    """Were a lent page back in the direct map, the host kernel's store would reach the
    hypervisor, which injects a synchronous external abort into the HLOS (a host crash)."""
    with guestmem.open("gunyah") as kvm:
        g = Guest(kvm)
        g.vcpu.access(LENT_GPA + PAGE, 1)
        pfn = g.vm.gmem_pfn(LENT_GFN + 1)
        host = view(kvm)
        host.set_direct_map_default(pfn, 1)  # what Linux never does for a lent folio
        with pytest.raises(HostCrash, match="synchronous external abort injected into the HLOS"):
            host.kernel_write(pfn, 0, b"x")
        assert host.crashed


def test_a_file_without_init_shared_keeps_guest_memfds_rule(kvm: Any) -> None:
    """The uAPI face: a page that is not lent follows M-4 (SIGBUS unless INIT_SHARED)."""
    vm = kvm.create_vm(abi.GUNYAH_VM_TYPE)
    gmem = vm.create_guest_memfd(SIZE, uapi.GUEST_MEMFD_FLAG_MMAP)
    with gmem.mmap(SIZE) as m, pytest.raises(HostSigbus) as info:
        m.read(0, 1)
    assert info.value.rule == "M-4"
    vm.close()
    gmem.close()


def test_punch_hole_launders_then_frees(guest: Guest) -> None:
    """``invalidate_inode_pages2_range`` -> ``launder_folio``: reclaimed before truncation;
    the guest's next touch gets a fresh zeroed folio."""
    guest.vcpu.access(LENT_GPA + 8 * PAGE, data=b"gone")
    pfn = guest.vm.gmem_pfn(LENT_GFN + 8)
    guest.lent.fallocate(PUNCH, 8 * PAGE, PAGE)
    assert not view(guest.kvm).is_allocated(pfn)
    assert view(guest.kvm).direct_map_valid(pfn)
    assert guest.vcpu.access(LENT_GPA + 8 * PAGE, 4) == bytes(4)


def test_freeing_a_folio_a_guest_accepted_in_a_parcel_takes_it_back_first(guest: Guest) -> None:
    """The core frees a folio a parcel holds (a punch hole): the model releases it for its
    borrower, reclaims it (sanitized if asked) and only then frees it (README)."""
    guest.gh.start()
    parcel = guest.gh.share_parcel(LENT_GPA + 12 * PAGE, PAGE)
    r = rm(guest.kvm)
    r.mem_accept(guest.gh.vmid, parcel.handle, trans=TransType.LEND, sgl=[(LENT_GPA + 12 * PAGE, PAGE)])
    guest.vcpu.access(LENT_GPA + 12 * PAGE, data=b"in a parcel")
    guest.lent.fallocate(PUNCH, 12 * PAGE, PAGE)
    assert not r.parcels and not guest.gh.state.parcels
    assert guest.vm.counters["gunyah.forced_parcel_reclaims"] == 1
    assert view(guest.vm).leaf(LENT_GFN + 12) is None
