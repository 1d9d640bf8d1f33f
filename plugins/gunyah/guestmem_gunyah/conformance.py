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
from guestmem_gunyah.invariants import GunyahChecker


@hookimpl
def guestmem_conformance_options(backend: Backend, vm_type: VmTypeInfo) -> dict[str, Any] | None:
    """The kit's settings for the ``gunyah`` backend: the Gunyah checker watches every VM,
    and a host access to a lent page reclaims it, contents and all, rather than failing
    (``gunyah_gmem_host_fault`` -> ``gunyah_gmem_launder_folio``: ``host_private_access =
    "reclaim"``)."""
    if backend.name != "gunyah":
        return None
    return {"observers": (GunyahChecker,), "host_private_access": "reclaim"}
