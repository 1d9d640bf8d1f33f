"""The ``guestmem_conformance_options`` of guestmem-tdx: the kit's settings for TDX hosts.

The kit launches and drives a TD through the backend's intents
(:class:`guestmem_tdx.intents.TdxIntents`), as scenarios and the VMM-testing pytest plugin
do: ``KVM_TDX_INIT_VM`` before any vCPU, ``KVM_TDX_INIT_VCPU``, the firmware page added
and measured (``KVM_TDX_INIT_MEM_REGION``), ``KVM_TDX_FINALIZE_VM``, the TD accepting its
RAM, MapGPA answered by QEMU's destructive conversion and an ACCEPT of what became
private (backends.md 1.3, 1.4).  The kit's TD accepts on fault: it is launched without
``SEPT_VE_DISABLE`` and answers the #VE of a page the host took away with ACCEPT.
"""

from __future__ import annotations

from typing import Any

from guestmem import uapi
from guestmem.backend import Backend, VmTypeInfo, hookimpl
from guestmem_tdx.invariants import TdxChecker


@hookimpl
def guestmem_conformance_options(backend: Backend, vm_type: VmTypeInfo) -> dict[str, Any] | None:
    """The kit's settings for the ``tdx`` backend: the TDX checker watches every VM, and a
    TD's private page whose S-EPT leaf a memslot change removed (TDH.MEM.PAGE.REMOVE, then
    the page cleared) comes back as a new page the TD accepts: zeroed
    (``private_unmap="destroy"``)."""
    if backend.name != "tdx":
        return None
    options: dict[str, Any] = {"observers": (TdxChecker,)}
    if vm_type.type == uapi.KVM_X86_TDX_VM:
        options["private_unmap"] = "destroy"
    return options
