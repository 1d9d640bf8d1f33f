"""Operations: the span of one uAPI call, run under its host's lock, at whose end
deferred releases run and what observers raised is reported.

Every public method of the model's uAPI objects is an operation (:func:`uapi_call`); a
hook that calls back into the model nests inside it.  An operation holds its host's lock
(``ModelKvm.lock``, re-entrant, taken once by the outermost operation of a thread), which
stands for every lock the kernel takes on that path (``kvm->slots_lock``, the
guest_memfd inode's ``filemap_invalidate_lock``, ``kvm->mmu_lock`` and the rest; see the
locking section of docs/model.md): operations of several threads run one after the
other, each whole, which is one of the schedules the kernel's locks allow.  The one
place a thread lets others in before its operation ends is :func:`mmu_lock_window`,
where a stage-2 fault of the kernel holds none of those locks.

As a system call holds the files it works on (``fdget`` ... ``fdput``), the last
reference to a file dropped during an operation (a ``close()`` from inside a hook
included) is released only when the outermost operation ends: ``fput`` defers ``__fput``
to ``task_work``, which runs on the way back to userspace
(:meth:`guestmem.model.kvm.ModelKvm.fput`).  An observer's exception is kept until then
too, so the model is consistent (no invalidation left open, nothing half-applied, no
object destroyed under an operation using it) when the caller hears of it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

if TYPE_CHECKING:
    from guestmem.model.kvm import ModelKvm

#: How many times the fault's window gives up the interpreter waiting for a waiting thread
#: to take the lock before it goes on (each is a ``sched_yield``-like system call).
_HANDOFF_TRIES = 1000

P = ParamSpec("P")
R = TypeVar("R")


def uapi_call(method: Callable[P, R]) -> Callable[P, R]:
    """Make *method* (of an object with a ``kvm`` attribute) one operation.

    While somebody listens to the trace, the outermost call (what userspace issued, not
    the calls the model makes inside it) is recorded as a ``uapi`` event with its
    arguments and its outcome, rejected calls included (:mod:`guestmem.recording`).
    """
    name = method.__qualname__

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        owner: Any = args[0]
        kvm: ModelKvm = owner.kvm
        lock = kvm.lock  # enter() and leave(), inlined: every uAPI call comes this way
        if not lock.acquire(False):
            wait(kvm)
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
            try:
                if started is not None:
                    kvm.call_finished(started, owner, method, args[1:], kwargs, result, error)
            finally:
                kvm.op_depth -= 1
                if kvm.op_depth:
                    lock.release()
                else:  # done(), inlined
                    try:
                        kvm.operation_done(name)
                    finally:
                        lock.release()
                    if kvm.lock_waiters:
                        time.sleep(0)

    return call


def enter(kvm: ModelKvm) -> None:
    """Begin an operation of *kvm*: take the host lock (waiting in line if another thread
    holds it), one level deeper."""
    if not kvm.lock.acquire(False):
        wait(kvm)
    kvm.op_depth += 1


def wait(kvm: ModelKvm) -> None:
    """Take the host lock that another thread holds, counted among its waiters."""
    waiting = kvm.lock_waiters
    waiting.append(None)  # list.append and pop are atomic: no lock needed to count
    try:
        kvm.lock.acquire()
    finally:
        waiting.pop()
    kvm.lock_handoffs += 1


def leave(kvm: ModelKvm, name: str) -> None:
    """End an operation begun by :func:`enter`."""
    kvm.op_depth -= 1
    if kvm.op_depth:
        kvm.lock.release()
    else:
        done(kvm, name)


def done(kvm: ModelKvm, name: str) -> None:
    """The outermost operation *name* ended: report it (observers'
    ``guestmem_operation_done`` and failures), release the lock, and let a waiting thread
    in before this one may take it again (Python's locks are not fair: a thread looping
    over short operations would otherwise keep the others out)."""
    try:
        kvm.operation_done(name)
    finally:
        kvm.lock.release()
    if kvm.lock_waiters:
        time.sleep(0)


class Operation:
    """An operation as a context manager (``with kvm.operation(): ...``), for the views'
    entry points and a backend's own calls (:meth:`guestmem.backend.HostView.operation`)."""

    __slots__ = ("_kvm",)

    def __init__(self, kvm: ModelKvm) -> None:
        self._kvm = kvm

    def __enter__(self) -> None:
        enter(self._kvm)

    def __exit__(self, *exc_info: object) -> None:
        leave(self._kvm, "operation")


def mmu_lock_window(kvm: ModelKvm) -> bool:
    """Let the threads waiting for the host lock run their operations: True if it was let go.

    Called by a stage-2 fault between ``kvm_mmu_faultin_pfn`` and taking ``mmu_lock``
    (``kvm_tdp_mmu_page_fault``): the one stretch of a vCPU's fault during which the
    kernel holds none of the locks the host lock stands for, so that an invalidation, a
    memslot update or another vCPU's fault may complete before this fault installs its
    leaf, which then finds its ``mmu_invalidate_seq`` snapshot stale and retries.  Only the
    outermost operation of a thread lets go (a fault nested in a hook runs inside a
    caller's critical section); the operation's own bookkeeping (depth, observers'
    failures and deferred releases so far) is set aside meanwhile, so that the operations
    that run in between are reported, and release, as their own.
    """
    if kvm.op_depth != 1 or not kvm.lock_waiters:
        return False
    # This thread's operation: its depth, its observers' failures, its deferred releases
    # (task_work is per task: another thread's operation must not run them).
    depth, failures, work = kvm.op_depth, kvm.observer_failures, kvm.task_work
    kvm.op_depth, kvm.observer_failures, kvm.task_work = 0, [], []
    handoffs = kvm.lock_handoffs
    kvm.lock.release()
    try:
        # Give up the interpreter until a waiting thread took the lock (or none waits any
        # more): this thread would otherwise take it back before the waiter even woke.
        for _ in range(_HANDOFF_TRIES):
            time.sleep(0)
            if kvm.lock_handoffs != handoffs or not kvm.lock_waiters:
                break
    finally:
        enter(kvm)
        kvm.op_depth, kvm.observer_failures, kvm.task_work = depth, failures, work
    return True
