"""Closed and destroyed objects: every SEV command and every guest-side instruction fails with
the kernel's errno (EBADF for a closed fd) before anything changes, and the host keeps no
ASID, page or RMP entry for it; host kernel stores take integers only, within one page."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import pytest
from snp_helpers import SnpVm, make_snp_vm

import guestmem
import guestmem_snp
from guestmem import KvmError, uapi
from guestmem.backend import view
from guestmem.conformance import kit_for
from guestmem.conformance.hostile import classify
from guestmem.errors import HypercallExit
from guestmem_snp.ghcb import SNP_PAGE_STATE_PRIVATE, PscEntry

PAGE = uapi.PAGE_SIZE


def _host_footprint(kvm: Any) -> tuple[Any, ...]:
    """What a leak would change: allocated host pages, the RMP, the ASIDs in use."""
    host = guestmem_snp.snp_host(kvm)
    asids = tuple(a for a in range(1, 1024) if host.asids.in_use(a))
    return view(kvm).counters, len(host.rmp), list(host.rmp.runs()), asids, kvm.host.allocated_pages


def _ebadf(call: Callable[[], Any]) -> None:
    with pytest.raises(KvmError) as info:
        call()
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize("destroyed", [False, True], ids=["closed", "destroyed"])
def test_sev_commands_on_a_closed_vm_are_ebadf_and_leak_nothing(destroyed: bool) -> None:
    """``kvm_vm_ioctl``: ``KVM_MEMORY_ENCRYPT_OP`` and ``KVM_ENABLE_CAP`` on a closed VM fd
    fail at ``fdget`` with EBADF; INIT2 takes no ASID, no firmware page, no RMP entry."""
    with guestmem.open("snp") as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_SNP_VM)
        gmem = vm.create_guest_memfd(PAGE)
        sev = guestmem_snp.sev(vm)
        vm.close()
        if destroyed:
            gmem.close()
        assert vm.destroyed == destroyed
        before = _host_footprint(kvm)
        for call in (
            sev.init2,
            sev.snp_launch_start,
            lambda: sev.launch_update_data(0, b"x" * PAGE),
            sev.snp_launch_finish,
            lambda: sev.enable_cap_exit_hypercall(1 << 12),
            lambda: guestmem_snp.sev(vm).init2(),
        ):
            _ebadf(call)
        assert _host_footprint(kvm) == before and sev.asid == 0


def test_guest_instructions_on_a_closed_vcpu_are_ebadf_and_change_nothing() -> None:
    """The guest side runs inside ``KVM_RUN`` of its vCPU: once the vCPU fd is closed,
    re-entry after an exit (``resume``), PVALIDATE and page-state changes are EBADF, the
    pending exit stays pending and the RMP is untouched."""
    snp: SnpVm = make_snp_vm()
    snp.private(0, 2 * PAGE)
    g = snp.guest
    with pytest.raises(HypercallExit):
        g.page_state_change([PscEntry(gfn=0x200, operation=SNP_PAGE_STATE_PRIVATE, pagesize=1)])
    pending = g.state.pending
    snp.vcpu.close()
    before = _host_footprint(snp.kvm), list(snp.rmp.runs())
    for call in (
        lambda: g.resume(0),
        lambda: g.pvalidate(0),
        lambda: g.pvalidate_range(0, 2 * PAGE),
        lambda: g.page_state_change([PscEntry(gfn=1, operation=SNP_PAGE_STATE_PRIVATE)]),
        lambda: g.read(0, 4),
        lambda: guestmem_snp.guest(snp.vcpu).pvalidate(PAGE),
    ):
        _ebadf(call)
    assert g.state.pending is pending
    assert (_host_footprint(snp.kvm), list(snp.rmp.runs())) == before
    assert snp.vm.gmem_pfn(0) is None or not snp.rmp.lookup(snp.pfn(0)).validated
    snp.vm.close()


@pytest.mark.parametrize("pfn", ["4096", 4096.0, None])
def test_host_kernel_write_takes_an_integer_pfn(pfn: Any) -> None:
    """A non-integer *pfn* is a TypeError naming it, before the host kernel touches a page:
    later host writes and the teardown work as ever."""
    snp = make_snp_vm()
    with pytest.raises(TypeError, match="pfn"):
        snp.sev.host_kernel_write(pfn, b"x")
    with pytest.raises(TypeError, match="offset"):
        snp.sev.host_kernel_write(4096, b"x", offset="0")
    free = view(snp.kvm).alloc(1)
    snp.sev.host_kernel_write(free, b"ok")
    assert view(snp.kvm).read(free, 0, 2) == b"ok"


@pytest.mark.parametrize(
    ("delta", "offset", "n"), [(0, -PAGE, 3), (0, PAGE - 1, 2), (0, PAGE, 1), (None, 0, 1)]
)
def test_host_kernel_write_outside_its_page_is_a_usage_error(delta: int | None, offset: int, n: int) -> None:
    """``host_kernel_write`` is one store into one page (a model-only helper, no errno):
    bytes not all within page *pfn* are ``HostWriteOutsidePage``, a ValueError, before
    anything is touched; the hostile fuzzer counts it as the outcome the backend declares
    (``hostile_outcomes``), never as a crash."""
    snp = make_snp_vm()
    page = view(snp.kvm).alloc(1)
    before = _host_footprint(snp.kvm)
    with pytest.raises(guestmem_snp.HostWriteOutsidePage) as info:
        snp.sev.host_kernel_write(-1 if delta is None else page + delta, b"w" * n, offset)
    assert isinstance(info.value, ValueError)
    assert _host_footprint(snp.kvm) == before and view(snp.kvm).is_zero(page)
    assert view(snp.kvm).crashed is None
    kit = kit_for("snp")
    assert classify(info.value, [], kit.hostile_outcomes) == ("verdict", "HostWriteOutsidePage")
    assert view(snp.kvm).crashed is None
    snp.vcpu.close()
    snp.vm.close()
    snp.gmem.close()
    snp.shared.close()
    assert snp.vm.destroyed


class _CloseGmemOnce:
    """Observer: the first call of its hook closes the VM's guest_memfd (another VMM thread)."""

    def __init__(self, gmem: Any) -> None:
        self.gmem: Any = gmem

    def close(self) -> None:
        if self.gmem is not None:
            gmem, self.gmem = self.gmem, None
            gmem.close()


