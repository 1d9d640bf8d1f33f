"""Recording uAPI calls: one ``uapi`` trace event per call, with its arguments and outcome.

Every call of the uAPI face (an ioctl, ``fallocate``, ``mmap``, ``madvise``, ``close``, a
host or guest access) becomes one event of kind ``uapi`` once it returns or fails:

* ``call``: the method (``"Vm.set_memory_attributes"``), ``obj``: the object it was made
  on, named by a handle stable within the trace (``kvm``, ``vm1``, ``gmem2``, ``map1``,
  ``vcpu1``);
* ``args``: the arguments by name; objects as ``{"ref": handle}``, bytes as
  ``{"hex": ...}``, a ``userspace_addr`` inside a recorded mapping as
  ``{"ref": handle, "offset": n}``; values of no portable form as ``{"repr": ...}``;
* the outcome: ``result`` (encoded the same way), or ``errno``, ``rule`` and ``error`` of
  a rejected call, ``exit`` (``memory_fault``, ``hypercall``, ``mmio``, ``sigbus``,
  ``crash``...) with its fields;
* ``first_seq``: the sequence number the call started at: the events with
  ``first_seq <= seq`` below this one happened inside it;
* ``counters``: the cost counters it moved (model backends).

The model records through :func:`guestmem.model.operation.uapi_call`; any other backend
(the real kernel) through :func:`record`, which wraps the uAPI objects a ``Kvm`` hands
out: ``guestmem.open("linux", record=True)`` records the same events.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

from guestmem import api
from guestmem.backend import TraceEvent
from guestmem.errors import (
    GuestExit,
    HostCrash,
    HostSigbus,
    HypercallExit,
    KvmError,
    MemoryFault,
    MmioExit,
    errno_name,
)
from guestmem.model.events import make_event, next_seq

__all__ = ["Recorder", "RecordingKvm", "call_name", "record"]

#: Handle prefixes by uAPI class.
_KINDS = (
    (api.Kvm, "kvm"),
    (api.Vm, "vm"),
    (api.GuestMemfd, "gmem"),
    (api.HostMapping, "map"),
    (api.Vcpu, "vcpu"),
)


def call_name(obj: object, method: str) -> str:
    """``"Vm.set_memory_attributes"``: the uAPI class the object implements, and the method."""
    key = (type(obj), method)
    found = _CALL_NAMES.get(key)
    if found is None:
        cls_name = next((cls.__name__ for cls, _ in _KINDS if isinstance(obj, cls)), type(obj).__name__)
        found = _CALL_NAMES[key] = f"{cls_name}.{method}"
    return found


_CALL_NAMES: dict[tuple[type, str], str] = {}


class Recorder:
    """Names the uAPI objects of one ``Kvm`` and encodes calls on them as event fields."""

    def __init__(self) -> None:
        self._handles: dict[int, str] = {}
        self._objects: list[object] = []  # keeps ids stable while the trace lives
        self._counts: dict[str, int] = {}
        self._mappings: list[tuple[int, int, str]] = []

    def handle(self, obj: object) -> str:
        """The handle of *obj*, given on first sight (``vm1``, ``gmem2``...)."""
        found = self._handles.get(id(obj))
        if found is not None:
            return found
        kind = next((prefix for cls, prefix in _KINDS if isinstance(obj, cls)), "obj")
        if kind == "kvm":
            name = "kvm"
        else:
            self._counts[kind] = self._counts.get(kind, 0) + 1
            name = f"{kind}{self._counts[kind]}"
        self._handles[id(obj)] = name
        self._objects.append(obj)
        if isinstance(obj, api.HostMapping):
            self._mappings.append((int(obj.address), int(obj.length), name))
        return name

    def encode(self, value: Any, arg: str = "") -> Any:
        """*value* in a JSON form replay can decode."""
        if value is None or isinstance(value, bool | str | float):
            return value
        if isinstance(value, int):
            if arg == "userspace_addr" and value:
                for start, length, name in self._mappings:
                    if start <= value < start + length:
                        return {"ref": name, "offset": value - start}
            return value
        if isinstance(value, bytes | bytearray):
            return {"hex": bytes(value).hex()}
        if any(isinstance(value, cls) for cls, _ in _KINDS):
            return {"ref": self.handle(value)}
        if isinstance(value, os.stat_result):
            return {"st_size": value.st_size, "st_blksize": value.st_blksize, "st_ino": value.st_ino}
        if isinstance(value, list | tuple):
            return [self.encode(v) for v in value]
        return {"repr": repr(value), "type": type(value).__name__}

    def fields(
        self,
        obj: object,
        method: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        first_seq: int,
        *,
        result: Any = None,
        error: BaseException | None = None,
    ) -> dict[str, Any]:
        """The ``uapi`` event fields of a call of *method* on *obj* (*args* without self)."""
        named = _bind(method, obj, args, kwargs)
        fields: dict[str, Any] = {
            "call": call_name(obj, method.__name__),
            "obj": self.handle(obj),
            "args": {k: self.encode(v, k) for k, v in named.items()},
            "first_seq": first_seq,
        }
        if error is None:
            fields["result"] = self.encode(result)
        else:
            fields.update(outcome_fields(error))
        return fields


_SIGNATURES: dict[Callable[..., Any], inspect.Signature] = {}


def _signature(method: Callable[..., Any]) -> inspect.Signature:
    found = _SIGNATURES.get(method)
    if found is None:
        found = _SIGNATURES[method] = inspect.signature(method)
    return found


#: Per method: its parameter names after ``self`` and their defaults, or None when it
#: takes ``*args``/``**kwargs`` (then ``inspect`` binds).  Binding by hand is a dict
#: build, where ``Signature.bind`` + ``apply_defaults`` cost ~10 us per recorded call.
_PLAIN: dict[Callable[..., Any], tuple[tuple[str, ...], dict[str, Any]] | None] = {}
_NO_DEFAULT = inspect.Parameter.empty


def _plain(method: Callable[..., Any]) -> tuple[tuple[str, ...], dict[str, Any]] | None:
    if method in _PLAIN:
        return _PLAIN[method]
    params = list(_signature(method).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    plain = None
    if all(p.kind in kinds for p in params):
        plain = tuple(p.name for p in params), {p.name: p.default for p in params}
    _PLAIN[method] = plain
    return plain


def _bind(
    method: Callable[..., Any], obj: object, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The arguments of a call of *method* on *obj* by name, defaults filled in, in the
    signature's order (``arg0``... for a call that does not bind)."""
    plain = _plain(method)
    if plain is not None:
        names, defaults = plain
        if len(args) <= len(names) and kwargs.keys() <= defaults.keys():
            named = dict(zip(names, args, strict=False))
            out: dict[str, Any] = {}
            for name in names:
                if name in named:
                    if name in kwargs:
                        break  # given twice: what bind() refuses
                    out[name] = named[name]
                elif name in kwargs:
                    out[name] = kwargs[name]
                elif defaults[name] is not _NO_DEFAULT:
                    out[name] = defaults[name]
                else:
                    break  # a required argument is missing
            else:
                return out
    try:
        bound = _signature(method).bind(obj, *args, **kwargs)
        bound.apply_defaults()
        return {k: v for k, v in bound.arguments.items() if k != "self"}
    except TypeError:
        return {f"arg{i}": v for i, v in enumerate(args)} | kwargs


