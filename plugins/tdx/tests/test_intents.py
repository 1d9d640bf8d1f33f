"""The portable intents on TDX: the TD launch (INIT_VM, INIT_VCPU, INIT_MEM_REGION with
MRTD, FINALIZE), conversions by MapGPA through QEMU's loop, ACCEPT in 4K and 2M units."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

import guestmem
import guestmem_tdx
from guestmem import HypercallExit, KvmError, MemoryFault, uapi
from guestmem.backend import Intents, NotApplicable, view
from guestmem.errors import EHWPOISON
from guestmem.guestvm import GuestVm
from guestmem_tdx import MeasuredRegion, SeptState, TdState
from guestmem_tdx.intents import AcceptFailed

MiB = 1 << 20
PAGE = uapi.PAGE_SIZE


@pytest.fixture
def guest() -> Iterator[GuestVm]:
    with guestmem.open("tdx") as kvm, GuestVm.launch(kvm, size=16 * MiB) as g:
        yield g


def _state(guest: GuestVm, gpa: int) -> SeptState:
    td = guestmem_tdx.tdx(guest.vm).td
    return td.leaf_state(gpa >> uapi.PAGE_SHIFT)


def test_launch_is_init_vm_then_init_vcpu(guest: GuestVm) -> None:
    """INIT_VM right after KVM_CREATE_VM (a vCPU before it is EIO), MapGPA exits enabled,
    guest RAM private, INIT_VCPU once the vCPUs exist; the TD is not runnable yet."""
    tdx = guestmem_tdx.tdx(guest.vm)
    assert guest.vm_type.type == uapi.KVM_X86_TDX_VM
    assert tdx.hkid > 0 and tdx.td_state is TdState.INITIALIZED
    assert tdx.vcpu_state(guest.vcpu()).state is guestmem_tdx.VcpuTdState.INITIALIZED
    assert view(guest.vm).hypercall_exit_enabled & (1 << uapi.KVM_HC_MAP_GPA_RANGE)
    assert view(guest.vm).is_private(0) and view(guest.vm).is_private((16 * MiB >> 12) - 1)
    assert guest.notes == [f"TD initialised (HKID {tdx.hkid}, 1 vCPU(s))"]
    assert guest.capabilities >= {"conversion", "acceptance", "populate", "launch_measurement"}
    assert "in_place_conversion" not in guest.capabilities


def test_populate_adds_and_measures_and_finish_freezes_mrtd(guest: GuestVm) -> None:
    firmware, config = b"\x90" * 5000, b"config"
    assert guest.populate(0, firmware) == "PAGE.ADD of 2 page(s), measured (MR.EXTEND)"
    note = guest.populate(MiB, config, measure=False)
    assert note == "PAGE.ADD of 1 page(s), unmeasured (MRTD has the gpa only)"
    counters = guest.counters()
    assert counters["seamcall.TDH.MEM.PAGE.ADD"] == 3 and counters["seamcall.TDH.MR.EXTEND"] == 2 * 16
    assert counters["copied_bytes"] == 3 * PAGE
    mrtd = guestmem_tdx.expected_mrtd(
        [MeasuredRegion(0, firmware), MeasuredRegion(MiB, config, measure=False)]
    )
    assert guest.finish_launch() == f"MRTD {mrtd.hex()[:16]}..."
    assert guestmem_tdx.tdx(guest.vm).td_state is TdState.RUNNABLE
    assert guest.read(0, 4) == b"\x90" * 4 and guest.read(MiB, 6) == config  # PAGE.ADD: MAPPED
    with pytest.raises(NotApplicable, match="pre-boot"):
        guest.populate(2 * MiB, b"late")


def test_a_guest_step_finishes_the_launch_first(guest: GuestVm) -> None:
    """KVM_RUN of a TD is EINVAL until FINALIZE (tdx_vcpu_pre_run): the first guest step
    finalizes the launch, as the VMM does before it runs a vCPU."""
    with pytest.raises(KvmError) as info:
        guest.vcpu().access(0, 1)
    assert info.value.errno == errno.EINVAL
    guest.accept(0, PAGE)
    assert guest.launched and guest.notes[-1].startswith("MRTD ")


def test_accept_in_4k_and_2m_units(guest: GuestVm) -> None:
    """4K: one TDG.MEM.PAGE.ACCEPT per page, each exiting once for KVM to AUG it.  2M:
    tdx_accept_memory's 2 MiB ACCEPT first, a size mismatch on Linux 6.18 (4 KiB private
    mappings), then 4 KiB ones: more TDCALLs for the same pages."""
    assert guest.accept(0, 2 * MiB) == "512 page(s) accepted by 4K ACCEPTs"
    four_k = guest.counters()["tdcall.TDG.MEM.PAGE.ACCEPT"]
    assert four_k == 2 * 512  # each page's ACCEPT exits once (EPT violation) and runs again
    note = guest.accept(2 * MiB, 2 * MiB, page_size=2 * MiB)
    assert note == "512 page(s) accepted by tdx_accept_memory (1G, 2M, then 4K ACCEPTs)"
    # the 2 MiB ACCEPT exits (KVM AUGs its first page) and is a size mismatch when run
    # again; the 4 KiB ones follow, the first page's without an exit: 2 + 512 + 511
    assert guest.counters()["tdcall.TDG.MEM.PAGE.ACCEPT"] - four_k == 2 + 512 + 511
    assert _state(guest, 4 * MiB - PAGE) is SeptState.MAPPED
    assert guest.counters()["seamcall.TDH.MEM.PAGE.AUG"] == 1024
    assert guest.read(3 * MiB, 4) == bytes(4)  # ACCEPT zeroes the page


def test_accepting_twice_is_a_failure_a_linux_td_panics_on(guest: GuestVm) -> None:
    guest.accept(0, PAGE)
    with pytest.raises(AcceptFailed, match="TDX_PAGE_ALREADY_ACCEPTED") as info:
        guest.accept(0, 2 * PAGE)
    assert info.value.gpa == 0


def test_conversion_is_mapgpa_through_the_vmm_and_destructive(guest: GuestVm) -> None:
    """To shared: one MapGPA, one KVM_EXIT_HYPERCALL QEMU answers with attributes and a
    punch (the S-EPT leaf removed, the private page freed); to private: MapGPA, QEMU
    discards the shared copy, then the TD accepts a new, zeroed page."""
    guest.accept(MiB, MiB)
    guest.write(MiB + 0x3000, b"secret")
    old = view(guest.vm).gmem_pfn((MiB + 0x3000) >> 12)
    assert guest.convert(MiB + 0x3000, PAGE, private=False) == "1 MapGPA call(s) to shared"
    counters = guest.counters()
    assert counters["tdvmcall.MapGPA"] == 1 and counters["userspace_exits"] == 1
    assert counters["seamcall.TDH.MEM.PAGE.REMOVE"] == 1 and view(guest.vm).gmem_pfn(old) is None
    assert not view(guest.vm).is_private((MiB + 0x3000) >> 12)
    guest.write(MiB + 0x3000, b"bounce")  # through the shared alias now
    shared = guest.regions[0].shared
    assert shared is not None and shared.read(MiB + 0x3000, 6) == b"bounce"
    note = guest.convert(MiB + 0x3000, PAGE, private=True)
    assert note == "1 MapGPA call(s) to private, 1 page(s) accepted"
    assert shared.read(MiB + 0x3000, 6) == bytes(6)  # MADV_REMOVE
    assert guest.read(MiB + 0x3000, 6) == bytes(6) and _state(guest, MiB + 0x3000) is SeptState.MAPPED
    assert guest.vmm is not None and guest.vmm.handled["hypercall"] == 2


def test_a_large_conversion_leaves_in_2m_chunks_and_per_page_without_coalescing(guest: GuestVm) -> None:
    guest.convert(0, 6 * MiB, private=False)
    assert guest.counters()["userspace_exits"] == 3  # TDX_MAP_GPA_MAX_LEN
    assert guest.counters()["tdvmcall.MapGPA"] == 1
    guest.convert(8 * MiB, 4 * PAGE, private=False, coalesce=False)
    assert guest.counters()["tdvmcall.MapGPA"] == 5 and guest.counters()["userspace_exits"] == 7


def test_a_pending_interrupt_makes_the_guest_call_again(guest: GuestVm) -> None:
    """TDVMCALL_STATUS_RETRY between chunks: Linux's tdx_map_gpa calls again from R11."""
    guest.finish_launch()
    guestmem_tdx.tdx(guest.vm).inject_interrupt(guest.vcpu())
    guest.convert(0, 4 * MiB, private=False)
    assert guest.counters()["tdvmcall.MapGPA"] == 2 and guest.counters()["userspace_exits"] == 2


