"""guestmem: an executable model of Linux KVM guest private memory (guest_memfd).

Quick use::

    import guestmem
    from guestmem import uapi

    with guestmem.open("sw") as kvm, kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM) as vm:
        gmem = vm.create_guest_memfd(1 << 20)
        ...

``guestmem.open(backend)`` returns a :class:`guestmem.api.Kvm`; every backend, the built-in
``sw`` model, a hardware model plugin or the real kernel (``linux``), has the same face.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from guestmem import uapi

if TYPE_CHECKING:
    from guestmem.api import GuestMemfd, HostMapping, Kvm, Vcpu, Vm
    from guestmem.backend import Backend, VmTypeInfo, hookimpl
    from guestmem.errors import (
        BackendError,
        FailEntryExit,
        GuestExit,
        HostCrash,
        HostSigbus,
        HostSigsegv,
        HypercallExit,
        InternalErrorExit,
        KvmError,
        MemoryFault,
        MmioExit,
        ObserverError,
        PluginError,
    )
    from guestmem.registry import get_registry

# Imported on first use (PEP 562), so that ``import guestmem`` stays cheap: the plugin
# registry (pluggy, importlib.metadata) and attrs load when something needs them.
_LAZY = {
    "GuestMemfd": "guestmem.api",
    "HostMapping": "guestmem.api",
    "Kvm": "guestmem.api",
    "Vcpu": "guestmem.api",
    "Vm": "guestmem.api",
    "Backend": "guestmem.backend",
    "VmTypeInfo": "guestmem.backend",
    "hookimpl": "guestmem.backend",
    "BackendError": "guestmem.errors",
    "FailEntryExit": "guestmem.errors",
    "GuestExit": "guestmem.errors",
    "HostCrash": "guestmem.errors",
    "HostSigbus": "guestmem.errors",
    "HostSigsegv": "guestmem.errors",
    "HypercallExit": "guestmem.errors",
    "InternalErrorExit": "guestmem.errors",
    "KvmError": "guestmem.errors",
    "MemoryFault": "guestmem.errors",
    "MmioExit": "guestmem.errors",
    "ObserverError": "guestmem.errors",
    "PluginError": "guestmem.errors",
    "get_registry": "guestmem.registry",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'guestmem' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Backend",
    "BackendError",
    "FailEntryExit",
    "GuestExit",
    "GuestMemfd",
    "HostCrash",
    "HostMapping",
    "HostSigbus",
    "HostSigsegv",
    "HypercallExit",
    "InternalErrorExit",
    "Kvm",
    "KvmError",
    "MemoryFault",
    "MmioExit",
    "ObserverError",
    "PluginError",
    "Vcpu",
    "Vm",
    "VmTypeInfo",
    "backends",
    "get_registry",
    "hookimpl",
    "open",
    "uapi",
]


def open(backend: str = "sw", **options: Any) -> Kvm:  # noqa: A001 - mirrors open("/dev/kvm")
    """Open ``/dev/kvm`` of *backend* (``"sw"`` by default).

    *options* go to the backend: the model backends accept ``profile=`` (a
    :class:`guestmem.model.profile.KernelProfile` or its name).  ``record=True`` keeps every
    event in ``kvm.events``: on the model all of them, on a backend of its own (the real
    kernel) one ``uapi`` event per call (:mod:`guestmem.recording`).
    """
    from guestmem.registry import get_registry

    registry = get_registry()
    info = registry.backend(backend)
    if info.opener is not None:
        record = bool(options.pop("record", False))
        kvm = info.opener(info, **options)
        if record:  # the uAPI calls, recorded as the model records them
            from guestmem.recording import record as recording

            return recording(kvm)
        return kvm
    from guestmem.model.kvm import ModelKvm

    return ModelKvm(info, registry, **options)


def backends() -> dict[str, Backend]:
    """Every installed backend by name."""
    from guestmem.registry import get_registry

    return dict(get_registry().backends())
