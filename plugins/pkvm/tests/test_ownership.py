"""The pKVM ownership tables on their own (backends.md 3.2), no guestmem core model needed.

Each legal transition is checked for its new states on both components; each illegal one
for the hypervisor's errno and for leaving every table exactly as it was.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestmem_pkvm.ownership import (
    GUEST_TABLE,
    HANDLE_OFFSET,
    HOST_OWNED,
    HOST_TABLE,
    HYP_TABLE,
    PAGE_SIZE,
    PMD_NR_PAGES,
    Component,
    GuestPage,
    HostPage,
    HypError,
    Hypervisor,
    HypVm,
    PageState,
)

PFN = 0x8000
GFN = 0x40


class Memory:
    """Host pages as a dict; every page starts filled with 0xAA so zeroing shows."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self.zeroed: list[tuple[int, int]] = []

    def page(self, pfn: int) -> bytearray:
        return self.pages.setdefault(pfn, bytearray(b"\xaa" * PAGE_SIZE))

    def zero(self, pfn: int, npages: int) -> None:
        self.zeroed.append((pfn, npages))
        for p in range(pfn, pfn + npages):
            self.pages[p] = bytearray(PAGE_SIZE)

    def write(self, pfn: int, offset: int, data: bytes) -> None:
        self.page(pfn)[offset : offset + len(data)] = data


@pytest.fixture
def mem() -> Memory:
    return Memory()


@pytest.fixture
def events() -> list[tuple[str, int, int, Any, Any]]:
    return []


@pytest.fixture
def hyp(mem: Memory, events: list[tuple[str, int, int, Any, Any]]) -> Hypervisor:
    return Hypervisor(zero=mem.zero, write=mem.write, listener=lambda *a: events.append(a))


@pytest.fixture
def pvm(hyp: Hypervisor) -> HypVm:
    return hyp.init_vm(protected=True)


@pytest.fixture
def npvm(hyp: Hypervisor) -> HypVm:
    return hyp.init_vm(protected=False)


def snapshot(hyp: Hypervisor) -> tuple[Any, ...]:
    return (
        hyp.host.copy(),
        hyp.hyp.copy(),
        tuple((vm.handle, vm.guest.copy(), vm.dying) for vm in hyp.vm_table if vm is not None),
    )


def refused(hyp: Hypervisor, err: int, call: Callable[[], object]) -> HypError:
    """*call* fails with *err* and leaves every table untouched (no half-applied change)."""
    before = snapshot(hyp)
    with pytest.raises(HypError) as info:
        call()
    assert info.value.errno == err, info.value
    assert snapshot(hyp) == before
    return info.value


def host(hyp: Hypervisor, pfn: int = PFN) -> PageState:
    return hyp.host_state(pfn).state


def guest(vm: HypVm, gfn: int = GFN) -> PageState:
    return vm.state(gfn).state


# --- identity (3.1) ---------------------------------------------------------------------------
def test_handles_and_vmids_follow_the_vm_table_slot_3_1(hyp: Hypervisor) -> None:
    a, b = hyp.init_vm(protected=True), hyp.init_vm(protected=False)
    assert (a.handle, a.vmid) == (HANDLE_OFFSET, 1)  # VMID 0 is the host's
    assert (b.handle, b.vmid) == (HANDLE_OFFSET + 1, 2)
    assert hyp.vm(b.handle) is b
    hyp.start_teardown_vm(a)
    hyp.finalize_teardown_vm(a)
    with pytest.raises(HypError) as info:
        hyp.vm(a.handle)
    assert info.value.errno == errno.ENOENT
    c = hyp.init_vm(protected=True)
    assert (c.handle, c.vmid) == (HANDLE_OFFSET, 1)  # the freed slot is reused


def test_vm_table_full_is_enomem_3_1() -> None:
    hyp = Hypervisor(max_vms=2)
    hyp.init_vm(protected=True)
    hyp.init_vm(protected=True)
    with pytest.raises(HypError) as info:
        hyp.init_vm(protected=True)
    assert info.value.errno == errno.ENOMEM


# --- host -> protected guest donation ---------------------------------------------------------
def test_donate_host_owned_to_guest_3_2(hyp: Hypervisor, pvm: HypVm, mem: Memory) -> None:
    mem.write(PFN, 0, b"kernel image")
    hyp.host_donate_guest(pvm, PFN, GFN)
    entry = hyp.host_state(PFN)
    assert entry == HostPage(PageState.NOPAGE, Component.GUEST, pvm.handle, PFN - GFN)
    assert entry.gfn(PFN) == GFN
    assert pvm.state(GFN) == GuestPage(PageState.OWNED, PFN - GFN)
    assert not hyp.host_accessible(PFN)
    assert bytes(mem.page(PFN)[:12]) == b"kernel image"  # donation keeps contents, no copy
    assert pvm.counters["donations"] == 1
    assert pvm.counters["host_stage2_unmap"] == 1
    assert pvm.counters["stage2_map"] == 1


