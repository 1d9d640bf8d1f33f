"""The ``guestmem`` entry point of guestmem-gunyah: registers the ``gunyah`` backend."""

from __future__ import annotations

from collections.abc import Callable

from guestmem.backend import Backend, hookimpl
from guestmem_gunyah.conformance import guestmem_conformance_options
from guestmem_gunyah.intents import GunyahIntents
from guestmem_gunyah.policy import GUNYAH_VM, GunyahPolicy

__all__ = ["POLICY", "guestmem_conformance_options", "guestmem_register_backends"]

#: The policy object of the ``gunyah`` backend.  It holds no state: each host's machine is
#: that host's ``host.arch``, each VM's driver state its ``vm.arch``.
POLICY = GunyahPolicy()
#: Its translation of the portable intents (scenarios, the pytest plugin).
INTENTS = GunyahIntents()


@hookimpl
def guestmem_register_backends(register: Callable[[Backend], None]) -> None:
    """Offer the ``gunyah`` backend: Qualcomm Gunyah VMs backed by guest_memfd."""
    register(
        Backend(
            name="gunyah",
            summary="Qualcomm Gunyah: resource manager, memparcels, demand-paged guest_memfd (lend/share)",
            vm_types=(GUNYAH_VM,),
            policy=POLICY,
            range_faults=True,
            intents=INTENTS,
        )
    )