def outcome_fields(error: BaseException) -> dict[str, Any]:
    """The outcome fields of a call that raised *error*."""
    out: dict[str, Any] = {"error": str(error), "raised": type(error).__name__}
    if isinstance(error, KvmError):
        out.update(errno=errno_name(error.errno or 0), rule=error.rule)
    if isinstance(error, MemoryFault):
        out.update(exit="memory_fault", gpa=error.gpa, size=error.size, flags=error.flags)
    elif isinstance(error, HostSigbus):
        out.update(exit="sigbus", address=error.address)
    elif isinstance(error, HypercallExit):
        out.update(exit="hypercall", nr=error.nr, hc_args=list(error.args))
    elif isinstance(error, MmioExit):
        out.update(exit="mmio", gpa=error.gpa, is_write=error.is_write)
    elif isinstance(error, GuestExit):
        out.update(exit=type(error).__name__)
    elif isinstance(error, HostCrash):
        out.update(exit="crash", verdict=error.verdict)
    return out


# --- recording any backend's objects ----------------------------------------------------------
class _Recording:
    """What the recording wrappers share: the wrapped object and the Kvm's recorder."""

    _inner: Any
    _root: RecordingKvm

    def __getattr__(self, name: str) -> Any:  # backend extras (fileno, dup...) pass through
        return getattr(self._inner, name)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        root = self._root
        inner = self._inner
        target = getattr(type(inner), method)
        first = next_seq()
        plain_args = tuple(_unwrap(a) for a in args)
        plain_kwargs = {k: _unwrap(v) for k, v in kwargs.items()}
        try:
            result = getattr(inner, method)(*plain_args, **plain_kwargs)
        except BaseException as exc:
            root.emit(root.recorder.fields(inner, target, plain_args, plain_kwargs, first, error=exc), inner)
            raise
        wrapped = root.wrap(result)
        root.emit(root.recorder.fields(inner, target, plain_args, plain_kwargs, first, result=result), inner)
        return wrapped

    @property
    def closed(self) -> bool:
        return bool(self._inner.closed)

    def close(self) -> None:
        self._call("close")


