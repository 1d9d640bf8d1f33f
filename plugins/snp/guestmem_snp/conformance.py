"""The ``guestmem_conformance_options`` of guestmem-snp: the kit's settings for SNP hosts.

The kit launches and drives an SNP VM through the backend's intents
(:class:`guestmem_snp.intents.SnpIntents`), as scenarios and the VMM-testing pytest plugin
do: ``KVM_SEV_INIT2``, the launch, the guest validating its RAM (page-state change and
PVALIDATE) and validating again a page the host took away (its #VC), conversions through
GHCB page-state changes answered by QEMU's destructive ``kvm_convert_memory``
(backends.md 2.3).  What is left to say here is the RMP checker.
"""

from __future__ import annotations

from typing import Any

from guestmem.backend import Backend, VmTypeInfo, hookimpl
from guestmem_snp.invariants import RmpChecker


@hookimpl
def guestmem_conformance_options(backend: Backend, vm_type: VmTypeInfo) -> dict[str, Any] | None:
    """The kit's settings for the ``snp`` backends: the RMP checker watches every VM."""
    if not backend.name.startswith("snp"):
        return None
    return {"observers": (RmpChecker,)}
