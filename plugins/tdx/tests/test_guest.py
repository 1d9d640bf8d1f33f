"""The TD's side: TDG.MEM.PAGE.ACCEPT, accesses through the private and shared aliases,
TDG.VP.VMCALL<MapGPA> (``tdx_map_gpa``/``tdx_complete_vmcall_map_gpa``), unaccepted
pages (``tdx_handle_ept_violation``) and host writes to TD memory (#MC)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from tdx_helpers import MIB, PAGE, PRIVATE, PUNCH, TdVm, make_td

from guestmem import uapi
from guestmem.backend import view
from guestmem.errors import HostSigbus, HypercallExit, InternalErrorExit, KvmError, MemoryFault
from guestmem_tdx import PendingAccessVe, SeptState, abi, check_tdx
from guestmem_tdx import status as st
from guestmem_tdx.guest import TdxGuest


def _sept(td: TdVm) -> Any:
    return td.tdx.td


# --- ACCEPT ------------------------------------------------------------------------------------------
def test_accept_4k_faults_in_and_zeroes(td: TdVm) -> None:
    """ACCEPT of a page KVM has not AUGed exits (EPT violation), KVM faults it in (always a
    write fault), the TD retries: MAPPED and zeroed with the TD's key; a second ACCEPT is
    TDX_PAGE_ALREADY_ACCEPTED."""
    g = td.guest
    assert g.accept(0x5000) == st.TDX_SUCCESS
    c = td.vm.counters
    assert (c["ept_violation_exits"], c["seamcall.TDH.MEM.PAGE.AUG"]) == (1, 1)
    assert c["tdcall.TDG.MEM.PAGE.ACCEPT"] == 2  # exited, then executed again
    assert _sept(td).leaf_state(5) is SeptState.MAPPED
    assert g.read(0x5000, 4) == bytes(4)
    assert g.accept(0x5000) == st.TDX_PAGE_ALREADY_ACCEPTED


def test_accept_sizes(td: TdVm) -> None:
    """2 MiB: the 2 MiB entry is FREE, so the TD exits, KVM maps the 4 KiB page (6.18 maps
    private memory at 4 KiB only), the retry is TDX_PAGE_SIZE_MISMATCH.  1 GiB, a shared
    gpa and an unaligned one are TDX_OPERAND_INVALID without an exit."""
    g = td.guest
    assert g.accept(2 * MIB, uapi.PG_LEVEL_2M) == st.with_operand(st.TDX_PAGE_SIZE_MISMATCH, 1)
    assert td.vm.counters["ept_violation_exits"] == 1 and td.vm.is_mapped(512)
    invalid = st.with_operand(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    assert g.accept(0, uapi.PG_LEVEL_1G) == invalid
    assert g.accept(2 * MIB + PAGE, uapi.PG_LEVEL_2M) == invalid
    assert g.accept(PAGE | g.shared_bit) == invalid
    assert g.accept(PAGE + 8) == invalid
    assert td.vm.counters["ept_violation_exits"] == 1


def test_accept_range_stops_at_the_first_failure(td: TdVm) -> None:
    """The instructions before the failing one took effect."""
    g = td.guest
    assert g.accept(8 * PAGE) == 0
    assert g.accept_range(4 * PAGE, 8 * PAGE) == st.TDX_PAGE_ALREADY_ACCEPTED
    assert [_sept(td).leaf_state(i) for i in range(4, 9)] == [SeptState.MAPPED] * 5
    assert _sept(td).leaf_state(9) is SeptState.FREE
    assert g.accept_range(2 * MIB, 2 * MIB, uapi.PG_LEVEL_2M) == st.with_operand(st.TDX_PAGE_SIZE_MISMATCH, 1)
    with pytest.raises(ValueError):
        g.accept_range(0, PAGE + 1)


def test_accept_of_a_shared_gpa_is_a_memory_fault_exit(td: TdVm) -> None:
    """Implicit conversion: KVM's fault for an ACCEPT of a gfn whose attribute is shared is
    KVM_EXIT_MEMORY_FAULT (private); the VMM converts and the ACCEPT goes through."""
    td.vm.set_memory_attributes(MIB, PAGE, 0)
    with pytest.raises(MemoryFault) as info:
        td.guest.accept(MIB)
    assert (info.value.gpa, info.value.is_private, info.value.errno) == (MIB, True, errno.EFAULT)
    td.vmm().handle_memory_fault(info.value)
    assert td.guest.accept(MIB) == 0


def test_a_td_accesses_memory_through_both_aliases(td: TdVm) -> None:
    """The shared bit (47 with GPAW 48) picks the alias; a mismatch with the attribute is a
    memory-fault exit (G-2)."""
    g = td.guest
    assert g.accept(0x3000) == 0
    g.write(0x3000, b"private")
    assert g.read(0x3000, 7) == b"private"
    assert td.shared.read(0x3000, 7) == bytes(7)
    with pytest.raises(MemoryFault) as info:
        g.read(0x3000 | g.shared_bit, 1)
    assert not info.value.is_private


def test_gpaw52_moves_the_shared_bit() -> None:
    td = make_td(gpaw=52, finalize=True)
    g = td.guest
    assert g.shared_bit == 1 << 51
    td.vm.set_memory_attributes(0, PAGE, 0)
    g.write(g.shared_bit | 0x10, b"hi")
    assert td.shared.read(0x10, 2) == b"hi"
    td.close()


# --- unaccepted memory -----------------------------------------------------------------------------
def test_touching_a_pending_page_kills_the_td(td: TdVm) -> None:
    """With SEPT_VE_DISABLE a TD access to a PENDING page is an EPT violation KVM cannot
    resolve: ``tdx_handle_ept_violation`` ("Guest access before accepting") marks the VM
    dead and KVM_RUN fails with EIO; every later ioctl is EIO (CAP-9)."""
    assert td.vcpu.pre_fault_memory(0, PAGE) == 0
    with pytest.raises(KvmError) as info:
        td.guest.read(0, 8)
    assert info.value.errno == errno.EIO and info.value.rule == "TDX-1.2"
    assert view(td.vm).dead and not view(td.vm).bugged
    with pytest.raises(KvmError) as info:
        td.vm.set_memory_attributes(0, PAGE, 0)
    assert info.value.errno == errno.EIO


def test_without_sept_ve_disable_the_td_gets_ve() -> None:
    """Without SEPT_VE_DISABLE the TDX module injects #VE into the TD; KVM sees nothing."""
    td = make_td(attributes=0, finalize=True)
    td.vcpu.pre_fault_memory(0, PAGE)
    with pytest.raises(PendingAccessVe) as info:
        td.guest.read(0x10, 1)
    assert info.value.gpa == 0 and not view(td.vm).dead
    td.close()


