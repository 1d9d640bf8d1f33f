"""The kit for an installed backend, by name: capability flags from its declarations.

:func:`kit_for` builds the configured :class:`~guestmem.conformance.kit.GmemConformance`
subclass for one VM type of a backend, :func:`kits_for` one per VM type it offers; the
kit's pytest plugin (and ``pytest --guestmem-backend``) collect them without anyone writing
a subclass.  What the declarations cannot say comes from the plugin that registered the
backend, through ``guestmem_conformance_options`` (see :mod:`guestmem.hookspecs`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import guestmem
from guestmem import uapi
from guestmem.backend import X86_SW_PROTECTED_VM, Backend, VmTypeInfo
from guestmem.conformance.kit import GmemConformance
from guestmem.errors import PluginError

#: Capability flags a backend's ``guestmem_conformance_options`` may set.
FLAGS = frozenset(
    {
        "guest_access",
        "private_access",
        "gmem_only_from_gmem",
        "init_shared_coherent",
        "slot_gmem_flags",
        "private_unmap",
        "memslot_change_errno",
        "host_private_access",
        "open_options",
        "machine_examples",
        "machine_steps",
        "machine_shrink",
        "hostile_steps",
    }
)
#: The other keys: the backend's observers, a reason to skip the VM type, the backend's
#: arch face and modelled verdicts for hostile calls (:mod:`guestmem.conformance.hostile`),
#: what the backend still holds once all is closed.
EXTRA = frozenset({"observers", "skip", "hostile_ops", "hostile_outcomes", "leaks"})


def declared_flags(info: VmTypeInfo) -> dict[str, Any]:
    """The kit's capability flags as *info* declares them.

    A VM type with private memory makes private accesses (``private_access``); arm64's
    gmem-only memslots need ``GUEST_MEMFD_FLAG_MMAP`` files (S-16); a type that converts in
    place keeps its INIT_SHARED memory private until the guest shares it, so host and
    guest are not coherent without a conversion (pKVM; ``init_shared_coherent``).
    """
    return {
        "vm_type": info.type,
        "private_access": info.private,
        "slot_gmem_flags": uapi.GUEST_MEMFD_FLAG_MMAP if info.gmem_slot_requires_mmap else 0,
        "init_shared_coherent": info.conversion != "in_place",
    }


def options_for(backend: Backend, info: VmTypeInfo) -> dict[str, Any]:
    """What the backend's plugin says about the kit for *info*, checked."""
    options = guestmem.get_registry().conformance_options(backend, info)
    unknown = set(options) - FLAGS - EXTRA
    if unknown:
        raise PluginError(
            f"guestmem_conformance_options of distribution {backend.distribution!r} returned unknown "
            f"key(s) {sorted(unknown)}; known: {sorted(FLAGS | EXTRA)}"
        )
    return options


def _class_name(backend: str, info: VmTypeInfo) -> str:
    safe = "".join(c if c.isalnum() else "_" for c in f"{backend}_{info.name}")
    return f"TestKit_{safe}"


def kit_for(
    backend: str, vm_type: int | None = None, *, base: type[GmemConformance] = GmemConformance
) -> type[GmemConformance]:
    """The conformance kit for *vm_type* of the installed *backend*, ready for pytest.

    *vm_type* defaults to the backend's first private VM type of its own (the one its
    users care about: not the core's ``KVM_X86_SW_PROTECTED_VM``, which an x86 host offers
    next to its own types), else its first private VM type, else its default VM type.
    The class's flags come from :func:`declared_flags`, then from the backend's
    ``guestmem_conformance_options`` (which may also name its ``observers``, or ``skip``
    the type).  The kit drives the VMs through the backend's intents.  ``LookupError`` for an
    unknown backend or VM type, :class:`guestmem.PluginError` for bad options.
    """
    info_backend = guestmem.get_registry().backend(backend)
    if vm_type is None:
        private = info_backend.private_vm_types
        own = [t for t in private if t != X86_SW_PROTECTED_VM]
        info = (own or private or [info_backend.default_vm_type])[0]
    else:
        found = info_backend.vm_type(vm_type)
        if found is None:
            names = ", ".join(f"{t.type} ({t.name})" for t in info_backend.vm_types)
            raise LookupError(f"backend {backend!r} offers no VM type {vm_type} (it offers {names})")
        info = found
    options = options_for(info_backend, info)
    attrs: dict[str, Any] = {"backend": backend, **declared_flags(info)}
    attrs.update({k: v for k, v in options.items() if k in FLAGS})
    if "observers" in options:
        factories: tuple[Callable[[], object], ...] = tuple(options["observers"])
        attrs["observers"] = factories
    if "hostile_ops" in options:
        attrs["hostile_ops"] = dict(options["hostile_ops"])
    if "leaks" in options:
        attrs["leaks"] = options["leaks"]
    if "hostile_outcomes" in options:
        attrs["hostile_outcomes"] = tuple(options["hostile_outcomes"])
    if options.get("skip"):
        attrs["pytestmark"] = [pytest.mark.skip(reason=f"{backend} {info.name}: {options['skip']}")]
    attrs["__doc__"] = f"The conformance kit against {info.name} of backend {backend!r}."
    attrs["__module__"] = __name__
    return type(_class_name(backend, info), (base,), attrs)


def kits_for(backend: str, *, base: type[GmemConformance] = GmemConformance) -> list[type[GmemConformance]]:
    """One configured kit class per VM type *backend* offers (see :func:`kit_for`)."""
    info_backend = guestmem.get_registry().backend(backend)
    return [kit_for(backend, info.type, base=base) for info in info_backend.vm_types]
