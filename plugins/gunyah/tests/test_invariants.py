"""The Gunyah checker catches each invariant broken by hand (so that its silence elsewhere
means something)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import guestmem
from guestmem.backend import RangeMap, view
from guestmem_gunyah.hyp import Extent, ExtentKind
from guestmem_gunyah.invariants import GunyahChecker, GunyahViolation

from .conftest import LENT_GPA, PAGE, SHARED_GPA, Guest, machine

LENT_GFN = LENT_GPA >> 12


def _break_stage2_owner(g: Guest) -> None:
    hyp = machine(g.kvm).hyp
    pfn = g.vm.gmem_pfn(LENT_GFN + 1)
    hyp.memdb.set(pfn, pfn + 1, Extent(ExtentKind.GUEST_SHARED, g.gh.vmid))


def _break_core_mirror(g: Guest) -> None:
    machine(g.kvm).hyp.addrspaces[g.gh.vmid].erase(LENT_GFN + 1, LENT_GFN + 2)


def _break_direct_map(g: Guest) -> None:
    view(g.kvm).set_direct_map_default(g.vm.gmem_pfn(LENT_GFN + 1), 1)


def _break_host_mapping(g: Guest) -> None:
    mapping = g.mmap(g.lent)
    mapping.read(10 * PAGE, 1)
    pfn = g.vm.gmem_pfn(LENT_GFN + 10)
    view(g.kvm).set_direct_map_invalid(pfn, 1)
    machine(g.kvm).hyp.memdb.set(pfn, pfn + 1, Extent(ExtentKind.GUEST_PRIVATE, g.gh.vmid))


def _break_freed(g: Guest) -> None:
    pfn = view(g.kvm).alloc(1)
    view(g.kvm).free(pfn, 1)
    machine(g.kvm).hyp.memdb.set(pfn, pfn + 1, Extent(ExtentKind.GUEST_SHARED, g.gh.vmid))


def _break_driver_records(g: Guest) -> None:
    g.gh.state.mm.erase(LENT_GFN + 1, LENT_GFN + 2)
    pfn = g.vm.gmem_pfn((SHARED_GPA >> 12) + 3) or view(g.kvm).alloc(1)
    from guestmem_gunyah.driver import Provided

    g.gh.state.mm.set(LENT_GFN + 200, LENT_GFN + 201, Provided(pfn - LENT_GFN - 200, False, True))


@pytest.mark.parametrize(
    ("invariant", "breaker"),
    [
        ("G-1", _break_stage2_owner),
        ("G-2", _break_core_mirror),
        ("G-3.*direct map", _break_direct_map),
        ("G-3.*host maps", _break_host_mapping),
        ("G-4", _break_freed),
        ("G-5", _break_driver_records),
    ],
)
def test_each_invariant_can_fail(invariant: str, breaker: Callable[[Guest], None]) -> None:
    with guestmem.open("gunyah") as kvm:
        g = Guest(kvm)
        g.vcpu.access(LENT_GPA + PAGE, data=b"x")
        breaker(g)
        checker = GunyahChecker()
        host = view(kvm)
        with pytest.raises(GunyahViolation, match=invariant):
            checker.check(machine(kvm), "by hand", between_operations=True)
        assert checker.violations and host.arch is machine(kvm)


def test_g6_a_destroyed_vm_left_nothing(kvm: Any) -> None:
    g = Guest(kvm)
    g.vcpu.access(LENT_GPA + PAGE, data=b"x")
    state, m = g.gh.state, machine(kvm)
    g.teardown()
    checker = GunyahChecker()
    checker.check(m, "after teardown", between_operations=True)
    assert checker.checked["G-6"] == 1
    pfn = view(kvm).alloc(1)  # allocated, so G-4 holds
    m.hyp.memdb.set(pfn, pfn + 1, Extent(ExtentKind.GUEST_SHARED, state.vmid))
    with pytest.raises(GunyahViolation, match=r"G-6.*still owns memory"):
        checker.check(m, "by hand", between_operations=True)
    m.hyp.memdb.set(pfn, pfn + 1, None)
    m.hyp.addrspaces[state.vmid] = RangeMap()
    with pytest.raises(GunyahViolation, match=r"G-6.*VMID or addrspace"):
        checker.check(m, "by hand", between_operations=True)
    # Closing /dev/kvm is an operation too: the fixture's checker must find the machine
    # as the teardown left it, not as this test broke it.
    del m.hyp.addrspaces[state.vmid]
    checker.check(m, "repaired", between_operations=True)
