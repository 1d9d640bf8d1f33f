"""Entry point of the ``guestmem`` group: registers the ``linux`` backend.

Registration always succeeds.  Its VM types are read from ``KVM_CAP_VM_TYPES`` of the
running kernel (one open of ``/dev/kvm`` and two ioctls); where ``/dev/kvm`` cannot be
opened the backend registers with no VM types and a summary that says why, and
``guestmem.open("linux")`` raises :class:`guestmem.KvmError` with ``ENOENT`` (or the errno
of the failed open).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from guestmem import uapi
from guestmem.backend import Backend, VmTypeInfo, hookimpl
from guestmem.errors import KvmError
from guestmem_linux.intents import LinuxIntents
from guestmem_linux.kvm import DEV_KVM, LinuxKvm
from guestmem_linux.testing import is_kvm_pvm

#: x86 VM types with private memory (CAP-5).
_PRIVATE_MEM_TYPES = {uapi.KVM_X86_SW_PROTECTED_VM, uapi.KVM_X86_SNP_VM, uapi.KVM_X86_TDX_VM}
#: x86 VM types with protected state (no KVM_MEM_READONLY, S-4).
_PROTECTED_STATE_TYPES = {uapi.KVM_X86_SEV_ES_VM, uapi.KVM_X86_SNP_VM, uapi.KVM_X86_TDX_VM}


def vm_type_infos(kvm: LinuxKvm) -> tuple[VmTypeInfo, ...]:
    """One :class:`VmTypeInfo` per bit of ``KVM_CAP_VM_TYPES`` (DEFAULT if the cap is absent)."""
    bitmap = kvm.check_extension(uapi.KVM_CAP_VM_TYPES) or 1 << uapi.KVM_X86_DEFAULT_VM
    pre_fault = kvm.check_extension(uapi.KVM_CAP_PRE_FAULT_MEMORY) > 0
    attributes = kvm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) > 0
    # KVM_CAP_MULTI_ADDRESS_SPACE: 0 when KVM is built without SMM (one address space)
    address_spaces = max(1, kvm.check_extension(uapi.KVM_CAP_MULTI_ADDRESS_SPACE))
    infos = []
    for vm_type in range(bitmap.bit_length()):
        if not bitmap >> vm_type & 1:
            continue
        private = vm_type in _PRIVATE_MEM_TYPES
        infos.append(
            VmTypeInfo(
                type=vm_type,
                name=uapi.VM_TYPE_NAMES.get(vm_type, f"vm type {vm_type}"),
                has_private_mem=private,
                readonly_mem=vm_type not in _PROTECTED_STATE_TYPES,
                pre_fault_allowed=pre_fault and vm_type != uapi.KVM_X86_SNP_VM,
                nr_memslot_as_ids=1 if private else address_spaces,
                memory_attributes=attributes,
                conversion="destructive" if private else None,
            )
        )
    return tuple(infos)


def probe(path: str = DEV_KVM) -> tuple[tuple[VmTypeInfo, ...], str]:
    """The VM types of the kernel behind *path* and a one-line summary."""
    try:
        with LinuxKvm(path) as kvm:
            infos = vm_type_infos(kvm)
    except KvmError as exc:
        return (), f"the running kernel through {path}: unavailable ({os.strerror(exc.errno or 0)})"
    return infos, f"the running kernel through {path} ({os.uname().release})"


def open_linux(backend: Backend, *, path: str = DEV_KVM, **options: Any) -> LinuxKvm:
    """Opener of the ``linux`` backend: ``guestmem.open("linux", path=...)``."""
    if options:
        raise TypeError(f"backend {backend.name!r} takes only path=, not {', '.join(sorted(options))}")
    return LinuxKvm(path)


@hookimpl
def guestmem_register_backends(register: Callable[[Backend], None]) -> None:
    infos, summary = probe()
    vm_types: Any = infos  # attrs' tuple converter is not generic to mypy
    register(
        Backend(name="linux", summary=summary, vm_types=vm_types, opener=open_linux, intents=LinuxIntents())
    )


@hookimpl
def guestmem_conformance_options(backend: Backend, vm_type: VmTypeInfo) -> dict[str, Any] | None:
    """The conformance kit's settings for the running kernel: a gmem-only memslot's shared
    faults come from guest_memfd (6.18 ``kvm_mmu_faultin_pfn`` for
    ``kvm_memslot_is_gmem_only``), except on a PVM host, whose shadow paging walks
    ``userspace_addr`` (``kvm_pvm``, docs/profiles.md): the kit then maps guest_memfd there."""
    if backend.name != "linux":
        return None
    return {"gmem_only_from_gmem": not is_kvm_pvm()}
