"""Testing a VMM's conversion handler on every guestmem backend.

A VMM answers a guest's conversion request the way its architecture asks: on x86
(KVM_X86_SW_PROTECTED_VM, SEV-SNP, TDX) KVM exits with ``KVM_HC_MAP_GPA_RANGE`` (the guest
asked) or ``KVM_EXIT_MEMORY_FAULT`` (the guest touched the other side), and the VMM sets
the memory attributes and discards the side the guest left; on pKVM the hypervisor
converts in place and only tells the VMM; a Gunyah guest converts nothing (its RAM is lent
or shared for good), so the tests needing a conversion skip there with that reason.
``MyConversionHandler`` is the code under test: write it the way your VMM does (or call
into your VMM's own code), hand it to ``guestmem_vm(handle_exits=...)``, and guestmem
drives the guest side of each backend: GHCB page-state changes and PVALIDATE on SNP, MapGPA
and ACCEPT on TDX, MEM_SHARE/MEM_UNSHARE on pKVM...

Run it with ``pytest examples/vmm-testing`` (every installed model backend) or narrow it:
``pytest examples/vmm-testing --guestmem-backend sw``.  A backend without guest
conversions (the real kernel's DEFAULT VM) skips with the reason.
"""

from __future__ import annotations

from typing import Any

import pytest

from guestmem import HypercallExit, MemoryFault, uapi

PAGE = uapi.PAGE_SIZE
MiB = 1 << 20
PUNCH = uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE


class MyConversionHandler:
    """A VMM's conversion exits, handled as QEMU's ``kvm_convert_memory()`` does."""

    def __init__(self, guest: Any) -> None:
        self.guest = guest  # guestmem.guestvm.GuestVm: its vm, regions (gmem + shared side)
        self.conversions: list[tuple[int, int, bool]] = []

    def handle_hypercall(self, exit: HypercallExit, vcpu: Any) -> int:  # noqa: A002
        if exit.nr == uapi.KVM_HC_MAP_GPA_RANGE:
            gpa, npages, attributes = exit.args[:3]
            self.convert(gpa, npages * PAGE, bool(attributes & uapi.KVM_MAP_GPA_RANGE_ENCRYPTED))
            return 0  # run->hypercall.ret
        # pKVM: MEM_SHARE/MEM_UNSHARE already happened in place; the exit only tells us.
        return int(getattr(exit, "ret", 0))

    def handle_memory_fault(self, exit: MemoryFault, vcpu: Any) -> None:  # noqa: A002
        self.convert(exit.gpa, exit.size, exit.is_private)

    def convert(self, gpa: int, size: int, private: bool) -> None:
        self.guest.vm.set_memory_attributes(gpa, size, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0)
        region = self.guest.region(gpa)
        offset = gpa - region.gpa
        if private:  # the shared copy goes: shared anonymous memory needs MADV_REMOVE
            region.shared.madvise(uapi.MADV_REMOVE, offset, size)
        else:  # the private copy goes: punch it out of guest_memfd
            region.gmem.fallocate(PUNCH, region.gmem_offset + offset, size)
        self.conversions.append((gpa, size, private))


@pytest.mark.guestmem_requires("conversion")
def test_a_bounce_buffer_round_trip(guestmem_vm: Any) -> None:
    guest = guestmem_vm(vm_type="private", size=4 * MiB, handle_exits=MyConversionHandler)
    if "acceptance" in guest.capabilities:  # SNP, TDX: accept before use (a conversion too)
        guest.accept(MiB, MiB)
    accepted = len(guest.vmm.conversions)
    guest.write(MiB, b"secret")
    guest.convert(MiB, PAGE, private=False)  # the guest shares a bounce buffer
    guest.write(MiB, b"bounce")
    region = guest.region(MiB)
    assert region.shared.read(MiB - region.gpa, 6) == b"bounce"  # the host sees it
    if "in_place_conversion" in guest.capabilities:
        # pKVM refuses to unshare a page the host still maps: drop the mapping first.
        region.shared.madvise(uapi.MADV_DONTNEED, MiB - region.gpa, PAGE)
    guest.convert(MiB, PAGE, private=True)  # and takes it back
    if "in_place_conversion" in guest.capabilities:
        assert guest.read(MiB, 6) == b"bounce"  # one page, two states
        assert guest.vmm.conversions == []  # nothing for the VMM to do
    else:
        assert guest.read(MiB, 6) == bytes(6)  # discarded both ways: a fresh page
        assert guest.vmm.conversions[accepted:] == [(MiB, PAGE, False), (MiB, PAGE, True)]


@pytest.mark.guestmem_requires("memory_attributes", "conversion")
def test_an_implicit_conversion_goes_through_the_handler(guestmem_vm: Any) -> None:
    guest = guestmem_vm(vm_type="private", size=4 * MiB, handle_exits=MyConversionHandler)
    assert guest.read(2 * MiB, 4, private=False) == bytes(4)  # KVM_EXIT_MEMORY_FAULT, handled
    assert guest.vmm.conversions == [(2 * MiB, PAGE, False)]


@pytest.mark.guestmem_requires("private_access")
def test_private_memory_in_use_asks_nothing_of_the_handler(guestmem_vm: Any) -> None:
    """A guest using the memory it was launched with (accepted where it must be: SNP's
    page-state changes reach the handler as conversions to private) takes no conversion
    exit for its loads and stores, and the host's side of that memory does not change."""
    guest = guestmem_vm(vm_type="private", size=4 * MiB, handle_exits=MyConversionHandler)
    if "acceptance" in guest.capabilities:
        guest.accept(MiB, MiB)
    accepted = list(guest.vmm.conversions)
    assert all(private for _, _, private in accepted)
    guest.write(MiB + 0x40, b"private")
    assert guest.read(MiB + 0x40, 7) == b"private"
    assert guest.vmm.conversions == accepted
    region = guest.region(MiB)
    if not region.in_place:  # x86: the shared side is another page, never written
        assert region.shared.read(MiB + 0x40 - region.gpa, 7) == bytes(7)
