"""Exceptions of the uAPI face.

Every failure the kernel reports with an errno is an :class:`OSError` subclass carrying that
errno and, in its message, the ID of the spec rule that produced it (for example ``[S-14]``).
Guest exits that are not errors of an ioctl (an MMIO exit, an internal error) have their own
classes so a caller can tell them from a failed ioctl.
"""

from __future__ import annotations

import errno as _errno

from guestmem import cabi, uapi

#: A TypeError naming an argument of the wrong type (:class:`guestmem.cabi.ArgumentTypeError`).
ArgumentTypeError = cabi.ArgumentTypeError


class KvmError(OSError):
    """An ioctl or file operation failed with the kernel's *errno*.

    ``KvmError(errno, rule, message)``: *rule* is the ID of the rule of ``docs/rules.md``
    that decided the outcome (``""`` when no numbered rule did), *message* says why.  The
    message names the rule and, for one the project documents, the command that prints
    it: ``EINVAL: [B-5] ... (guestmem rules B-5)``.
    """

    def __init__(self, err: int, rule: str, message: str) -> None:
        self.rule = rule
        self.detail = message
        text = message
        if rule:
            text = f"[{rule}] {message}"
            if _documented(rule):
                text += f" (guestmem rules {rule})"
        super().__init__(err, f"{errno_name(err)}: {text}")

    def explain(self) -> str:
        """What the rule says (``docs/rules.md``), or ``""`` if it is not documented there."""
        from guestmem.rules import lookup

        found = lookup(self.rule) if self.rule else None
        return "" if found is None else f"{found.id}: {found.condition}"


def _documented(rule: str) -> bool:
    from guestmem.rules import lookup

    return lookup(rule) is not None


class MemoryFault(KvmError):
    """``KVM_RUN`` returned -1 with ``exit_reason == KVM_EXIT_MEMORY_FAULT`` (G-2..G-5).

    ``gpa``, ``size`` and ``flags`` are exactly ``kvm_run.memory_fault``; ``errno`` is
    ``EFAULT`` or ``EHWPOISON``.
    """

    exit_reason = uapi.KVM_EXIT_MEMORY_FAULT

    def __init__(self, err: int, gpa: int, size: int, flags: int, rule: str, why: str = "") -> None:
        self.gpa = gpa
        self.size = size
        self.flags = flags
        kind = "private" if flags & uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE else "shared"
        detail = f"memory fault exit: gpa={gpa:#x} size={size:#x} {kind}"
        super().__init__(err, rule, f"{detail}{': ' + why if why else ''}")

    @property
    def is_private(self) -> bool:
        """True iff the faulting access was private (``KVM_MEMORY_EXIT_FLAG_PRIVATE``)."""
        return bool(self.flags & uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE)


class HostSigbus(KvmError):
    """A host userspace access that the kernel answers with SIGBUS.

    The process never dies: the access raises this instead. ``errno`` is ``EFAULT``
    (what a ``process_vm_readv`` of the same address would report).
    """

    def __init__(self, address: int, rule: str, why: str) -> None:
        self.address = address
        super().__init__(_errno.EFAULT, rule, f"SIGBUS at host address {address:#x}: {why}")


class HostSigsegv(KvmError):
    """A host userspace access that the kernel answers with SIGSEGV.

    The process never dies: the access raises this instead and changes nothing.  ``errno``
    is ``EFAULT`` (what a ``process_vm_readv`` of the same address would report);
    ``si_code`` is the signal's (``uapi.SEGV_ACCERR``: the address is mapped but the access
    is not allowed).  arm64 pKVM answers a host access to a page the hypervisor took from
    the host stage-2 this way: ``handle_host_mem_abort`` injects the abort back into the
    host (``host_inject_abort``) and the host's ``do_page_fault`` sends the process
    ``SIGSEGV``/``SEGV_ACCERR`` ("stage-2 fault").
    """

    def __init__(self, address: int, rule: str, why: str, *, si_code: int = uapi.SEGV_ACCERR) -> None:
        self.address = address
        self.si_code = si_code
        super().__init__(_errno.EFAULT, rule, f"SIGSEGV at host address {address:#x}: {why}")


class GuestExit(Exception):
    """``KVM_RUN`` returned 0 with an exit the access could not complete through."""

    exit_reason: int = uapi.KVM_EXIT_UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)


class MmioExit(GuestExit):
    """The access left the guest as ``KVM_EXIT_MMIO`` (no memslot backs ``gpa``)."""

    exit_reason = uapi.KVM_EXIT_MMIO

    def __init__(self, gpa: int, length: int, is_write: bool) -> None:
        self.gpa = gpa
        self.length = length
        self.is_write = is_write
        verb = "write" if is_write else "read"
        super().__init__(f"KVM_EXIT_MMIO: {verb} of {length} byte(s) at gpa {gpa:#x}")