def test_donate_a_level2_block_3_2(hyp: Hypervisor, pvm: HypVm) -> None:
    hyp.host_donate_guest(pvm, PFN, 0x200, PMD_NR_PAGES)
    assert len(hyp.host) == 1 and len(pvm.guest) == 1  # one range each, not 512 entries
    assert guest(pvm, 0x200 + 511) == PageState.OWNED
    assert pvm.state(0x3FF).pfn(0x3FF) == PFN + 511


@pytest.mark.parametrize(
    ("pfn", "gfn", "nr"),
    [(PFN, GFN, 2), (PFN, GFN, 0), (PFN + 1, 0x200, PMD_NR_PAGES), (PFN, 0x201, PMD_NR_PAGES)],
)
def test_donate_bad_size_is_einval_3_2(hyp: Hypervisor, pvm: HypVm, pfn: int, gfn: int, nr: int) -> None:
    refused(hyp, errno.EINVAL, lambda: hyp.host_donate_guest(pvm, pfn, gfn, nr))


def test_donate_twice_is_eperm_3_2(hyp: Hypervisor, pvm: HypVm) -> None:
    hyp.host_donate_guest(pvm, PFN, GFN)
    refused(hyp, errno.EPERM, lambda: hyp.host_donate_guest(pvm, PFN, GFN + 1))  # host not OWNED
    refused(hyp, errno.EPERM, lambda: hyp.host_donate_guest(pvm, PFN + 1, GFN))  # guest not NOPAGE


def test_donate_page_shared_with_hyp_or_np_guest_is_eperm_3_2(
    hyp: Hypervisor, pvm: HypVm, npvm: HypVm
) -> None:
    hyp.host_share_hyp(PFN)
    refused(hyp, errno.EPERM, lambda: hyp.host_donate_guest(pvm, PFN, GFN))
    hyp.host_share_guest(npvm, PFN + 1, GFN)
    refused(hyp, errno.EPERM, lambda: hyp.host_donate_guest(pvm, PFN + 1, GFN))


def test_donate_to_dying_vm_is_einval_3_1(hyp: Hypervisor, pvm: HypVm) -> None:
    """``pkvm_load_hyp_vcpu`` fails for a dying VM; without a loaded vCPU the handler is -EINVAL."""
    hyp.start_teardown_vm(pvm)
    refused(hyp, errno.EINVAL, lambda: hyp.host_donate_guest(pvm, PFN, GFN))


def test_handlers_check_the_vm_kind_3_2(hyp: Hypervisor, pvm: HypVm, npvm: HypVm) -> None:
    """``hyp-main.c``: ``handle___pkvm_host_donate_guest`` rejects non-protected VMs, the
    share/unshare-with-guest handlers reject protected ones (``get_np_pkvm_hyp_vm``): -EINVAL.
    """
    refused(hyp, errno.EINVAL, lambda: hyp.host_donate_guest(npvm, PFN, GFN))
    refused(hyp, errno.EINVAL, lambda: hyp.host_share_guest(pvm, PFN, GFN))
    hyp.host_donate_guest(pvm, PFN, GFN)
    refused(hyp, errno.EINVAL, lambda: hyp.host_unshare_guest(pvm, GFN))


def test_donate_block_over_partly_owned_range_is_eperm_and_atomic_3_2(hyp: Hypervisor, pvm: HypVm) -> None:
    other = hyp.init_vm(protected=True)
    hyp.host_donate_guest(other, PFN + 100, GFN)
    refused(hyp, errno.EPERM, lambda: hyp.host_donate_guest(pvm, PFN, 0x200, PMD_NR_PAGES))


# --- guest share / unshare (MEM_SHARE / MEM_UNSHARE) -------------------------------------------
def test_share_then_unshare_in_place_3_3(hyp: Hypervisor, pvm: HypVm, mem: Memory) -> None:
    hyp.host_donate_guest(pvm, PFN, GFN)
    mem.write(PFN, 0, b"guest data")
    assert hyp.guest_share_host(pvm, GFN) == 1
    assert (guest(pvm), host(hyp)) == (PageState.SHARED_OWNED, PageState.SHARED_BORROWED)
    assert hyp.host_accessible(PFN)
    assert pvm.state(GFN).pfn(GFN) == PFN  # same page: conversion in place
    assert hyp.guest_unshare_host(pvm, GFN) == 1
    assert (guest(pvm), host(hyp)) == (PageState.OWNED, PageState.NOPAGE)
    assert hyp.host_state(PFN).owner == Component.GUEST  # re-annotated to the guest
    assert bytes(mem.page(PFN)[:10]) == b"guest data"
    assert mem.zeroed == []


