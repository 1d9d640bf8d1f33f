"""A realm through the KVM uAPI of the CCA series, against ``arch/arm64/kvm/rme.c`` (and
``rme-exit.c``) of gwshan/linux: its lifecycle (NEW, ACTIVE, SYSTEM_OFF), population and
measurement, faults, RIPAS changes through RSI, memslot changes, the host's accesses and
teardown.  The granule checker, the core's invariant checker and the ownership ledger watch
every test (conftest)."""

from __future__ import annotations

import errno
import re
from typing import Any

import pytest
from conftest import GPA, PAGE, SIZE, Realm, rme

import guestmem
from guestmem import uapi
from guestmem.backend import Owner, view
from guestmem.conformance import OwnershipLedger, allocated, check_released
from guestmem_cca import GranuleState, RealmAbort, RealmState, Ripas, kvm_realm, populate, realm_host
from guestmem_cca.guest import RealmGuest
from guestmem_cca.rmi import (
    KVM_CAP_ARM_RME,
    KVM_CAP_ARM_RME_ACTIVATE_REALM,
    KVM_CAP_ARM_RME_CONFIG_REALM,
    KVM_CAP_ARM_RME_CREATE_REALM,
    KVM_CAP_ARM_RME_INIT_RIPAS_REALM,
    KVM_CAP_ARM_RME_POPULATE_REALM,
    KVM_VM_TYPE_ARM_NORMAL,
    KVM_VM_TYPE_ARM_REALM,
    PSCI_SYSTEM_OFF,
    RSI_ACCEPT,
    RSI_CHANGE_DESTROYED,
    RSI_ERROR_INPUT,
    RSI_NO_CHANGE_DESTROYED,
    RSI_REJECT,
    RSI_SUCCESS,
    SMC_RSI_IPA_STATE_SET,
)

PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE


def rmm(kvm: Any) -> Any:
    return realm_host(view(kvm)).rmm


def granule(kvm: Any, vm: Any, gpa: int) -> GranuleState:
    """The state of the granule guest_memfd holds for *gpa*."""
    pfn = view(vm).gmem_pfn(gpa >> 12)
    assert pfn is not None
    state: GranuleState = rmm(kvm).state(pfn << 12)
    return state


def expect(err: int, fn: Any, *args: Any) -> None:
    with pytest.raises(guestmem.KvmError) as info:
        fn(*args)
    assert info.value.errno == err, info.value


# --- creation: kvm_create_realm, realm_create_rd, kvm_rme_config_realm ------------------------------
def test_create_realm_delegates_the_rd_and_root_rtt(kvm: Any, observers: Any) -> None:
    _, ledger = observers
    vm = kvm.create_vm(KVM_VM_TYPE_ARM_REALM)
    realm = kvm_realm(vm)
    assert realm.state == "NONE"
    rme(vm, KVM_CAP_ARM_RME_CONFIG_REALM, 1, 1)  # ARM_RME_CONFIG_HASH_ALGO, SHA512
    rme(vm, KVM_CAP_ARM_RME_CREATE_REALM)
    assert realm.state == "NEW" and realm.hash_algo == 1
    machine = rmm(kvm)
    assert (machine.state(realm.rd), machine.state(realm.root)) == (GranuleState.RD, GranuleState.RTT)
    assert machine.realms[realm.rd].state is RealmState.NEW
    held = {(start, owner) for _, start, _, owner in ledger.held(kvm)}
    assert (realm.rd >> 12, Owner.HYPERVISOR) in held
    expect(errno.EEXIST, rme, vm, KVM_CAP_ARM_RME_CREATE_REALM)
    expect(errno.EBUSY, rme, vm, KVM_CAP_ARM_RME_CONFIG_REALM, 1, 0)
    vm.close()


def test_config_rejects_unknown_items(kvm: Any) -> None:
    vm = kvm.create_vm(KVM_VM_TYPE_ARM_REALM)
    expect(errno.EINVAL, rme, vm, KVM_CAP_ARM_RME_CONFIG_REALM, 1, 7)  # hash algorithm
    expect(errno.EINVAL, rme, vm, KVM_CAP_ARM_RME_CONFIG_REALM, 9, 0)  # configuration item
    expect(errno.EINVAL, rme, vm, 42)  # command
    vm.close()


