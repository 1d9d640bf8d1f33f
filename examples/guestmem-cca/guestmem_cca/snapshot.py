"""What ``kvm.snapshot()`` and ``vm.snapshot()`` show of a CCA host (``guestmem_snapshot``).

The host: the granule states of the RMM as runs and the VMIDs in use.  A realm: KVM's
state of it and, once the RMM holds it, the realm's state, RTTs, RIPAS, the ASSIGNED and
unprotected mappings, its RECs and the RIM.
"""

from __future__ import annotations

from typing import Any

import attrs

from guestmem.backend import HostView, VmView
from guestmem_cca.realm import KvmRealm, RealmHost


@attrs.frozen
class Run:
    """``[start, end)`` (granule or IPA page numbers) with one value: a state name, or
    ``pa_page - ipa_page`` of a mapping."""

    start: int
    end: int
    value: str | int


@attrs.frozen
class CcaHostState:
    """The RMM's granule table and the VMIDs."""

    granules: tuple[Run, ...]
    vmids: tuple[int, ...]


@attrs.frozen
class RealmSnapshot:
    """One realm, as KVM and the RMM hold it."""

    kvm_state: str
    vmid: int
    rd: int
    state: str | None
    rim: str | None
    tables: tuple[tuple[int, int, int], ...]
    ripas: tuple[Run, ...]
    assigned: tuple[Run, ...]
    unprotected: tuple[Run, ...]
    recs: tuple[int, ...]


def host_state(host: HostView) -> CcaHostState | None:
    """The RMM's tables, or None on a host the CCA policy did not set up."""
    state = host.arch
    if not isinstance(state, RealmHost):
        return None
    granules = tuple(Run(s, e, g.name) for s, e, g in state.rmm.granules.items())
    return CcaHostState(granules, tuple(sorted(state.vmids)))


def vm_state(vm: VmView) -> Any:
    """The realm's state, or None for a VM that is no realm."""
    kvm_realm = vm.arch
    if not isinstance(kvm_realm, KvmRealm):
        return None
    realm = kvm_realm.rmm.realms.get(kvm_realm.rd) if kvm_realm.rd else None
    if realm is None:
        return RealmSnapshot(kvm_realm.state, kvm_realm.vmid, kvm_realm.rd, None, None, (), (), (), (), ())
    return RealmSnapshot(
        kvm_realm.state,
        kvm_realm.vmid,
        kvm_realm.rd,
        realm.state.name,
        realm.rim.hex(),
        tuple((level, index, addr) for (level, index), addr in sorted(realm.tables.items())),
        tuple(Run(s, e, r.name) for s, e, r in realm.ripas.items()),
        tuple(Run(s, e, delta) for s, e, delta in realm.assigned.items()),
        tuple(Run(s, e, delta) for s, e, delta in realm.unprotected.items()),
        tuple(sorted(realm.recs)),
    )