def _unwrap(value: Any) -> Any:
    return value._inner if isinstance(value, _Recording) else value


class RecordingHostMapping(_Recording, api.HostMapping):
    """A recorded :class:`guestmem.api.HostMapping`."""

    def __init__(self, root: RecordingKvm, inner: api.HostMapping) -> None:
        self._root, self._inner = root, inner
        self.address, self.length = inner.address, inner.length

    def read(self, offset: int, n: int) -> bytes:
        result: bytes = self._call("read", offset, n)
        return result

    def write(self, offset: int, data: bytes) -> None:
        self._call("write", offset, data)

    def madvise(self, advice: int, offset: int = 0, length: int | None = None) -> None:
        self._call("madvise", advice, offset, length)


class RecordingGuestMemfd(_Recording, api.GuestMemfd):
    """A recorded :class:`guestmem.api.GuestMemfd`."""

    def __init__(self, root: RecordingKvm, inner: api.GuestMemfd) -> None:
        self._root, self._inner = root, inner
        self.size, self.flags = inner.size, inner.flags

    def fileno(self) -> int:
        return int(self._inner.fileno())

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        self._call("fallocate", mode, offset, length)

    def read(self, n: int) -> bytes:
        result: bytes = self._call("read", n)
        return result

    def write(self, data: bytes) -> int:
        result: int = self._call("write", data)
        return result

    def fstat(self) -> Any:
        return self._call("fstat")

    def truncate(self, size: int) -> None:
        self._call("truncate", size)

    def dup(self) -> api.GuestMemfd:
        result: api.GuestMemfd = self._call("dup")
        return result

    def mmap(self, length: int, offset: int = 0, shared: bool = True) -> api.HostMapping:
        result: api.HostMapping = self._call("mmap", length, offset, shared)
        return result

    def inject_memory_failure(self, offset: int) -> None:
        self._call("inject_memory_failure", offset)


class RecordingVcpu(_Recording, api.Vcpu):
    """A recorded :class:`guestmem.api.Vcpu`."""

    def __init__(self, root: RecordingKvm, inner: api.Vcpu) -> None:
        self._root, self._inner = root, inner
        self.vcpu_id = inner.vcpu_id

    def access(
        self,
        gpa: int,
        length: int = 1,
        *,
        write: bool = False,
        data: bytes | None = None,
        private: bool | None = None,
    ) -> bytes | None:
        result: bytes | None = self._call("access", gpa, length, write=write, data=data, private=private)
        return result

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> int:
        result: int = self._call("pre_fault_memory", gpa, size, flags)
        return result

    def hypercall(self, nr: int, *args: int) -> int:
        result: int = self._call("hypercall", nr, *args)
        return result

    def memory_encrypt_op(self, cmd: Any) -> int:
        result: int = self._call("memory_encrypt_op", cmd)
        return result


