"""``HypercallExit`` with working ``args``.

``guestmem.errors.HypercallExit`` sets ``self.args`` before ``Exception.__init__``, which
then replaces it with ``(message,)``.  This subclass (still an instance of the core's
class, so ``except guestmem.errors.HypercallExit`` catches it) sets them in the right order.
"""

from __future__ import annotations

from guestmem import errors


class HypercallExit(errors.HypercallExit):
    """``KVM_RUN`` returned with ``KVM_EXIT_HYPERCALL``: ``run->hypercall.nr`` and ``.args``."""

    def __init__(self, nr: int, args: tuple[int, ...], message: str = "") -> None:
        super().__init__(nr, args, message)
        self._message = message or f"KVM_EXIT_HYPERCALL nr={nr} args=({', '.join(f'{a:#x}' for a in args)})"
        # ``run->hypercall.args``; this replaces BaseException.args, hence __str__ below.
        self.args = tuple(args)

    def __str__(self) -> str:
        return self._message
