"""Gunyah's calls take integers and files, and a closed VM fd is EBADF (guestmem.cabi).

The ``/dev/gunyah`` structs are read as their C types (``struct gunyah_create_mem_args``,
``gunyah_vm_dtb_config``, ``gunyah_vm_boot_context``, ``gunyah_map_mem_args``): a
non-integer is a TypeError naming the field before anything changes, a wider value is
truncated.  The RM's RPCs take integer arguments.  The VM calls of a closed VM fd
(``GUNYAH_VM_MAP_MEM``, the driver's parcels, a run) are EBADF and change nothing.
"""

from __future__ import annotations

import errno
import re
from typing import Any

import pytest

from guestmem import KvmError
from guestmem_gunyah import abi, create_guest_mem, gunyah, gunyah_state, rm
from guestmem_gunyah.hyp import Hypervisor
from guestmem_gunyah.rm import ResourceManager

from .conftest import LEND, LENT_GPA, PAGE, SIZE, Guest, machine


def _typeerror(call: Any, name: str) -> None:
    with pytest.raises(TypeError, match=rf"^{re.escape(name)} must be"):
        call()


def test_the_vm_calls_take_integers_and_files(guest: Guest) -> None:
    gh, vm = guest.gh, guest.vm
    before = [(b.gfn, b.nr, b.flags) for b in gh.bindings], gh.status, machine(guest.kvm).rm.parcels.copy()
    for call, name in (
        (lambda: create_guest_mem(vm, float(SIZE)), "size"),
        (lambda: gh.set_dtb_config("0", PAGE), "guest_phys_addr"),
        (lambda: gh.set_boot_context(0, None), "value"),
        (lambda: gh.map_mem(guest.lent, LENT_GPA + 2 * SIZE, 0.0, PAGE, LEND), "offset"),
        (lambda: gh.map_mem(b"mem", LENT_GPA + 2 * SIZE, 0, PAGE, LEND), "guest_mem"),
        (lambda: gh.share_parcel(LENT_GPA, 1.5), "size"),
        (lambda: gh.touch(None, PAGE), "guest_addr"),
    ):
        _typeerror(call, name)
    after = [(b.gfn, b.nr, b.flags) for b in gh.bindings], gh.status, machine(guest.kvm).rm.parcels
    assert after == before
    gh.set_boot_context((1 << 32) + 1, 5)  # a __u32 reg
    assert gunyah_state(vm).exit_info["boot_context"] == [(1, 5)]


def test_the_rms_rpcs_take_integers() -> None:
    resource_manager = ResourceManager(Hypervisor())
    for call, name in (
        (lambda: resource_manager.vm_alloc_vmid(float(abi.VMID_HLOS)), "caller"),
        (lambda: resource_manager.mem_lend(abi.VMID_HLOS, [(3, "rw")], [(0x200000000, PAGE)]), "acl"),
        (lambda: resource_manager.mem_reclaim(abi.VMID_HLOS, 1, flags=None), "flags"),
    ):
        _typeerror(call, name)
    assert resource_manager.vm_alloc_vmid(abi.VMID_HLOS) == abi.VMID_DYNAMIC_BASE


def test_the_vm_calls_of_a_closed_vm_fd_are_ebadf(guest: Guest) -> None:
    gh = guest.gh
    gh.start()
    guest.vcpu.close()
    guest.vm.close()
    parcels = dict(rm(guest.kvm).parcels)
    for call in (
        lambda: gh.map_mem(guest.lent, LENT_GPA + 2 * SIZE, 0, PAGE, LEND),
        lambda: gh.share_parcel(LENT_GPA, PAGE),
        lambda: gh.touch(LENT_GPA, PAGE),
        lambda: gunyah(guest.vm).start(),
    ):
        with pytest.raises(KvmError) as info:
            call()
        assert info.value.errno == errno.EBADF
    assert rm(guest.kvm).parcels == parcels and guest.vm.mmu.mapped_pages() == 0


@pytest.mark.parametrize(("offset", "size", "pages"), [(0, PAGE - 1, 1), (PAGE - 1, 2, 2), (0x800, PAGE, 2)])
def test_touch_reaches_every_page_of_its_byte_range(guest: Guest, offset: int, size: int, pages: int) -> None:
    """A touch of part of a page touches that page (demand paging lends it)."""
    assert guest.gh.touch(LENT_GPA + 8 * PAGE + offset, size) == pages * PAGE
    assert guest.gh.state.mm.get((LENT_GPA >> 12) + 8 + pages - 1) is not None


@pytest.mark.parametrize(("addr", "size"), [(LENT_GPA, 0), (LENT_GPA, -PAGE), (-PAGE, 2 * PAGE)])
def test_a_touch_of_no_bytes_or_below_zero_is_einval(guest: Guest, addr: int, size: int) -> None:
    """As ``Vcpu.access`` answers such an access: EINVAL, before the VM starts."""
    with pytest.raises(KvmError) as info:
        guest.gh.touch(addr, size)
    assert (info.value.errno, info.value.rule) == (errno.EINVAL, "Gunyah-uapi")
    assert guest.gh.status == abi.VmStatus.NO_STATE
