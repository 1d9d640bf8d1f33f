"""The core's conformance kit against both pKVM VM types, configured by the backend's own
``guestmem_conformance_options`` (its VMM driver and isolation checker)."""

from __future__ import annotations

from guestmem.conformance import kit_for
from guestmem_pkvm import abi


class TestPkvmDefaultVm(kit_for("pkvm", abi.KVM_VM_TYPE_ARM_DEFAULT)):
    """A normal arm64 VM under pKVM: the 6.18 guest_memfd rules."""


class TestPkvmProtectedVm(kit_for("pkvm", abi.KVM_VM_TYPE_ARM_PROTECTED)):
    """A protected VM: the same uAPI rules, and in-place conversions through MEM_SHARE /
    MEM_UNSHARE.  Its memory is private unless the guest shares it, so the kit's plain
    host/guest coherence test (M-7) does not apply: ``test_e2e`` covers it through MEM_SHARE.
    """
