"""End to end: a Gunyah VM with a lent and a shared binding boots, the guest writes both,
the host reads the shared one and, on the lent one, gets SIGBUS or a launder (by driver
generation), the guest relinquishes a lent page with sanitize, the VM is destroyed and
every page is back with the host, zeroed only where a sanitize was asked.  The core's
invariant checker and the Gunyah checker run after every event."""

from __future__ import annotations

from typing import Any

import pytest

import guestmem
from guestmem import HostSigbus, uapi
from guestmem.backend import HostView, TraceEvent, hookimpl, view
from guestmem.invariants import InvariantChecker
from guestmem_gunyah import Driver, abi, rm, set_driver
from guestmem_gunyah.abi import TransType, VmStatus
from guestmem_gunyah.hyp import ExtentKind
from guestmem_gunyah.invariants import GunyahChecker

from .conftest import LENT_GPA, PAGE, SHARED_GPA, Guest, machine

DTB = b"\xd0\x0d\xfe\xed fake devicetree"
RELINQUISH = 64  # page of the lent binding the guest gives back


class ReclaimWatch:
    """Reads pages the moment the driver reclaims them (before any free)."""

    def __init__(self, pfns: dict[str, int]) -> None:
        self.pfns = pfns
        self.seen: dict[str, bytes] = {}

    @hookimpl
    def guestmem_trace(self, host: HostView, event: TraceEvent) -> None:
        if event.kind == "gunyah_reclaim":
            for name, pfn in self.pfns.items():
                if (
                    host.is_allocated(pfn)
                    and name not in self.seen
                    and host.arch.hyp.owner(pfn).kind == ExtentKind.HLOS
                ):
                    self.seen[name] = host.read(pfn, 0, 16)


@pytest.mark.parametrize("driver", list(Driver), ids=[d.value for d in Driver])
def test_lend_share_launder_or_sigbus_relinquish_destroy(
    kvm: Any, checkers: tuple[InvariantChecker, GunyahChecker], driver: Driver
) -> None:
    set_driver(kvm, driver)
    g = Guest(kvm)
    m = machine(kvm)
    gh, vcpu = g.gh, g.vcpu

    # The VMM writes the devicetree, drops its mapping (a mapped folio is not lent), boots.
    dtb_map = g.lent.mmap(PAGE)
    dtb_map.write(0, DTB)
    dtb_map.close()
    assert vcpu.access(LENT_GPA, len(DTB)) == DTB  # the first run starts the VM
    assert gh.status == VmStatus.RUNNING and gh.vmid == abi.VMID_DYNAMIC_BASE

    # The guest writes both bindings: demand paging lends one page, shares the other.
    vcpu.access(LENT_GPA + 2 * PAGE, data=b"lent secret")
    vcpu.access(SHARED_GPA + 2 * PAGE, data=b"shared hello")
    lent_pfn, shared_pfn = g.vm.gmem_pfn((LENT_GPA >> 12) + 2), g.vm.gmem_pfn((SHARED_GPA >> 12) + 2)
    assert m.hyp.owner(lent_pfn).kind == ExtentKind.GUEST_PRIVATE
    assert m.hyp.owner(shared_pfn).kind == ExtentKind.GUEST_SHARED

    # The host reads the shared page; the lent one is SIGBUS or laundered, by generation.
    shared_map = g.mmap(g.shared)
    assert shared_map.read(2 * PAGE, 12) == b"shared hello"
    lent_map = g.mmap(g.lent, PAGE, 2 * PAGE)
    if driver == Driver.LIBRARY:
        with pytest.raises(HostSigbus):
            lent_map.read(0, 1)
        assert vcpu.access(LENT_GPA + 2 * PAGE, 11) == b"lent secret"
    else:
        assert lent_map.read(0, 11) == b"lent secret"  # laundered: non-destructive
        assert m.hyp.owner(lent_pfn).kind == ExtentKind.HLOS
        lent_map.madvise(uapi.MADV_DONTNEED, 0, lent_map.length)
        assert vcpu.access(LENT_GPA + 2 * PAGE, 11) == b"lent secret"  # lent again on touch
    lent_map.close()

    # The guest relinquishes a lent page with sanitize: the VMM lends it as a parcel, the
    # guest accepts it where it sits, uses it, releases it asking for sanitize, the VMM
    # reclaims it: zeroed, the host's again.
    gpa = LENT_GPA + RELINQUISH * PAGE
    parcel = gh.share_parcel(gpa, PAGE)
    r = rm(kvm)
    r.mem_accept(gh.vmid, parcel.handle, trans=TransType.LEND, sgl=[(gpa, PAGE)])
    vcpu.access(gpa, data=b"guest scratch")
    relinquished_pfn = g.vm.gmem_pfn(gpa >> 12)
    r.mem_release(gh.vmid, parcel.handle, abi.MEM_RELEASE_FLAG_SANITIZE)
    assert view(g.vm).leaf(gpa >> 12) is None
    gh.reclaim_parcel(parcel)
    assert m.hyp.owner(relinquished_pfn).kind == ExtentKind.HLOS
    assert view(kvm).read(relinquished_pfn, 0, 13) == bytes(13)
    assert g.vm.counters["gunyah.sanitized_bytes"] == PAGE

    # Destroy the VM as a VMM does; watch what the reclaim hands back.
    pfns = {"lent": lent_pfn, "dtb": g.vm.gmem_pfn(LENT_GPA >> 12)}
    watch = ReclaimWatch(pfns)
    vmid, counters = gh.vmid, g.vm.counters
    registry = guestmem.get_registry()
    registry.add_plugin(watch, name="reclaim-watch")
    try:
        g.teardown()
    finally:
        registry.remove_plugin(watch)

    # Every page is back with the host: no guest extent, no stage-2, no parcel, no VMID,
    # the direct map whole; contents were kept (no sanitize asked) until the pages were freed.
    assert not m.hyp.memdb and not m.hyp.addrspaces and not m.rm.parcels
    assert vmid not in m.rm.vms and vmid in m.rm.free_dynamic
    host = view(kvm)
    assert all(host.direct_map_valid(pfn) for pfn in (lent_pfn, shared_pfn, relinquished_pfn, *pfns.values()))
    assert not any(host.is_allocated(pfn) for pfn in (lent_pfn, shared_pfn, relinquished_pfn))
    assert watch.seen == {"lent": b"lent secret" + bytes(5), "dtb": DTB[:16]}
    assert counters["gunyah.sanitized_bytes"] == PAGE  # the relinquished page only
    assert counters["gunyah.rm.VM_STOP"] == 1 and counters["gunyah.rm.VM_RESET"] == 1
    assert counters["gunyah.rm.VM_DEALLOC_VMID"] == 1
    assert not m.warnings
    core, mine = checkers
    assert core.checked > 0 and mine.checked["G-1"] > 0 and mine.checked["G-6"] > 0 and not mine.violations