def test_without_a_vmm_loop_the_exit_reaches_the_caller() -> None:
    with guestmem.open("tdx") as kvm, GuestVm.launch(kvm, size=4 * MiB, handle_exits="none") as g:
        with pytest.raises(HypercallExit) as info:
            g.convert(0, PAGE, private=False)
        assert info.value.nr == uapi.KVM_HC_MAP_GPA_RANGE
        assert info.value.args == (0, 1, uapi.KVM_MAP_GPA_RANGE_DECRYPTED)


def test_an_implicit_conversion_during_accept_resumes_the_accept(guest: GuestVm) -> None:
    """An ACCEPT of a page whose attribute is shared: KVM_EXIT_MEMORY_FAULT, QEMU converts
    it to private and the TD re-executes the ACCEPT that exited, not its loop."""
    guest.vm.set_memory_attributes(5 * PAGE, PAGE, 0)
    guest.accept(0, 16 * PAGE)
    assert guest.vmm is not None and guest.vmm.handled["memory_fault"] == 1
    assert all(_state(guest, gpa) is SeptState.MAPPED for gpa in range(0, 16 * PAGE, PAGE))


def test_touching_memory_never_accepted_kills_the_td(guest: GuestVm) -> None:
    """Accepted memory faults in as runs; the first private page not accepted is an EPT
    violation KVM answers by killing the TD (SEPT_VE_DISABLE)."""
    guest.accept(0, MiB)
    assert guest.touch(0, MiB) == 256
    assert guest.counters()["seamcall.TDH.MEM.PAGE.AUG"] == 256  # nothing more to map
    with pytest.raises(KvmError) as info:
        guest.touch(MiB - 2 * PAGE, 4 * PAGE)
    assert (info.value.errno, info.value.rule) == (errno.EIO, "TDX-1.2")
    assert view(guest.vm).dead and _state(guest, MiB) is SeptState.PENDING