class HypercallExit(GuestExit):
    """The guest's hypercall left to userspace as ``KVM_EXIT_HYPERCALL`` (e.g. MAP_GPA_RANGE).

    ``nr``, ``args`` and ``flags`` are ``kvm_run.hypercall.nr``/``args``/``flags``.  The
    VMM handles the request and may set ``ret`` (``kvm_run.hypercall.ret``) before handing
    the exit back to the backend that raised it, if that backend offers a way to resume.
    """

    exit_reason = uapi.KVM_EXIT_HYPERCALL

    def __init__(self, nr: int, args: tuple[int, ...], message: str = "", *, flags: int = 0) -> None:
        shown = ", ".join(f"{a:#x}" for a in args)
        text = message or f"KVM_EXIT_HYPERCALL nr={nr} args=({shown})"
        super().__init__(text)
        self.nr = nr
        self.args = tuple(args)  # after Exception.__init__, which sets its own args
        self.flags = flags
        self.ret: int | None = None
        self._text = text

    def __str__(self) -> str:
        return self._text


class InternalErrorExit(GuestExit):
    """The access left the guest as ``KVM_EXIT_INTERNAL_ERROR`` (``suberror`` as the kernel)."""

    exit_reason = uapi.KVM_EXIT_INTERNAL_ERROR

    def __init__(self, suberror: int, gpa: int | None = None) -> None:
        self.suberror = suberror
        self.gpa = gpa
        where = f" at gpa {gpa:#x}" if gpa is not None else ""
        super().__init__(f"KVM_EXIT_INTERNAL_ERROR suberror {suberror}{where}")


class FailEntryExit(GuestExit):
    """The hardware refused to enter the guest: ``KVM_RUN`` returned 0 with
    ``KVM_EXIT_FAIL_ENTRY`` (SVM: VMRUN failed with ``VMEXIT_INVALID``; ``svm_handle_exit``).

    ``hardware_entry_failure_reason`` and ``cpu`` are ``kvm_run.fail_entry``'s; ``rule`` names
    the rule that decided it, as for :class:`KvmError`.
    """

    exit_reason = uapi.KVM_EXIT_FAIL_ENTRY

    def __init__(self, hardware_entry_failure_reason: int, why: str, *, cpu: int = 0, rule: str = "") -> None:
        self.hardware_entry_failure_reason = hardware_entry_failure_reason
        self.cpu = cpu
        self.rule = rule
        tag = f"[{rule}] " if rule else ""
        reason = f"hardware_entry_failure_reason={hardware_entry_failure_reason:#x}"
        super().__init__(f"KVM_EXIT_FAIL_ENTRY {reason}: {tag}{why}")


class HostCrash(RuntimeError):
    """A modelled hardware outcome that takes down the host (e.g. an RMP #PF in the kernel).

    The simulator itself keeps running; the host object records the verdict and refuses
    further work.
    """

    def __init__(self, verdict: str) -> None:
        self.verdict = verdict
        super().__init__(f"host crash: {verdict}")


class PluginError(RuntimeError):
    """A plugin failed validation at load; the message names its distribution."""


class PluginWarning(UserWarning):
    """An installed plugin was left out (it failed to load or to validate); the message names
    its distribution and what to do."""


class BackendError(RuntimeError):
    """A backend's hook raised something other than the kernel's outcomes: a bug in the
    backend, reported with its name and distribution (the original is ``__cause__``)."""

    def __init__(self, backend: str, distribution: str, hook: str, error: BaseException) -> None:
        self.backend = backend
        self.distribution = distribution
        self.hook = hook
        self.error = error
        dist = f" (distribution {distribution!r})" if distribution else ""
        super().__init__(f"{backend}{dist} failed in {hook}: {type(error).__name__}: {error}")


class ObserverError(RuntimeError):
    """An observer plugin raised while watching an operation.

    Raised once the operation has finished (the model is consistent again), naming the
    plugin; the observer's exception is ``error`` and ``__cause__``.
    """

    def __init__(self, plugin: str, distribution: str, hook: str, error: BaseException) -> None:
        self.plugin = plugin
        self.distribution = distribution
        self.hook = hook
        self.error = error
        dist = f" (distribution {distribution!r})" if distribution else ""
        super().__init__(f"observer {plugin}{dist} failed in {hook}: {type(error).__name__}: {error}")


EHWPOISON = getattr(_errno, "EHWPOISON", 133)
EOPNOTSUPP = _errno.EOPNOTSUPP
# The kernel's names where Python's table ends on an alias (EDEADLOCK, ENOTSUP).
_NAMES = {
    **_errno.errorcode,
    EHWPOISON: "EHWPOISON",
    EOPNOTSUPP: "EOPNOTSUPP",
    _errno.EDEADLK: "EDEADLK",
}


def errno_name(err: int) -> str:
    """The symbolic name of *err* (``EINVAL``), or the number as text."""
    return _NAMES.get(err, str(err))
