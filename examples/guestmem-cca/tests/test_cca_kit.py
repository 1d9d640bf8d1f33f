"""The guestmem conformance kit against both VM types of the ``cca`` backend, configured by
its own ``guestmem_conformance_options`` (the realm driver, the granule checker): the uAPI
rules, destructive conversion round trips through RSI, host access, memslot changes with
mapped pages, release while bound, the leak check and the stateful machine."""

from __future__ import annotations

from guestmem.conformance import kit_for
from guestmem_cca.rmi import KVM_VM_TYPE_ARM_NORMAL, KVM_VM_TYPE_ARM_REALM


class TestCcaRealm(kit_for("cca", KVM_VM_TYPE_ARM_REALM)):
    """A realm: created before its vCPUs, RIPAS RAM and activated before it runs."""


class TestCcaNormalVm(kit_for("cca", KVM_VM_TYPE_ARM_NORMAL)):
    """A normal arm64 VM on the CCA host: the 6.18 rules on plain guest_memfd memory."""
