"""The built-in ``sw`` backend: x86 KVM_X86_DEFAULT_VM and KVM_X86_SW_PROTECTED_VM.

SW_PROTECTED is upstream's hardware-free private-memory VM: attributes are the only
source of privateness (G-1), there is no ownership table and nothing to prepare, and
private pages are simply not host-mappable (the core rule M-4).  Its policy therefore
implements no hook at all: what it does is the core's generic x86 KVM, the reference
every hardware backend is compared to.  The core declares it through its own entry
point, like any other backend.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from guestmem import uapi
from guestmem.backend import (
    X86_DEFAULT_VM,
    X86_SW_PROTECTED_VM,
    Backend,
    GuestVm,
    Intents,
    NotApplicable,
    hookimpl,
)

DEFAULT_VM = X86_DEFAULT_VM
SW_PROTECTED_VM = X86_SW_PROTECTED_VM


class SwPolicy:
    """The arch policy of ``sw``: upstream x86 needs no hook beyond the core's own code."""


POLICY = SwPolicy()


class SwIntents(Intents):
    """The portable intents on upstream x86 without hardware.

    A guest converts with the ``KVM_HC_MAP_GPA_RANGE`` hypercall, which KVM turns into a
    ``KVM_EXIT_HYPERCALL`` for the VMM (``__kvm_emulate_hypercall``, enabled by
    ``KVM_CAP_EXIT_HYPERCALL``), exactly as the upstream selftest
    ``x86/private_mem_conversions_test.c`` guest does; the VMM sets the attributes and
    discards the old side.  There is no launch (the host cannot write private memory: no
    populate ioctl and no mmap of private guest_memfd) and no acceptance.
    """

    def convert(
        self, guest: GuestVm, gpa: int, size: int, *, private: bool, page_size: int, coalesce: bool
    ) -> str:
        if not guest.vm_type.has_private_mem:
            raise NotApplicable(f"{guest.vm_type.name} has no private memory")
        vcpu = guest.vcpu()
        flags = uapi.KVM_MAP_GPA_RANGE_ENCRYPTED if private else uapi.KVM_MAP_GPA_RANGE_DECRYPTED
        flags |= uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_2M if page_size > uapi.PAGE_SIZE else 0
        step = page_size if not coalesce else size
        calls = 0
        for start in range(gpa, gpa + size, step):
            npages = step >> uapi.PAGE_SHIFT
            request = partial(vcpu.hypercall, uapi.KVM_HC_MAP_GPA_RANGE, start, npages, flags)
            ret = guest.run(request, vcpu)
            calls += 1
            if ret:
                raise NotApplicable(
                    f"KVM_HC_MAP_GPA_RANGE returned {ret}: exits to userspace are not enabled"
                )
        return f"{calls} KVM_HC_MAP_GPA_RANGE hypercall(s)"

    def capabilities(self, guest: GuestVm) -> frozenset[str]:
        found = super().capabilities(guest)
        if guest.vm_type.has_private_mem:
            found |= {"conversion"}
        return found


INTENTS = SwIntents()


@hookimpl
def guestmem_register_backends(register: Callable[[Backend], None]) -> None:
    """Register ``sw``."""
    register(
        Backend(
            name="sw",
            summary="Linux 6.18 x86 KVM without hardware: DEFAULT and SW_PROTECTED VMs",
            vm_types=(DEFAULT_VM, SW_PROTECTED_VM),
            policy=POLICY,
            range_faults=True,
            intents=INTENTS,
        )
    )
