"""The portable intents on a realm (``guestmem_cca.intents.CcaIntents``): created before its
RECs, RIPAS RAM, populated and measured, activated; conversions through RSI_IPA_STATE_SET
answered by QEMU's loop; no acceptance."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import guestmem
from guestmem import uapi
from guestmem.backend import NotApplicable
from guestmem.guestvm import GuestVm
from guestmem_cca import RealmAbort, kvm_realm
from guestmem_cca.rmi import KVM_VM_TYPE_ARM_NORMAL, KVM_VM_TYPE_ARM_REALM

PAGE = uapi.PAGE_SIZE
MiB = 1 << 20


@pytest.fixture
def realm() -> Iterator[GuestVm]:
    with guestmem.open("cca") as kvm, GuestVm.launch(kvm, size=MiB) as g:
        yield g


def test_a_private_vm_is_a_realm_launched_as_kvmtool_does(realm: GuestVm) -> None:
    state = kvm_realm(realm.vm)
    assert realm.vm_type.type == KVM_VM_TYPE_ARM_REALM
    assert state.state == "NEW" and realm.notes == ["realm created (RIPAS RAM over 1 region(s))"]
    assert realm.populate(0, b"realm kernel") == "DATA_CREATE of 1 granule(s), measured"
    assert realm.populate(PAGE, b"config", measure=False).endswith("unmeasured")
    assert realm.finish_launch() == "realm activated" and state.state == "ACTIVE"
    assert realm.read(0, 12) == b"realm kernel"
    assert realm.capabilities >= {"private_mem", "conversion", "populate", "launch_measurement"}
    assert "acceptance" not in realm.capabilities
    with pytest.raises(NotApplicable, match="accepts nothing"):
        realm.accept(0, PAGE)


def test_conversions_are_rsi_calls_answered_by_the_vmm(realm: GuestVm) -> None:
    """To shared and back: each RSI_IPA_STATE_SET exits once, the VMM converts, the realm
    re-enters; destructive both ways."""
    realm.write(0x3000, b"secret")
    assert realm.convert(0x2000, 2 * PAGE, private=False) == "1 RSI_IPA_STATE_SET call(s) to EMPTY"
    assert realm.read(0x3000, 6, private=False) == bytes(6)
    realm.write(0x3000, b"shared", private=False)
    assert realm.convert(0x3000, PAGE, private=True, coalesce=False) == "1 RSI_IPA_STATE_SET call(s) to RAM"
    assert realm.read(0x3000, 6) == bytes(6)
    assert realm.vmm is not None and realm.vmm.handled["memory_fault"] == 2
    costs = realm.costs()
    assert costs["exits"] == 2 and costs["guest_instructions"] == 2
    assert costs["hw_table_updates"] > 0 and costs["firmware_commands"] > 0
    assert realm.intents.cost_details(realm.counters())["DATA_DESTROY"] >= 1


def test_a_page_the_host_took_away_aborts_the_realm(realm: GuestVm) -> None:
    realm.write(0x4000, b"secret")
    region = realm.regions[0]
    assert region.gmem is not None
    region.gmem.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, 0x4000, PAGE)
    with pytest.raises(RealmAbort):
        realm.read(0x4000, 6)


def test_a_default_vm_is_a_normal_arm64_vm() -> None:
    with guestmem.open("cca") as kvm, GuestVm.launch(kvm, kind="default", size=MiB) as g:
        assert g.vm_type.type == KVM_VM_TYPE_ARM_NORMAL
        g.write(0x1000, b"plain")
        assert g.read(0x1000, 5) == b"plain"
        with pytest.raises(NotApplicable):
            g.convert(0, PAGE, private=True)