def test_share_a_range_3_3(hyp: Hypervisor, pvm: HypVm) -> None:
    hyp.host_donate_guest(pvm, PFN, 0x200, PMD_NR_PAGES)
    assert hyp.guest_share_host(pvm, 0x210, 16) == 16
    assert [(s - 0x200, e - 0x200, p.state) for s, e, p in pvm.guest.items()] == [
        (0, 0x10, PageState.OWNED),
        (0x10, 0x20, PageState.SHARED_OWNED),
        (0x20, 0x200, PageState.OWNED),
    ]
    assert host(hyp, PFN + 0x10) == PageState.SHARED_BORROWED
    assert host(hyp, PFN + 0x20) == PageState.NOPAGE


def test_share_unmapped_gfn_is_efault_3_2(hyp: Hypervisor, pvm: HypVm) -> None:
    """``guest_request_walker``: a leaf with the NOPAGE meta-state is -EFAULT (map and retry)."""
    refused(hyp, errno.EFAULT, lambda: hyp.guest_share_host(pvm, GFN))
    hyp.host_donate_guest(pvm, PFN, GFN)
    refused(hyp, errno.EFAULT, lambda: hyp.guest_share_host(pvm, GFN, 2))  # the second leaf


def test_share_twice_is_eperm_3_2(hyp: Hypervisor, pvm: HypVm) -> None:
    hyp.host_donate_guest(pvm, PFN, GFN)
    hyp.guest_share_host(pvm, GFN)
    refused(hyp, errno.EPERM, lambda: hyp.guest_share_host(pvm, GFN))


def test_share_range_of_mixed_states_is_eperm_3_2(hyp: Hypervisor, pvm: HypVm) -> None:
    """``guest_request_walker``: any leaf in another (valid) state fails the whole request."""
    hyp.host_donate_guest(pvm, PFN, GFN)
    hyp.host_donate_guest(pvm, PFN + 1, GFN + 1)  # contiguous: merges
    hyp.guest_share_host(pvm, GFN + 1)
    refused(hyp, errno.EPERM, lambda: hyp.guest_share_host(pvm, GFN, 2))


def test_share_stops_at_a_physically_discontiguous_page_3_3(hyp: Hypervisor, pvm: HypVm) -> None:
    """``__guest_request_page_transition``: -E2BIG from the walker is success for the run so far.

    The guest gets ``nr_shared`` (x1) and asks again for the rest.
    """
    hyp.host_donate_guest(pvm, PFN, GFN)
    hyp.host_donate_guest(pvm, PFN + 7, GFN + 1)
    assert hyp.guest_share_host(pvm, GFN, 2) == 1
    assert (guest(pvm, GFN), guest(pvm, GFN + 1)) == (PageState.SHARED_OWNED, PageState.OWNED)
    assert hyp.guest_share_host(pvm, GFN + 1, 1) == 1
    assert hyp.guest_unshare_host(pvm, GFN, 2) == 1


def test_share_request_covers_at_most_256_leaves_3_3(hyp: Hypervisor, pvm: HypVm) -> None:
    """``GUEST_WALKER_DATA_INIT``: ``max_ptes = 512``, two spent per leaf."""
    hyp.host_donate_guest(pvm, PFN, 0x200, PMD_NR_PAGES)
    assert hyp.guest_share_host(pvm, 0x200, PMD_NR_PAGES) == 256
    assert guest(pvm, 0x2FF) == PageState.SHARED_OWNED and guest(pvm, 0x300) == PageState.OWNED


def test_unshare_owned_page_is_eperm_3_2(hyp: Hypervisor, pvm: HypVm) -> None:
    hyp.host_donate_guest(pvm, PFN, GFN)
    refused(hyp, errno.EPERM, lambda: hyp.guest_unshare_host(pvm, GFN))


def test_unshare_unmapped_gfn_is_efault_3_2(hyp: Hypervisor, pvm: HypVm) -> None:
    refused(hyp, errno.EFAULT, lambda: hyp.guest_unshare_host(pvm, GFN))


def test_share_when_host_annotation_disagrees_is_eperm_3_2(hyp: Hypervisor, pvm: HypVm) -> None:
    hyp.host_donate_guest(pvm, PFN, GFN)
    # Corrupt the host side: the guest's PTE says OWNED but the host table says otherwise.
    hyp.host.set(PFN, PFN + 1, HostPage(PageState.NOPAGE, Component.HYP))
    refused(hyp, errno.EPERM, lambda: hyp.guest_share_host(pvm, GFN))


def test_unshare_when_host_not_borrowing_is_eperm_3_2(hyp: Hypervisor, pvm: HypVm) -> None:
    hyp.host_donate_guest(pvm, PFN, GFN)
    hyp.guest_share_host(pvm, GFN)
    hyp.host.set(PFN, PFN + 1, HostPage(PageState.NOPAGE, Component.GUEST, pvm.handle, PFN - GFN))
    refused(hyp, errno.EPERM, lambda: hyp.guest_unshare_host(pvm, GFN))


