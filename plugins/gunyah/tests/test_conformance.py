"""The core's conformance kit against the Gunyah VM type, driven by the backend's kit
driver (``guestmem_gunyah.conformance.GunyahKitVmm``: the VM started with its devicetree
lent, RAM a lent binding the guest touches, conversions that rebind pages lent or
shared).  An arm64 VM type: only gmem-only (MMAP) guest_memfd memslots (S-16); its
conversions keep contents (``in_place``), so lent INIT_SHARED memory is not coherent
with the host without one (``init_shared_coherent``)."""

from __future__ import annotations

import pytest

import guestmem
from guestmem import HostSigbus, uapi
from guestmem.conformance import RAM_PAGES, KitGuest, kit_for
from guestmem_gunyah import abi, gunyah
from guestmem_gunyah.conformance import GunyahKitVmm
from guestmem_gunyah.policy import GUNYAH_VM


class TestGunyahVm(kit_for("gunyah", abi.GUNYAH_VM_TYPE)):  # type: ignore[misc]
    """Flags from ``GUNYAH_VM`` and the plugin's ``guestmem_conformance_options``."""


def test_the_kit_driver_starts_the_vm_and_converts_by_rebinding() -> None:
    """``GunyahKitVmm``: the VM runs with its devicetree lent and all RAM lent; converting
    pages in the middle of the lent binding splits it around a shared binding, and back to
    a lent one; the bytes move with the page both ways, and the host reaches the page only
    while it is shared."""
    with guestmem.open("gunyah") as kvm:
        g = KitGuest(kvm, GUNYAH_VM, GunyahKitVmm)
        face = gunyah(g.vm)
        assert face.status == abi.VmStatus.RUNNING

        def bindings() -> list[tuple[int, int, bool]]:
            base = g.ram.gpa >> uapi.PAGE_SHIFT
            return [(b.gfn - base, b.nr, b.lend) for b in face.bindings]

        assert bindings() == [(0, RAM_PAGES, True)]
        g.write(5, b"secret")
        with pytest.raises(HostSigbus):
            g.ram.host_read(5, 6)
        g.convert(4, 3, private=False)
        assert bindings() == [(0, 4, True), (4, 3, False), (7, RAM_PAGES - 7, True)]
        assert g.ram.host_read(5, 6) == b"secret" == g.read(5, 6, private=False)
        g.ram.host_write(5, b"host!!")
        g.convert(5, private=True)
        assert bindings() == [
            (0, 4, True),
            (4, 1, False),
            (5, 1, True),
            (6, 1, False),
            (7, RAM_PAGES - 7, True),
        ]
        assert g.read(5, 6) == b"host!!"
        with pytest.raises(HostSigbus):
            g.ram.host_read(5, 6)
        g.close()
