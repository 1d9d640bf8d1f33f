"""The ownership ledger's cross-check (``private-leaf-owned``): a private leaf on a page a
table gives the host is a violation, unless another table holds the page now (TDX: an
S-EPT page-table page reclaimed, ``sept.nl`` -> host, and the same pfn given to a TD as
guest memory, ``pamt`` -> guest)."""

from __future__ import annotations

import pytest
from gmem_helpers import PRIVATE, gmem_slot

import guestmem
from guestmem import uapi
from guestmem.backend import Owner, OwnershipEvent, view
from guestmem.conformance import OwnershipLedger, check_ownership
from guestmem.invariants import InvariantViolation

PAGE = uapi.PAGE_SIZE


def _event(table: str, pfn: int, owner: Owner) -> OwnershipEvent:
    return OwnershipEvent(table, pfn, 1, None, owner, Owner.HOST, owner)


def test_a_page_another_table_holds_now_is_not_the_hosts() -> None:
    with guestmem.open("sw") as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem_slot(vm, 4 * PAGE)
        vm.set_memory_attributes(0, 4 * PAGE, PRIVATE)
        vm.create_vcpu(0).access(0, data=b"x", private=True)
        (leaf,) = view(vm).leaves()
        ledger = OwnershipLedger()
        host = view(kvm)
        ledger.guestmem_ownership_update(host, None, _event("sept.nl", leaf.pfn, Owner.HOST))
        with pytest.raises(InvariantViolation, match=r"private-leaf-owned.*sept\.nl"):
            check_ownership(vm, ledger)
        ledger.guestmem_ownership_update(host, None, _event("pamt", leaf.pfn, Owner.GUEST))
        check_ownership(vm, ledger)
        ledger.guestmem_ownership_update(host, None, _event("pamt", leaf.pfn, Owner.HOST))
        with pytest.raises(InvariantViolation, match="private-leaf-owned"):
            check_ownership(vm, ledger)
