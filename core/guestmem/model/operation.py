"""Operations: the span of one uAPI call, at whose end deferred releases run and what
observers raised is reported.

Every public method of the model's uAPI objects is an operation (:func:`uapi_call`); a
hook that calls back into the model nests inside it.  As a system call holds the files it
works on (``fdget`` ... ``fdput``), the last reference to a file dropped during an
operation (a ``close()`` from inside a hook included) is released only when the outermost
operation ends: ``fput`` defers ``__fput`` to ``task_work``, which runs on the way back
to userspace (:meth:`guestmem.model.kvm.ModelKvm.fput`).  An observer's exception is kept
until then too, so the model is consistent (no invalidation left open, nothing
half-applied, no object destroyed under an operation using it) when the caller hears of it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

if TYPE_CHECKING:
    from guestmem.model.kvm import ModelKvm

P = ParamSpec("P")
R = TypeVar("R")


def uapi_call(method: Callable[P, R]) -> Callable[P, R]:
    """Make *method* (of an object with a ``kvm`` attribute) one operation.

    While somebody listens to the trace, the outermost call (what userspace issued, not
    the calls the model makes inside it) is recorded as a ``uapi`` event with its
    arguments and its outcome, rejected calls included (:mod:`guestmem.recording`).
    """

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        owner: Any = args[0]
        kvm: ModelKvm = owner.kvm
        recording = not kvm.op_depth and kvm.tracing
        started = kvm.call_started() if recording else None
        kvm.op_depth += 1
        result: Any = None
        error: BaseException | None = None
        try:
            result = method(*args, **kwargs)
            return result  # type: ignore[no-any-return]
        except BaseException as exc:
            error = exc
            raise
        finally:
            if started is not None:
                kvm.call_finished(started, owner, method, args[1:], kwargs, result, error)
            kvm.op_depth -= 1
            if not kvm.op_depth:
                kvm.operation_done(method.__qualname__)

    return call
