"""An observer checking the RMM's tables against the model after every operation.

- ``G-1``: every ASSIGNED entry of a realm holds a DATA granule, and that granule is the
  guest_memfd page KVM faulted in for the IPA (no entry points at a page guest_memfd no
  longer holds);
- ``G-2``: every DATA granule belongs to exactly one ASSIGNED entry of one realm;
- ``G-3``: no granule the Realm PAS holds is mapped by the host (a host mapping of one
  would Granule-Protection-Fault on its first touch);
- ``G-4``: every RD, REC, REC_AUX and RTT granule belongs to a live realm.

A violation raises :class:`GranuleViolation` (an ``InvariantViolation``), reported when
the operation that caused it has finished.
"""

from __future__ import annotations

from collections import Counter

from guestmem.backend import HostView, hookimpl
from guestmem.invariants import InvariantViolation
from guestmem_cca.realm import KvmRealm, RealmHost
from guestmem_cca.rmi import GRANULE_SHIFT, GranuleState


class GranuleViolation(InvariantViolation):
    """An invariant of the RMM's granule table broke."""


class GranuleChecker:
    """The observer; ``checks`` counts what it checked, by invariant."""

    def __init__(self) -> None:
        self.checks: Counter[str] = Counter()

    @hookimpl
    def guestmem_operation_done(self, host: HostView, operation: str) -> None:
        state = host.arch
        if not isinstance(state, RealmHost):
            return
        check_granules(host, state, operation)
        self.checks["operations"] += 1


def check_granules(host: HostView, state: RealmHost, after: str = "") -> None:
    """Check G-1..G-4 on *host*; raise :class:`GranuleViolation` naming the first broken one."""
    rmm = state.rmm
    where = f" after {after}" if after else ""
    owned: dict[int, GranuleState] = {}
    data_owners: Counter[int] = Counter()
    for realm in rmm.realms.values():
        owned[realm.rd] = GranuleState.RD
        owned[realm.params.rtt_base] = GranuleState.RTT
        for addr in realm.tables.values():
            owned[addr] = GranuleState.RTT
        for rec in realm.recs.values():
            owned[rec.addr] = GranuleState.REC
            for aux in rec.aux:
                owned[aux] = GranuleState.REC_AUX
        for s, e, delta in realm.assigned.items():
            for page in range(s, e):
                data_owners[page + delta] += 1
    vms = {vm.arch.rd: vm for vm in host.vms() if isinstance(vm.arch, KvmRealm) and vm.arch.rd}
    for rd, realm in rmm.realms.items():
        vm = vms.get(rd)
        for s, e, delta in realm.assigned.items():
            for page in range(s, e):
                if rmm.state((page + delta) << GRANULE_SHIFT) is not GranuleState.DATA:
                    raise GranuleViolation(
                        f"G-1{where}: ipa page {page:#x} is ASSIGNED to a granule not DATA"
                    )
                if vm is not None and vm.gmem_pfn(page) != page + delta:
                    raise GranuleViolation(
                        f"G-1{where}: ipa page {page:#x} maps pfn {page + delta:#x}, not gmem's"
                    )
    for s, e, value in rmm.granules.items():
        for pfn in range(s, e):
            addr = pfn << GRANULE_SHIFT
            if value is GranuleState.DATA and data_owners[pfn] != 1:
                raise GranuleViolation(f"G-2{where}: DATA granule {pfn:#x} has {data_owners[pfn]} owner(s)")
            control = value in (GranuleState.RD, GranuleState.REC, GranuleState.REC_AUX, GranuleState.RTT)
            if control and owned.get(addr) is not value:
                raise GranuleViolation(f"G-4{where}: {value.value} granule {pfn:#x} belongs to no realm")
    for vm in host.vms():
        for gmem in vm.bound_gmem():
            for folio in gmem.host_mapped_folios():
                for pfn in range(folio.pfn, folio.pfn + folio.end - folio.start):
                    if rmm.in_realm_pas(pfn << GRANULE_SHIFT):
                        raise GranuleViolation(f"G-3{where}: the host maps pfn {pfn:#x} of the Realm PAS")
