"""The realm's side, and how the conformance kit drives a realm.

:class:`RealmGuest` is what a realm's kernel does through RSI on one vCPU (Linux's
``rsi_set_memory_range``).  :class:`CcaKitVmm` is the conformance kit's VMM and guest for
realms: the realm is created before its vCPUs, its RAM gets RIPAS RAM and it is activated
before the first run, and the guest converts with RSI_IPA_STATE_SET, which reaches the VMM
as a memory-fault exit it answers as for any destructive conversion.  It has the methods of
``guestmem.conformance.KitVmm`` it changes (the kit supplies the rest: this package imports
only the public API).
"""

from __future__ import annotations

from typing import Any

from guestmem import uapi
from guestmem.backend import view
from guestmem.errors import KvmError, MemoryFault
from guestmem_cca.policy import kvm_realm
from guestmem_cca.rmi import (
    KVM_CAP_ARM_RME,
    KVM_CAP_ARM_RME_ACTIVATE_REALM,
    KVM_CAP_ARM_RME_CREATE_REALM,
    KVM_CAP_ARM_RME_INIT_RIPAS_REALM,
    RSI_CHANGE_DESTROYED,
    RSI_SUCCESS,
    SMC_RSI_IPA_STATE_SET,
    Ripas,
)

PAGE = uapi.PAGE_SIZE


class RealmGuest:
    """RSI calls of the realm running on *vcpu*."""

    def __init__(self, vcpu: Any) -> None:
        self.vcpu = vcpu

    def set_ipa_state(self, base: int, top: int, ripas: Ripas, flags: int = RSI_CHANGE_DESTROYED) -> int:
        """``RSI_IPA_STATE_SET``: x0 (``RSI_SUCCESS`` once the host carried it out).  The
        first call exits to userspace (:class:`guestmem.MemoryFault`); calling again after
        the VMM answered is the realm re-entering, and returns."""
        status: int = self.vcpu.hypercall(SMC_RSI_IPA_STATE_SET, base, top, int(ripas), flags)
        return status

    def returned(self) -> tuple[int, int, int]:
        """x0..x2 of the last RSI call (status, top reached, host response)."""
        vm = view(self.vcpu).vm
        with vm.host.operation():
            return kvm_realm(vm).recs[self.vcpu.vcpu_id].ret


def enable_rme(vm: Any, command: int, *args: int) -> int:
    """``KVM_ENABLE_CAP(KVM_CAP_ARM_RME, command, args...)``."""
    result: int = vm.enable_cap(KVM_CAP_ARM_RME, command, *args)
    return result


class CcaKitVmm:
    """The conformance kit's VMM and realm guest (kvmtool's order, Linux's RSI calls)."""

    vm: Any
    vm_type: Any

    def _realm(self) -> bool:
        return bool(self.vm_type.private)

    def setup(self) -> None:
        """``KVM_CAP_ARM_RME_CREATE_REALM`` before the vCPUs, which get their RECs from it."""
        if self._realm():
            enable_rme(self.vm, KVM_CAP_ARM_RME_CREATE_REALM)

    def start(self, vcpu: Any, ram: Any) -> None:
        """The RAM private (attributes) with RIPAS RAM (INIT_RIPAS), then the realm ACTIVE."""
        super().start(vcpu, ram)  # type: ignore[misc]
        if self._realm():
            enable_rme(self.vm, KVM_CAP_ARM_RME_INIT_RIPAS_REALM, ram.gpa, ram.size)
            enable_rme(self.vm, KVM_CAP_ARM_RME_ACTIVATE_REALM)

    def convert(self, vcpu: Any, ram: Any, page: int, npages: int, *, private: bool) -> None:
        """RSI_IPA_STATE_SET (``rsi_set_memory_range_protected/_shared``): the exit is answered
        as QEMU answers a conversion (``KitVmm.convert``), the realm re-enters and its call
        returns."""
        base, top = ram.gpa_of(page), ram.gpa_of(page + npages)
        guest = RealmGuest(vcpu)
        ripas = Ripas.RAM if private else Ripas.EMPTY
        try:
            guest.set_ipa_state(base, top, ripas)
        except MemoryFault as exit_:
            assert (exit_.gpa, exit_.size, exit_.is_private) == (base, top - base, private)
            super().convert(vcpu, ram, page, npages, private=private)  # type: ignore[misc]
        status = guest.set_ipa_state(base, top, ripas)
        if status != RSI_SUCCESS or guest.returned()[1] != top:
            raise KvmError(0, "CCA", f"RSI_IPA_STATE_SET [{base:#x}, {top:#x}) returned {guest.returned()}")