def test_rme_commands_need_a_realm(kvm: Any) -> None:
    """``kvm_realm_enable_cap``: EINVAL on a VM that is no realm; the host reports
    KVM_CAP_ARM_RME and the arm64 answers of the x86-only capabilities."""
    vm = kvm.create_vm(KVM_VM_TYPE_ARM_NORMAL)
    expect(errno.EINVAL, rme, vm, KVM_CAP_ARM_RME_CREATE_REALM)
    assert kvm.check_extension(KVM_CAP_ARM_RME) == 1
    assert (
        kvm.check_extension(uapi.KVM_CAP_VM_TYPES),
        vm.check_extension(uapi.KVM_CAP_PRE_FAULT_MEMORY),
    ) == (0, 0)
    vm.close()


# --- RECs: kvm_create_rec, kvm_rec_pre_enter ----------------------------------------------------------------
def test_recs_exist_while_the_realm_is_new(kvm: Any) -> None:
    vm = kvm.create_vm(KVM_VM_TYPE_ARM_REALM)
    early = vm.create_vcpu(0)  # before the realm: its REC comes with CREATE_REALM
    realm = kvm_realm(vm)
    assert realm.recs == {}
    rme(vm, KVM_CAP_ARM_RME_CREATE_REALM)
    assert rmm(kvm).state(realm.recs[0].addr) is GranuleState.REC
    assert rmm(kvm).state(realm.recs[0].aux[0]) is GranuleState.REC_AUX
    vm.create_vcpu(1)
    rme(vm, KVM_CAP_ARM_RME_ACTIVATE_REALM)
    expect(errno.ENOENT, vm.create_vcpu, 2)  # kvm_create_rec: the realm is not NEW
    assert sorted(realm.recs) == [0, 1]
    early.close()
    vm.close()


def test_a_rec_runs_only_in_an_active_realm(kvm: Any) -> None:
    r = Realm(kvm, activate=False)
    expect(errno.EINVAL, r.vcpu.access, GPA, 1)  # kvm_rec_pre_enter
    rme(r.vm, KVM_CAP_ARM_RME_ACTIVATE_REALM)
    assert r.vcpu.access(GPA, 4, private=True) == bytes(4)
    expect(errno.EINVAL, rme, r.vm, KVM_CAP_ARM_RME_ACTIVATE_REALM)  # kvm_activate_realm: not NEW
    expect(errno.EPERM, rme, r.vm, KVM_CAP_ARM_RME_INIT_RIPAS_REALM, GPA, PAGE)
    r.close()


def test_system_off_ends_the_realm(realm: Realm) -> None:
    """PSCI SYSTEM_OFF: the RMM's realm is SYSTEM_OFF, RMI_REC_ENTER answers
    RMI_ERROR_REALM and KVM_RUN fails."""
    assert realm.vcpu.hypercall(PSCI_SYSTEM_OFF) == 0
    assert kvm_realm(realm.vm).state == "SYSTEM_OFF"
    expect(errno.EINVAL, realm.vcpu.access, GPA, 1)


