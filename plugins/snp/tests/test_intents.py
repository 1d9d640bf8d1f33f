"""The portable intents on SEV-SNP: the real launch, PSC + PVALIDATE, destructive conversion."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import guestmem
import guestmem_snp
from guestmem import uapi
from guestmem.backend import NotApplicable, view
from guestmem.guestvm import GuestVm
from guestmem_snp.guest import UnvalidatedAccess

MiB = 1 << 20
PAGE = uapi.PAGE_SIZE


@pytest.fixture
def guest() -> Iterator[GuestVm]:
    with guestmem.open("snp") as kvm, GuestVm.launch(kvm, size=16 * MiB) as g:
        yield g


def test_launch_is_init2_then_launch_start(guest: GuestVm) -> None:
    sev = guestmem_snp.sev(guest.vm)
    assert guest.vm_type.type == uapi.KVM_X86_SNP_VM
    assert sev.asid and sev.gctx_pfn is not None  # INIT2 before the vCPU, then LAUNCH_START
    assert guest.notes == [f"SNP launch started (ASID {sev.asid})"]
    assert not view(guest.vm).pre_fault_allowed
    assert guest.capabilities >= {"conversion", "acceptance", "populate", "launch_measurement"}


def test_populate_measures_in_place_and_finish_gives_the_digest(guest: GuestVm) -> None:
    sev = guestmem_snp.sev(guest.vm)
    assert guest.populate(0, b"kernel") == "LAUNCH_UPDATE of 1 page(s), measured"
    pfn = view(guest.vm).gmem_pfn(0)
    assert pfn is not None and sev.rmp_entry(pfn).validated  # Pre-Guest -> Guest-Valid
    measured = sev.launch_digest
    assert guest.populate(PAGE, b"initrd", measure=False).endswith("unmeasured")
    assert guest.finish_launch().startswith("launch digest ")
    assert measured != bytes(48) and view(guest.vm).pre_fault_allowed
    assert guest.read(0, 6) == b"kernel"  # LAUNCH_UPDATE validated it
    with pytest.raises(NotApplicable, match="pre-boot"):
        guest.populate(2 * PAGE, b"late")


def test_the_digest_follows_the_content(guest: GuestVm) -> None:
    with guestmem.open("snp") as kvm, GuestVm.launch(kvm, size=MiB) as other:
        guest.populate(0, b"one")
        other.populate(0, b"two")
        assert guestmem_snp.sev(guest.vm).launch_digest != guestmem_snp.sev(other.vm).launch_digest


def test_unaccepted_memory_is_a_vc_in_the_guest(guest: GuestVm) -> None:
    with pytest.raises(UnvalidatedAccess):
        guest.read(2 * MiB, 1)
    assert guest.accept(2 * MiB, 2 * MiB) == "8 PSC request(s), 512 page(s) validated"  # 64 entries each
    assert guest.read(2 * MiB, 1) == b"\x00"


def test_a_page_the_host_punched_comes_back_unvalidated() -> None:
    """After the VMM punches a validated private page, the guest's next private access
    takes #VC: a Linux guest stops there; a guest that accepts on fault (the conformance
    kit's) validates it again and reads zeroes.  Converting the page to shared then
    rescinds only what is validated (a punched page untouched since answers PVALIDATE with
    FAIL_NOUPDATE, which is not an error)."""
    punch = uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE
    for accept_on_fault in (False, True):
        with guestmem.open("snp") as kvm, GuestVm.launch(kvm, size=MiB, accept_on_fault=accept_on_fault) as g:
            g.accept(0, 8 * PAGE)
            g.write(3 * PAGE, b"secret")
            region = g.regions[0]
            assert region.gmem is not None
            region.gmem.fallocate(punch, 2 * PAGE, 2 * PAGE)
            if not accept_on_fault:
                with pytest.raises(UnvalidatedAccess):
                    g.read(3 * PAGE, 6)
                continue
            validated = g.counters()["pvalidate"]
            assert g.read(3 * PAGE, 6) == bytes(6)
            assert g.counters()["pvalidate"] == validated + 1
            assert g.convert(2 * PAGE, 2 * PAGE, private=False).endswith("2 rescinded")
            assert g.read(2 * PAGE, 4, private=False) == bytes(4)


def test_accept_coalesced_vs_msr_protocol(guest: GuestVm) -> None:
    guest.accept(0, 64 * PAGE, entries=32)  # two GHCB requests, one coalesced exit each
    assert guest.counters()["psc_exits"] == 2
    guest.accept(64 * PAGE, 8 * PAGE, coalesce=False)  # one MSR request (and exit) per page
    assert guest.counters()["psc_exits"] == 10
    assert guest.counters()["pvalidate"] == 72


def test_conversion_is_destructive_and_reclaims_the_rmp(guest: GuestVm) -> None:
    guest.accept(0, 2 * MiB)
    guest.write(0x3000, b"secret")
    pfn = view(guest.vm).gmem_pfn(3)
    sev = guestmem_snp.sev(guest.vm)
    assert pfn is not None and sev.rmp_entry(pfn).assigned
    note = guest.convert(0x3000, PAGE, private=False)
    assert note == "1 PSC request(s), 1 rescinded"
    assert not sev.rmp_entry(pfn).assigned  # QEMU punched the page: sev_gmem_invalidate
    guest.write(0x3000, b"bounce")  # shared now: the guest's C-bit follows
    assert guest.regions[0].shared is not None and guest.regions[0].shared.read(0x3000, 6) == b"bounce"
    guest.convert(0x3000, PAGE, private=True)
    assert guest.read(0x3000, 6) == bytes(6)


def test_costs_count_rmpupdates_and_pvalidates(guest: GuestVm) -> None:
    guest.accept(0, MiB)
    costs, counters = guest.costs(), guest.counters()
    assert costs["hw_table_updates"] == counters["rmpupdate"] + counters.get("psmash", 0) > 0
    assert costs["guest_instructions"] == counters["pvalidate"] == 256
    assert costs["firmware_commands"] == counters["psp_commands"]


def test_hugepage_gmem_accepts_in_2m_pages() -> None:
    with guestmem.open("snp-hugepage") as kvm, GuestVm.launch(kvm, size=8 * MiB) as guest:
        guest.finish_launch()
        before = guest.counters()["rmpupdate"]
        assert guest.accept(0, 8 * MiB, page_size=2 * MiB) == "1 PSC request(s), 2048 page(s) validated"
        assert guest.counters()["pvalidate"] == 4  # one 2 MiB PVALIDATE per 2 MiB RMP entry
        assert guest.counters()["rmpupdate"] - before == 4


def test_cost_details_name_the_architectures_operations(guest: GuestVm) -> None:
    guest.accept(0, 4 * PAGE)
    details = guest.intents.cost_details(guest.counters())
    assert set(details) == {"RMPUPDATE", "PSMASH", "PVALIDATE", "PSP commands"}
    assert details["PVALIDATE"] == 4 and details["RMPUPDATE"] >= 4
