"""Closed and destroyed objects: every ``KVM_TDX_*`` command and every instruction of the TD
fails with the kernel's errno (EBADF for a closed fd) before anything changes, and the host
keeps no KeyID, TD page, S-EPT or PAMT entry for it."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import pytest
from tdx_helpers import MIB, PAGE, make_td

import guestmem
import guestmem_tdx
from guestmem import KvmError, uapi
from guestmem.backend import view
from guestmem.errors import HypercallExit


def _host_footprint(kvm: Any) -> tuple[Any, ...]:
    """What a leak would change: counters, allocated host pages, the PAMT, the KeyIDs in use."""
    host = guestmem_tdx.tdx_host(kvm)
    pamt = list(host.module.pamt.items())
    return view(kvm).counters, kvm.host.allocated_pages, pamt, sorted(host.keyids.in_use)


def _ebadf(call: Callable[[], Any]) -> None:
    with pytest.raises(KvmError) as info:
        call()
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize("destroyed", [False, True], ids=["closed", "destroyed"])
def test_tdx_commands_on_a_closed_vm_are_ebadf_and_leak_nothing(destroyed: bool) -> None:
    """``kvm_vm_ioctl``: ``KVM_MEMORY_ENCRYPT_OP`` and ``KVM_ENABLE_CAP`` on a closed VM fd
    fail at ``fdget`` with EBADF; INIT_VM takes no KeyID, no TDR/TDCS page, no PAMT entry."""
    with guestmem.open("tdx") as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_TDX_VM)
        gmem = vm.create_guest_memfd(MIB)
        tdx = guestmem_tdx.tdx(vm)
        vm.close()
        if destroyed:
            gmem.close()
        assert vm.destroyed == destroyed
        before = _host_footprint(kvm)
        for call in (
            tdx.capabilities,
            tdx.init_vm,
            tdx.finalize,
            tdx.enable_cap_exit_hypercall,
            lambda: guestmem_tdx.tdx(vm).init_vm(),
        ):
            _ebadf(call)
        assert _host_footprint(kvm) == before and tdx.state.hkid < 0


def test_td_instructions_on_a_closed_vcpu_are_ebadf_and_change_nothing() -> None:
    """The TD's instructions run inside ``KVM_RUN`` of its vCPU (``kvm_vcpu_ioctl``): once
    the vCPU fd is closed, re-entry after an exit (``resume``), ACCEPT, MapGPA and accesses
    are EBADF, the pending exit stays pending and the S-EPT and PAMT are untouched; so is
    ``KVM_TDX_INIT_VCPU`` (``kvm_vcpu_ioctl``)."""
    td = make_td(4 * MIB, nvcpus=2, finalize=True)
    g = td.guest
    assert g.accept(0) == 0
    with pytest.raises(HypercallExit):
        g.map_gpa(MIB | g.shared_bit, MIB)
    pending = g.state.pending
    sept = td.tdx.td.leaves.copy()
    td.vcpu.close()
    before = _host_footprint(td.kvm)
    for call in (
        lambda: g.resume(0),
        lambda: g.accept(PAGE),
        lambda: g.accept_range(PAGE, 4 * PAGE),
        lambda: g.accept_memory(0, MIB),
        lambda: g.map_gpa(2 * MIB | g.shared_bit, PAGE),
        lambda: g.read(0, 4),
        lambda: g.write(0, b"x"),
        lambda: guestmem_tdx.guest(td.vcpu).accept(PAGE),
        lambda: td.tdx.init_vcpu(td.vcpu),
    ):
        _ebadf(call)
    assert g.state.pending is pending
    assert _host_footprint(td.kvm) == before and td.tdx.td.leaves == sept
    # the other vCPU still runs the TD
    other = guestmem_tdx.guest(td.vcpus[1])
    assert other.accept(PAGE) == 0 and other.read(PAGE, 4) == bytes(4)