# --- population: kvm_populate_realm, realm_create_protected_data_page ---------------------------------------
def test_populate_loads_and_measures_before_activation(kvm: Any) -> None:
    r = Realm(kvm, activate=False)
    realm = kvm_realm(r.vm)
    rim = rmm(kvm).realms[realm.rd].rim
    image = b"realm firmware " * 400  # two pages
    assert populate(r.vm, GPA, image) == 2
    measured = rmm(kvm).realms[realm.rd].rim
    assert measured != rim
    assert granule(kvm, r.vm, GPA) is GranuleState.DATA
    assert populate(r.vm, GPA + 2 * PAGE, image, measure=False) == 2
    assert rmm(kvm).realms[realm.rd].rim != measured
    assert r.vm.counters["cca.measured_pages"] == 2 and r.vm.counters["cca.data_pages"] == 2
    with pytest.raises(guestmem.KvmError) as info:  # already prepared (P-4)
        populate(r.vm, GPA, image)
    assert info.value.errno == errno.EEXIST
    expect(errno.EINVAL, rme, r.vm, KVM_CAP_ARM_RME_POPULATE_REALM, GPA, PAGE)
    rme(r.vm, KVM_CAP_ARM_RME_ACTIVATE_REALM)
    assert r.vcpu.access(GPA, 15, private=True) == b"realm firmware "
    expect(errno.EPERM, populate, r.vm, GPA + 4 * PAGE, image)
    r.close()


def test_the_realm_calls_take_integers_and_bytes_and_a_closed_vm_is_ebadf(kvm: Any) -> None:
    """``populate``'s *base* is a ``__u64`` and its data bytes-like, an RSI call's arguments
    registers: a TypeError naming the argument, nothing populated.  ``populate`` is a VM
    ioctl: EBADF once the VM fd is closed (the guest_memfd keeps the VM alive)."""
    r = Realm(kvm, activate=False)
    guest = RealmGuest(r.vcpu)
    for call, name in (
        (lambda: populate(r.vm, float(GPA), b"image"), "base"),
        (lambda: populate(r.vm, GPA, "image"), "data"),
        (lambda: guest.set_ipa_state(GPA, GPA + PAGE, 1.0), "ripas"),
        (lambda: guest.set_ipa_state(GPA, None, Ripas.EMPTY), "args[1]"),
    ):
        with pytest.raises(TypeError, match=rf"^{re.escape(name)} must be"):
            call()
    assert view(r.vm).gmem_pfn(GPA >> 12) is None  # nothing populated
    assert populate(r.vm, GPA, bytearray(b"image")) == 1
    r.vcpu.close()
    r.vm.close()
    counters = dict(r.vm.counters)
    with pytest.raises(guestmem.KvmError) as info:
        populate(r.vm, GPA + PAGE, b"late")
    assert info.value.errno == errno.EBADF and dict(r.vm.counters) == counters
    r.shared.close()
    r.gmem.close()


# --- faults: realm_map_protected, realm_map_non_secure ------------------------------------------------------
def test_a_private_fault_delegates_the_page_and_makes_it_the_realms(kvm: Any, realm: Realm) -> None:
    realm.vcpu.access(GPA + 3 * PAGE, data=b"secret", private=True)
    assert granule(kvm, realm.vm, GPA + 3 * PAGE) is GranuleState.DATA
    counters = realm.vm.counters
    assert counters["cca.rmi.data_create_unknown"] == 1 and counters["cca.rmi.granule_delegate"] >= 1
    entry = rmm(kvm).realms[kvm_realm(realm.vm).rd].entry(GPA + 3 * PAGE)
    assert entry[2] is Ripas.RAM and entry[1] == view(realm.vm).gmem_pfn((GPA >> 12) + 3) << 12
    assert realm.vcpu.access(GPA + 3 * PAGE, 6, private=True) == b"secret"


def test_the_host_never_reaches_a_delegated_granule(kvm: Any, realm: Realm) -> None:
    """gmem mapping: SIGBUS; the host kernel through its direct map: a Granule Protection
    Fault that takes the host down."""
    realm.vcpu.access(GPA, data=b"secret", private=True)
    pfn = view(realm.vm).gmem_pfn(GPA >> 12)
    probe = realm.vm.create_guest_memfd(PAGE, uapi.GUEST_MEMFD_FLAG_MMAP)
    with probe.mmap(PAGE) as m, pytest.raises(guestmem.HostSigbus):
        m.read(0, 1)
    probe.close()
    with pytest.raises(guestmem.HostCrash, match="Granule Protection Fault"):
        view(kvm).kernel_write(pfn, 0, b"x")


