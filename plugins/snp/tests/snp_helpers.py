"""Helpers of the guestmem-snp tests: a ready SNP VM."""

from __future__ import annotations

from typing import Any

import attrs

import guestmem
import guestmem_snp
from guestmem import uapi

MIB = 1 << 20


@attrs.define
class SnpVm:
    """An SNP VM with one guest_memfd RAM slot at gpa 0 backed by a shared mapping too."""

    kvm: Any
    vm: Any
    gmem: Any
    shared: Any
    vcpu: Any
    size: int

    @property
    def sev(self) -> guestmem_snp.Sev:
        return guestmem_snp.sev(self.vm)

    @property
    def state(self) -> guestmem_snp.SevVm:
        """The kernel's ``struct kvm_sev_info`` of the VM (its kernel paths, for white-box tests)."""
        return self.sev.state

    @property
    def guest(self) -> guestmem_snp.SnpGuest:
        return guestmem_snp.guest(self.vcpu)

    @property
    def rmp(self) -> guestmem_snp.RmpTable:
        return self.sev.host.rmp

    def vmm(self) -> guestmem_snp.ConvertingVmm:
        return guestmem_snp.ConvertingVmm(
            self.vm, [guestmem_snp.RamRegion(0, self.size, self.gmem, 0, self.shared)]
        )

    def private(self, gpa: int, size: int) -> None:
        self.vm.set_memory_attributes(gpa, size, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)

    def pfn(self, gpa: int) -> int:
        pfn = self.vm.gmem_pfn(gpa >> uapi.PAGE_SHIFT)
        assert pfn is not None
        return int(pfn)


def make_snp_vm(
    backend: str = "snp",
    size: int = 8 * MIB,
    *,
    init: bool = True,
    launch: bool = True,
    exits: bool = True,
) -> SnpVm:
    """An SNP VM with RAM at gpa 0 and vCPU 0, through ``KVM_SEV_INIT2`` (*init*) and an
    empty launch (*launch*: ``SNP_LAUNCH_START`` + ``SNP_LAUNCH_FINISH``, which makes vCPU 0's
    VMSA so that it can run, SNP-2.4).  Counters start at zero after the setup."""
    kvm = guestmem.open(backend)
    vm = kvm.create_vm(uapi.KVM_X86_SNP_VM)
    sev = guestmem_snp.sev(vm)
    if init:
        sev.init2()
    if exits:
        sev.enable_cap_exit_hypercall(1 << 12)
    gmem = vm.create_guest_memfd(size)
    shared = kvm.mmap_anonymous(size)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, size, shared.address, gmem, 0)
    vcpu = vm.create_vcpu(0)
    if init and launch:
        sev.snp_launch_start()
        sev.snp_launch_finish()
    vm.counters.clear()  # the tests count their own work, not INIT2's firmware page or the launch
    return SnpVm(kvm, vm, gmem, shared, vcpu, size)
