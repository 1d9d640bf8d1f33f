"""The granule checker can fail: each invariant, broken on purpose in the RMM's tables, is
reported when the next operation finishes (the core reports observers' findings then)."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import GPA, PAGE, Realm

from guestmem import uapi
from guestmem.backend import view
from guestmem_cca import GranuleState, kvm_realm, realm_host
from guestmem_cca.invariants import GranuleViolation


def tables(kvm: Any) -> Any:
    return realm_host(view(kvm)).rmm


def test_the_checker_runs_on_every_operation(observers: Any, realm: Realm) -> None:
    granules, _ = observers
    before = granules.checks["operations"]
    realm.vcpu.access(GPA, data=b"x", private=True)
    assert granules.checks["operations"] > before


def test_g1_an_entry_on_a_granule_that_is_not_data(kvm: Any, realm: Realm) -> None:
    realm.vcpu.access(GPA, data=b"x", private=True)
    pfn = view(realm.vm).gmem_pfn(GPA >> 12)
    tables(kvm).granules.set(pfn, pfn + 1, GranuleState.DELEGATED)
    with pytest.raises(GranuleViolation, match="G-1"):
        realm.vcpu.access(GPA, 1, private=True)
    tables(kvm).granules.set(pfn, pfn + 1, GranuleState.DATA)


def test_g2_a_data_granule_nobody_maps(kvm: Any, realm: Realm) -> None:
    spare = view(kvm).alloc(1)
    tables(kvm).granules.set(spare, spare + 1, GranuleState.DATA)
    with pytest.raises(GranuleViolation, match=f"G-2.*{spare:#x}"):
        realm.vcpu.access(GPA, 1, private=True)
    tables(kvm).granules.erase(spare, spare + 1)
    view(kvm).free(spare, 1)


def test_g3_a_host_mapping_of_the_realm_pas(kvm: Any, realm: Realm) -> None:
    """A realm's normal sibling VM maps INIT_SHARED gmem; its page handed to the Realm PAS
    behind the host's back is caught while mapped."""
    vm = kvm.create_vm(0)
    gmem = vm.create_guest_memfd(PAGE, uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, PAGE, 0, gmem, 0)
    mapping = gmem.mmap(PAGE)
    mapping.write(0, b"host")
    pfn = view(gmem).pfn(0)
    tables(kvm).granules.set(pfn, pfn + 1, GranuleState.DELEGATED)
    with pytest.raises(GranuleViolation, match="G-3"):
        mapping.read(0, 1)
    tables(kvm).granules.erase(pfn, pfn + 1)
    mapping.close()
    gmem.close()
    vm.close()


def test_g4_a_table_granule_of_no_realm(kvm: Any, realm: Realm) -> None:
    known = tables(kvm).realms[kvm_realm(realm.vm).rd].tables
    saved = dict(known)
    known.clear()
    rtt = next(iter(saved.values()))
    with pytest.raises(GranuleViolation, match=f"G-4 after .*: RTT granule {rtt >> 12:#x}"):
        realm.vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD)  # any operation: nothing else changes
    known.update(saved)