# --- relinquish -----------------------------------------------------------------------------
def test_relinquish_owned_page_zeroes_and_returns_it_early_3_2(
    hyp: Hypervisor, pvm: HypVm, mem: Memory
) -> None:
    hyp.host_donate_guest(pvm, PFN, GFN)
    mem.write(PFN, 0, b"secret")
    assert hyp.guest_relinquish_to_host(pvm, GFN) == PFN
    assert (guest(pvm), hyp.host_state(PFN)) == (PageState.NOPAGE, HOST_OWNED)
    assert mem.zeroed == [(PFN, 1)]
    assert bytes(mem.page(PFN)) == bytes(PAGE_SIZE)
    assert pvm.counters["zeroed_bytes"] == PAGE_SIZE
    assert pvm.counters["relinquished_pages"] == 1


def test_relinquish_unmapped_gfn_is_a_noop_3_2(hyp: Hypervisor, pvm: HypVm) -> None:
    before = snapshot(hyp)
    assert hyp.guest_relinquish_to_host(pvm, GFN) is None
    assert snapshot(hyp) == before


def test_relinquish_shared_page_is_eperm_3_2(hyp: Hypervisor, pvm: HypVm) -> None:
    # Android's relinquish walker expects OWNED for protected guests (spec 3.2 also lists
    # SHARED_OWNED; the source refuses it).
    hyp.host_donate_guest(pvm, PFN, GFN)
    hyp.guest_share_host(pvm, GFN)
    refused(hyp, errno.EPERM, lambda: hyp.guest_relinquish_to_host(pvm, GFN))


def test_relinquish_of_non_protected_vm_returns_a_borrowed_page_3_2(
    hyp: Hypervisor, npvm: HypVm, mem: Memory
) -> None:
    """``__pkvm_guest_relinquish_to_host``: the expected state "depends on VM type".

    A non-protected guest gives back a page the host shares with it (SHARED_BORROWED):
    the guest PTE goes, the host has the page to itself again, nothing is zeroed.
    """
    hyp.host_share_guest(npvm, PFN, GFN)
    mem.write(PFN, 0, b"host data")
    assert hyp.guest_relinquish_to_host(npvm, GFN) == PFN
    assert (guest(npvm), hyp.host_state(PFN)) == (PageState.NOPAGE, HOST_OWNED)
    assert mem.zeroed == [] and bytes(mem.page(PFN)[:9]) == b"host data"
    assert npvm.counters["relinquished_pages"] == 1
    assert hyp.guest_relinquish_to_host(npvm, GFN) is None  # nothing mapped: a no-op


# --- host <-> non-protected guest ------------------------------------------------------------
def test_host_share_guest_counts_sharers_3_2(hyp: Hypervisor, npvm: HypVm) -> None:
    other = hyp.init_vm(protected=False)
    hyp.host_share_guest(npvm, PFN, GFN)
    assert hyp.host_state(PFN) == HostPage(PageState.SHARED_OWNED, share_count=1)
    assert guest(npvm) == PageState.SHARED_BORROWED
    assert hyp.host_accessible(PFN)
    hyp.host_share_guest(other, PFN, GFN + 5)
    assert hyp.host_state(PFN).share_count == 2
    hyp.host_unshare_guest(npvm, GFN)
    assert hyp.host_state(PFN).share_count == 1
    assert guest(npvm) == PageState.NOPAGE
    hyp.host_unshare_guest(other, GFN + 5)
    assert hyp.host_state(PFN) == HOST_OWNED
    assert len(hyp.host) == 0


def test_host_share_guest_block_3_2(hyp: Hypervisor, npvm: HypVm) -> None:
    hyp.host_share_guest(npvm, PFN, 0x200, PMD_NR_PAGES)
    assert len(npvm.guest) == 1
    hyp.host_unshare_guest(npvm, 0x200, PMD_NR_PAGES)
    assert len(hyp.host) == 0 and len(npvm.guest) == 0


def test_host_share_guest_illegal_3_2(hyp: Hypervisor, npvm: HypVm, pvm: HypVm) -> None:
    hyp.host_share_guest(npvm, PFN, GFN)
    refused(hyp, errno.EPERM, lambda: hyp.host_share_guest(npvm, PFN + 1, GFN))  # gfn taken
    hyp.host_share_hyp(PFN + 2)
    refused(hyp, errno.EPERM, lambda: hyp.host_share_guest(npvm, PFN + 2, GFN + 2))  # shared with hyp
    hyp.host_donate_guest(pvm, PFN + 3, GFN)
    refused(hyp, errno.EPERM, lambda: hyp.host_share_guest(npvm, PFN + 3, GFN + 3))  # donated
    refused(hyp, errno.EINVAL, lambda: hyp.host_share_guest(npvm, PFN + 4, GFN + 4, 3))