# --- MapGPA ----------------------------------------------------------------------------------------------
def test_map_gpa_needs_the_hypercall_exit() -> None:
    """Userspace did not enable KVM_CAP_EXIT_HYPERCALL for KVM_HC_MAP_GPA_RANGE: the TD gets
    TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED and R11 = the gpa."""
    td = make_td(exits=False, finalize=True)
    g = td.guest
    assert g.map_gpa(MIB | g.shared_bit, PAGE) == abi.TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED
    assert g.r11 == MIB | g.shared_bit
    td.close()


@pytest.mark.parametrize(
    ("gpa", "size", "status"),
    [
        (MIB, (1 << 47) - MIB + PAGE, abi.TDVMCALL_STATUS_INVALID_OPERAND),  # private start, shared end
        (1 << 48, PAGE, abi.TDVMCALL_STATUS_INVALID_OPERAND),  # beyond GPAW 48
        ((1 << 64) - PAGE, 2 * PAGE, abi.TDVMCALL_STATUS_INVALID_OPERAND),  # wraps
        (MIB + 8, PAGE, abi.TDVMCALL_STATUS_ALIGN_ERROR),
        (MIB, PAGE + 8, abi.TDVMCALL_STATUS_ALIGN_ERROR),
    ],
)
def test_map_gpa_checks(td: TdVm, gpa: int, size: int, status: int) -> None:
    """``tdx_map_gpa``: range, GPAW and alias checks first, then alignment."""
    assert td.guest.map_gpa(gpa, size) == status
    assert td.guest.r11 == gpa


