"""The ``guestmem_conformance_options`` of guestmem-gunyah: the kit's settings for Gunyah.

The kit launches and drives a Gunyah VM through the backend's intents
(:class:`guestmem_gunyah.intents.GunyahIntents`), as scenarios and the VMM-testing pytest
plugin do: RAM a guest memory file bound with ``GUNYAH_MEM_FORCE_LEND``, the devicetree in
the firmware page, ``GUNYAH_VM_SET_DTB_CONFIG`` and ``GUNYAH_VM_START``, the guest touching
its RAM (demand paging lends every page).  A Gunyah guest converts nothing (the intents
say why), so the kit's conversion tests are not applicable; the conversion Gunyah has is
the host's: a host fault on a lent page takes it back with its bytes (launder).
"""

from __future__ import annotations

from typing import Any

from guestmem.backend import Backend, VmTypeInfo, hookimpl
from guestmem_gunyah.face import gunyah
from guestmem_gunyah.invariants import GunyahChecker

#: The Gunyah VM manager's ioctls and the driver's parcels for ``guestmem fuzz --hostile``,
#: with their arguments' kinds (``guestmem.conformance.hostile``).
HOSTILE_OPS: dict[str, tuple[Any, ...]] = {
    "set_dtb_config": (
        "vm",
        lambda vm, guest_phys_addr, size: gunyah(vm).set_dtb_config(guest_phys_addr, size),
        ("gpa", "size"),
    ),
    "start": ("vm", lambda vm: gunyah(vm).start(), ()),
    "set_boot_context": (
        "vm",
        lambda vm, reg, value: gunyah(vm).set_boot_context(reg, value),
        ("u32", "u64"),
    ),
    "map_mem": (
        "vm",
        lambda vm, guest_mem, guest_addr, offset, size, flags: gunyah(vm).map_mem(
            guest_mem, guest_addr, offset, size, flags
        ),
        ("gmem", "gpa", "offset", "size", "u32"),
    ),
    "share_parcel": (
        "vm",
        lambda vm, guest_addr, size: gunyah(vm).share_parcel(guest_addr, size),
        ("gpa", "size"),
        True,  # gunyah_gmem_get_folio grabs the folios into the file; a refusal keeps them
    ),
    "reclaim_parcel": (
        "vm",
        lambda vm, parcel, flags: gunyah(vm).reclaim_parcel(parcel, flags),
        ("u32", "u32"),
    ),
    "touch": ("vm", lambda vm, guest_addr, size: gunyah(vm).touch(guest_addr, size), ("gpa", "size")),
}


@hookimpl
def guestmem_conformance_options(backend: Backend, vm_type: VmTypeInfo) -> dict[str, Any] | None:
    """The kit's settings for the ``gunyah`` backend: the Gunyah checker watches every VM,
    and a host access to a lent page reclaims it, contents and all, rather than failing
    (``gunyah_gmem_host_fault`` -> ``gunyah_gmem_launder_folio``: ``host_private_access =
    "reclaim"``)."""
    if backend.name != "gunyah":
        return None
    return {"observers": (GunyahChecker,), "host_private_access": "reclaim", "hostile_ops": HOSTILE_OPS}
