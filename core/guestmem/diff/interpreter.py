"""Running a program on one backend, a ``guestmem.api.Kvm``, and comparing two backends.

Each op runs through the uAPI face only, so the model and the real kernel take the same
calls.  What happens is normalised into an :data:`~guestmem.diff.program.Outcome` (return
value, errno, SIGBUS, guest exit ...): an op whose object is missing (its creation failed or
was shrunk away) is skipped on both sides alike.  Every run starts from a fresh ``Kvm`` of
an :data:`Opener`; :func:`host_profile` names the model profile matching this host.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import guestmem
from guestmem import api, uapi
from guestmem.diff.program import Disagreement, Op, Outcome
from guestmem.errors import (
    GuestExit,
    HostSigbus,
    InternalErrorExit,
    KvmError,
    MemoryFault,
    MmioExit,
    errno_name,
)


# --- backends -------------------------------------------------------------------------------
def host_profile() -> str:
    """The model profile matching the running host (docs/profiles.md)."""
    if os.path.isdir("/sys/module/kvm_pvm"):
        return "kvm_pvm-6.18"
    return "upstream-6.18"


Opener = Callable[[], api.Kvm]


def opener(backend: str, profile: str | None = None) -> Opener:
    """A callable opening *backend* (with *profile* for the model backends)."""
    options: dict[str, Any] = {} if profile is None else {"profile": profile}
    return lambda: guestmem.open(backend, **options)


# --- executing a program --------------------------------------------------------------------
class _Skip(Exception):
    """An op whose object does not exist (creation failed or was shrunk away)."""


class _Session:
    """One backend's objects while a program runs; every object is closed at the end."""

    def __init__(self, kvm: api.Kvm) -> None:
        self.kvm = kvm
        self.objects: dict[int, Any] = {}
        self.owned: list[api.HostMapping | api.GuestMemfd | api.Vm] = []

    def get(self, ref: int, kind: type[Any]) -> Any:
        obj = self.objects.get(ref)
        if not isinstance(obj, kind):
            raise _Skip
        return obj

    def keep(self, op: Op, obj: Any) -> None:
        self.objects[op.id] = obj
        if isinstance(obj, api.HostMapping | api.GuestMemfd | api.Vm):
            self.owned.append(obj)

    def close(self) -> None:
        for obj in reversed(self.owned):
            obj.close()
        self.kvm.close()

    # address arguments: ("map", ref, offset) or an int
    def address(self, ref: Any) -> int:
        if isinstance(ref, tuple):
            _, map_ref, offset = ref
            mapping: api.HostMapping = self.get(map_ref, api.HostMapping)
            return mapping.address + int(offset)
        return int(ref)

    def gmem_arg(self, ref: Any) -> Any:
        if isinstance(ref, tuple):
            kind, target = ref
            if kind == "vm":  # a VM fd as guest_memfd: not a guest_memfd file (B-2)
                return self.get(target, api.Vm)
            if kind == "fd":  # the open guest_memfd's descriptor number, as an int
                gmem: api.GuestMemfd = self.get(target, api.GuestMemfd)
                if gmem.closed:  # numbers of closed fds are reused differently
                    raise _Skip
                return gmem.fileno()
            return self.get(target, api.GuestMemfd)
        return ref


