"""The core's conformance kit against the tdx host's VM types."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import guestmem_tdx
from guestmem import uapi
from guestmem.conformance import GmemConformance


class TestTdxDefaultVm(GmemConformance):
    """A normal VM on a TDX host: exactly the sw backend's 6.18 rules."""

    backend = "tdx"
    vm_type = uapi.KVM_X86_DEFAULT_VM


class TestTdxSwProtectedVm(GmemConformance):
    backend = "tdx"
    vm_type = uapi.KVM_X86_SW_PROTECTED_VM
    private_access = True


class TestTdxVm(GmemConformance):
    """A TD after KVM_TDX_INIT_VM: the same uAPI rules.  Its vCPUs run only after
    KVM_TDX_INIT_VCPU and FINALIZE and its private pages must be accepted, so the kit's
    plain guest accesses do not apply: ``test_e2e`` and ``test_guest`` cover them."""

    backend = "tdx"
    vm_type = uapi.KVM_X86_TDX_VM
    guest_access = False

    @pytest.fixture
    def vm(self, kvm: Any) -> Iterator[Any]:
        vm = kvm.create_vm(self.vm_type)
        guestmem_tdx.tdx(vm).init_vm()
        yield vm
        vm.close()