def test_an_access_to_an_ipa_without_ram_ripas_aborts_in_the_realm(kvm: Any, realm: Realm) -> None:
    """The RMM injects a synchronous external abort: the host sees no fault and no page is
    delegated."""
    extra = realm.vm.create_guest_memfd(4 * PAGE)
    shared = kvm.mmap_anonymous(4 * PAGE)
    realm.vm.set_user_memory_region2(
        1, uapi.KVM_MEM_GUEST_MEMFD, GPA + SIZE, 4 * PAGE, shared.address, extra, 0
    )
    realm.vm.set_memory_attributes(GPA + SIZE, 4 * PAGE, PRIVATE)
    with pytest.raises(RealmAbort, match="RIPAS is EMPTY"):
        realm.vcpu.access(GPA + SIZE, 1, private=True)
    assert realm.vm.counters["cca.realm_aborts"] == 1
    pfn = view(realm.vm).gmem_pfn((GPA + SIZE) >> 12)
    assert pfn is None or rmm(kvm).state(pfn << 12) is GranuleState.NS
    realm.vcpu.close()
    realm.vm.close()
    extra.close()
    shared.close()


def test_a_shared_access_maps_the_unprotected_alias(kvm: Any, realm: Realm) -> None:
    """RMI_RTT_MAP_UNPROTECTED at ``ipa | BIT(ia_bits - 1)``; munmap of the VMM's memory
    unmaps it again (RMI_RTT_UNMAP_UNPROTECTED)."""
    realm.vm.set_memory_attributes(GPA + PAGE, PAGE, 0)
    realm.shared.write(PAGE, b"bounce")
    assert realm.vcpu.access(GPA + PAGE, 6, private=False) == b"bounce"
    unprotected = rmm(kvm).realms[kvm_realm(realm.vm).rd].unprotected
    assert unprotected.get((GPA + PAGE) >> 12 | 1 << 27) is not None
    realm.shared.close()  # the mmu notifier: kvm_unmap_gfn_range, KVM_FILTER_SHARED
    assert not unprotected
    assert realm.vm.counters["cca.rmi.rtt_unmap_unprotected"] == 1


# --- RIPAS changes: rec_exit_ripas_change, kvm_complete_ripas_change, realm_set_ipa_state -------------------
def test_a_ripas_change_exits_to_the_vmm_and_completes_at_reentry(kvm: Any, realm: Realm) -> None:
    guest = RealmGuest(realm.vcpu)
    realm.vcpu.access(GPA + 2 * PAGE, data=b"secret", private=True)
    with pytest.raises(guestmem.MemoryFault) as info:
        guest.set_ipa_state(GPA + 2 * PAGE, GPA + 3 * PAGE, Ripas.EMPTY)
    assert (info.value.gpa, info.value.size, info.value.flags) == (GPA + 2 * PAGE, PAGE, 0)
    # The VMM converts (QEMU's kvm_convert_memory): attributes, then the private copy goes.
    realm.vm.set_memory_attributes(GPA + 2 * PAGE, PAGE, 0)
    realm.gmem.fallocate(PUNCH, 2 * PAGE, PAGE)
    assert guest.set_ipa_state(GPA + 2 * PAGE, GPA + 3 * PAGE, Ripas.EMPTY) == RSI_SUCCESS
    assert guest.returned() == (RSI_SUCCESS, GPA + 3 * PAGE, RSI_ACCEPT)
    assert kvm_realm(realm.vm).ripas((GPA >> 12) + 2) is Ripas.EMPTY
    assert realm.vcpu.access(GPA + 2 * PAGE, 6, private=False) == bytes(6)
    # And back: the exit is private this time.
    with pytest.raises(guestmem.MemoryFault) as info:
        guest.set_ipa_state(GPA + 2 * PAGE, GPA + 3 * PAGE, Ripas.RAM)
    assert info.value.flags == uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE
    realm.vm.set_memory_attributes(GPA + 2 * PAGE, PAGE, PRIVATE)
    assert guest.set_ipa_state(GPA + 2 * PAGE, GPA + 3 * PAGE, Ripas.RAM) == RSI_SUCCESS
    assert realm.vcpu.access(GPA + 2 * PAGE, 6, private=True) == bytes(6)  # destructive
    assert realm.vm.counters["cca.ripas_change_exits"] == 2 and realm.vm.counters["cca.ripas_changes"] == 2