def test_host_unshare_guest_illegal_3_2(hyp: Hypervisor, npvm: HypVm) -> None:
    refused(hyp, errno.ENOENT, lambda: hyp.host_unshare_guest(npvm, GFN))


# --- host <-> hypervisor --------------------------------------------------------------------
def test_host_hyp_share_and_donate_round_trips_3_2(hyp: Hypervisor) -> None:
    hyp.host_share_hyp(PFN)
    assert (host(hyp), hyp.hyp_state(PFN)) == (PageState.SHARED_OWNED, PageState.SHARED_BORROWED)
    hyp.host_unshare_hyp(PFN)
    assert (hyp.host_state(PFN), hyp.hyp_state(PFN)) == (HOST_OWNED, PageState.NOPAGE)
    hyp.host_donate_hyp(PFN, 4)
    assert (host(hyp, PFN + 3), hyp.hyp_state(PFN + 3)) == (PageState.NOPAGE, PageState.OWNED)
    assert hyp.host_state(PFN).owner == Component.HYP
    hyp.hyp_donate_host(PFN, 4)
    assert len(hyp.host) == 0 and len(hyp.hyp) == 0


def test_host_hyp_selftest_matrix_3_2(hyp: Hypervisor) -> None:
    """The refusals of ``pkvm_ownership_selftest()`` for the host/hyp pair."""
    # Host OWNED, hyp NOPAGE.
    refused(hyp, errno.EPERM, lambda: hyp.host_unshare_hyp(PFN))
    refused(hyp, errno.EPERM, lambda: hyp.hyp_donate_host(PFN))
    # Donated to hyp.
    hyp.host_donate_hyp(PFN)
    refused(hyp, errno.EPERM, lambda: hyp.host_donate_hyp(PFN))
    refused(hyp, errno.EPERM, lambda: hyp.host_share_hyp(PFN))
    refused(hyp, errno.EPERM, lambda: hyp.host_unshare_hyp(PFN))
    hyp.hyp_donate_host(PFN)
    # Shared with hyp.
    hyp.host_share_hyp(PFN)
    refused(hyp, errno.EPERM, lambda: hyp.host_share_hyp(PFN))
    refused(hyp, errno.EPERM, lambda: hyp.host_donate_hyp(PFN))
    refused(hyp, errno.EPERM, lambda: hyp.hyp_donate_host(PFN))


# --- reclaim --------------------------------------------------------------------------------
def test_reclaim_needs_a_dying_vm_3_6(hyp: Hypervisor, pvm: HypVm) -> None:
    """``__pkvm_reclaim_dying_guest_page``: ``if (!hyp_vm || !hyp_vm->is_dying)`` -> -EINVAL."""
    hyp.host_donate_guest(pvm, PFN, GFN)
    refused(hyp, errno.EINVAL, lambda: hyp.host_reclaim_page_guest(pvm, GFN))


def test_reclaim_of_a_poisoned_gfn_succeeds_3_6(hyp: Hypervisor, pvm: HypVm, mem: Memory) -> None:
    """``__pkvm_host_reclaim_page_guest``: ``return ret && ret != -EHWPOISON ? ret : 0``.

    The page under a poisoned PTE went back to the host at the force reclaim; reclaiming
    it at teardown is a success that changes nothing.
    """
    hyp.host_donate_guest(pvm, PFN, GFN)
    hyp.host_force_reclaim_page_guest(pvm, GFN)
    hyp.start_teardown_vm(pvm)
    before = snapshot(hyp)
    assert hyp.host_reclaim_page_guest(pvm, GFN) == PFN
    assert snapshot(hyp) == before and mem.zeroed == [(PFN, 1)]
    assert pvm.counters["reclaims"] == 0


def test_reclaim_of_a_block_over_page_mappings_is_e2big_3_6(hyp: Hypervisor, pvm: HypVm) -> None:
    """``get_valid_guest_pte``: ``kvm_granule_size(level) != size`` -> -E2BIG."""
    hyp.host_donate_guest(pvm, PFN, 0x200)
    hyp.start_teardown_vm(pvm)
    refused(hyp, errno.E2BIG, lambda: hyp.host_reclaim_page_guest(pvm, 0x200, PMD_NR_PAGES))


