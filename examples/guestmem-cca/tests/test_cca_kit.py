"""The guestmem conformance kit against both VM types of the ``cca`` backend.

The kit's flags say what the backend supports; they start from what the VM types declare
(``guestmem.conformance.declared_flags``).  Every deep test ends with the leak check, and
the core's invariant checker watches every event.
"""

from __future__ import annotations

from guestmem import uapi
from guestmem.conformance import GmemConformance
from guestmem_cca import DEFAULT_VM, CCA_VM


class TestCcaVm(GmemConformance):
    """The confidential VM type: the uAPI rules, conversion round trips, host access,
    memslot changes, release while bound, the leak check and the stateful machine."""

    backend = "cca"
    vm_type = CCA_VM.type
    private_access = True


class TestCcaDefaultVm(GmemConformance):
    """The default VM type: the same rules on plain guest_memfd memory."""

    backend = "cca"
    vm_type = DEFAULT_VM.type
    # arm64 accepts only gmem-only (MMAP) guest_memfd memslots (S-16).
    slot_gmem_flags = uapi.GUEST_MEMFD_FLAG_MMAP
