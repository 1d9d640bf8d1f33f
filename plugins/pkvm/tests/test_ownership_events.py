"""What observers hear of the hypervisor's tables: ``guestmem_ownership_update`` with the
pKVM entries and the core's typed :class:`~guestmem.backend.Owner` values."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from guestmem import uapi
from guestmem.backend import HostView, Owner, OwnershipEvent, VmView, hookimpl, view
from guestmem_pkvm import abi
from guestmem_pkvm.exits import HypercallExit
from guestmem_pkvm.ownership import (
    GUEST_NOPAGE,
    GUEST_TABLE,
    HOST_OWNED,
    HOST_TABLE,
    HYP_TABLE,
    Component,
    GuestPage,
    HostPage,
    PageState,
)
from guestmem_pkvm.policy import owner_of

from .conftest import GPA, Guest, observing

PAGE = uapi.PAGE_SIZE


class Recorder:
    """An observer keeping every ownership event as ``(vm_id, event)``."""

    def __init__(self) -> None:
        self.events: list[tuple[int | None, OwnershipEvent]] = []

    @hookimpl
    def guestmem_ownership_update(self, host: HostView, vm: VmView | None, event: OwnershipEvent) -> None:
        assert event.vm_id == (None if vm is None else vm.vm_id)
        self.events.append((event.vm_id, event))

    def owners(self, table: str) -> list[tuple[Owner, Owner]]:
        return [(e.old_owner, e.new_owner) for _, e in self.events if e.table == table]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    with observing(Recorder(), "pkvm-recorder") as recorder:
        yield recorder


def test_donation_is_guest_and_teardown_gives_it_back_to_the_host_3_2(kvm: Any, recorder: Recorder) -> None:
    g = Guest(kvm)
    g.map.madvise(uapi.MADV_DONTNEED, 0, PAGE)
    g.vcpu.access(GPA, data=b"x")
    pfn = g.vm.gmem_pfn(GPA >> 12)
    vm_id = view(g.vm).vm_id
    assert {vid for vid, _ in recorder.events} == {vm_id}
    assert [(e.pfn, e.npages) for _, e in recorder.events] == [(pfn, 1), (pfn, 1)]
    assert recorder.owners(HOST_TABLE) == [(Owner.HOST, Owner.GUEST)]
    assert recorder.owners(GUEST_TABLE) == [(Owner.HOST, Owner.GUEST)]
    host_event = next(e for _, e in recorder.events if e.table == HOST_TABLE)
    assert host_event.old == HOST_OWNED and host_event.new.state == PageState.NOPAGE

    with pytest.raises(HypercallExit):
        g.vcpu.hypercall(abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_SHARE_FUNC_ID, GPA, 1, 0)
    assert recorder.owners(HOST_TABLE)[-1] == (Owner.GUEST, Owner.SHARED)
    assert recorder.owners(GUEST_TABLE)[-1] == (Owner.GUEST, Owner.SHARED)

    recorder.events.clear()
    g.teardown()
    assert recorder.owners(HOST_TABLE) == [(Owner.SHARED, Owner.HOST)]
    assert recorder.owners(GUEST_TABLE) == [(Owner.SHARED, Owner.HOST)]


def test_teardown_of_a_private_page_is_guest_to_host_3_6(kvm: Any, recorder: Recorder) -> None:
    g = Guest(kvm)
    g.map.madvise(uapi.MADV_DONTNEED, 0, PAGE)
    g.vcpu.access(GPA + PAGE, data=b"y")
    recorder.events.clear()
    g.teardown()
    assert recorder.owners(HOST_TABLE) == [(Owner.GUEST, Owner.HOST)]
    assert recorder.owners(GUEST_TABLE) == [(Owner.GUEST, Owner.HOST)]


def test_a_normal_vm_shares_host_pages_3_2(kvm: Any, recorder: Recorder) -> None:
    g = Guest(kvm, abi.KVM_VM_TYPE_ARM_DEFAULT)
    g.vcpu.access(GPA, 1)
    assert recorder.owners(HOST_TABLE) == [(Owner.HOST, Owner.SHARED)]
    assert recorder.owners(GUEST_TABLE) == [(Owner.HOST, Owner.SHARED)]
    g.teardown()
    assert recorder.owners(HOST_TABLE)[-1] == (Owner.SHARED, Owner.HOST)


def test_host_hyp_transitions_are_reported_for_no_vm_3_2(kvm: Any, recorder: Recorder) -> None:
    hyp = view(kvm).arch
    pfn = view(kvm).alloc(2)
    hyp.host_share_hyp(pfn)
    hyp.host_donate_hyp(pfn + 1)
    assert {vid for vid, _ in recorder.events} == {None}
    assert recorder.owners(HOST_TABLE) == [(Owner.HOST, Owner.SHARED), (Owner.HOST, Owner.HYPERVISOR)]
    assert recorder.owners(HYP_TABLE) == [(Owner.HOST, Owner.SHARED), (Owner.HOST, Owner.HYPERVISOR)]
    hyp.host_unshare_hyp(pfn)
    hyp.hyp_donate_host(pfn + 1)
    assert recorder.owners(HOST_TABLE)[2:] == [(Owner.SHARED, Owner.HOST), (Owner.HYPERVISOR, Owner.HOST)]
    assert recorder.owners(HYP_TABLE)[2:] == [(Owner.SHARED, Owner.HOST), (Owner.HYPERVISOR, Owner.HOST)]


@pytest.mark.parametrize(
    ("table", "entry", "owner"),
    [
        (HOST_TABLE, HOST_OWNED, Owner.HOST),
        (HOST_TABLE, HostPage(PageState.SHARED_OWNED, share_count=1), Owner.SHARED),
        (HOST_TABLE, HostPage(PageState.SHARED_BORROWED, Component.GUEST, 0x1000), Owner.SHARED),
        (HOST_TABLE, HostPage(PageState.NOPAGE, Component.GUEST, 0x1000), Owner.GUEST),
        (HOST_TABLE, HostPage(PageState.NOPAGE, Component.HYP), Owner.HYPERVISOR),
        (GUEST_TABLE, GuestPage(PageState.OWNED), Owner.GUEST),
        (GUEST_TABLE, GuestPage(PageState.SHARED_OWNED), Owner.SHARED),
        (GUEST_TABLE, GuestPage(PageState.SHARED_BORROWED), Owner.SHARED),
        (GUEST_TABLE, GUEST_NOPAGE, Owner.HOST),
        (GUEST_TABLE, GuestPage(PageState.POISON), Owner.HOST),
        (HYP_TABLE, PageState.OWNED, Owner.HYPERVISOR),
        (HYP_TABLE, PageState.SHARED_BORROWED, Owner.SHARED),
        (HYP_TABLE, PageState.NOPAGE, Owner.HOST),
    ],
)
def test_owner_of_every_table_state(table: str, entry: Any, owner: Owner) -> None:
    assert owner_of(table, entry) is owner