def test_map_gpa_exits_in_2m_chunks(td: TdVm) -> None:
    """5 MiB to shared: three KVM_EXIT_HYPERCALL (2, 2, 1 MiB) with the shared bit stripped
    and KVM_MAP_GPA_RANGE_DECRYPTED; ``ret`` is 0 on exit (for QEMU <= 9.2)."""
    g = td.guest
    exits = []
    with pytest.raises(HypercallExit) as info:
        g.map_gpa(MIB | g.shared_bit, 5 * MIB)
    exit_: HypercallExit | int = info.value
    while isinstance(exit_, HypercallExit):
        exits.append((exit_.nr, exit_.args, exit_.flags, exit_.ret))
        try:
            exit_ = g.resume(0)
        except HypercallExit as exc:
            exit_ = exc
    assert exit_ == abi.TDVMCALL_STATUS_SUCCESS
    dec, lm = uapi.KVM_MAP_GPA_RANGE_DECRYPTED, uapi.KVM_EXIT_HYPERCALL_LONG_MODE
    assert exits == [
        (uapi.KVM_HC_MAP_GPA_RANGE, (MIB, 512, dec), lm, 0),
        (uapi.KVM_HC_MAP_GPA_RANGE, (3 * MIB, 512, dec), lm, 0),
        (uapi.KVM_HC_MAP_GPA_RANGE, (5 * MIB, 256, dec), lm, 0),
    ]
    assert g.resume(0) is None  # nothing pending: complete_userspace_io is NULL


def test_resume_with_no_exit_pending_ignores_ret(td: TdVm) -> None:
    """``KVM_RUN`` without a pending ``complete_userspace_io`` ignores
    ``run->hypercall.ret``: the TD runs on, nothing changes, no R10 is returned."""
    g = td.guest
    before = dict(td.vm.counters)
    assert g.resume(1) is None and g.resume(0) is None
    assert dict(td.vm.counters) == before


def test_instruction_with_an_exit_unanswered_completes_it_with_ret_0(td: TdVm) -> None:
    """An instruction's ``KVM_RUN`` while a MapGPA exit is unanswered runs
    ``tdx_complete_vmcall_map_gpa`` first with ``run->hypercall.ret`` as ``__tdx_map_gpa``
    left it, 0: the chunk counts as converted and the next one exits instead of entering
    the TD; after the last chunk the TD gets SUCCESS and the instruction executes."""
    g = td.guest
    with pytest.raises(HypercallExit):
        g.map_gpa(MIB | g.shared_bit, 3 * MIB)
    accepts = td.vm.counters["tdcall.TDG.MEM.PAGE.ACCEPT"]
    with pytest.raises(HypercallExit) as info:  # the second chunk, not the ACCEPT
        g.accept(0x5000)
    assert info.value.args == (3 * MIB, 256, uapi.KVM_MAP_GPA_RANGE_DECRYPTED)
    assert td.vm.counters["tdcall.TDG.MEM.PAGE.ACCEPT"] == accepts
    assert g.accept(0x5000) == st.TDX_SUCCESS  # the last chunk completed, then the ACCEPT ran
    assert g.state.completed == abi.TDVMCALL_STATUS_SUCCESS and g.state.pending is None


def test_map_gpa_error_from_userspace(td: TdVm) -> None:
    """``run->hypercall.ret`` nonzero: INVALID_OPERAND for the TD, R11 = the chunk that failed."""
    g = td.guest
    with pytest.raises(HypercallExit):
        g.map_gpa(0, 4 * MIB)
    with pytest.raises(HypercallExit):
        g.resume(0)
    assert g.resume(1) == abi.TDVMCALL_STATUS_INVALID_OPERAND and g.r11 == 2 * MIB


def test_map_gpa_retry_on_pending_interrupt(td: TdVm) -> None:
    """An interrupt pending between chunks: TDVMCALL_STATUS_RETRY with R11 = the next gpa;
    Linux's ``tdx_map_gpa`` calls again from there."""
    g, vmm = td.guest, td.vmm()
    calls = []

    def handle(exit_: HypercallExit) -> int:
        calls.append(exit_.args[0])
        if len(calls) == 1:
            td.tdx.inject_interrupt(td.vcpu)
        return vmm.handle(exit_)

    assert g.map_gpa_range(0, 6 * MIB, private=False, handle=handle)
    assert calls == [0, 2 * MIB, 4 * MIB]
    assert td.vm.counters["tdvmcall.MapGPA"] == 2  # the first call, and the one after RETRY
    assert not any(v & PRIVATE for _, _, v in view(td.vm).attribute_runs(0, (6 * MIB) >> 12))


def test_kvm_hypercall_from_a_td(td: TdVm) -> None:
    """TDG.VP.VMCALL with R10 = a KVM hypercall number is ``tdx_emulate_vmcall``:
    KVM_HC_MAP_GPA_RANGE leaves as the core's x86 code does."""
    with pytest.raises(HypercallExit) as info:
        td.guest.kvm_hypercall(uapi.KVM_HC_MAP_GPA_RANGE, 0, 1, 0)
    assert info.value.args == (0, 1, 0)
    assert td.guest.kvm_hypercall(99) == -uapi.KVM_ENOSYS


