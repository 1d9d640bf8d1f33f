"""The conformance kit against the built-in sw backend, both VM types."""

from __future__ import annotations

from guestmem import uapi
from guestmem.conformance import GmemConformance


class TestSwDefaultVm(GmemConformance):
    backend = "sw"
    vm_type = uapi.KVM_X86_DEFAULT_VM


class TestSwProtectedVm(GmemConformance):
    backend = "sw"
    vm_type = uapi.KVM_X86_SW_PROTECTED_VM
    private_access = True
