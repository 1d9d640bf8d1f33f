"""The built-in ``sw`` backend: x86 KVM_X86_DEFAULT_VM and KVM_X86_SW_PROTECTED_VM.

SW_PROTECTED is upstream's hardware-free private-memory VM: attributes are the only
source of privateness (G-1), there is no ownership table and nothing to prepare, and
private pages are simply not host-mappable (the core rule M-4).  Its policy therefore
implements no hook at all: what it does is the core's generic x86 KVM, the reference
every hardware backend is compared to.  The core declares it through its own entry
point, like any other backend.
"""

from __future__ import annotations

from collections.abc import Callable

from guestmem.backend import X86_DEFAULT_VM, X86_SW_PROTECTED_VM, Backend, X86Intents, hookimpl

DEFAULT_VM = X86_DEFAULT_VM
SW_PROTECTED_VM = X86_SW_PROTECTED_VM


class SwPolicy:
    """The arch policy of ``sw``: upstream x86 needs no hook beyond the core's own code."""


POLICY = SwPolicy()


#: The core's x86 intents (KVM_HC_MAP_GPA_RANGE conversions, no launch, no acceptance).
INTENTS = X86Intents()


@hookimpl
def guestmem_register_backends(register: Callable[[Backend], None]) -> None:
    """Register ``sw``."""
    register(
        Backend(
            name="sw",
            summary="Linux 6.18 x86 KVM without hardware: DEFAULT and SW_PROTECTED VMs",
            vm_types=(DEFAULT_VM, SW_PROTECTED_VM),
            policy=POLICY,
            range_faults=True,
            intents=INTENTS,
        )
    )
