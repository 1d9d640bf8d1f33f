"""What a Gunyah guest run ends in besides the core's exits.

* :class:`PageFaultExit`: ``GUNYAH_VCPU_RUN`` returned with ``exit_reason ==
  GUNYAH_VCPU_EXIT_PAGE_FAULT``: Linux could not demand-page the address
  (``gunyah_handle_page_fault``: ``page_fault.attempt`` is the negative errno of
  ``gunyah_gmem_demand_page``, -EPERM for a store to a read-only binding).  The VMM resumes
  with ``GUNYAH_VCPU_RESUME_FAULT`` to inject the fault back into the guest
  (``guestmem_gunyah.gunyah(vm).resume_fault(exit)``).
* :class:`SyncExternalAbort`: the hypervisor injected a synchronous external abort into the
  VM (``handle_inst_data_abort`` -> ``inject_inst_data_abort`` in
  ``hyp/vm/vcpu/aarch64/src``): it touched an IPA its stage-2 does not map and nobody
  resolved.  A modelled outcome: the guest takes the exception, the VMM only learns of it
  through this object (and the VM's ``gunyah.aborts_injected`` counter).
* :class:`VmStatusExit`: ``GUNYAH_VCPU_EXIT_STATUS``: the VM is no longer running (the RM
  said it exited).
"""

from __future__ import annotations

import errno

from guestmem.errors import GuestExit
from guestmem_gunyah import abi


class PageFaultExit(GuestExit):
    """``GUNYAH_VCPU_EXIT_PAGE_FAULT``: ``phys_addr`` and ``attempt`` (a negative errno)."""

    exit_reason = abi.GUNYAH_VCPU_EXIT_PAGE_FAULT

    def __init__(self, phys_addr: int, attempt: int, write: bool, why: str = "") -> None:
        self.phys_addr = phys_addr
        self.attempt = attempt
        self.write = write
        name = errno.errorcode.get(-attempt, str(attempt))
        detail = f": {why}" if why else ""
        super().__init__(f"GUNYAH_VCPU_EXIT_PAGE_FAULT at IPA {phys_addr:#x} (attempt -{name}){detail}")


class SyncExternalAbort(GuestExit):
    """The hypervisor injected a synchronous external abort into VM ``vmid`` at ``ipa``."""

    def __init__(self, vmid: int, ipa: int, write: bool, why: str) -> None:
        self.vmid = vmid
        self.ipa = ipa
        self.write = write
        self.why = why
        kind = "data abort (write)" if write else "data abort (read)"
        super().__init__(
            f"synchronous external abort injected into VM {vmid:#x}: {kind} at IPA {ipa:#x}: {why}"
        )


class VmStatusExit(GuestExit):
    """``GUNYAH_VCPU_EXIT_STATUS``: ``status`` is a ``GUNYAH_VM_STATUS_*``."""

    exit_reason = abi.GUNYAH_VCPU_EXIT_STATUS

    def __init__(self, status: int, why: str) -> None:
        self.status = status
        super().__init__(f"GUNYAH_VCPU_EXIT_STATUS status={status}: {why}")