def test_other_tdvmcalls(td: TdVm) -> None:
    """GET_TD_VM_CALL_INFO leaf 0 is answered by KVM; an unknown leaf is SUBFUNC_UNSUPPORTED."""
    assert td.guest.tdvmcall(abi.TDVMCALL_GET_TD_VM_CALL_INFO, 0) == abi.TDVMCALL_STATUS_SUCCESS
    assert td.guest.tdvmcall(0x10077) == abi.TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED


def test_conversion_is_destructive(td: TdVm) -> None:
    """Private data made shared is gone (the VMM punched the page); made private again, the
    page is a new, zeroed one after ACCEPT."""
    g, vmm = td.guest, td.vmm()
    assert g.accept_range(MIB, 2 * PAGE) == 0
    g.write(MIB, b"private data")
    old = td.pfn(MIB)
    assert g.map_gpa_range(MIB, MIB + 2 * PAGE, private=False, handle=vmm.handle)
    assert td.vm.gmem_pfn(MIB >> 12) is None and td.module.pamt_entry(old) is None
    g.write(MIB | g.shared_bit, b"bounce")
    assert g.map_gpa_range(MIB, MIB + 2 * PAGE, private=True, handle=vmm.handle)
    assert td.shared.read(MIB, 6) == bytes(6)  # the shared copy was discarded
    assert g.accept_range(MIB, 2 * PAGE) == 0
    assert g.read(MIB, 12) == bytes(12) and td.pfn(MIB) != old
    check_tdx(td.kvm)


# --- host writes to TD memory ------------------------------------------------------------------------
def test_host_write_poisons_and_the_td_read_is_a_machine_check(td: TdVm) -> None:
    """X86_BUG_TDX_PW_MCE: a host kernel write to a TD private page does not fault; the TD's
    next read of it is #MC in SEAM non-root: the module marks the TD fatal and KVM_RUN ends
    with KVM_EXIT_INTERNAL_ERROR (``tdx_handle_exit``), again on every re-entry."""
    g = td.guest
    assert g.accept(0) == 0
    pfn = td.pfn(0)
    td.kvm.backend_view.kernel_write(pfn, 0x48, b"oops")  # cache line 1 of the page
    assert td.kvm.backend_view.crashed is None and td.host.is_poisoned(pfn)
    assert not td.host.is_poisoned(pfn, 0, 0x40) and td.host.is_poisoned(pfn, 0x7F, 1)
    assert g.read(0, 0x40) == bytes(0x40) and g.read(0x80, 8) == bytes(8)  # clean lines
    with pytest.raises(InternalErrorExit) as info:
        g.read(0x3C, 8)  # straddles into line 1
    assert info.value.suberror == abi.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON
    assert _sept(td).fatal and td.host.mce
    with pytest.raises(InternalErrorExit):
        g.read(PAGE, 1)
    # the fatal TD's pages cannot be removed (TDX_TD_FATAL from BLOCK: KVM_BUG_ON, leaked)
    td.gmem.fallocate(PUNCH, 0, PAGE)
    assert view(td.vm).bugged and td.host.leaked.get(pfn) is not None


def test_clearing_removes_poison(td: TdVm) -> None:
    """MOVDIR64B (the clear after REMOVE) and the TD's own zeroing at ACCEPT rewrite the
    lines with integrity: the poison is gone."""
    td.vcpu.pre_fault_memory(0, PAGE)
    pfn = td.pfn(0)
    td.kvm.backend_view.kernel_write(pfn, 0, b"x")
    assert td.guest.accept(0) == 0 and not td.host.is_poisoned(pfn)
    td.kvm.backend_view.kernel_write(pfn, 0, b"x")
    td.vm.set_memory_attributes(0, PAGE, 0)
    assert not td.host.is_poisoned(pfn)


def test_host_writes_elsewhere_are_harmless(td: TdVm) -> None:
    """Shared memory and pages the module does not own are not poisoned."""
    free = td.kvm.backend_view.alloc(1)
    td.kvm.backend_view.kernel_write(free, 0, b"fine")
    assert not td.host.is_poisoned(free) and td.kvm.backend_view.crashed is None


