"""The core's conformance kit against the tdx host's VM types."""

from __future__ import annotations

import guestmem
import guestmem_tdx
from guestmem import uapi
from guestmem.conformance import RAM_PAGES, GmemConformance, KitGuest, kit_for
from guestmem.conformance.vmm import FIRMWARE_GPA, FIRMWARE_IMAGE
from guestmem_tdx import TDX_VM, MeasuredRegion, TdState, expected_mrtd

PAGE = uapi.PAGE_SIZE


class TestTdxDefaultVm(GmemConformance):
    """A normal VM on a TDX host: exactly the sw backend's 6.18 rules."""

    backend = "tdx"
    vm_type = uapi.KVM_X86_DEFAULT_VM


class TestTdxSwProtectedVm(GmemConformance):
    backend = "tdx"
    vm_type = uapi.KVM_X86_SW_PROTECTED_VM
    private_access = True


class TestTdxVm(kit_for("tdx", uapi.KVM_X86_TDX_VM)):  # type: ignore[misc]
    """A TD, launched and driven through the backend's intents (INIT_VM, INIT_VCPU,
    INIT_MEM_REGION, FINALIZE, ACCEPT, MapGPA): the uAPI rules on a TD after
    KVM_TDX_INIT_VM (the intents' ``vm_init``, which the kit's ``vm`` runs), and the deep
    kit."""


def test_the_kit_launches_its_td_through_the_intents() -> None:
    """The kit's TD is launched and driven by ``TdxIntents``: runnable with the firmware
    page measured (MRTD), its RAM accepted; a conversion is MapGPA leaving to the VMM (one
    exit each), a conversion to private is accepted; the kit's TD has no
    ``SEPT_VE_DISABLE``, so a page the VMM punched is accepted again at its #VE and reads
    zero."""
    with guestmem.open("tdx") as kvm:
        g = KitGuest(kvm, TDX_VM)
        tdx = guestmem_tdx.tdx(g.vm)
        assert tdx.td_state is TdState.RUNNABLE
        assert tdx.mrtd == expected_mrtd([MeasuredRegion(FIRMWARE_GPA, FIRMWARE_IMAGE)])
        counters = g.vm.counters
        assert counters["tdx.accepted_pages"] == RAM_PAGES
        assert counters.get("userspace_exits", 0) == 0
        g.write(3, b"secret")
        g.convert(3, private=False)
        assert counters["userspace_exits"] == 1 and g.read(3, 6, private=False) == bytes(6)
        g.convert(3, private=True)
        assert counters["userspace_exits"] == 2 and counters["tdx.accepted_pages"] == RAM_PAGES + 1
        g.write(5, b"secret")
        g.ram.discard_private(5, 1)
        assert g.read(5, 6) == bytes(6) and counters["tdx.accepted_pages"] == RAM_PAGES + 2
        g.close()
