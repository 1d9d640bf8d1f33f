"""Entry point of the ``guestmem-tdx`` distribution (group ``guestmem``, name ``tdx``).

Registers ``tdx``: an x86 host running Linux 6.18 with the TDX module loaded.  Its
``/dev/kvm`` offers ``KVM_X86_DEFAULT_VM`` and ``KVM_X86_SW_PROTECTED_VM`` (the core's
x86 code, unchanged) and ``KVM_X86_TDX_VM``.
"""

from __future__ import annotations

from collections.abc import Callable

from guestmem import Backend, VmTypeInfo, hookimpl, uapi
from guestmem.backend import X86_DEFAULT_VM, X86_SW_PROTECTED_VM
from guestmem_tdx.conformance import guestmem_conformance_options
from guestmem_tdx.intents import TdxIntents
from guestmem_tdx.policy import TdxPolicy

__all__ = ["BACKEND", "POLICY", "TDX_VM", "guestmem_conformance_options", "guestmem_register_backends"]

#: ``KVM_X86_TDX_VM`` (``tdx_vm_init``): private memory (CAP-5, so no INIT_SHARED gmem,
#: CAP-3), protected state (no read-only memslots, S-4), one memslot address space,
#: pre-faulting only after ``KVM_TDX_FINALIZE_VM`` (PF-2), private leaves in a mirror root;
#: conversions are destructive (MapGPA, then the VMM discards the old side: backends.md 1.3).
TDX_VM = VmTypeInfo(
    type=uapi.KVM_X86_TDX_VM,
    name="KVM_X86_TDX_VM",
    has_private_mem=True,
    readonly_mem=False,
    pre_fault_allowed=False,
    nr_memslot_as_ids=1,
    gmem_folio_order=0,
    has_mirrored_tdp=True,
    conversion="destructive",
)

POLICY = TdxPolicy()
#: Its translation of the portable intents (scenarios, the pytest plugin).
INTENTS = TdxIntents()

BACKEND = Backend(
    name="tdx",
    summary="Intel TDX host (Linux 6.18): TDX module, S-EPT and PAMT, KeyIDs, launch, ACCEPT, MapGPA",
    vm_types=(X86_DEFAULT_VM, X86_SW_PROTECTED_VM, TDX_VM),
    policy=POLICY,
    range_faults=True,
    intents=INTENTS,
)


@hookimpl
def guestmem_register_backends(register: Callable[[Backend], None]) -> None:
    """Register ``tdx``."""
    register(BACKEND)
