"""``range_faults``: a run of a pKVM guest's stage-2 faults (``VmView.fault_range``, the
host's fault-in for MEM_SHARE) leaves the hypervisor's tables, the stage-2, the folios and
every counter as the same faults page by page, and stops (or raises) at the same page."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import guestmem
from guestmem import uapi
from guestmem.backend import view
from guestmem.errors import GuestExit, KvmError
from guestmem_pkvm import abi
from guestmem_pkvm.invariants import IsolationChecker
from guestmem_pkvm.ownership import PageState
from guestmem_pkvm.policy import pkvm_state

from .conftest import GPA, SIZE, Guest, observing

PAGE = uapi.PAGE_SIZE
NPAGES = SIZE // PAGE
GFN = GPA // PAGE
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
SHARE = abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_SHARE_FUNC_ID
UNSHARE = abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_UNSHARE_FUNC_ID
RELINQUISH = abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_RELINQUISH_FUNC_ID


def apply(g: Guest, op: tuple[str, int, int]) -> None:
    """One step of the state a run of faults meets."""
    kind, page, n = op
    n = min(n, NPAGES - page)
    with contextlib.suppress(KvmError, GuestExit):
        if kind == "host_write":
            g.map.write(page * PAGE, b"h")
        elif kind == "host_zap":
            g.map.madvise(uapi.MADV_DONTNEED, page * PAGE, n * PAGE)
        elif kind == "touch":
            g.vcpu.access(GPA + page * PAGE, 1)
        elif kind == "share":
            g.vcpu.hypercall(SHARE, GPA + page * PAGE, n, 0)
        elif kind == "unshare":
            g.vcpu.hypercall(UNSHARE, GPA + page * PAGE, n, 0)
        elif kind == "relinquish":
            g.vcpu.hypercall(RELINQUISH, GPA + page * PAGE, 0, 0)
        elif kind == "punch":
            g.gmem.fallocate(PUNCH, page * PAGE, n * PAGE)


def state(g: Guest) -> tuple[Any, ...]:
    st_ = pkvm_state(g.vm)
    counters = dict(g.vm.counters)
    for key in ("memory_fault_exits", "guest_accesses"):  # exits and loads of the page loop
        counters.pop(key, None)
    return (
        list(st_.running.guest.items()),
        list(st_.hyp.host.items()),
        list(view(g.vm).leaves()),
        list(view(g.gmem).folios()),
        counters,
    )


OPS = st.lists(
    st.tuples(
        st.sampled_from(["host_write", "host_zap", "touch", "share", "unshare", "relinquish", "punch"]),
        st.integers(0, NPAGES - 1),
        st.integers(1, 20),
    ),
    max_size=8,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, first=st.integers(0, NPAGES - 1), npages=st.integers(1, NPAGES), protected=st.booleans())
def test_a_run_of_faults_equals_the_faults_page_by_page(
    ops: list[tuple[str, int, int]], first: int, npages: int, protected: bool
) -> None:
    npages = min(npages, NPAGES - first)
    vm_type = abi.KVM_VM_TYPE_ARM_PROTECTED if protected else abi.KVM_VM_TYPE_ARM_DEFAULT
    with guestmem.open("pkvm") as kvm_a, guestmem.open("pkvm") as kvm_b:
        a, b = Guest(kvm_a, vm_type), Guest(kvm_b, vm_type)
        for g in (a, b):
            g.vcpu.access(GPA, 1)  # the first KVM_RUN makes the hypervisor's VM
            for op in ops:
                apply(g, op)
        assert state(a) == state(b)
        try:
            got: Any = view(a.vm).fault_range(GFN + first, npages, private=False, vcpu=view(a.vcpu))
        except (KvmError, GuestExit) as exc:
            got = type(exc)
        want: Any = npages
        poisoned = False
        for page in range(first, first + npages):
            try:
                b.vcpu.access(GPA + page * PAGE, 1)
            except (KvmError, GuestExit) as exc:
                want = type(exc) if page == first else page - first
                poisoned = pkvm_state(b.vm).running.state(GFN + page).state == PageState.POISON
                break
        assert got == want
        if poisoned:
            # A run over freed pages allocates (and zeroes) its folios before the fault hook
            # finds the poisoned one: the folios after it exist, unmapped; the rest is equal.
            assert allocation_aside(state(a)) == allocation_aside(state(b))
        else:
            assert state(a) == state(b)


def allocation_aside(observed: tuple[Any, ...]) -> tuple[Any, ...]:
    guest, host, leaves, _, counters = observed
    allocation = ("gmem_folios_allocated", "gmem_pages_allocated", "gmem_prepare", "zeroed_bytes")
    counters = {k: v for k, v in counters.items() if k not in allocation}
    return guest, host, leaves, counters


def test_a_protected_guests_first_touch_of_64_pages_is_one_donation_run(kvm: Any) -> None:
    """Counted as 64 one-page donations (hypercalls, stage-2 maps, TLB invalidations),
    made as one change of each table: the ownership observers see one event per table."""
    events: list[Any] = []

    class Events:
        @guestmem.hookimpl
        def guestmem_ownership_update(self, event: Any) -> None:
            events.append(event)

    g = Guest(kvm)
    g.vcpu.access(GPA, 1)
    del events[:]
    with observing(Events(), "events"), observing(IsolationChecker(), "isolation") as checker:
        assert view(g.vm).fault_range(GFN + 1, NPAGES - 1, private=False, vcpu=view(g.vcpu)) == NPAGES - 1
    assert checker.violations == []
    c = g.vm.counters
    assert c["pkvm.donations"] == c["pkvm.tlbi"] == c["pkvm.stage2_map"] == c["faults"] == NPAGES
    assert len(events) == 2 and {e.npages for e in events} == {NPAGES - 1}


def test_a_run_stops_before_a_page_the_host_maps(kvm: Any) -> None:
    """pKVM-3.5: the pages before a host-mapped one are donated; that page's own fault is
    the memory-fault exit, when the run reaches it first."""
    g = Guest(kvm)
    g.vcpu.access(GPA, 1)
    g.map.write(10 * PAGE, b"h")
    assert view(g.vm).fault_range(GFN + 1, 20, private=False, vcpu=view(g.vcpu)) == 9
    with pytest.raises(guestmem.MemoryFault) as info:
        view(g.vm).fault_range(GFN + 10, 10, private=False, vcpu=view(g.vcpu))
    assert info.value.rule == "pKVM-3.5"
    assert g.vm.counters["pkvm.donations"] == 10
