"""The portable intents on pKVM: in-place share/unshare, host population, no acceptance."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

import guestmem
from guestmem import HostSigbus, KvmError, uapi
from guestmem.backend import NotApplicable
from guestmem.guestvm import GuestVm
from guestmem_pkvm import abi
from guestmem_pkvm.ownership import HANDLE_OFFSET
from guestmem_pkvm.policy import pkvm_state

MiB = 1 << 20
PAGE = uapi.PAGE_SIZE


@pytest.fixture
def guest() -> Iterator[GuestVm]:
    with guestmem.open("pkvm") as kvm, GuestVm.launch(kvm, size=4 * MiB) as g:
        yield g


def test_a_private_vm_is_protected_with_gmem_only_memory(guest: GuestVm) -> None:
    assert guest.vm_type.type == abi.KVM_VM_TYPE_ARM_PROTECTED
    assert pkvm_state(guest.vm).protected
    region = guest.regions[0]
    assert region.in_place and region.gmem is not None
    assert region.gmem.flags == uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
    assert guest.notes[0].startswith("pKVM protected VM: the hypervisor's VM")
    assert "in_place_conversion" in guest.capabilities and "acceptance" not in guest.capabilities
    state = pkvm_state(guest.vm)
    assert (state.handle, state.hvm) == (0, None)  # pkvm_create_hyp_vm waits for KVM_RUN
    guest.write(0x1000, b"x")
    assert (state.handle, state.vmid) == (HANDLE_OFFSET, 1)


def test_populate_writes_then_unmaps_and_the_first_fault_donates(guest: GuestVm) -> None:
    with pytest.raises(NotApplicable, match="pvmfw"):
        guest.populate(PAGE, b"x", measure=True)
    assert guest.populate(0, b"kernel").startswith("host wrote 1 page(s) and unmapped")
    assert guest.read(0, 6) == b"kernel"  # donated as is: no copy, no zeroing
    assert guest.counters()["pkvm.donations"] == 1


def test_share_is_in_place_and_unshare_is_refused_while_mapped(guest: GuestVm) -> None:
    guest.write(0x3000, b"secret")
    assert guest.convert(0x3000, PAGE, private=False) == "1 MEM_SHARE call(s), in place"
    shared = guest.regions[0].shared
    assert shared is not None and shared.read(0x3000, 6) == b"secret"  # contents kept
    with pytest.raises(KvmError) as exc:
        guest.convert(0x3000, PAGE, private=True)
    assert (exc.value.errno, exc.value.rule) == (errno.EAGAIN, "pKVM-3.3")
    shared.madvise(uapi.MADV_DONTNEED, 0x3000, PAGE)
    guest.convert(0x3000, PAGE, private=True)
    assert guest.read(0x3000, 6) == b"secret"
    with pytest.raises(HostSigbus):
        shared.read(0x3000, 1)


def test_a_range_share_takes_several_calls(guest: GuestVm) -> None:
    """The hypervisor's walk stops after 256 pages; the guest asks again for the rest."""
    assert guest.convert(0, 2 * MiB, private=False) == "2 MEM_SHARE call(s), in place"
    assert guest.convert(2 * MiB, 4 * PAGE, private=False, coalesce=False).startswith("4 ")


def test_a_fault_on_a_host_mapped_page_is_answered_by_unmapping(guest: GuestVm) -> None:
    shared = guest.regions[0].shared
    assert shared is not None
    shared.write(0x5000, b"late")  # the host maps the page after the launch
    assert guest.read(0x5000, 4) == b"late"  # pKVM-3.5 exit: the VMM unmaps, the vCPU reruns
    assert guest.vmm is not None and guest.vmm.handled["memory_fault"] == 1


def test_no_acceptance_on_pkvm(guest: GuestVm) -> None:
    with pytest.raises(NotApplicable, match="first touch"):
        guest.accept(0, MiB)


def test_costs_count_the_hypervisors_work(guest: GuestVm) -> None:
    guest.touch(0, 16 * PAGE)
    costs = guest.costs()
    assert costs["hw_table_updates"] >= 16 and costs["tlb_flushes"] >= 16


def test_cost_details_name_the_architectures_operations(guest: GuestVm) -> None:
    guest.touch(0, 4 * PAGE)
    details = guest.intents.cost_details(guest.counters())
    assert details == {"pKVM donations": 4, "pKVM reclaims": 0, "pKVM shares": 0}
