"""The scenario file format: attrs values a TOML file is structured into.

A scenario describes one VM's life in two vocabularies (``docs/vmm-testing.md`` is the
reference): uAPI steps, which run the same ioctls on every backend (``vm.set_memory_attributes``,
``gmem.fallocate``, ``host.read``...), and portable intents, which each backend translates
into its own mechanism (``guest.convert``, ``guest.accept``, ``launch.populate``...).  Every
step may assert what it expects (``expect``, or per backend ``expect_on``).

These are plain values; :mod:`guestmem.serialize` reads them from TOML (unknown keys are
errors naming file, line and field) and :mod:`guestmem.scenario.run` runs them.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Final, Literal, NewType

import attrs

from guestmem import uapi

__all__ = [
    "STEP_TYPES",
    "Data",
    "Expect",
    "HostSpec",
    "Meta",
    "Region",
    "Scenario",
    "Size",
    "Span",
    "Step",
    "Teardown",
    "VmSpec",
    "VmmSpec",
    "parse_data",
    "parse_size",
    "parse_span",
]

#: An address or a size: an integer, or text such as ``"0x1000"``, ``"4K"``, ``"2M"``, ``"64G"``.
Size = NewType("Size", int)
#: Bytes: a string (UTF-8), or ``{hex = "..."}``, ``{fill = 0x90, size = "8K"}``,
#: ``{text = "ab", size = "1M"}`` (repeated to size).
Data = NewType("Data", bytes)

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(0x[0-9a-fA-F_]+|[0-9_]+)\s*([KMGT]?)(?:i?B)?\s*$")


def parse_size(value: Any) -> int:
    """An integer from an int or size text (``"4K"``, ``"0x2000"``, ``"2MiB"``)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size or address, got {value!r}")
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size or address, got {value!r}")
    found = _SIZE.match(value)
    if found is None:
        raise ValueError(f"not a size or address: {value!r} (write 4096, 0x1000, 4K, 2M or 64G)")
    number, unit = found.groups()
    return int(number, 0) * _UNITS[unit]