def test_reclaim_owned_page_is_zeroed_shared_page_is_not_3_6(
    hyp: Hypervisor, pvm: HypVm, mem: Memory
) -> None:
    hyp.host_donate_guest(pvm, PFN, GFN)
    hyp.host_donate_guest(pvm, PFN + 1, GFN + 1)
    hyp.guest_share_host(pvm, GFN + 1)
    mem.write(PFN, 0, b"private")
    mem.write(PFN + 1, 0, b"shared")
    hyp.start_teardown_vm(pvm)
    refused(hyp, errno.EBUSY, lambda: hyp.finalize_teardown_vm(pvm))  # pages left
    assert hyp.host_reclaim_page_guest(pvm, GFN) == PFN
    assert hyp.host_reclaim_page_guest(pvm, GFN + 1) == PFN + 1
    assert mem.zeroed == [(PFN, 1)]
    assert bytes(mem.page(PFN)) == bytes(PAGE_SIZE)
    assert bytes(mem.page(PFN + 1)[:6]) == b"shared"
    assert len(hyp.host) == 0 and len(pvm.guest) == 0
    assert pvm.counters["reclaims"] == 2
    assert pvm.counters["zeroed_bytes"] == PAGE_SIZE
    hyp.finalize_teardown_vm(pvm)


def test_reclaim_illegal_3_6(hyp: Hypervisor, pvm: HypVm) -> None:
    hyp.host_donate_guest(pvm, PFN, GFN)
    hyp.host_donate_guest(pvm, PFN + 1, GFN + 1)
    hyp.guest_share_host(pvm, GFN + 1)
    # The host no longer borrows the shared page (e.g. lent on over FF-A): EBUSY.
    hyp.host.set(PFN + 1, PFN + 2, HostPage(PageState.NOPAGE, Component.HYP))
    hyp.start_teardown_vm(pvm)
    refused(hyp, errno.ENOENT, lambda: hyp.host_reclaim_page_guest(pvm, GFN + 9))
    refused(hyp, errno.EBUSY, lambda: hyp.host_reclaim_page_guest(pvm, GFN + 1))
    refused(hyp, errno.EINVAL, lambda: hyp.host_reclaim_page_guest(pvm, GFN, 2))


def test_reclaim_np_guest_page_unshares_3_6(hyp: Hypervisor, npvm: HypVm, mem: Memory) -> None:
    hyp.host_share_guest(npvm, PFN, GFN)
    hyp.start_teardown_vm(npvm)
    hyp.host_reclaim_page_guest(npvm, GFN)
    assert hyp.host_state(PFN) == HOST_OWNED and mem.zeroed == []


def test_force_reclaim_poisons_the_guest_pte_3_2(hyp: Hypervisor, pvm: HypVm, mem: Memory) -> None:
    hyp.host_donate_guest(pvm, PFN, GFN)
    assert hyp.host_force_reclaim_page_guest(pvm, GFN) == PFN
    assert guest(pvm) == PageState.POISON
    assert hyp.host_state(PFN) == HOST_OWNED and mem.zeroed == [(PFN, 1)]
    # The host owns the page again: "host state no longer PKVM_NOPAGE" is -EAGAIN.
    refused(hyp, errno.EAGAIN, lambda: hyp.host_force_reclaim_page_guest(pvm, GFN))
    refused(hyp, errno.EFAULT, lambda: hyp.guest_share_host(pvm, GFN))  # invalid PTE
    refused(hyp, errno.EPERM, lambda: hyp.host_donate_guest(pvm, PFN + 1, GFN))
    refused(hyp, errno.ENOENT, lambda: hyp.host_force_reclaim_page_guest(pvm, GFN + 1))
    hyp.start_teardown_vm(pvm)
    hyp.finalize_teardown_vm(pvm)  # a poisoned PTE holds no page


def test_force_reclaim_of_a_page_the_host_can_access_is_eagain_3_2(
    hyp: Hypervisor, pvm: HypVm, npvm: HypVm
) -> None:
    """``__pkvm_host_force_reclaim_page_guest``: only a donated page (host NOPAGE, guest
    OWNED) is taken by force; a page the host already maps (guest SHARED_OWNED, or a page it
    shares with a normal VM) is -EAGAIN: the faulting host access is simply retried.
    """
    hyp.host_donate_guest(pvm, PFN, GFN)
    hyp.guest_share_host(pvm, GFN)
    refused(hyp, errno.EAGAIN, lambda: hyp.host_force_reclaim_page_guest(pvm, GFN))
    hyp.host_share_guest(npvm, PFN + 1, GFN)
    refused(hyp, errno.EAGAIN, lambda: hyp.host_force_reclaim_page_guest(npvm, GFN))


def test_finalize_without_start_is_ebusy_3_1(hyp: Hypervisor, pvm: HypVm) -> None:
    """``__pkvm_finalize_teardown_vm``: ``else if (!hyp_vm->is_dying) err = -EBUSY``."""
    refused(hyp, errno.EBUSY, lambda: hyp.finalize_teardown_vm(pvm))