def test_private_pages_are_never_host_mapped(td: TdVm) -> None:
    """A TD's guest_memfd has no INIT_SHARED; an mmap of it faults with SIGBUS (M-4)."""
    gmem = td.vm.create_guest_memfd(MIB, uapi.GUEST_MEMFD_FLAG_MMAP)
    td.vm.set_user_memory_region2(1, uapi.KVM_MEM_GUEST_MEMFD, 1 << 30, MIB, 0, gmem, 0)
    td.vm.set_memory_attributes(1 << 30, MIB, PRIVATE)
    assert td.guest.accept(1 << 30) == 0
    with gmem.mmap(MIB) as m:
        with pytest.raises(HostSigbus) as info:
            m.read(0, 1)
        assert info.value.rule == "host-mappability"  # the module owns it
        with pytest.raises(HostSigbus) as info:
            m.read(PAGE, 1)
        assert info.value.rule == "M-4"


# --- batched ACCEPTs are the single instructions ---------------------------------------------------
def _scenario(kind: str) -> tuple[TdVm, int, int]:
    td = make_td(size=8 * MIB, finalize=True)
    start, end = 0, 8 * MIB
    if kind == "prefaulted-part":
        td.vcpu.pre_fault_memory(2 * MIB + 16 * PAGE, 3 * MIB)
    elif kind == "accepted-page":
        td.guest.accept(5 * MIB + 7 * PAGE)
    elif kind == "shared-hole":
        td.vm.set_memory_attributes(3 * MIB + 5 * PAGE, PAGE, 0)
    elif kind == "shared-chunk":
        td.vm.set_memory_attributes(4 * MIB, PAGE, 0)
    elif kind == "unaligned":
        start, end = 3 * PAGE, 7 * MIB - 5 * PAGE
    elif kind == "mixed":
        td.vcpu.pre_fault_memory(MIB, 2 * PAGE)
        td.guest.accept(MIB + PAGE)
        start = 512 * PAGE - 3 * PAGE
    return td, start, end


@pytest.mark.parametrize(
    "kind", ["fresh", "prefaulted-part", "accepted-page", "shared-hole", "shared-chunk", "unaligned", "mixed"]
)
def test_accept_memory_batched_equals_stepwise(kind: str) -> None:
    """``accept_memory`` (runs) leaves the same S-EPT, counters and outcome as Linux's
    ``tdx_accept_memory`` one instruction at a time."""
    results = []
    for stepwise in (False, True):
        td, start, end = _scenario(kind)
        g: TdxGuest = td.guest
        before = dict(td.vm.counters)
        try:
            outcome: Any = (g.accept_memory_stepwise if stepwise else g.accept_memory)(start, end)
        except MemoryFault as exc:  # where the TD's loop stood: it re-executes that ACCEPT
            outcome = ("memory fault", exc.gpa, g.position)
        delta = {k: v - before.get(k, 0) for k, v in td.vm.counters.items() if v != before.get(k, 0)}
        runs: list[list[Any]] = []  # states by gfn (which pfns the allocator gave differs)
        for s, e, leaf in _sept(td).leaves.items():
            if runs and runs[-1][1] == s and runs[-1][2] is leaf.state:
                runs[-1][1] = e
            else:
                runs.append([s, e, leaf.state])
        results.append((outcome, delta, runs))
        check_tdx(td.kvm)
        td.close()
    assert results[0] == results[1]
    assert results[0][1].get("tdcall.TDG.MEM.PAGE.ACCEPT", 0) > 0


@pytest.mark.parametrize("batched", ["accept_memory", "accept_range"])
def test_an_accept_interrupted_by_a_conversion_exit_resumes_where_it_stood(batched: str) -> None:
    """An ACCEPT of a page whose attribute is shared exits to userspace (KVM_EXIT_MEMORY_FAULT,
    private); the VMM converts it and re-enters, and the TD executes that ACCEPT again, not
    its loop from the start (whose first pages would be TDX_PAGE_ALREADY_ACCEPTED)."""
    td = make_td(size=8 * MIB, finalize=True)
    td.vm.set_memory_attributes(3 * MIB + 5 * PAGE, PAGE, 0)
    g, vmm = td.guest, td.vmm()
    accept = {
        "accept_memory": lambda start: g.accept_memory(start, 4 * MIB),
        "accept_range": lambda start: g.accept_range(start, 4 * MIB - start) == 0,
    }[batched]
    with pytest.raises(MemoryFault) as info:
        accept(2 * MIB)
    assert g.position == info.value.gpa == 3 * MIB + 5 * PAGE and info.value.is_private
    vmm.handle_memory_fault(info.value)
    assert accept(g.position)
    runs = _sept(td).leaves.items(2 * MIB >> 12, 4 * MIB >> 12)
    assert sum(e - s for s, e, leaf in runs if leaf.state is SeptState.MAPPED) == 512
    check_tdx(td.kvm)
    td.close()
