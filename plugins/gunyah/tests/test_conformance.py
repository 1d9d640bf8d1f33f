"""The core's conformance kit against the Gunyah VM type, which it launches and drives
through the backend's intents (``GunyahIntents``: RAM lent, the devicetree lent at
``GUNYAH_VM_START``, the guest touching its RAM).  An arm64 VM type: only gmem-only (MMAP)
guest_memfd memslots (S-16).  A Gunyah guest converts nothing, so the conversion tests are
not applicable, with the intents' reason; the host takes a lent page back when it touches
it (launder: ``host_private_access = "reclaim"``)."""

from __future__ import annotations

import pytest

import guestmem
from guestmem import uapi
from guestmem.backend import NotApplicable
from guestmem.conformance import RAM_PAGES, KitGuest, kit_for
from guestmem.conformance.vmm import FIRMWARE_GPA
from guestmem_gunyah import abi, gunyah
from guestmem_gunyah.intents import FDT_MAGIC
from guestmem_gunyah.policy import GUNYAH_VM


class TestGunyahVm(kit_for("gunyah", abi.GUNYAH_VM_TYPE)):  # type: ignore[misc]
    """Flags from ``GUNYAH_VM`` and the plugin's ``guestmem_conformance_options``."""


def test_the_kit_starts_its_vm_through_the_intents() -> None:
    """The kit's VM runs with its devicetree (in the firmware page, lent at the start) and
    all RAM lent and demand-paged in; ``guest.convert`` is not applicable with the intents' reason; a host
    read of a lent page launders it back with its bytes, and the guest's next touch lends
    it again, bytes kept."""
    with guestmem.open("gunyah") as kvm:
        g = KitGuest(kvm, GUNYAH_VM)
        face = gunyah(g.vm)
        assert face.status == abi.VmStatus.RUNNING
        base = g.ram.gpa >> uapi.PAGE_SHIFT
        ram = [(b.gfn - base, b.nr, b.lend) for b in face.bindings if b.gfn >= base]
        assert ram == [(0, RAM_PAGES, True)]
        counters = g.vm.counters
        assert counters["gunyah.demand_paged_pages"] == RAM_PAGES
        assert g.vmm.read(FIRMWARE_GPA, len(FDT_MAGIC), private=True) == FDT_MAGIC  # its devicetree
        reason = g.vmm.conversion_not_applicable()
        assert reason is not None and "converts nothing" in reason
        with pytest.raises(NotApplicable, match="converts nothing"):
            g.convert(4, private=False)
        g.write(5, b"secret")
        assert g.ram.host_read(5, 6) == b"secret"  # launder: reclaimed from the guest
        assert counters["gunyah.host_fault_launders"] == 1
        g.write(5, b"again!")  # lent again at the guest's touch
        assert counters["gunyah.demand_paged_pages"] == RAM_PAGES + 1
        assert g.read(5, 6) == b"again!"
        g.close()
