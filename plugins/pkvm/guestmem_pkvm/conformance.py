"""How the conformance kit drives pKVM VMs: the ``guestmem_conformance_options`` of
guestmem-pkvm and the kit's VMM driver for protected VMs.

A protected VM's guest owns every page it touches (the host donates it at the first
stage-2 fault) and converts in place with the MEM_SHARE / MEM_UNSHARE hypercalls
(backends.md 3.3).  :class:`PkvmKitVmm` is what the kit's VMM and guest do about it; it
has the methods of ``guestmem.conformance.KitVmm`` it changes, and the kit supplies the
rest (this package imports only the public API).
"""

from __future__ import annotations

import errno
from typing import Any

from guestmem import uapi
from guestmem.backend import Backend, VmTypeInfo, hookimpl
from guestmem.errors import HypercallExit, KvmError
from guestmem_pkvm import abi
from guestmem_pkvm.invariants import IsolationChecker
from guestmem_pkvm.policy import pkvm_state

PAGE = uapi.PAGE_SIZE


class PkvmKitVmm:
    """The kit's VMM and guest of a protected VM: RAM is an INIT_SHARED guest_memfd the
    guest takes page by page, and conversions are the guest's MEM_SHARE / MEM_UNSHARE."""

    vm: Any

    def gmem_flags(self) -> int:
        """``MMAP | INIT_SHARED``: the VMM may load the guest's pages before it first runs
        (backends.md 3.4), and the host reaches every page the guest shares."""
        return uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED

    def start(self, vcpu: Any, ram: Any) -> None:
        """The guest touches all its RAM first, so that every page starts guest-private, as
        a protected guest's memory is once it runs (the host donates each, 3.2)."""
        for page in range(ram.npages):
            vcpu.access(ram.gpa_of(page), 1)

    def guest_write(self, vcpu: Any, gpa: int, data: bytes, *, private: bool) -> None:
        """A guest store: pKVM has no private/shared access bit, the page's owner decides."""
        vcpu.access(gpa, data=data)

    def guest_read(self, vcpu: Any, gpa: int, n: int, *, private: bool) -> bytes:
        """A guest load."""
        data: bytes = vcpu.access(gpa, n)
        return data

    def convert(self, vcpu: Any, ram: Any, page: int, npages: int, *, private: bool) -> None:
        """MEM_UNSHARE (to private) or MEM_SHARE (to shared) of the pages, repeated until the
        hypervisor did them all (it may stop short: x1 says how many); the exit to
        userspace each one makes is simply resumed."""
        call = (
            abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_UNSHARE_FUNC_ID
            if private
            else abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_SHARE_FUNC_ID
        )
        state = pkvm_state(self.vm)
        gpa, left = ram.gpa_of(page), npages
        while left:
            try:
                ret = vcpu.hypercall(call, gpa, left, 0)
            except HypercallExit:
                ret = abi.SMCCC_RET_SUCCESS
            if ret != abi.SMCCC_RET_SUCCESS:
                error = state.last_error
                raise error if error is not None else KvmError(0, "pKVM-3", f"conversion failed: {ret}")
            done = state.ret[1]
            gpa += done * PAGE
            left -= done


@hookimpl
def guestmem_conformance_options(backend: Backend, vm_type: VmTypeInfo) -> dict[str, Any] | None:
    """The kit's settings for the ``pkvm`` backend: the isolation checker watches every VM;
    a protected VM is driven by :class:`PkvmKitVmm`, keeps INIT_SHARED memory private
    until the guest shares it (no M-7 coherence without a conversion), and loses a private
    page the VMM punches (the host reclaims it from the running guest: zeroed, or
    poisoned for the guest, pKVM-3.2); once it ran, its memslots may be neither deleted
    nor moved (Android's ``kvm_arch_prepare_memory_region``: EPERM, pKVM-3.6), the guest
    keeping its pages."""
    if backend.name != "pkvm":
        return None
    options: dict[str, Any] = {"observers": (IsolationChecker,)}
    if vm_type.type & abi.KVM_VM_TYPE_ARM_PROTECTED:
        options.update(
            vmm=PkvmKitVmm,
            init_shared_coherent=False,
            private_unmap="revoke",
            memslot_change_errno=errno.EPERM,
        )
    return options