def parse_data(value: Any) -> bytes:
    """Bytes from a string or one of the data tables (see :data:`Data`)."""
    if isinstance(value, str):
        return value.encode()
    if not isinstance(value, dict):
        raise ValueError(f"expected a string or a data table, got {value!r}")
    keys = set(value)
    if keys == {"hex"}:
        return bytes.fromhex(str(value["hex"]))
    if keys == {"fill", "size"}:
        fill = parse_size(value["fill"])
        if not 0 <= fill <= 0xFF:
            raise ValueError(f"fill must be a byte, got {fill}")
        return bytes([fill]) * parse_size(value["size"])
    if keys == {"text", "size"}:
        unit = str(value["text"]).encode()
        size = parse_size(value["size"])
        return (unit * (size // max(1, len(unit)) + 1))[:size]
    raise ValueError(f"a data table is {{hex}}, {{fill, size}} or {{text, size}}, got keys {sorted(keys)}")


@attrs.frozen
class Span:
    """A guest-physical (or file, or mapping) range ``[start, start + size)``."""

    start: int
    size: int

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.start + self.size

    def __str__(self) -> str:
        return f"{self.start:#x}+{_show_size(self.size)}"


def parse_span(value: Any) -> Span:
    """A :class:`Span` from ``"START+SIZE"`` text, ``[start, size]`` or ``{start, size}``."""
    if isinstance(value, str):
        start, plus, size = value.partition("+")
        if not plus:
            raise ValueError(f"a range is written START+SIZE (e.g. 0x1000+4K), got {value!r}")
        found = Span(parse_size(start), parse_size(size))
    elif isinstance(value, list) and len(value) == 2:
        found = Span(parse_size(value[0]), parse_size(value[1]))
    elif isinstance(value, dict) and set(value) == {"start", "size"}:
        found = Span(parse_size(value["start"]), parse_size(value["size"]))
    else:
        raise ValueError(f"a range is START+SIZE, [start, size] or {{start, size}}, got {value!r}")
    if found.start < 0 or found.size <= 0:
        raise ValueError(f"a range needs start >= 0 and size > 0, got {value!r}")
    return found


def _show_size(size: int) -> str:
    if size < 1024:
        return str(size)
    for unit in "TGMK":
        if size >= _UNITS[unit] and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{size:#x}"


# --- expectations ----------------------------------------------------------------------------
#: The exits every backend shares; ``Expect.exit`` also takes the class name of an exit an
#: architecture defines (``PageFaultExit``: ``GUNYAH_VCPU_EXIT_PAGE_FAULT``).
EXIT_KINDS: Final = ("memory_fault", "hypercall", "mmio", "internal_error", "sigbus")


@attrs.frozen(kw_only=True)
class Expect:
    """What a step is expected to do; fields left out are not checked.

    ``ok`` (no error), ``errno`` (``"EINVAL"``) and ``rule`` (``"B-5"``) of a failed call;
    ``exit`` and its ``gpa``/``size``/``private`` (a ``KVM_EXIT_MEMORY_FAULT``...: one of
    :data:`EXIT_KINDS`, or the class name of a backend's own exit);
    ``data``/``zero`` (what a read returned); ``value`` (a return value, e.g. of
    ``check_extension``, or pages still allocated at teardown); ``crash``/``verdict`` (a
    hardware verdict that took the host down); ``raised`` (the class of a guest-side
    exception, such as ``UnvalidatedAccess``); ``note`` (text the backend's note holds);
    ``counters``/``costs`` (the step's counter or cost-category deltas).
    """

    ok: bool | None = None
    errno: str | None = None
    rule: str | None = None
    exit: str | None = None
    gpa: Size | None = None
    size: Size | None = None
    private: bool | None = None
    data: Data | None = None
    zero: bool | None = None
    value: int | None = None
    crash: bool | None = None
    verdict: str | None = None
    raised: str | None = None
    note: str | None = None
    counters: dict[str, int] | None = None
    costs: dict[str, int] | None = None


# --- steps -----------------------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class Step:
    """What every step has.

    ``do`` names the step; ``name`` labels its row; ``requires`` lists capabilities
    (:data:`guestmem.intents.CAPABILITIES`) without which it is not applicable; ``only``
    restricts it to some backends; ``skip`` makes it not applicable on a backend with the
    reason given; ``expect`` and ``expect_on.<backend>`` (which replaces ``expect`` there)
    assert its outcome.
    """

    #: The ``do`` value this class stands for.
    kind: ClassVar[str] = ""
    #: Objects (names) the step reads, by field.
    refs: ClassVar[tuple[str, ...]] = ()

    do: str
    name: str | None = None
    expect: Expect | None = None
    expect_on: dict[str, Expect] = attrs.Factory(dict)
    requires: list[str] = attrs.Factory(list)
    only: list[str] | None = None
    skip: dict[str, str] = attrs.Factory(dict)

    def describe(self) -> str:
        """A short text for the step's row: its name, or ``do`` and its main arguments."""
        if self.name:
            return self.name
        shown = [f"{k.rstrip('_')}={_show(getattr(self, k), k)}" for k in self.show_fields()]
        return f"{self.do} {' '.join(shown)}".strip()

    def show_fields(self) -> tuple[str, ...]:
        """The fields :meth:`describe` shows."""
        return ()

    def created(self) -> str | None:
        """The object name the step creates (``as``), if any."""
        return getattr(self, "as_", None)


def _show(value: Any, field: str = "") -> str:
    if isinstance(value, bytes):
        text = value[:16].decode("utf-8", "replace")
        return repr(text + ("..." if len(value) > 16 else ""))
    if isinstance(value, int) and not isinstance(value, bool):
        if field in ("size", "length", "page_size") and value:
            return _show_size(value)
        return hex(value) if value >= 16 else str(value)
    return str(value)


def _shows(*fields: str) -> Any:
    def show_fields(self: Step) -> tuple[str, ...]:
        return tuple(f for f in fields if getattr(self, f) is not None)

    return show_fields


# intents -------------------------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class Populate(Step):
    """``launch.populate``: put ``data`` at ``gpa`` before the guest runs (``measure``:
    true requires a measurement, false leaves it out, unset: the architecture's default)."""

    kind = "launch.populate"
    gpa: Size
    data: Data
    measure: bool | None = None
    show_fields = _shows("gpa", "measure")


@attrs.frozen(kw_only=True)
class LaunchFinish(Step):
    """``launch.finish``: end the launch (inserted before the first guest step if absent)."""

    kind = "launch.finish"


@attrs.frozen(kw_only=True)
class Convert(Step):
    """``guest.convert``: the guest turns ``range`` ``to`` shared or private."""

    kind = "guest.convert"
    range: Span
    to: Literal["shared", "private"]
    page_size: Size = Size(uapi.PAGE_SIZE)
    coalesce: bool = True
    show_fields = _shows("range", "to")


@attrs.frozen(kw_only=True)
class Accept(Step):
    """``guest.accept``: the guest accepts ``range`` in pages of ``page_size``, at most
    ``entries`` per request (``coalesce = false``: one request per 4 KiB page)."""

    kind = "guest.accept"
    range: Span
    page_size: Size = Size(uapi.PAGE_SIZE)
    coalesce: bool = True
    entries: int = 64
    show_fields = _shows("range", "page_size")


@attrs.frozen(kw_only=True)
class GuestRead(Step):
    """``guest.read``: a guest load of ``length`` bytes at ``gpa`` (``side``: the access is
    private or shared; unset: what the guest would use)."""

    kind = "guest.read"
    gpa: Size
    length: Size
    side: Literal["private", "shared"] | None = None
    show_fields = _shows("gpa", "length", "side")


@attrs.frozen(kw_only=True)
class GuestWrite(Step):
    """``guest.write``: a guest store of ``data`` at ``gpa``."""

    kind = "guest.write"
    gpa: Size
    data: Data
    side: Literal["private", "shared"] | None = None
    show_fields = _shows("gpa", "data", "side")


@attrs.frozen(kw_only=True)
class Touch(Step):
    """``guest.touch``: the guest's first store to every page of ``range``."""

    kind = "guest.touch"
    range: Span
    show_fields = _shows("range")


# uAPI ----------------------------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class CreateVm(Step):
    """``kvm.create_vm``: another VM of ``kind`` (no launch: its RAM is up to the steps)."""

    kind = "kvm.create_vm"
    vm_kind: Literal["private", "default"] = "private"
    as_: str
    show_fields = _shows("vm_kind", "as_")


@attrs.frozen(kw_only=True)
class MmapAnonymous(Step):
    """``kvm.mmap_anonymous``: shared anonymous host memory."""

    kind = "kvm.mmap_anonymous"
    size: Size
    as_: str
    show_fields = _shows("size", "as_")


@attrs.frozen(kw_only=True)
class CreateGmem(Step):
    """``vm.create_guest_memfd``."""

    kind = "vm.create_guest_memfd"
    refs = ("vm",)
    vm: str = "vm"
    size: Size
    flags: list[str] | int = 0
    as_: str
    show_fields = _shows("size", "as_")


@attrs.frozen(kw_only=True)
class SetRegion(Step):
    """``vm.set_user_memory_region2``; ``userspace`` is a mapping name, ``"name+offset"``
    or an address, ``gmem`` a guest_memfd name (a size of 0 deletes the slot)."""

    kind = "vm.set_user_memory_region2"
    refs = ("vm", "gmem", "userspace")
    vm: str = "vm"
    slot: int
    flags: list[str] | int = attrs.Factory(lambda: ["KVM_MEM_GUEST_MEMFD"])
    gpa: Size
    size: Size
    userspace: str | int | None = None
    gmem: str | None = None
    gmem_offset: Size = Size(0)
    show_fields = _shows("slot", "gpa", "size", "gmem")


@attrs.frozen(kw_only=True)
class SetAttributes(Step):
    """``vm.set_memory_attributes``: ``attributes`` is ``"private"``, ``"shared"`` or a number."""

    kind = "vm.set_memory_attributes"
    refs = ("vm",)
    vm: str = "vm"
    range: Span
    attributes: Literal["private", "shared"] | int
    show_fields = _shows("range", "attributes")


@attrs.frozen(kw_only=True)
class CreateVcpu(Step):
    """``vm.create_vcpu``."""

    kind = "vm.create_vcpu"
    refs = ("vm",)
    vm: str = "vm"
    id: int
    as_: str
    show_fields = _shows("id", "as_")


@attrs.frozen(kw_only=True)
class EnableCap(Step):
    """``vm.enable_cap``: ``cap`` is a ``KVM_CAP_*`` name or number."""

    kind = "vm.enable_cap"
    refs = ("vm",)
    vm: str = "vm"
    cap: str | int
    args: list[int] = attrs.Factory(list)
    show_fields = _shows("cap")


@attrs.frozen(kw_only=True)
class CheckExtension(Step):
    """``check_extension`` on ``on`` (``"kvm"`` or a VM name); the value is the outcome."""

    kind = "check_extension"
    refs = ("on",)
    on: str = "vm"
    cap: str | int
    show_fields = _shows("on", "cap")


@attrs.frozen(kw_only=True)
class Fallocate(Step):
    """``gmem.fallocate``: ``mode`` is ``"punch_hole"``, ``"allocate"`` or a number;
    ``range`` is in the file."""

    kind = "gmem.fallocate"
    refs = ("gmem",)
    gmem: str = "gmem0"
    mode: Literal["punch_hole", "allocate"] | int = "punch_hole"
    range: Span
    show_fields = _shows("gmem", "mode", "range")


@attrs.frozen(kw_only=True)
class GmemMmap(Step):
    """``gmem.mmap``."""

    kind = "gmem.mmap"
    refs = ("gmem",)
    gmem: str = "gmem0"
    length: Size
    offset: Size = Size(0)
    as_: str
    show_fields = _shows("gmem", "length", "as_")


@attrs.frozen(kw_only=True)
class InjectMemoryFailure(Step):
    """``gmem.inject_memory_failure`` at ``offset`` of the file."""

    kind = "gmem.inject_memory_failure"
    refs = ("gmem",)
    gmem: str = "gmem0"
    offset: Size
    show_fields = _shows("gmem", "offset")


@attrs.frozen(kw_only=True)
class HostRead(Step):
    """``host.read``: a host load through mapping ``map``."""

    kind = "host.read"
    refs = ("map",)
    map: str = "shared0"
    offset: Size
    length: Size
    show_fields = _shows("map", "offset", "length")


@attrs.frozen(kw_only=True)
class HostWrite(Step):
    """``host.write``: a host store through mapping ``map``."""

    kind = "host.write"
    refs = ("map",)
    map: str = "shared0"
    offset: Size
    data: Data
    show_fields = _shows("map", "offset", "data")


@attrs.frozen(kw_only=True)
class Madvise(Step):
    """``host.madvise``: ``advice`` is ``"dontneed"`` or ``"remove"``; ``range`` is in the mapping."""

    kind = "host.madvise"
    refs = ("map",)
    map: str = "shared0"
    advice: Literal["dontneed", "remove"]
    range: Span
    show_fields = _shows("map", "advice", "range")


@attrs.frozen(kw_only=True)
class VcpuAccess(Step):
    """``vcpu.access``: a load of ``length`` bytes or a store of ``data`` (``private``
    unset: the attribute decides)."""

    kind = "vcpu.access"
    refs = ("vcpu",)
    vcpu: str = "vcpu0"
    gpa: Size
    length: Size | None = None
    data: Data | None = None
    private: bool | None = None
    show_fields = _shows("gpa", "length", "data", "private")


@attrs.frozen(kw_only=True)
class PreFault(Step):
    """``vcpu.pre_fault_memory``; the value is the size left."""

    kind = "vcpu.pre_fault_memory"
    refs = ("vcpu",)
    vcpu: str = "vcpu0"
    range: Span
    show_fields = _shows("range")


@attrs.frozen(kw_only=True)
class Hypercall(Step):
    """``vcpu.hypercall``: the guest's hypercall ``nr`` with ``args``; the value is its result."""

    kind = "vcpu.hypercall"
    refs = ("vcpu",)
    vcpu: str = "vcpu0"
    nr: int
    args: list[Size] = attrs.Factory(list)
    show_fields = _shows("nr")


@attrs.frozen(kw_only=True)
class Close(Step):
    """``close``: close object ``object`` (a VM, guest_memfd, mapping or vCPU)."""

    kind = "close"
    refs = ("object",)
    object: str
    show_fields = _shows("object")


#: ``do`` -> step class.
STEP_TYPES: dict[str, type[Step]] = {
    cls.kind: cls
    for cls in (
        Populate,
        LaunchFinish,
        Convert,
        Accept,
        GuestRead,
        GuestWrite,
        Touch,
        CreateVm,
        MmapAnonymous,
        CreateGmem,
        SetRegion,
        SetAttributes,
        CreateVcpu,
        EnableCap,
        CheckExtension,
        Fallocate,
        GmemMmap,
        InjectMemoryFailure,
        HostRead,
        HostWrite,
        Madvise,
        VcpuAccess,
        PreFault,
        Hypercall,
        Close,
    )
}
#: Steps that run the guest (the launch is finished before the first of them).
GUEST_STEPS = frozenset({"guest.convert", "guest.accept", "guest.read", "guest.write", "guest.touch"})


# --- the file --------------------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class Meta:
    """``[scenario]``: what the scenario is and what it shows.

    ``backends`` lists the rows run by default (a backend not installed is a row "n/a:
    backend not installed"); ``not_applicable`` makes a backend's whole row n/a with the
    reason given.
    """

    name: str = ""
    title: str = ""
    shows: str = ""
    cites: list[str] = attrs.Factory(list)
    backends: list[str] | None = None
    not_applicable: dict[str, str] = attrs.Factory(dict)


@attrs.frozen(kw_only=True)
class HostSpec:
    """``[host]``: the kernel modelled (``profile``) and what-if ``policies`` (fields of
    :class:`guestmem.model.profile.KernelProfile`, model backends only)."""

    profile: str | None = None
    policies: dict[str, bool | int] = attrs.Factory(dict)


@attrs.frozen(kw_only=True)
class Region:
    """One region of guest RAM."""

    gpa: Size = Size(0)
    size: Size


@attrs.frozen(kw_only=True)
class VmSpec:
    """``[vm]``: the kind of VM, its vCPUs and RAM (``size`` at gpa 0, or ``memory`` regions)."""

    kind: Literal["private", "default"] = "private"
    vcpus: int = 1
    size: Size | None = None
    memory: list[Region] | None = None

    def layout(self) -> list[tuple[int, int]]:
        """``(gpa, size)`` of every RAM region."""
        if self.memory:
            return [(r.gpa, r.size) for r in self.memory]
        return [(0, self.size if self.size is not None else 16 << 20)]


@attrs.frozen(kw_only=True)
class VmmSpec:
    """``[vmm]``: ``handle_exits = "qemu"`` runs exits through the built-in VMM loop
    (:class:`guestmem.vmm.QemuVmm`); ``"none"`` makes them steps' outcomes.  ``prefault``
    pre-faults converted ranges as QEMU does with ``KVM_PRE_FAULT_MEMORY``."""

    handle_exits: Literal["qemu", "none"] = "qemu"
    prefault: bool = False


@attrs.frozen(kw_only=True)
class Teardown:
    """``[teardown]``: what closing everything leaves; its value is the host pages still
    allocated (model backends)."""

    expect: Expect | None = None
    expect_on: dict[str, Expect] = attrs.Factory(dict)


@attrs.frozen(kw_only=True)
class Scenario:
    """A scenario file."""

    scenario: Meta = attrs.Factory(Meta)
    host: HostSpec = attrs.Factory(HostSpec)
    vm: VmSpec = attrs.Factory(VmSpec)
    vmm: VmmSpec = attrs.Factory(VmmSpec)
    steps: list[Step] = attrs.Factory(list)
    teardown: Teardown = attrs.Factory(Teardown)
    #: Where it was read from (not a TOML key).
    path: str = ""

    @property
    def name(self) -> str:
        """The scenario's name."""
        return self.scenario.name
