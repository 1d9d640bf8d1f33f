"""The core's conformance kit against the Gunyah VM type (the uAPI face).

An arm64 VM type: only gmem-only (MMAP) guest_memfd memslots (S-16).  Every memslot is a
binding with the default policy (lend), so the guest's pages leave the host when the guest
touches them: the kit's plain host/guest coherence test (M-7) does not apply
(``init_shared_coherent``); ``test_e2e`` covers coherence through a shared binding.
"""

from __future__ import annotations

from guestmem import uapi
from guestmem.conformance import GmemConformance
from guestmem_gunyah import abi


class TestGunyahVm(GmemConformance):
    backend = "gunyah"
    vm_type = abi.GUNYAH_VM_TYPE
    slot_gmem_flags = uapi.GUEST_MEMFD_FLAG_MMAP
    init_shared_coherent = False
