"""guestmem-cca: an Arm CCA host for guestmem, as a third party would write one.

* :mod:`guestmem_cca.rmm`: the Realm Management Monitor (granules, realms, RTTs, RECs,
  the RMI commands and their status codes), usable on its own;
* :mod:`guestmem_cca.realm`: KVM's side (``arch/arm64/kvm/rme.c`` of the CCA series);
* :mod:`guestmem_cca.policy`: the hooks, and :func:`populate`;
* :mod:`guestmem_cca.guest`: the realm's RSI calls;
* :mod:`guestmem_cca.intents`: the portable intents on a realm (scenarios, the pytest
  plugin and the conformance kit drive realms through them);
* :mod:`guestmem_cca.invariants`: the granule checker (an observer).
"""

from __future__ import annotations

from guestmem_cca.exits import RealmAbort
from guestmem_cca.plugin import DEFAULT_VM, REALM_VM
from guestmem_cca.policy import kvm_realm, populate, realm_host
from guestmem_cca.rmi import GranuleState, RealmState, Ripas
from guestmem_cca.rmm import RmiResult, Rmm

__all__ = [
    "DEFAULT_VM",
    "REALM_VM",
    "GranuleState",
    "RealmAbort",
    "RealmState",
    "Ripas",
    "RmiResult",
    "Rmm",
    "kvm_realm",
    "populate",
    "realm_host",
]
