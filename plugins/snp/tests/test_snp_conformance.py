"""The core's conformance kit against SNP VMs, launched and driven through the backend's
intents (INIT2, a launch, PVALIDATE and page-state changes:
:class:`guestmem_snp.intents.SnpIntents`), the RMP checker of its
``guestmem_conformance_options`` on every event."""

from __future__ import annotations

from guestmem import uapi
from guestmem.conformance import kit_for


class TestSnpVm(kit_for("snp", uapi.KVM_X86_SNP_VM)):
    """Linux 6.18 on an SEV-SNP host: 4 KiB RMP entries, destructive conversions."""


class TestSnpHugepageVm(kit_for("snp-hugepage", uapi.KVM_X86_SNP_VM)):
    """The hugepage guest_memfd series: order-9 folios, 2 MiB RMP entries where possible."""


class TestSevVm(kit_for("snp", uapi.KVM_X86_SEV_VM)):
    """An SEV VM, created as its VMM does (``KVM_SEV_INIT2`` right after KVM_CREATE_VM, the
    intents' ``vm_init``): no private memory, its guest runs on shared memory."""


class TestSevEsVm(kit_for("snp", uapi.KVM_X86_SEV_ES_VM)):
    """An SEV-ES VM, likewise."""
