"""The portable intents on Gunyah: lent or shared RAM bindings, the VM started with its
devicetree, host population, demand paging, and no guest conversion or acceptance."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest

import guestmem
from guestmem import uapi
from guestmem.backend import NotApplicable, view
from guestmem.guestvm import GuestVm
from guestmem_gunyah import PageFaultExit, abi, gunyah
from guestmem_gunyah.hyp import ExtentKind
from guestmem_gunyah.intents import FDT_MAGIC

from .conftest import machine

MiB = 1 << 20
PAGE = uapi.PAGE_SIZE


@pytest.fixture
def guest(checkers: Any) -> Iterator[GuestVm]:
    with guestmem.open("gunyah") as kvm, GuestVm.launch(kvm, size=4 * MiB) as g:
        yield g


def test_a_private_vm_lends_its_ram(guest: GuestVm) -> None:
    """Guest memory files bound with GUNYAH_MEM_FORCE_LEND, reached by the host through its
    own mapping of them; the VM has no state until the launch ends."""
    face = gunyah(guest.vm)
    (binding,) = face.bindings
    region = guest.regions[0]
    assert guest.vm_type.type == abi.GUNYAH_VM_TYPE and "FORCE_LEND" in guest.notes[0]
    assert binding.lend and binding.flags == abi.GUNYAH_MEM_ALLOW_RWX | abi.GUNYAH_MEM_FORCE_LEND
    assert (binding.gfn, binding.nr, binding.slot) == (0, 4 * MiB // PAGE, region.slot)
    assert region.in_place and region.gmem is not None
    assert region.gmem.flags == uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
    assert face.status == abi.VmStatus.NO_STATE
    assert guest.capabilities >= {"private_mem", "private_access", "populate", "host_mmap"}
    assert not guest.capabilities & {"conversion", "in_place_conversion", "acceptance", "memory_attributes"}


def test_the_launch_starts_the_vm_with_its_devicetree(guest: GuestVm) -> None:
    """The devicetree goes in the last page, lent as the image parcel at GUNYAH_VM_START;
    it is then the VM's paged memory."""
    note = guest.finish_launch()
    face = gunyah(guest.vm)
    assert face.status == abi.VmStatus.RUNNING
    assert note == f"VM started: VMID {face.vmid:#x}, devicetree at {4 * MiB - PAGE:#x} lent as its image"
    counters = guest.counters()
    for rpc in ("MEM_LEND", "VM_CONFIG_IMAGE", "VM_SET_DEMAND_PAGING", "VM_INIT", "VM_START"):
        assert counters[f"gunyah.rm.{rpc}"] == 1, rpc
    dtb = (4 * MiB - PAGE) >> uapi.PAGE_SHIFT
    parcel = face.state.dtb
    assert parcel is not None and parcel.gfn == dtb and parcel.lend
    assert face.state.mm.get(dtb) is not None and parcel.handle not in face.state.parcels  # paged now
    assert guest.read(4 * MiB - PAGE, 4) == FDT_MAGIC


def test_populate_writes_then_unmaps_and_the_first_touch_lends(guest: GuestVm) -> None:
    with pytest.raises(NotApplicable, match="measures nothing"):
        guest.populate(0, b"x", measure=True)
    assert guest.populate(PAGE, b"kernel") == "host wrote 1 page(s) and unmapped them (not measured)"
    region = guest.regions[0]
    assert region.gmem is not None and not view(region.gmem).host_mapped(1)
    assert guest.read(PAGE, 6) == b"kernel"  # demand-paged: lent as it was, no copy
    pfn = view(guest.vm).gmem_pfn(1)
    assert machine(guest.kvm).hyp.owner(pfn).kind == ExtentKind.GUEST_PRIVATE
    assert not view(guest.kvm).direct_map_valid(pfn)
    with pytest.raises(NotApplicable, match="pre-boot"):
        guest.populate(2 * PAGE, b"late")


def test_a_vm_its_first_vcpu_run_started_takes_no_image(guest: GuestVm) -> None:
    """gunyah_vm_ensure_started at the first GUNYAH_VCPU_RUN: the host no longer writes."""
    guest.vcpu().access(0x5000, 1)
    assert gunyah(guest.vm).status == abi.VmStatus.RUNNING and not guest.launched
    with pytest.raises(NotApplicable, match="has started"):
        guest.populate(0, b"late")
    assert guest.finish_launch() == ""  # nothing left to start


def test_the_guest_converts_and_accepts_nothing(guest: GuestVm) -> None:
    with pytest.raises(NotApplicable, match="converts nothing: a binding is lent or shared"):
        guest.convert(0, PAGE, private=False)
    with pytest.raises(NotApplicable, match="no acceptance"):
        guest.accept(0, PAGE)


def test_the_host_takes_a_lent_page_back_with_its_bytes(guest: GuestVm) -> None:
    """Gunyah's conversion is the host's: its fault on a lent page launders it (reclaimed,
    contents kept); a page the host maps is not lent again (-EPERM) until it unmaps it."""
    guest.write(0x3000, b"secret")
    shared = guest.regions[0].shared
    assert shared is not None and shared.read(0x3000, 6) == b"secret"
    assert guest.counters()["gunyah.host_fault_launders"] == 1
    with pytest.raises(PageFaultExit) as info:
        guest.read(0x3000, 6)
    assert info.value.attempt == -errno.EPERM
    shared.madvise(uapi.MADV_DONTNEED, 0x3000, PAGE)
    assert guest.read(0x3000, 6) == b"secret"


def test_a_default_vm_shares_its_ram() -> None:
    with guestmem.open("gunyah") as kvm, GuestVm.launch(kvm, kind="default", size=4 * MiB) as g:
        (binding,) = gunyah(g.vm).bindings
        assert not binding.lend and "FORCE_SHARE" in g.notes[0]
        assert "private_mem" not in g.capabilities
        g.write(0x2000, b"plain")
        shared = g.regions[0].shared
        assert shared is not None and shared.read(0x2000, 5) == b"plain"  # no launder needed
        assert not g.counters().get("gunyah.host_fault_launders")
        with pytest.raises(NotApplicable, match="converts nothing"):
            g.convert(0x2000, PAGE, private=True)


def test_a_large_touch_costs_its_runs_and_the_costs_show_rm_rpcs() -> None:
    with guestmem.open("gunyah") as kvm, GuestVm.launch(kvm, size=1 << 30) as g:
        assert g.touch(0, 1 << 30) == (1 << 30) // PAGE
        counters = g.counters()
        assert counters["gunyah.demand_paged_pages"] == (1 << 30) // PAGE - 1  # the DTB's was paged at start
        costs, details = g.costs(), g.intents.cost_details(counters)
        rpcs = sum(v for k, v in counters.items() if k.startswith("gunyah.rm."))
        assert costs["firmware_commands"] == details["RM RPCs"] == rpcs > 0
        assert details["memextent donations"] == counters["gunyah.hvc.memextent_donate"] > 0
        hvc = counters["gunyah.hvc.memextent_donate"] + counters["gunyah.hvc.addrspace_map"]
        assert costs["hw_table_updates"] == hvc
        assert details["demand-paged pages"] == counters["gunyah.demand_paged_pages"]