class RecordingVm(_Recording, api.Vm):
    """A recorded :class:`guestmem.api.Vm`."""

    def __init__(self, root: RecordingKvm, inner: api.Vm) -> None:
        self._root, self._inner = root, inner
        self.vm_type = inner.vm_type

    def check_extension(self, cap: int) -> int:
        result: int = self._call("check_extension", cap)
        return result

    def create_guest_memfd(self, size: int, flags: int = 0) -> api.GuestMemfd:
        result: api.GuestMemfd = self._call("create_guest_memfd", size, flags)
        return result

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        self._call("set_user_memory_region", slot, flags, guest_phys_addr, memory_size, userspace_addr)

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int = 0,
        guest_memfd: Any = None,
        guest_memfd_offset: int = 0,
    ) -> None:
        self._call(
            "set_user_memory_region2",
            slot,
            flags,
            guest_phys_addr,
            memory_size,
            userspace_addr,
            guest_memfd,
            guest_memfd_offset,
        )

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        self._call("set_memory_attributes", address, size, attributes, flags)

    def create_vcpu(self, vcpu_id: int) -> api.Vcpu:
        result: api.Vcpu = self._call("create_vcpu", vcpu_id)
        return result

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> int:
        result: int = self._call("enable_cap", cap, *args, flags=flags)
        return result

    def memory_encrypt_op(self, cmd: Any) -> int:
        result: int = self._call("memory_encrypt_op", cmd)
        return result


class RecordingKvm(_Recording, api.Kvm):
    """A recorded ``/dev/kvm``: every uAPI call of it and of the objects it hands out is a
    ``uapi`` event in :attr:`events`."""

    def __init__(self, inner: api.Kvm) -> None:
        self._root, self._inner = self, inner
        self.backend = inner.backend
        self.recorder = Recorder()
        self.recorder.handle(inner)
        #: The trace: one ``uapi`` event per call.
        self.events: list[TraceEvent] = []
        self._wrappers: dict[int, _Recording] = {id(inner): self}

    def emit(self, fields: dict[str, Any], obj: object) -> None:
        """Append a ``uapi`` event."""
        self.events.append(make_event("uapi", None, fields))

    def wrap(self, value: Any) -> Any:
        """The recording wrapper of a uAPI object (the same one each time)."""
        if isinstance(value, _Recording) or not any(isinstance(value, cls) for cls, _ in _KINDS[1:]):
            return value
        found = self._wrappers.get(id(value))
        if found is None:
            found = self._wrappers[id(value)] = self._new_wrapper(value)
        return found

    def _new_wrapper(self, value: Any) -> _Recording:
        if isinstance(value, api.Vm):
            return RecordingVm(self, value)
        if isinstance(value, api.GuestMemfd):
            return RecordingGuestMemfd(self, value)
        if isinstance(value, api.HostMapping):
            return RecordingHostMapping(self, value)
        return RecordingVcpu(self, value)

    def check_extension(self, cap: int) -> int:
        result: int = self._call("check_extension", cap)
        return result

    def create_vm(self, vm_type: int = 0) -> api.Vm:
        result: api.Vm = self._call("create_vm", vm_type)
        return result

    def mmap_anonymous(self, length: int) -> api.HostMapping:
        result: api.HostMapping = self._call("mmap_anonymous", length)
        return result


def record(kvm: api.Kvm) -> RecordingKvm:
    """Record every uAPI call made through *kvm* and the objects it hands out."""
    return kvm if isinstance(kvm, RecordingKvm) else RecordingKvm(kvm)
