"""The ``guestmem`` entry point of guestmem-pkvm: registers the ``pkvm`` backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from guestmem.hookspecs import hookimpl
from guestmem.registry import Backend
from guestmem_pkvm.policy import DEFAULT_VM, PROTECTED_VM, PkvmPolicy

#: The policy object of the ``pkvm`` backend (one per process, like the kernel's hypervisor).
POLICY = PkvmPolicy()


@hookimpl
def guestmem_register_backends(register: Callable[[Backend], None]) -> None:
    """Offer the ``pkvm`` backend: protected and normal arm64 VMs under pKVM."""
    register(
        Backend(
            name="pkvm",
            summary="arm64 protected KVM (nVHE pKVM) with guest_memfd and restricted host mapping",
            # cast: mypy cannot solve Backend's ``converter=tuple`` (reported to the core).
            vm_types=cast(Any, (PROTECTED_VM, DEFAULT_VM)),
            policy=POLICY,
        )
    )
