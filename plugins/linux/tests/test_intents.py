"""The portable intents on the running kernel: what a DEFAULT VM can express."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import guestmem
from guestmem import uapi
from guestmem.backend import NotApplicable
from guestmem.guestvm import GuestVm
from guestmem_linux.testing import kvm_unavailable

MiB = 1 << 20


@pytest.fixture
def guest() -> Iterator[GuestVm]:
    reason = kvm_unavailable()
    if reason:
        pytest.skip(reason)
    with guestmem.open("linux") as kvm, GuestVm.launch(kvm, size=4 * MiB) as g:
        yield g


def test_every_kind_is_the_default_vm_with_a_note(guest: GuestVm) -> None:
    assert guest.vm_type.type == uapi.KVM_X86_DEFAULT_VM
    assert "shared loads and stores only" in guest.notes[0]
    assert guest.regions[0].in_place
    assert "private_mem" not in guest.capabilities and "populate" in guest.capabilities


def test_populate_then_the_guest_reads_it(guest: GuestVm) -> None:
    guest.populate(0x1000, b"kernel")
    assert guest.read(0x1000, 6) == b"kernel"
    guest.write(0x2000, b"guest")
    shared = guest.regions[0].shared
    assert shared is not None and shared.read(0x2000, 5) == b"guest"
    assert guest.touch(MiB, 16 * uapi.PAGE_SIZE) == 16


def test_what_the_default_vm_cannot_express(guest: GuestVm) -> None:
    with pytest.raises(NotApplicable, match="measurement"):
        guest.populate(0, b"x", measure=True)
    with pytest.raises(NotApplicable, match="no private memory"):
        guest.convert(0, uapi.PAGE_SIZE, private=True)
    with pytest.raises(NotApplicable, match="private access"):
        guest.read(0, 1, private=True)
    with pytest.raises(NotApplicable, match="reaches gpas below"):
        guest.read(4 << 30, 1)
    with pytest.raises(NotApplicable, match="no memory acceptance"):
        guest.accept(0, MiB)
    assert guest.counters() == {}