@pytest.mark.parametrize("hook", ["fault", "gmem_prepare", "trace", "ownership_update"])
def test_a_guest_memfd_closed_while_pvalidate_faults_its_page_in_exits_and_leaks_nothing(hook: str) -> None:
    """PVALIDATE's NPT walk faults the page in while another thread closes the guest_memfd:
    the file's release zaps what the fault mapped, the walk faults again and leaves with the
    memory-fault exit of a released file (L-4); no RMP entry, page or ASID stays behind."""
    snp = make_snp_vm()
    snp.private(0, 8 * PAGE)
    closer = _CloseGmemOnce(snp.gmem)

    def impl(self: Any) -> None:
        closer.close()

    observer = type("Closer", (), {f"guestmem_{hook}": guestmem.hookimpl(impl)})()
    registry = guestmem.get_registry()
    registry.add_plugin(observer, distribution="test-closer")
    try:
        with pytest.raises(guestmem.MemoryFault) as info:
            snp.guest.pvalidate_range(4 * PAGE, 4 * PAGE)
    finally:
        registry.remove_plugin(observer)
    assert (info.value.errno, info.value.rule) == (errno.EFAULT, "L-4")
    assert snp.gmem.closed and snp.vm.mmu.invalidate_in_progress == 0
    snp.vcpu.close()
    snp.vm.close()
    snp.shared.close()
    host = guestmem_snp.snp_host(snp.kvm)
    assert snp.vm.destroyed and snp.kvm.host.allocated_pages == 0
    assert not [a for a in range(1, 1024) if host.asids.in_use(a)]