def test_start_teardown_twice_is_einval_and_unknown_handle_enoent_3_1(hyp: Hypervisor, pvm: HypVm) -> None:
    """``__pkvm_start_teardown_vm``: -ENOENT without a VM, -EINVAL if it is already dying."""
    hyp.start_teardown_vm(pvm)
    refused(hyp, errno.EINVAL, lambda: hyp.start_teardown_vm(pvm))
    hyp.finalize_teardown_vm(pvm)
    refused(hyp, errno.ENOENT, lambda: hyp.start_teardown_vm(pvm))
    refused(hyp, errno.ENOENT, lambda: hyp.finalize_teardown_vm(pvm))


# --- pvmfw (3.4) ------------------------------------------------------------------------------
def test_pvmfw_is_loaded_by_the_hypervisor_at_donation_3_4(hyp: Hypervisor, pvm: HypVm, mem: Memory) -> None:
    image = b"F" * (PAGE_SIZE + 10)
    hyp.set_pvmfw(pvm, 0x100 * PAGE_SIZE, image)
    hyp.host_donate_guest(pvm, PFN, 0x101)
    assert bytes(mem.page(PFN)[:10]) == b"F" * 10
    assert bytes(mem.page(PFN)[10:20]) == bytes(10)  # padded with zeros
    hyp.host_donate_guest(pvm, PFN + 1, GFN)  # outside the image: untouched
    assert bytes(mem.page(PFN + 1)[:4]) == b"\xaa" * 4
    assert pvm.counters["pvmfw_bytes"] == PAGE_SIZE


def test_pvmfw_illegal_3_4(hyp: Hypervisor, pvm: HypVm, npvm: HypVm) -> None:
    refused(hyp, errno.EINVAL, lambda: hyp.set_pvmfw(npvm, 0, b"x"))
    refused(hyp, errno.EINVAL, lambda: hyp.set_pvmfw(pvm, 0x10, b"x"))
    refused(hyp, errno.EINVAL, lambda: hyp.set_pvmfw(pvm, 0, b""))
    hyp.host_donate_guest(pvm, PFN, 0)
    with pytest.raises(HypError) as info:
        hyp.set_pvmfw(pvm, 0, b"x")
    assert info.value.errno == errno.EBUSY


# --- listener ------------------------------------------------------------------------------
def test_every_table_change_is_reported_3_2(
    hyp: Hypervisor, pvm: HypVm, events: list[tuple[str, int, int, Any, Any]]
) -> None:
    hyp.host_donate_guest(pvm, PFN, GFN)
    hyp.guest_share_host(pvm, GFN)
    tables = [(t, pfn, n, old.state, new.state) for t, pfn, n, old, new in events]
    assert tables == [
        (HOST_TABLE, PFN, 1, PageState.OWNED, PageState.NOPAGE),
        (GUEST_TABLE, PFN, 1, PageState.NOPAGE, PageState.OWNED),
        (HOST_TABLE, PFN, 1, PageState.NOPAGE, PageState.SHARED_BORROWED),
        (GUEST_TABLE, PFN, 1, PageState.OWNED, PageState.SHARED_OWNED),
    ]
    events.clear()
    hyp.host_share_hyp(PFN + 1)
    assert [e[0] for e in events] == [HOST_TABLE, HYP_TABLE]


