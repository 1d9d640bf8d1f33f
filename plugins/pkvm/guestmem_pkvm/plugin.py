"""The ``guestmem`` entry point of guestmem-pkvm: registers the ``pkvm`` backend."""

from __future__ import annotations

from collections.abc import Callable

from guestmem.backend import Backend, hookimpl
from guestmem_pkvm.conformance import guestmem_conformance_options
from guestmem_pkvm.intents import PkvmIntents
from guestmem_pkvm.policy import DEFAULT_VM, PROTECTED_VM, PkvmPolicy

__all__ = ["POLICY", "guestmem_conformance_options", "guestmem_register_backends"]

#: The policy object of the ``pkvm`` backend.  It holds no state: each host's hypervisor is
#: that host's ``host.arch`` (``guestmem_host_init``), each VM's state its ``vm.arch``.
POLICY = PkvmPolicy()
#: Its translation of the portable intents (scenarios, the pytest plugin).
INTENTS = PkvmIntents()


@hookimpl
def guestmem_register_backends(register: Callable[[Backend], None]) -> None:
    """Offer the ``pkvm`` backend: protected and normal arm64 VMs under pKVM."""
    register(
        Backend(
            name="pkvm",
            summary="arm64 protected KVM (nVHE pKVM) with guest_memfd and restricted host mapping",
            vm_types=(PROTECTED_VM, DEFAULT_VM),
            policy=POLICY,
            intents=INTENTS,
            range_faults=True,  # a run of faults is one donation (or share) run: see guestmem_fault
        )
    )
