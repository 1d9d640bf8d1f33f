"""``KVM_EXIT_HYPERCALL`` for the memory-conversion hypercalls of a pKVM guest.

guestmem's core does not define a hypercall exit yet; this one follows the planned
``guestmem.errors.HypercallExit(GuestExit)`` (fields ``nr`` and ``args``) and adds ``ret``:
the value the guest's x0 receives when the VMM resumes it.  The conversion has already
happened when the exit is raised; userspace is being told, not asked.
"""

from __future__ import annotations

from guestmem import uapi
from guestmem.errors import GuestExit


class HypercallExit(GuestExit):
    """``KVM_RUN`` returned with ``exit_reason == KVM_EXIT_HYPERCALL`` (``run->hypercall``)."""

    exit_reason = uapi.KVM_EXIT_HYPERCALL

    def __init__(self, nr: int, args: tuple[int, ...], ret: int = 0) -> None:
        shown = ", ".join(f"{a:#x}" for a in args)
        self._message = f"KVM_EXIT_HYPERCALL nr={nr:#x} args=({shown})"
        super().__init__(self._message)
        self.nr = nr
        #: ``run->hypercall.args`` (this replaces ``BaseException.args``, as the spec names it).
        self.args = args
        self.ret = ret

    def __str__(self) -> str:
        return self._message