# --- property: a random walk keeps host and guest views consistent --------------------------
OPS = st.lists(
    st.tuples(st.sampled_from(["donate", "share", "unshare", "relinquish", "force"]), st.integers(0, 7)),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_host_and_guest_views_agree_after_any_sequence_3_2(ops: list[tuple[str, int]]) -> None:
    mem = Memory()
    hyp = Hypervisor(zero=mem.zero)
    vm = hyp.init_vm(protected=True)
    calls: dict[str, Callable[[int], object]] = {
        "donate": lambda i: hyp.host_donate_guest(vm, PFN + i, GFN + i),
        "share": lambda i: hyp.guest_share_host(vm, GFN + i),
        "unshare": lambda i: hyp.guest_unshare_host(vm, GFN + i),
        "relinquish": lambda i: hyp.guest_relinquish_to_host(vm, GFN + i),
        "force": lambda i: hyp.host_force_reclaim_page_guest(vm, GFN + i),
    }
    for name, i in ops:
        before = snapshot(hyp)
        try:
            calls[name](i)
        except HypError:
            assert snapshot(hyp) == before
    for i in range(8):
        g, h = vm.state(GFN + i), hyp.host_state(PFN + i)
        expected = {
            PageState.OWNED: PageState.NOPAGE,
            PageState.SHARED_OWNED: PageState.SHARED_BORROWED,
            PageState.NOPAGE: PageState.OWNED,
            PageState.POISON: PageState.OWNED,
        }[g.state]
        assert h.state == expected
        # The host may touch exactly the pages the guest does not own privately.
        assert hyp.host_accessible(PFN + i) == (g.state != PageState.OWNED)


# --- range reclaim (what the policy's invalidation and teardown use) -------------------------
def test_reclaim_guest_range_works_by_runs_3_6(hyp: Hypervisor, pvm: HypVm, mem: Memory) -> None:
    for i in range(4):
        hyp.host_donate_guest(pvm, PFN + i * PMD_NR_PAGES, 0x1000 + i * PMD_NR_PAGES, PMD_NR_PAGES)
    hyp.guest_share_host(pvm, 0x1000 + 7)
    hyp.start_teardown_vm(pvm)
    # A whole 1 TiB guest-physical window: cost follows the stored runs, not its size.
    assert hyp.reclaim_guest_range(pvm, 0, 1 << 28) == 4 * PMD_NR_PAGES
    assert len(pvm.guest) == 0 and len(hyp.host) == 0
    assert pvm.counters["reclaims"] == 4 * PMD_NR_PAGES
    assert pvm.counters["zeroed_bytes"] == (4 * PMD_NR_PAGES - 1) * PAGE_SIZE  # not the shared page
    assert mem.zeroed == [(PFN, 7), (PFN + 8, 4 * PMD_NR_PAGES - 8)]  # the two runs around the shared page
    hyp.finalize_teardown_vm(pvm)


def test_reclaim_guest_range_of_live_vms_3_6(hyp: Hypervisor, pvm: HypVm, npvm: HypVm) -> None:
    hyp.host_donate_guest(pvm, PFN, GFN)
    hyp.host_share_guest(npvm, PFN + 1, GFN)
    assert hyp.reclaim_guest_range(pvm, GFN, GFN + 1) == 1
    assert guest(pvm) == PageState.POISON  # live protected VM: force reclaim
    assert hyp.reclaim_guest_range(pvm, GFN, GFN + 1) == 0  # poisoned PTEs hold nothing
    assert hyp.reclaim_guest_range(npvm, 0, 1 << 20) == 1
    assert guest(npvm) == PageState.NOPAGE and len(hyp.host) == 0


# --- runs of one-page calls (a run of guest stage-2 faults) ----------------------------------
def _tables(hyp: Hypervisor, vm: HypVm) -> tuple[Any, ...]:
    return list(hyp.host.items()), list(hyp.hyp.items()), list(vm.guest.items()), dict(vm.counters)


@pytest.mark.parametrize("blocked", [None, 0, 5])
def test_a_donation_run_is_one_page_donations_in_a_row(blocked: int | None) -> None:
    """``host_donate_guest_pages``: the tables and counters of that many one-page
    ``__pkvm_host_donate_guest`` calls; a page the host shared with the hypervisor stops
    the run there, and is refused (EPERM) by the call that starts at it."""
    ranged, stepped = Hypervisor(), Hypervisor()
    runs = []
    for hyp in (ranged, stepped):
        vm = hyp.init_vm(protected=True)
        if blocked is not None:
            hyp.host_share_hyp(PFN + blocked)
        runs.append(vm)
    rvm, svm = runs
    done = 0 if blocked == 0 else ranged.host_donate_guest_pages(rvm, PFN, GFN, 8)
    if blocked == 0:
        with pytest.raises(HypError) as info:
            ranged.host_donate_guest_pages(rvm, PFN, GFN, 8)
        assert info.value.errno == errno.EPERM
    for i in range(8 if blocked is None else blocked):
        stepped.host_donate_guest(svm, PFN + i, GFN + i)
    assert done == (8 if blocked is None else blocked)
    assert _tables(ranged, rvm) == _tables(stepped, svm)
    assert rvm.counters["donations"] == rvm.counters["tlbi"] == rvm.counters["stage2_map"] == done


def test_a_share_run_is_one_page_shares_in_a_row() -> None:
    """``host_share_guest_pages`` (a normal VM's faults): pages another normal VM shares
    already count one more sharer, a page the host gave the hypervisor ends the run."""
    ranged, stepped = Hypervisor(), Hypervisor()
    runs = []
    for hyp in (ranged, stepped):
        other, vm = hyp.init_vm(protected=False), hyp.init_vm(protected=False)
        hyp.host_share_guest(other, PFN + 2, GFN)
        hyp.host_donate_hyp(PFN + 6)
        runs.append(vm)
    rvm, svm = runs
    assert ranged.host_share_guest_pages(rvm, PFN, GFN, 8) == 6
    for i in range(6):
        stepped.host_share_guest(svm, PFN + i, GFN + i)
    assert _tables(ranged, rvm) == _tables(stepped, svm)
    assert ranged.host_state(PFN + 2).share_count == 2
    with pytest.raises(HypError) as info:
        ranged.host_share_guest_pages(rvm, PFN + 6, GFN + 6, 2)
    assert info.value.errno == errno.EPERM
