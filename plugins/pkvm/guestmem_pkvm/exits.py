"""``KVM_EXIT_HYPERCALL`` for the memory-conversion hypercalls of a pKVM guest.

A :class:`guestmem.HypercallExit` (catch either class) that also carries ``ret``: the value
the guest's x0 receives when the VMM resumes it.  The conversion has already happened when
the exit is raised; userspace is being told, not asked.
"""

from __future__ import annotations

from guestmem import errors


class HypercallExit(errors.HypercallExit):
    """``KVM_RUN`` returned with ``exit_reason == KVM_EXIT_HYPERCALL`` (``run->hypercall``)."""

    def __init__(self, nr: int, args: tuple[int, ...], ret: int = 0) -> None:
        shown = ", ".join(f"{a:#x}" for a in args)
        self._message = f"KVM_EXIT_HYPERCALL nr={nr:#x} args=({shown})"
        super().__init__(nr, args, self._message)
        # BaseException.__init__ replaced ``args`` with the message: restore run->hypercall.args.
        self.args = tuple(args)
        self.ret = ret

    def __str__(self) -> str:
        return self._message