def test_ripas_empty_destroys_what_the_vmm_did_not_punch(kvm: Any, realm: Realm) -> None:
    """``realm_set_ipa_state``: RIPAS EMPTY unmaps the private range itself (DATA_DESTROY,
    UNDELEGATE): the page is the host's again, zeroed."""
    realm.vcpu.access(GPA, data=b"secret", private=True)
    pfn = view(realm.vm).gmem_pfn(GPA >> 12)
    guest = RealmGuest(realm.vcpu)
    with pytest.raises(guestmem.MemoryFault):
        guest.set_ipa_state(GPA, GPA + PAGE, Ripas.EMPTY)
    realm.vm.set_memory_attributes(GPA, PAGE, 0)
    assert guest.set_ipa_state(GPA, GPA + PAGE, Ripas.EMPTY) == RSI_SUCCESS
    assert pfn is not None and rmm(kvm).state(pfn << 12) is GranuleState.NS
    assert view(kvm).read(pfn, 0, 6) == bytes(6)


def test_ripas_empty_the_vmm_never_answered_unmaps_the_private_leaves(kvm: Any, realm: Realm) -> None:
    """A RIPAS change to EMPTY the VMM did not carry out (no conversion: the attributes stay
    private) is completed at the next entry all the same (``kvm_complete_ripas_change``):
    DATA_DESTROY takes the RTT entries, so the core's private leaves that mirror them go
    too, and the realm's next private access there aborts (RIPAS EMPTY)."""
    realm.vcpu.access(GPA + PAGE, data=b"secret", private=True)
    guest = RealmGuest(realm.vcpu)
    with pytest.raises(guestmem.MemoryFault):
        guest.set_ipa_state(GPA, GPA + 4 * PAGE, Ripas.EMPTY)
    assert realm.vcpu.access(GPA + 8 * PAGE, 1, private=True) == b"\0"  # KVM_RUN: completed
    assert not [leaf for leaf in view(realm.vm).leaves((GPA >> 12), (GPA >> 12) + 4) if leaf.private]
    assert kvm_realm(realm.vm).ripas((GPA >> 12) + 1) is Ripas.EMPTY
    with pytest.raises(RealmAbort):
        realm.vcpu.access(GPA + PAGE, 6, private=True)


@pytest.mark.parametrize(
    "args",
    [
        (GPA + 8, GPA + PAGE, 1, 0),  # unaligned base
        (GPA + PAGE, GPA, 1, 0),  # top <= base
        (GPA, GPA + PAGE, 2, 0),  # DESTROYED is no RIPAS a realm asks for
        (GPA, GPA + PAGE, 1, 4),  # flags
        (1 << 39, (1 << 39) + PAGE, 1, 0),  # outside the PAR
    ],
)
def test_bad_rsi_arguments_are_answered_by_the_rmm(realm: Realm, args: tuple[int, ...]) -> None:
    """``handle_rsi_ipa_state_set``: RSI_ERROR_INPUT to the realm, no exit to the host."""
    assert realm.vcpu.hypercall(SMC_RSI_IPA_STATE_SET, *args) == RSI_ERROR_INPUT
    assert realm.vm.counters["cca.ripas_change_exits"] == 0