def test_a_default_vm_on_the_tdx_host_is_the_cores() -> None:
    with guestmem.open("tdx") as kvm, GuestVm.launch(kvm, kind="default", size=4 * MiB) as g:
        assert g.vm_type.type == uapi.KVM_X86_DEFAULT_VM and g.notes == []
        with pytest.raises(NotApplicable):
            g.accept(0, PAGE)
        with pytest.raises(NotApplicable):
            g.populate(0, b"x")
        g.write(0, b"plain")
        assert g.read(0, 5) == b"plain" and g.touch(0, MiB) == 256
        assert "SEAMCALLs" in g.intents.cost_details(g.counters()) and not g.counters().get("seamcalls")


def test_costs_show_seamcalls_by_kind(guest: GuestVm) -> None:
    guest.populate(0, b"fw")
    guest.accept(MiB, MiB)
    guest.convert(MiB, PAGE, private=False)
    counters = guest.counters()
    costs, details = guest.costs(), guest.intents.cost_details(counters)
    table = sum(
        counters.get(f"seamcall.TDH.{leaf}", 0) for leaf in ("MEM.SEPT.ADD", "MEM.PAGE.ADD", "MEM.PAGE.AUG")
    )
    table += sum(counters.get(f"seamcall.TDH.{leaf}", 0) for leaf in ("MEM.RANGE.BLOCK", "MEM.PAGE.REMOVE"))
    flushes = counters["seamcall.TDH.MEM.TRACK"] + counters["seamcall.TDH.PHYMEM.PAGE.WBINVD"]
    assert costs["hw_table_updates"] == table
    assert costs["firmware_commands"] == counters["seamcalls"] - table - flushes > 0
    assert (
        costs["tlb_flushes"]
        == Intents().costs(counters)["tlb_flushes"] + flushes + counters["tdx.vcpu_kicks"]
    )
    assert costs["guest_instructions"] == details["TDG.MEM.PAGE.ACCEPT"] == 2 * 256
    assert costs["exits"] == 1 and costs["copied_bytes"] == PAGE
    assert details["SEAMCALLs"] == counters["seamcalls"] and details["TDH.MEM.PAGE.REMOVE"] == 1
    assert details["EPT-violation exits"] == 256


def test_a_poisoned_page_is_no_conversion(guest: GuestVm) -> None:
    """EHWPOISON is not a conversion: QEMU fails KVM_RUN (the exit is raised again)."""
    guest.accept(0, PAGE)
    guest.write(0, b"x")
    region = guest.regions[0]
    assert region.gmem is not None
    region.gmem.inject_memory_failure(0)
    with pytest.raises(MemoryFault) as info:
        guest.read(0, 1)
    assert info.value.errno == EHWPOISON


def test_a_1g_mapgpa_leaves_in_512_exits() -> None:
    """One MapGPA, one KVM_EXIT_HYPERCALL per 2 MiB chunk: 512 exits that each make
    progress, which the VMM loop follows to the end."""
    with guestmem.open("tdx") as kvm, GuestVm.launch(kvm, size=1 << 30) as g:
        assert g.convert(0, 1 << 30, private=False) == "1 MapGPA call(s) to shared"
        assert g.counters()["userspace_exits"] == 512 and g.counters()["tdvmcall.MapGPA"] == 1
        assert not view(g.vm).is_private(((1 << 30) >> 12) - 1)


@pytest.mark.parametrize("accept_on_fault", [False, True])
def test_a_punched_page_kills_a_linux_td_and_is_accepted_again_by_one_that_accepts_on_fault(
    accept_on_fault: bool,
) -> None:
    """After the VMM punches an accepted private page, the TD's next touch meets a new,
    PENDING page: a TD launched as Linux runs (``SEPT_VE_DISABLE``) is killed (TDX-1.2);
    one that accepts on fault is launched without it, takes #VE, accepts the page and reads
    zero."""
    punch = uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE
    with guestmem.open("tdx") as kvm, GuestVm.launch(kvm, size=MiB, accept_on_fault=accept_on_fault) as g:
        g.accept(0, 16 * PAGE)
        g.write(5 * PAGE, b"secret")
        region = g.regions[0]
        assert region.gmem is not None
        region.gmem.fallocate(punch, 5 * PAGE, PAGE)
        if not accept_on_fault:
            with pytest.raises(KvmError) as info:
                g.read(5 * PAGE, 6)
            assert (info.value.errno, info.value.rule) == (errno.EIO, "TDX-1.2")
            return
        accepted = g.counters()["tdx.accepted_pages"]
        assert g.read(5 * PAGE, 6) == bytes(6)
        assert g.counters()["tdx.accepted_pages"] == accepted + 1
