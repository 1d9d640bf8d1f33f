"""The ``guestmem_conformance_options`` of guestmem-pkvm: the kit's settings for pKVM.

The kit launches and drives a protected VM through the backend's intents
(:class:`guestmem_pkvm.intents.PkvmIntents`), as scenarios and the VMM-testing pytest
plugin do: RAM an ``MMAP | INIT_SHARED`` guest_memfd in a gmem-only memslot, which the
guest takes page by page (donation at its first touch), and conversions in place with
MEM_SHARE / MEM_UNSHARE (backends.md 3.3).  What is left to say here is what the
architecture does that the declarations cannot say.
"""

from __future__ import annotations

import errno
from typing import Any

from guestmem.backend import Backend, VmTypeInfo, hookimpl
from guestmem_pkvm import abi
from guestmem_pkvm.invariants import IsolationChecker
from guestmem_pkvm.policy import enable_exit_hypercall, set_pvmfw

#: The pKVM arch face for ``guestmem fuzz --hostile`` (guest hypercalls are the uAPI
#: face's ``Vcpu.hypercall``), with their arguments' kinds (``guestmem.conformance.hostile``).
HOSTILE_OPS: dict[str, tuple[Any, ...]] = {
    "set_pvmfw": ("vm", set_pvmfw, ("gpa", "data")),
    "enable_exit_hypercall": ("vm", enable_exit_hypercall, ("u64",)),
}


@hookimpl
def guestmem_conformance_options(backend: Backend, vm_type: VmTypeInfo) -> dict[str, Any] | None:
    """The kit's settings for the ``pkvm`` backend: the isolation checker watches every VM;
    a protected VM keeps INIT_SHARED memory private until the guest shares it (no M-7
    coherence without a conversion), and loses a private page the VMM punches (the host
    reclaims it from the running guest: zeroed, or poisoned for the guest, pKVM-3.2);
    once it ran, its memslots may be neither deleted nor moved (Android's
    ``kvm_arch_prepare_memory_region``: EPERM, pKVM-3.6), the guest keeping its pages."""
    if backend.name != "pkvm":
        return None
    options: dict[str, Any] = {"observers": (IsolationChecker,)}
    if vm_type.type & abi.KVM_VM_TYPE_ARM_PROTECTED:
        options.update(
            init_shared_coherent=False,
            private_unmap="revoke",
            memslot_change_errno=errno.EPERM,
            hostile_ops=HOSTILE_OPS,
        )
    return options