def _execute(session: _Session, op: Op) -> Any:
    """Run *op*; returns the raw result (normalised by :func:`_outcome`)."""
    s = session
    a = op.args
    match op.name:
        case "check_extension":
            target = s.kvm if a[0] is None else s.get(a[0], api.Vm)
            return target.check_extension(a[1])
        case "create_vm":
            vm = s.kvm.create_vm(a[0])
            s.keep(op, vm)
            return None
        case "close_vm":
            s.get(a[0], api.Vm).close()
            return None
        case "create_guest_memfd":
            gmem = s.get(a[0], api.Vm).create_guest_memfd(a[1], a[2])
            s.keep(op, gmem)
            return None
        case "close_gmem":
            s.get(a[0], api.GuestMemfd).close()
            return None
        case "fallocate":
            s.get(a[0], api.GuestMemfd).fallocate(a[1], a[2], a[3])
            return None
        case "fstat":
            st = s.get(a[0], api.GuestMemfd).fstat()
            return (st.st_size, st.st_blksize, st.st_blocks, st.st_mode, st.st_nlink)
        case "gmem_read":
            return s.get(a[0], api.GuestMemfd).read(a[1])
        case "gmem_write":
            return s.get(a[0], api.GuestMemfd).write(a[1])
        case "gmem_truncate":
            s.get(a[0], api.GuestMemfd).truncate(a[1])
            return None
        case "mmap":
            mapping = s.get(a[0], api.GuestMemfd).mmap(a[1], a[2], a[3])
            s.keep(op, mapping)
            return None
        case "mmap_anonymous":
            s.keep(op, s.kvm.mmap_anonymous(a[0]))
            return None
        case "munmap":
            s.get(a[0], api.HostMapping).close()
            return None
        case "host_read":
            return s.get(a[0], api.HostMapping).read(a[1], a[2])
        case "host_write":
            s.get(a[0], api.HostMapping).write(a[1], a[2])
            return None
        case "set_user_memory_region":
            vm = s.get(a[0], api.Vm)
            vm.set_user_memory_region(a[1], a[2], a[3], a[4], s.address(a[5]))
            return None
        case "set_user_memory_region2":
            vm = s.get(a[0], api.Vm)
            vm.set_user_memory_region2(a[1], a[2], a[3], a[4], s.address(a[5]), s.gmem_arg(a[6]), a[7])
            return None
        case "set_memory_attributes":
            s.get(a[0], api.Vm).set_memory_attributes(a[1], a[2], a[3], a[4])
            return None
        case "create_vcpu":
            s.keep(op, s.get(a[0], api.Vm).create_vcpu(a[1]))
            return None
        case "access_read":  # (vcpu, gpa, length[, style])
            vcpu = s.get(a[0], api.Vcpu)
            style = a[3] if len(a) > 3 else "positional"
            if style == "keywords":
                return vcpu.access(gpa=a[1], length=a[2], write=False, data=None, private=False)
            return vcpu.access(a[1], a[2])
        case "access_write":  # (vcpu, gpa, data[, style]): every calling convention of a store
            vcpu = s.get(a[0], api.Vcpu)
            style = a[3] if len(a) > 3 else "write"
            if style == "data":  # data alone makes a store
                return vcpu.access(a[1], data=a[2])
            if style == "length":  # an explicit length, as the data's
                return vcpu.access(a[1], len(a[2]), write=True, data=a[2], private=False)
            if style == "other_length":  # data decides the length
                return vcpu.access(a[1], 1 + len(a[2]) * 3, data=a[2])
            if style == "no_data":  # write=True without data is refused
                return vcpu.access(a[1], len(a[2]), write=True)
            return vcpu.access(a[1], write=True, data=a[2])
        case "pre_fault_memory":
            return s.get(a[0], api.Vcpu).pre_fault_memory(a[1], a[2], a[3])
        case "close_vcpu":
            s.get(a[0], api.Vcpu).close()
            return None
        case "close_kvm":
            s.kvm.close()
            return None
        case "dup_gmem":
            s.keep(op, s.get(a[0], api.GuestMemfd).dup())
            return None
    raise ValueError(f"unknown op {op.name!r}")


def _outcome(session: _Session, op: Op) -> Outcome:
    """Run *op* and normalise what happened so two backends can be compared."""
    try:
        value = _execute(session, op)
    except _Skip:
        return ("skip",)
    except MemoryFault as exc:
        return ("memory_fault", exc.errno, exc.gpa, exc.size, exc.flags)
    except HostSigbus as exc:
        base = _mapping_base(session, op)
        return ("sigbus", (exc.address - base) // uapi.PAGE_SIZE if base is not None else None)
    except KvmError as exc:
        return ("errno", errno_name(exc.errno or 0))
    except MmioExit as exc:
        return ("mmio", exc.gpa, exc.is_write)
    except InternalErrorExit:
        return ("internal_error",)
    except GuestExit as exc:
        return ("exit", type(exc).__name__)
    except (TypeError, ValueError, OverflowError) as exc:  # the uAPI face refused the arguments
        return ("raised", type(exc).__name__)
    if isinstance(value, bytes):
        return ("ok", value.hex())
    return ("ok", value)


def _mapping_base(session: _Session, op: Op) -> int | None:
    if op.name in ("host_read", "host_write"):
        mapping = session.objects.get(op.args[0])
        if isinstance(mapping, api.HostMapping):
            return int(mapping.address)
    return None


def run_program(open_kvm: Opener, program: Sequence[Op]) -> list[Outcome]:
    """Run *program* on a fresh ``Kvm`` from *open_kvm*; one outcome per op."""
    session = _Session(open_kvm())
    try:
        return [_outcome(session, op) for op in program]
    finally:
        session.close()


def compare(left: Opener, right: Opener, program: Sequence[Op]) -> Disagreement | None:
    """The first disagreement of *program* between the two backends, or None."""
    a = run_program(left, program)
    b = run_program(right, program)
    for index, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            return Disagreement(tuple(program), index, x, y)
    return None
