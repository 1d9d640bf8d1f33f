"""The realm's side: :class:`RealmGuest`, what a realm's kernel does through RSI on one
vCPU (Linux's ``rsi_set_memory_range``), and :func:`enable_rme`, the VMM's realm commands.
How a VMM and a realm do each portable intent with them is :mod:`guestmem_cca.intents`."""

from __future__ import annotations

from typing import Any

from guestmem import cabi, uapi
from guestmem.backend import view
from guestmem_cca.policy import kvm_realm
from guestmem_cca.rmi import (
    KVM_CAP_ARM_RME,
    RSI_CHANGE_DESTROYED,
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
        the VMM answered is the realm re-entering, and returns.  Each argument is a
        register (an integer; a TypeError naming it otherwise)."""
        state = cabi.index(ripas, "ripas")
        status: int = self.vcpu.hypercall(SMC_RSI_IPA_STATE_SET, base, top, state, flags)
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
