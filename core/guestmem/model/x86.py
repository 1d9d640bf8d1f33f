"""x86 code of KVM that is no vendor's: what a VM type with ``arch == "x86"`` runs when its
backend does not handle a hypercall itself (``arch/x86/kvm/x86.c``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from guestmem import uapi
from guestmem.errors import HypercallExit

if TYPE_CHECKING:
    from guestmem.model.vcpu import ModelVcpu

_U64 = uapi.U64_MAX


def emulate_hypercall(vcpu: ModelVcpu, nr: int, args: tuple[int, ...]) -> int:
    """``__kvm_emulate_hypercall`` for a 64-bit guest at CPL 0.

    VAPIC_POLL_IRQ, KICK_CPU and SCHED_YIELD succeed (PV feature CPUID is not enforced by
    default); ``KVM_HC_MAP_GPA_RANGE`` leaves to userspace as ``KVM_EXIT_HYPERCALL`` once
    ``KVM_CAP_EXIT_HYPERCALL`` enabled it, after its argument checks; anything else is
    ``-KVM_ENOSYS``.
    """
    if nr in (uapi.KVM_HC_VAPIC_POLL_IRQ, uapi.KVM_HC_KICK_CPU, uapi.KVM_HC_SCHED_YIELD):
        return 0
    if nr == uapi.KVM_HC_MAP_GPA_RANGE:
        if not vcpu.vm.hypercall_exit_enabled & (1 << uapi.KVM_HC_MAP_GPA_RANGE):
            return -uapi.KVM_ENOSYS
        gpa, npages, attributes = ((*args, 0, 0, 0)[i] & _U64 for i in range(3))
        gfn = gpa >> uapi.PAGE_SHIFT
        if gpa % uapi.PAGE_SIZE or not npages or (gfn + npages) & _U64 <= gfn:
            return -uapi.KVM_EINVAL
        vcpu.vm.count("userspace_exits")
        vcpu.vm.trace("hypercall_exit", nr=nr, gpa=gpa, npages=npages, attrs=attributes)
        raise HypercallExit(nr, (gpa, npages, attributes), flags=uapi.KVM_EXIT_HYPERCALL_LONG_MODE)
    return -uapi.KVM_ENOSYS
