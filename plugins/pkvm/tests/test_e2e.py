"""End to end on the core model: populate, donate, share, host I/O, unshare, teardown.

The isolation checker (I-1: never host-mapped while guest-private; I-2: zeroed on return)
watches every step; a violation fails the step that caused it.
"""

from __future__ import annotations

import pytest

import guestmem
from guestmem import HostSigbus, MemoryFault, uapi
from guestmem_pkvm import abi, policy
from guestmem_pkvm.exits import HypercallExit
from guestmem_pkvm.invariants import IsolationChecker, IsolationViolation
from guestmem_pkvm.ownership import HOST_OWNED, PageState
from guestmem_pkvm.policy import pkvm_state

from .conftest import GPA, SIZE, Guest

PAGE = uapi.PAGE_SIZE
SHARE = abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_SHARE_FUNC_ID
UNSHARE = abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_UNSHARE_FUNC_ID
IMAGE = b"\x7fELF pvm payload " * 600  # a little over 2.5 pages
BUF = 40  # page index of the shared buffer


def test_populate_run_share_host_io_unshare_teardown_3_3_3_4_3_5(
    guest: Guest, checker: IsolationChecker
) -> None:
    vm, m, vcpu = guest.vm, guest.map, guest.vcpu
    state = pkvm_state(vm)
    hyp = state.hyp
    image_pages = -(-len(IMAGE) // PAGE)

    # 3.4: the VMM writes the payload through the gmem mapping while the host owns the pages,
    # then drops the mapping before the first run (a mapped page cannot be donated).
    m.write(0, IMAGE)
    m.madvise(uapi.MADV_DONTNEED, 0, SIZE)

    # First guest accesses donate the pages as they are: no copy, contents kept.
    assert vcpu.access(GPA, len(IMAGE)) == IMAGE
    assert vm.counters["pkvm.donations"] == image_pages
    pfn0 = vm.gmem_pfn(GPA >> 12)
    assert pfn0 is not None and hyp.host_state(pfn0).state == PageState.NOPAGE

    # The guest fills a private buffer, then shares it with the host (in place).
    buf_gpa = GPA + BUF * PAGE
    vcpu.access(buf_gpa, data=b"guest says hi")
    pfn = vm.gmem_pfn(buf_gpa >> 12)
    with pytest.raises(HypercallExit) as exit_info:
        vcpu.hypercall(SHARE, buf_gpa, 1, 0)
    assert exit_info.value.exit_reason == uapi.KVM_EXIT_HYPERCALL
    assert isinstance(exit_info.value, guestmem.HypercallExit)
    assert (exit_info.value.nr, exit_info.value.args) == (SHARE, (buf_gpa, 1, 0))
    assert vm.gmem_pfn(buf_gpa >> 12) == pfn  # same page

    # The host sees the guest's bytes (non-destructive), writes its own, the guest reads them.
    assert m.read(BUF * PAGE, 13) == b"guest says hi"
    m.write(BUF * PAGE, b"host answers!")
    assert vcpu.access(buf_gpa, 13) == b"host answers!"

    # Unshare while the host still maps the page: refused, and the guest sees it.
    assert vcpu.hypercall(UNSHARE, buf_gpa, 1, 0) == abi.SMCCC_RET_INVALID_PARAMETER
    assert state.last_error is not None and state.last_error.errno == 11  # EAGAIN
    assert state.hvm.state(buf_gpa >> 12).state == PageState.SHARED_OWNED

    # The host unmaps; the unshare goes through; the page is private again, contents kept.
    m.madvise(uapi.MADV_DONTNEED, BUF * PAGE, PAGE)
    with pytest.raises(HypercallExit):
        vcpu.hypercall(UNSHARE, buf_gpa, 1, 0)
    assert state.hvm.state(buf_gpa >> 12).state == PageState.OWNED
    assert vcpu.access(buf_gpa, 13) == b"host answers!"
    with pytest.raises(HostSigbus):
        m.read(BUF * PAGE, 1)
    with pytest.raises(HostSigbus):
        m.read(0, 1)  # the image pages are the guest's too

    # Costs: conversions never copied, exits and hypercalls counted.
    c = vm.counters
    assert c["pkvm.copies"] == 0
    assert "pkvm.copies" in c
    assert c["pkvm.hvc.mem_share"] == 1 and c["pkvm.hvc.mem_unshare"] == 2
    assert c["pkvm.userspace_exits"] == 2
    assert c["pkvm.converted_pages"] == 2
    donated = c["pkvm.donations"]

    # Teardown: every page comes back to the host zeroed (I-2 checks each one as it returns).
    guest.teardown()
    assert vm.destroyed
    assert c["pkvm.reclaims"] == donated
    assert c["pkvm.zeroed_bytes"] == donated * PAGE
    # The host reclaims page by page (__pkvm_reclaim_dying_guest_page): each one is a guest
    # stage-2 unmap and a host stage-2 idmap; costs are counted per page even when the
    # model takes a run at once.  (+1 host stage-2 map: the share above.)
    assert c["pkvm.stage2_unmap"] == donated
    assert c["pkvm.host_stage2_map"] == donated + 1
    assert len(hyp.host) == 0  # the host owns everything again
    assert checker.checks["I-2"] == donated
    assert checker.checks["I-1"] >= donated
    assert checker.violations == []


def test_guest_fault_on_a_page_the_host_still_maps_exits_3_5(guest: Guest) -> None:
    guest.map.write(0, b"boot")
    with pytest.raises(MemoryFault) as info:
        guest.vcpu.access(GPA, 4)
    assert info.value.gpa == GPA and info.value.rule == "pKVM-3.5"
    assert pkvm_state(guest.vm).hvm.state(GPA >> 12).state == PageState.NOPAGE
    guest.map.madvise(uapi.MADV_DONTNEED, 0, PAGE)
    assert guest.vcpu.access(GPA, 4) == b"boot"


def test_checker_catches_a_host_mapping_of_a_private_page_i_1(
    guest: Guest, checker: IsolationChecker
) -> None:
    """The checker can fail: force the host table into a state the policy never produces."""
    guest.vcpu.access(GPA, 1)
    state = pkvm_state(guest.vm)
    pfn = guest.vm.gmem_pfn(GPA >> 12)
    assert pfn is not None
    # A broken policy that would let the host map a donated page.
    original = state.hyp.host_state
    state.hyp.host_state = lambda pfn: HOST_OWNED  # type: ignore[method-assign]
    checked = checker.checks["I-1"]
    try:
        # Reported when the host's access (the operation that mapped the page) ends.
        with pytest.raises(IsolationViolation, match="I-1: host maps gmem page 0x0 "):
            guest.map.read(0, 1)
        assert checker.violations == [
            f"I-1: host maps gmem page 0x0 (pfn {pfn:#x}) that a guest owns privately"
        ]
        assert checker.checks["I-1"] == checked + 1
    finally:
        state.hyp.host_state = original  # type: ignore[method-assign]
        checker.violations.clear()


def test_checker_leaves_hosts_of_other_backends_alone(checker: IsolationChecker) -> None:
    with guestmem.open("sw") as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        gmem = vm.create_guest_memfd(SIZE, uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED)
        with gmem.mmap(SIZE) as m:
            m.write(0, b"sw")
        gmem.close()
        vm.close()
    assert checker.checks["I-1"] == 0


def test_checker_catches_a_donation_of_a_host_mapped_page_i_1(
    guest: Guest, checker: IsolationChecker, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest.map.write(0, b"mapped")
    # A broken policy that would donate a page the host still maps.
    monkeypatch.setattr(policy, "host_mapped_gfn", lambda vm, gfn, npages=1: None)
    with pytest.raises(IsolationViolation, match=r"I-1: pfn .* is host-mapped but guest-private"):
        guest.vcpu.access(GPA, 1)
    assert len(checker.violations) == 1
    checker.violations.clear()
