"""The built-in ``sw`` backend: x86 KVM_X86_DEFAULT_VM and KVM_X86_SW_PROTECTED_VM.

SW_PROTECTED is upstream's hardware-free private-memory VM: attributes are the only
source of privateness (G-1), there is no ownership table and nothing to prepare, and
private pages are simply not host-mappable (the core rule M-4).  The policy therefore
implements no arch hooks: it is the reference every hardware backend is compared to.
"""

from __future__ import annotations

from collections.abc import Callable

from guestmem import uapi
from guestmem.hookspecs import hookimpl
from guestmem.registry import Backend, VmTypeInfo

DEFAULT_VM = VmTypeInfo(
    type=uapi.KVM_X86_DEFAULT_VM,
    name="KVM_X86_DEFAULT_VM",
    has_private_mem=False,
    nr_memslot_as_ids=2,
)
SW_PROTECTED_VM = VmTypeInfo(
    type=uapi.KVM_X86_SW_PROTECTED_VM,
    name="KVM_X86_SW_PROTECTED_VM",
    has_private_mem=True,
    nr_memslot_as_ids=1,
)


# include/uapi/linux/kvm_para.h
KVM_HC_VAPIC_POLL_IRQ = 1
KVM_HC_KICK_CPU = 5
KVM_HC_SCHED_YIELD = 11


class SwPolicy:
    """The arch policy of ``sw``: upstream x86 behaviour needs no ownership hooks."""

    @hookimpl
    def guestmem_hypercall(self, vcpu: object, nr: int, args: tuple[int, ...]) -> int | None:
        """``__kvm_emulate_hypercall``: the calls that succeed without userspace.

        KICK_CPU and SCHED_YIELD return 0 because PV feature CPUID is not enforced by
        default; everything else (MAP_GPA_RANGE included, until userspace enables its
        exit) is ``-KVM_ENOSYS``, which the core answers for an unhandled call.
        """
        if nr in (KVM_HC_VAPIC_POLL_IRQ, KVM_HC_KICK_CPU, KVM_HC_SCHED_YIELD):
            return 0
        return None


POLICY = SwPolicy()


@hookimpl
def guestmem_register_backends(register: Callable[[Backend], None]) -> None:
    """Register ``sw``."""
    register(
        Backend(
            name="sw",
            summary="Linux 6.18 x86 KVM without hardware: DEFAULT and SW_PROTECTED VMs",
            vm_types=(DEFAULT_VM, SW_PROTECTED_VM),
            policy=POLICY,
        )
    )