# --- memslot changes: kvm_realm_unmap_range -----------------------------------------------------------------
def test_a_memslot_change_destroys_private_pages_until_the_realm_accepts_them(kvm: Any, realm: Realm) -> None:
    realm.vcpu.access(GPA + PAGE, data=b"secret", private=True)
    pfn = view(realm.vm).gmem_pfn((GPA >> 12) + 1)
    realm.vm.set_user_memory_region2(0, 0, GPA, 0, 0)  # delete: DATA_DESTROY + UNDELEGATE
    assert pfn is not None and rmm(kvm).state(pfn << 12) is GranuleState.NS
    realm.vm.set_user_memory_region2(
        0, uapi.KVM_MEM_GUEST_MEMFD, GPA, SIZE, realm.shared.address, realm.gmem, 0
    )
    assert kvm_realm(realm.vm).ripas((GPA >> 12) + 1) is Ripas.DESTROYED
    with pytest.raises(RealmAbort, match="DESTROYED"):
        realm.vcpu.access(GPA + PAGE, 1, private=True)
    guest = RealmGuest(realm.vcpu)
    # rsi_set_memory_range_protected_safe: no permission to change DESTROYED -> rejected.
    with pytest.raises(guestmem.MemoryFault):
        guest.set_ipa_state(GPA + PAGE, GPA + 2 * PAGE, Ripas.RAM, RSI_NO_CHANGE_DESTROYED)
    guest.set_ipa_state(GPA + PAGE, GPA + 2 * PAGE, Ripas.RAM, RSI_NO_CHANGE_DESTROYED)
    assert guest.returned() == (RSI_SUCCESS, GPA + PAGE, RSI_REJECT)
    assert realm.vm.counters["cca.ripas_change_failures"] == 1
    # With permission (rsi_set_memory_range_protected) the page is the realm's again, zeroed.
    with pytest.raises(guestmem.MemoryFault):
        guest.set_ipa_state(GPA + PAGE, GPA + 2 * PAGE, Ripas.RAM, RSI_CHANGE_DESTROYED)
    guest.set_ipa_state(GPA + PAGE, GPA + 2 * PAGE, Ripas.RAM, RSI_CHANGE_DESTROYED)
    assert guest.returned()[2] == RSI_ACCEPT
    assert realm.vcpu.access(GPA + PAGE, 6, private=True) == bytes(6)


# --- teardown: kvm_destroy_realm, kvm_destroy_rec, realm_tear_down_rtt_range --------------------------------
def test_teardown_gives_every_granule_and_page_back(kvm: Any, observers: Any) -> None:
    _, ledger = observers
    baseline = allocated(kvm)
    r = Realm(kvm, activate=False)
    populate(r.vm, GPA, b"boot" * 1024)
    rme(r.vm, KVM_CAP_ARM_RME_ACTIVATE_REALM)
    for page in range(1, 8):
        r.vcpu.access(GPA + page * PAGE, data=b"x", private=True)
    realm = kvm_realm(r.vm)
    r.close()
    assert realm.state == "DEAD"
    machine = rmm(kvm)
    assert not machine.granules and not machine.realms and not realm_host(view(kvm)).vmids
    check_released(kvm, ledger, baseline)
    counters = r.vm.counters
    assert counters["cca.rmi.realm_destroy"] == 1 and counters["cca.rmi.rec_destroy"] == 1
    assert counters["cca.rmi.rtt_destroy"] == counters["cca.rmi.rtt_create"] == 2
    assert counters.get("cca.leaked_granules", 0) == 0


def test_the_leak_check_sees_a_granule_the_rmm_keeps(kvm: Any, observers: Any) -> None:
    """A realm whose RD the RMM refuses to destroy (a REC it never got back) leaks its
    granules, as rme.c does; the leak check says so."""
    _, ledger = observers
    baseline = allocated(kvm)
    r = Realm(kvm)
    realm = kvm_realm(r.vm)
    realm.recs.clear()  # KVM forgets its REC: RMI_REALM_DESTROY answers RMI_ERROR_REALM
    r.close()
    assert r.vm.counters["cca.leaked_granules"] == 2
    with pytest.raises(AssertionError, match="ownership-released"):
        check_released(kvm, ledger, baseline)


def test_vm_fd_without_realm_leaves_nothing(kvm: Any, observers: Any) -> None:
    _, ledger = observers
    baseline = allocated(kvm)
    kvm.create_vm(KVM_VM_TYPE_ARM_REALM).close()
    check_released(kvm, ledger, baseline)
    assert isinstance(ledger, OwnershipLedger)
