"""Hostile operations for the stateful machine: wrong types, integers at the edges of the
kernel's C types, closed and foreign objects, reentrant calls from hooks, and each
backend's arch face.

:class:`~guestmem.conformance.machine.GmemMachine` with ``hostile`` set mixes two rules of
this module into its valid ones: ``hostile`` makes one call of the uAPI face (or of the
backend's arch face) with drawn arguments, ``reentrant`` arms :class:`Reentrant`, an
observer that calls back into the model from inside a hook, and then triggers that hook.
A call is plain data (:func:`draw_call`: a target role, a method, arguments, with objects
named by role as :class:`Ref`), so that a program of the machine is JSON and replays
without Hypothesis.

What a call came to is an outcome class (:func:`classify`): ``ok``, a kernel ``errno``
(with the rule that decided it), ``type_error`` naming a parameter (what a wrong type must
give), a guest ``exit`` or host ``signal``, a modelled hardware ``verdict``
(:class:`~guestmem.errors.HostCrash` and the backend's own, ``hostile_outcomes``), or a
``crash``: any other exception, keyed by its type and the innermost guestmem frame.  A
crash raises :class:`Finding`; so does a failed call that changed the state
(``half-applied``: the state after a failed call must equal the state before,
:func:`state_of`).  A call on the machine's own objects that succeeded and changed the
state ends the sequence (``desynced``): the machine's reference no longer describes it; so
does an arch call on them that ends in a guest exit (its completion at the next ``KVM_RUN``
may change the state).

Roles: ``kvm``, ``vm``, ``gmem``, ``vcpu`` are the machine's own objects (model backends
only: the real kernel's state cannot be compared); ``scratch_*`` a second VM of the same
type with its RAM (:class:`~guestmem.conformance.kit.KitGuest`), made on first use and
again once closed; ``closed_*`` objects made and closed at once.  The machine's
``gmem`` passed to the scratch VM, or the scratch ``gmem`` to the machine's VM, is another
VM's guest_memfd.

A backend offers its arch face through two keys of ``guestmem_conformance_options``:

- ``hostile_ops``: ``{name: (kind, call, params[, partial])}``, where *kind* is ``"vm"``
  or ``"vcpu"`` (the object *call* takes first), *call* a callable ``call(obj, *args)``,
  *params* the kinds of its arguments (:data:`KINDS`), and *partial* True for a call whose
  failure may leave progress behind as the kernel's does (``kvm_gmem_populate`` keeps the
  folio it allocated when the architecture's ``post_populate`` fails): the half-applied
  check leaves it out; e.g. guestmem-snp's
  ``"sev.init2": ("vm", lambda vm, *a: sev(vm).init2(*a), ("u64", "u32", "u32"))``;
- ``hostile_outcomes``: exception types that are modelled hardware verdicts of the
  backend, or documented usage errors of its model-only helpers (counted as ``verdict``,
  never as a crash).
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable
from typing import Any

import attrs

from guestmem import uapi
from guestmem.backend import hookimpl, view
from guestmem.cabi import ArgumentTypeError
from guestmem.conformance.kit import BASE_GPA, KitGuest
from guestmem.errors import (
    BackendError,
    GuestExit,
    HostCrash,
    HostSigbus,
    HostSigsegv,
    KvmError,
    MemoryFault,
    ObserverError,
    errno_name,
)
from guestmem.invariants import InvariantViolation

PAGE = uapi.PAGE_SIZE
KEEP = uapi.FALLOC_FL_KEEP_SIZE
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
U64 = uapi.U64_MAX
#: Pages of the scratch VM's RAM.
SCRATCH_PAGES = 4

#: Integers at the edges of the kernel's C types (u32, u64, loff_t) and of pages.
BOUNDARY_INTS: tuple[int, ...] = (
    0,
    1,
    -1,
    PAGE - 1,
    PAGE + 1,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1 << 52,
    (1 << 63) - 1,
    1 << 63,
    -(1 << 63),
    -(1 << 63) - 1,
    U64,
    1 << 64,
    (1 << 64) + PAGE,
    -PAGE,
)
#: What goes where an integer should: floats (NaN and infinities too), text, None, bytes, a list.
WRONG_INTS: tuple[Any, ...] = (
    0.0,
    4096.0,
    2.5,
    math.nan,
    math.inf,
    -math.inf,
    "4096",
    "",
    None,
    b"\x00\x10",
    [4096],
)
#: What goes where bytes should.
WRONG_BYTES: tuple[Any, ...] = (None, "data", 1, 4096, 2.5, [1, 2])


@attrs.frozen
class Ref:
    """An object argument named by its role (see the module docstring), resolved when the
    call runs."""

    role: str


#: Valid draws per kind of parameter; ``gmem`` and ``uaddr`` are objects of the roles.
KINDS: dict[str, Callable[[random.Random], Any]] = {
    "size": lambda r: r.choice((1, 2, 4, 8, 16)) * PAGE,
    "offset": lambda r: r.randrange(0, 16) * PAGE,
    "length": lambda r: r.randint(1, 64),
    "gpa": lambda r: BASE_GPA + r.randrange(0, 16) * PAGE,
    "gfn": lambda r: BASE_GPA // PAGE + r.randrange(0, 16),
    "pfn": lambda r: (1 << 20) + r.randrange(0, 64),
    "slot": lambda r: r.randrange(0, 4),
    "vcpu_id": lambda r: r.randrange(0, 8),
    "vm_type": lambda r: r.choice((0, 1, 2, 3, 4, 5, 1 << 8, 1 << 31)),
    "cap": lambda r: r.choice(
        (
            uapi.KVM_CAP_GUEST_MEMFD,
            uapi.KVM_CAP_GUEST_MEMFD_FLAGS,
            uapi.KVM_CAP_MEMORY_ATTRIBUTES,
            uapi.KVM_CAP_VM_TYPES,
            uapi.KVM_CAP_EXIT_HYPERCALL,
            uapi.KVM_CAP_USER_MEMORY2,
        )
    ),
    "mem_flags": lambda r: r.choice((0, uapi.KVM_MEM_GUEST_MEMFD, uapi.KVM_MEM_LOG_DIRTY_PAGES)),
    "gmem_flags": lambda r: r.choice(
        (0, uapi.GUEST_MEMFD_FLAG_MMAP, uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED)
    ),
    "falloc_mode": lambda r: r.choice((KEEP, PUNCH, PUNCH, 0)),
    "attributes": lambda r: r.choice((0, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)),
    "flags": lambda r: 0,
    "u32": lambda r: r.choice((0, 1, 2)),
    "u64": lambda r: r.choice((0, 1, PAGE)),
    "data": lambda r: r.randbytes(r.randint(1, 32)),
    "bool": lambda r: r.choice((True, False)),
    "gmem": lambda r: Ref(r.choice(("scratch_gmem", "scratch_gmem", "gmem"))),
    "uaddr": lambda r: Ref("scratch_uaddr"),
    "vcpu": lambda r: Ref(r.choice(("scratch_vcpu", "vcpu"))),
}
#: Kinds that take an integer (the others: bytes, a bool, an object).
INT_KINDS = frozenset(KINDS) - {"data", "bool", "gmem", "uaddr", "vcpu"}
#: Hostile values of the object kinds: closed, of the wrong kind, raw numbers, wrong types.
HOSTILE_OBJECTS: dict[str, tuple[Any, ...]] = {
    "gmem": (Ref("closed_gmem"), Ref("scratch_vm"), Ref("kvm"), -1, 1 << 32, 2.5, "3", b""),
    "uaddr": (Ref("closed_uaddr"), 0, 0x10008, 1 << 47, -PAGE, U64 & ~(PAGE - 1), 2.5, None),
    "vcpu": (Ref("closed_vcpu"), Ref("scratch_vm"), 0, None),
}

#: The uAPI face: ``{kind of object: [(method, parameter names and kinds), ...]}``; a
#: keyword parameter is written ``*name``.
FACE: dict[str, tuple[tuple[str, tuple[tuple[str, str], ...]], ...]] = {
    "kvm": (
        ("check_extension", (("cap", "cap"),)),
        ("create_vm", (("vm_type", "vm_type"),)),
        ("mmap_anonymous", (("length", "size"),)),
    ),
    "vm": (
        ("check_extension", (("cap", "cap"),)),
        ("create_guest_memfd", (("size", "size"), ("flags", "gmem_flags"))),
        (
            "set_user_memory_region",
            (
                ("slot", "slot"),
                ("flags", "mem_flags"),
                ("guest_phys_addr", "gpa"),
                ("memory_size", "size"),
                ("userspace_addr", "uaddr"),
            ),
        ),
        (
            "set_user_memory_region2",
            (
                ("slot", "slot"),
                ("flags", "mem_flags"),
                ("guest_phys_addr", "gpa"),
                ("memory_size", "size"),
                ("userspace_addr", "uaddr"),
                ("guest_memfd", "gmem"),
                ("guest_memfd_offset", "offset"),
            ),
        ),
        (
            "set_memory_attributes",
            (("address", "gpa"), ("size", "size"), ("attributes", "attributes"), ("flags", "flags")),
        ),
        ("create_vcpu", (("vcpu_id", "vcpu_id"),)),
        ("enable_cap", (("cap", "cap"), ("args", "u64"))),
    ),
    "gmem": (
        ("fallocate", (("mode", "falloc_mode"), ("offset", "offset"), ("length", "size"))),
        ("read", (("n", "length"),)),
        ("write", (("data", "data"),)),
        ("fstat", ()),
        ("truncate", (("size", "offset"),)),
        ("dup", ()),
        ("mmap", (("length", "size"), ("offset", "offset"), ("shared", "bool"))),
        ("inject_memory_failure", (("offset", "offset"),)),
        ("fileno", ()),
    ),
    "vcpu": (
        ("access", (("gpa", "gpa"), ("length", "length"), ("*private", "bool"))),
        ("access", (("gpa", "gpa"), ("*data", "data"))),
        ("pre_fault_memory", (("gpa", "gpa"), ("size", "size"), ("flags", "flags"))),
        ("hypercall", (("nr", "u32"), ("args", "u64"), ("args", "u64"))),
    ),
    "map": (
        ("read", (("offset", "offset"), ("n", "length"))),
        ("write", (("offset", "offset"), ("data", "data"))),
    ),
}
#: Roles by the kind of object they hold.
ROLES: dict[str, tuple[str, ...]] = {
    "kvm": ("kvm",),
    "vm": ("vm", "scratch_vm", "scratch_vm", "closed_vm"),
    "gmem": ("gmem", "scratch_gmem", "scratch_gmem", "closed_gmem"),
    "vcpu": ("vcpu", "scratch_vcpu", "scratch_vcpu", "closed_vcpu"),
    "map": ("scratch_map", "scratch_map", "closed_map"),
}
#: The machine's own objects: a call on one that succeeds may change what its reference
#: describes.
OWN_ROLES = frozenset({"kvm", "vm", "gmem", "vcpu"})
#: Calls whose failure may legitimately leave a trace (an access that faulted pages in
#: before it failed, a guest's arch call): the half-applied check leaves them out.
PARTIAL = frozenset({"access", "pre_fault_memory", "hypercall", "read", "write"})

#: Hooks :class:`Reentrant` calls back from, actions it takes there, what triggers them.
REENTRANT_HOOKS = (
    "guestmem_gmem_invalidate",
    "guestmem_unmap_gfn_range",
    "guestmem_fault",
    "guestmem_vm_pre_destroy",
    "guestmem_gmem_unbind",
)
REENTRANT_ACTIONS = (
    "close_gmem",
    "close_vm",
    "close_vcpu",
    "punch",
    "delete_slot",
    "set_attributes",
    "access",
)
REENTRANT_TRIGGERS = ("punch", "delete_slot", "access", "close_vm", "set_attributes", "close_gmem")


def draw_value(rng: random.Random, kind: str) -> tuple[Any, bool]:
    """A value for a parameter of *kind*: valid mostly, often at an edge, now and then of
    the wrong type.  Returns it and whether it is well typed."""
    r = rng.random()
    if kind in INT_KINDS:
        if r < 0.12:
            return rng.choice(WRONG_INTS), False
        if r < 0.35:
            return rng.choice(BOUNDARY_INTS), True
    elif kind == "data" and r < 0.12:
        return rng.choice(WRONG_BYTES), False
    elif kind in HOSTILE_OBJECTS and r < 0.3:
        value = rng.choice(HOSTILE_OBJECTS[kind])
        return value, isinstance(value, Ref | int) and not isinstance(value, bool)
    return KINDS[kind](rng), True


def draw_call(rng: random.Random, machine: Any = None) -> dict[str, Any]:
    """One hostile call as plain data: ``{"on": role, "op": method, "args": [...],
    "kw": {...}, "wrong": [parameters of the wrong type]}``.  The backend's ``hostile_ops``
    come from *machine* (a call of one has ``op`` ``arch:NAME``)."""
    arch = getattr(machine, "hostile_ops", None)
    if arch and rng.random() < 0.25:
        name = rng.choice(sorted(arch))
        kind, call, kinds = arch[name][:3]
        params = tuple(zip(_param_names(call, len(kinds)), kinds, strict=True))
        op = f"arch:{name}"
    else:
        kind = rng.choice(("kvm", "vm", "vm", "gmem", "gmem", "vcpu", "map"))
        op, params = rng.choice(FACE[kind])
    role = rng.choice(ROLES[kind])
    args: list[Any] = []
    kw: dict[str, Any] = {}
    wrong: list[str] = []
    for name, param_kind in params:
        value, typed = draw_value(rng, param_kind)
        if not typed:
            wrong.append(name.lstrip("*"))
        if name.startswith("*"):
            kw[name[1:]] = value
        else:
            args.append(value)
    return {"on": role, "op": op, "args": args, "kw": kw, "wrong": wrong}


def _param_names(call: Any, n: int) -> list[str]:
    """The names of the *n* arguments *call* takes after its object (a TypeError naming
    one is the expected outcome of a wrong type), else ``arg0``, ``arg1``..."""
    try:
        names = list(inspect.signature(call).parameters)[1:]
    except (TypeError, ValueError):
        names = []
    return names[:n] if len(names) >= n else [f"arg{i}" for i in range(n)]


def draw_reentrant(rng: random.Random, machine: Any = None) -> dict[str, str]:
    """An armed reentrant call: at *hook*, do *action*; then do *trigger*."""
    return {
        "hook": rng.choice(REENTRANT_HOOKS),
        "action": rng.choice(REENTRANT_ACTIONS),
        "trigger": rng.choice(REENTRANT_TRIGGERS),
    }


# --- outcomes --------------------------------------------------------------------------------
class Finding(AssertionError):
    """A call whose outcome is a bug: a crash class or a half-applied change.  ``key`` is
    the class (``crash: KeyError @ guestmem.model.vm:delete_memslot``), ``well_typed``
    whether every argument of the call had the right type."""

    def __init__(self, key: str, detail: str, *, well_typed: bool) -> None:
        self.key = key
        self.well_typed = well_typed
        super().__init__(f"{key}: {detail}")


def innermost_frame(exc: BaseException) -> str:
    """``module:function`` of the innermost frame of *exc* in guestmem or a backend (not
    in the kit or the fuzzer), else of its innermost frame outside the fuzzer (a time
    limit's handler is not where a step hung)."""
    tb = exc.__traceback__
    found = last = ""
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", "?"))
        where = f"{module}:{tb.tb_frame.f_code.co_name}"
        if not module.startswith("guestmem.fuzz"):
            last = where
        if module.startswith("guestmem") and not module.startswith(("guestmem.conformance", "guestmem.fuzz")):
            found = where
        tb = tb.tb_next
    return found or last


def crash_key(exc: BaseException) -> str:
    """The crash class of *exc*: its type and innermost guestmem frame (a backend's hook
    that raised is keyed by what it raised)."""
    if isinstance(exc, BackendError | ObserverError):
        return f"crash: {type(exc).__name__}({type(exc.error).__name__}) @ {innermost_frame(exc.error)}"
    return f"crash: {type(exc).__name__} @ {innermost_frame(exc)}"


def classify(
    exc: BaseException | None,
    wrong: list[str] | tuple[str, ...] = (),
    outcomes: tuple[type[BaseException], ...] = (),
) -> tuple[str, str]:
    """The outcome class of a call that raised *exc* (None: it returned): ``(kind, detail)``.

    *wrong* names the parameters given a wrong type: a ``TypeError`` naming one of them
    is the expected ``type_error``; *outcomes* are the backend's modelled verdicts.
    """
    if exc is None:
        return ("accepted", ",".join(wrong)) if wrong else ("ok", "")
    if isinstance(exc, HostSigbus | HostSigsegv):
        return "signal", "SIGBUS" if isinstance(exc, HostSigbus) else "SIGSEGV"
    if isinstance(exc, MemoryFault):
        return "exit", "MemoryFault"
    if isinstance(exc, KvmError):
        err = exc.errno or 0
        return "errno", f"{errno_name(err)} [{exc.rule}]" if exc.rule else errno_name(err)
    if isinstance(exc, GuestExit):
        return "exit", type(exc).__name__
    if isinstance(exc, ObserverError) and isinstance(exc.error, InvariantViolation):
        exc = exc.error
    if isinstance(exc, InvariantViolation):
        return "invariant", str(exc).split(" ", 1)[0].rstrip(":")
    if isinstance(exc, HostCrash) or (outcomes and isinstance(exc, outcomes)):
        return "verdict", type(exc).__name__
    if isinstance(exc, ArgumentTypeError):
        # The C-type conversion's own error: the argument it names may carry another name
        # than the call's parameter (``args[0]``, a struct field).
        return "type_error", str(exc).split(" ", 1)[0]
    if isinstance(exc, TypeError) and wrong:
        text = str(exc)
        named = [name for name in wrong if name in text]
        if named:
            return "type_error", named[0]
    return "crash", crash_key(exc)[len("crash: ") :]


# --- the state a failed call must not change ---------------------------------------------------
def state_of(kvm: Any, tables: Any = None) -> Any:
    """What a failed call must leave as it was: the host's snapshot (``kvm.snapshot()``:
    every VM's liveness, memslots, attributes, stage-2 leaves and vCPUs, every guest_memfd's
    folios with a digest of their bytes, host mappings and the anonymous memory they hold,
    descriptors, allocated pages and the backend's hardware tables) and *tables*, the
    ownership tables an :class:`~guestmem.conformance.OwnershipLedger` recorded.  None for
    a host whose state cannot be read (the real kernel)."""
    try:
        snapshot = kvm.snapshot()
    except NotImplementedError:
        return None
    owned: tuple[Any, ...] = ()
    if tables is not None:
        owned = tuple((name, tuple(t.items())) for name, t in sorted(tables.items()))
    return snapshot, owned


def zapped_only(before: Any, after: Any) -> bool:
    """True iff :func:`state_of` *after* differs from *before* only by stage-2 leaves gone.

    Stage-2 is a cache of memslots, attributes and guest_memfd: the kernel drops leaves on
    many paths and the guest refaults them, and a failed call may have zapped before it
    failed (``kvm_set_memslot`` flushes a slot it deletes or moves before
    ``kvm_arch_prepare_memory_region`` may refuse the change).  A leaf that appears or
    changes, or any other difference, is still a change.
    """
    (host_before, owned_before), (host_after, owned_after) = before, after
    if owned_before != owned_after or len(host_before.vms) != len(host_after.vms):
        return False
    for vm_before, vm_after in zip(host_before.vms, host_after.vms, strict=True):
        if not all(any(_within(leaf, held) for held in vm_before.leaves) for leaf in vm_after.leaves):
            return False

    def without_leaves(host: Any) -> Any:
        return attrs.evolve(host, vms=tuple(attrs.evolve(vm, leaves=()) for vm in host.vms))

    return bool(without_leaves(host_before) == without_leaves(host_after))


def _within(leaf: Any, held: Any) -> bool:
    """*leaf* is part of *held*: the same mapping of fewer gfns."""
    return (
        held.gfn <= leaf.gfn
        and leaf.gfn + leaf.npages <= held.gfn + held.npages
        and leaf.pfn - leaf.gfn == held.pfn - held.gfn
        and (leaf.level, leaf.private, leaf.writable) == (held.level, held.private, held.writable)
    )


# --- reentrant calls ---------------------------------------------------------------------------
class Reentrant:
    """Observer: once armed, calls back into the model from inside one hook of the scratch
    VM (closing, punching, deleting a memslot...), as another thread of the VMM could
    while the kernel is inside that path.  What the action came to is ``outcome``."""

    def __init__(self) -> None:
        self.armed: tuple[str, Callable[[], None], int] | None = None
        self.outcome: BaseException | None = None
        self.fired = False

    def arm(self, hook: str, action: Callable[[], None], vm_id: int) -> None:
        self.armed = (hook, action, vm_id)
        self.outcome = None
        self.fired = False

    def _fire(self, hook: str, vm: Any) -> None:
        if self.armed is None or self.armed[0] != hook or vm is None or vm.vm_id != self.armed[2]:
            return
        _, action, _ = self.armed
        self.armed = None
        self.fired = True
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - the action's outcome is classified
            self.outcome = exc

    @hookimpl
    def guestmem_gmem_invalidate(self, vm: Any, start_pfn: int, end_pfn: int) -> None:
        self._fire("guestmem_gmem_invalidate", vm)

    @hookimpl
    def guestmem_unmap_gfn_range(self, vm: Any, range: Any) -> None:  # noqa: A002 - the hook's name
        self._fire("guestmem_unmap_gfn_range", vm)

    @hookimpl
    def guestmem_fault(self, vm: Any, fault: Any) -> None:
        self._fire("guestmem_fault", vm)

    @hookimpl
    def guestmem_vm_pre_destroy(self, vm: Any) -> None:
        self._fire("guestmem_vm_pre_destroy", vm)

    @hookimpl
    def guestmem_gmem_unbind(self, vm: Any, slot: Any, gmem: Any) -> None:
        self._fire("guestmem_gmem_unbind", vm)


# --- the hostile part of a machine ------------------------------------------------------------
class Hostility:
    """The objects hostile calls act on, and the tally of what they came to.

    *machine* is the :class:`~guestmem.conformance.machine.GmemMachine`; *arch* and
    *outcomes* the backend's ``hostile_ops`` and ``hostile_outcomes``.
    """

    def __init__(
        self,
        machine: Any,
        arch: dict[str, tuple[Any, ...]],
        outcomes: tuple[type[BaseException], ...],
    ) -> None:
        self.machine = machine
        self.arch = arch
        self.outcomes = outcomes
        self.reentrant = Reentrant()
        #: Outcome counts: ``"op kind: detail"`` -> n.
        self.tally: dict[str, int] = {}
        self.worlds: list[KitGuest] = []
        self.closed: dict[str, Any] = {}
        self.made: list[Any] = []  # objects hostile calls created, closed at once
        #: The machine's reference no longer describes the state: end the sequence.
        self.desynced = False

    # roles
    @property
    def scratch(self) -> KitGuest:
        """The scratch VM, made again once a call closed it."""
        world = self.worlds[-1] if self.worlds else None
        if world is None or world.vm.closed or world.vcpu.closed or world.ram.gmem.closed:
            m = self.machine
            world = KitGuest(m.kvm, m.vm_info, SCRATCH_PAGES)
            self.worlds.append(world)
        return world

    def _closed(self, role: str) -> Any:
        if role not in self.closed:
            m = self.machine
            world = KitGuest(m.kvm, m.vm_info, 2)
            mapping = m.kvm.mmap_anonymous(2 * PAGE)
            self.closed.update(
                closed_vm=world.vm,
                closed_gmem=world.ram.gmem,
                closed_vcpu=world.vcpu,
                closed_map=mapping,
                closed_uaddr=mapping.address,
            )
            world.close()
            mapping.close()
        return self.closed[role]

    def resolve(self, role: str) -> Any:
        """The object (or address) *role* names now."""
        m = self.machine
        match role:
            case "kvm":
                return m.kvm
            case "vm":
                return m.guest.vm
            case "gmem":
                return m.ram.gmem
            case "vcpu":
                return m.guest.vcpu
            case "scratch_vm":
                return self.scratch.vm
            case "scratch_gmem":
                return self.scratch.ram.gmem
            case "scratch_vcpu":
                return self.scratch.vcpu
            case "scratch_map" | "scratch_uaddr":
                world = self.scratch
                if not world.extra:
                    world.extra.append(m.kvm.mmap_anonymous(SCRATCH_PAGES * PAGE))
                mapping = world.extra[0]
                return mapping.address if role == "scratch_uaddr" else mapping
        return self._closed(role)

    def _value(self, value: Any) -> Any:
        return self.resolve(value.role) if isinstance(value, Ref) else value

    def count(self, kind: str, detail: str, op: str) -> None:
        key = f"{kind}: {op}: {detail}" if kind not in ("ok",) else f"ok: {op}"
        self.tally[key] = self.tally.get(key, 0) + 1

    def _capture(self) -> Any:
        m = self.machine
        if not m.white_box:
            return None
        return state_of(m.kvm, m.ledger.tables(m.kvm))

    # the rules
    def call(self, call: dict[str, Any]) -> None:
        """Run one hostile call (:func:`draw_call`) and count its outcome; raise
        :class:`Finding` for a crash or a half-applied change."""
        role, op = call["on"], call["op"]
        own = role in OWN_ROLES
        if own and role != "kvm" and not self.machine.white_box:
            role = f"scratch_{role}"  # the real kernel's state cannot be compared
        wrong = list(call.get("wrong", ()))
        target = self.resolve(role)
        args = [self._value(a) for a in call["args"]]
        kw = {k: self._value(v) for k, v in call["kw"].items()}
        before = self._capture()  # once every object the call names exists
        exc: BaseException | None = None
        name = op
        try:
            if op.startswith("arch:"):
                name = op.removeprefix("arch:")
                result = self.arch[name][1](target, *args, **kw)
            else:
                result = getattr(target, op)(*args, **kw)
            self._drop(result)
        except Exception as raised:  # noqa: BLE001 - every outcome is classified
            exc = raised
        kind, detail = classify(exc, wrong, self.outcomes)
        if name == "fileno" and isinstance(exc, ValueError):
            # Documented (api.GuestMemfd.fileno): a closed file object's fileno() is a
            # ValueError, as Python's own file objects answer.
            kind, detail = "closed", "ValueError"
        shown = f"{role}.{name}"
        self.count(kind, detail, shown)
        self._check_host()
        if kind in ("crash", "invariant"):
            raise Finding(f"{kind}: {detail}", f"{shown}{_args(call)}", well_typed=not wrong) from exc
        if before is None:
            return
        after = self._capture()
        partial = name in PARTIAL or (op.startswith("arch:") and self.arch[name][3:4] == (True,))
        changed = after != before and not zapped_only(before, after)
        if kind in ("errno", "type_error") and not partial and changed:
            raise Finding(
                f"half-applied: {shown}: {kind} {detail}",
                f"{shown}{_args(call)} failed but changed the state",
                well_typed=not wrong,
            )
        # A guest store through the machine's own vCPU may land in memory the state does
        # not hold (the anonymous shared side): the reference no longer describes it.
        stored = role == "vcpu" and kind == "ok" and ("data" in kw or "write" in name)
        # An arch call that left the machine's guest inside an exit: the kernel completes it
        # at the vCPU's next KVM_RUN whether the VMM answered or not (complete_userspace_io,
        # kvm_complete_ripas_change), and what that changes (a RIPAS change to EMPTY
        # destroys pages) the reference cannot follow.
        pending = kind == "exit" and op.startswith("arch:")
        if own and (after != before or stored or pending):
            self.desynced = True

    @property
    def host_crashed(self) -> bool:
        """A call crashed the host (a modelled verdict: the host refuses all work)."""
        return self.machine.white_box and view(self.machine.kvm).crashed is not None

    def _check_host(self) -> None:
        if self.host_crashed:
            self.desynced = True  # nothing runs on a crashed host: the sequence ends

    def _drop(self, result: Any) -> None:
        """Close what a hostile call made (a VM, a file, a mapping, a vCPU)."""
        if hasattr(result, "close") and hasattr(result, "closed"):
            self.made.append(result)
            result.close()

    def reenter(self, arm: dict[str, str]) -> None:
        """Arm :class:`Reentrant` on the scratch VM and trigger its hook; count what the
        trigger and the action came to."""
        world = self.scratch
        actions = self._actions(world)
        self.reentrant.arm(
            arm["hook"], actions[arm["action"]], view(world.vm).vm_id if self.machine.white_box else -1
        )
        exc: BaseException | None = None
        try:
            actions[arm["trigger"]]()
        except Exception as raised:  # noqa: BLE001 - every outcome is classified
            exc = raised
        fired = self.reentrant.fired
        self.reentrant.armed = None
        where = f"reentrant {arm['action']} in {arm['hook'].removeprefix('guestmem_')} of {arm['trigger']}"
        inner = self.reentrant.outcome
        kind, detail = classify(exc, (), self.outcomes)
        self.count(kind, detail, where if fired else f"{arm['trigger']} (not reentered)")
        self._check_host()
        if kind in ("crash", "invariant"):
            raise Finding(f"{kind}: {detail}", where, well_typed=True) from exc
        if fired:
            inner_kind, inner_detail = classify(inner, (), self.outcomes)
            self.count(inner_kind, inner_detail, f"{where} (inside)")
            if inner_kind in ("crash", "invariant"):
                raise Finding(
                    f"{inner_kind}: {inner_detail}", f"{where} (inside)", well_typed=True
                ) from inner

    def _actions(self, world: KitGuest) -> dict[str, Callable[[], None]]:
        ram = world.ram

        def punch() -> None:
            world.write(0, b"reentrant")
            ram.gmem.fallocate(PUNCH, 0, PAGE)

        def close_vm() -> None:
            world.vcpu.close()
            world.vm.close()

        def set_attributes() -> None:
            world.vm.set_memory_attributes(ram.gpa, PAGE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
            world.vm.set_memory_attributes(ram.gpa, PAGE, 0)

        return {
            "close_gmem": ram.gmem.close,
            "close_vm": close_vm,
            "close_vcpu": world.vcpu.close,
            "punch": punch,
            "delete_slot": ram.unbind,
            "set_attributes": set_attributes,
            "access": lambda: world.write(1, b"reentrant"),
        }

    def close(self) -> None:
        """Close every world and object the hostile calls made."""
        for world in self.worlds:
            world.close()
        self.worlds.clear()


def _args(call: dict[str, Any]) -> str:
    shown = [_show(a) for a in call["args"]] + [f"{k}={_show(v)}" for k, v in call["kw"].items()]
    return "(" + ", ".join(shown) + ")"


def _show(value: Any) -> str:
    if isinstance(value, Ref):
        return f"<{value.role}>"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10:
        return hex(value)
    if isinstance(value, bytes) and len(value) > 8:
        return f"bytes({len(value)})"
    return repr(value)


# --- plain data: JSON of calls --------------------------------------------------------------------
def to_plain(value: Any) -> Any:
    """*value* (drawn arguments of a rule) as JSON-able data: bytes, non-finite floats,
    tuples and :class:`Ref` are tagged."""
    if isinstance(value, Ref):
        return {"$ref": value.role}
    if isinstance(value, bytes | bytearray):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": repr(value)}
    if isinstance(value, tuple):
        return {"$tuple": [to_plain(v) for v in value]}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    return value


def from_plain(value: Any) -> Any:
    """The inverse of :func:`to_plain`."""
    if isinstance(value, list):
        return [from_plain(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"$ref"}:
            return Ref(value["$ref"])
        if set(value) == {"$bytes"}:
            return bytes.fromhex(value["$bytes"])
        if set(value) == {"$float"}:
            return float(value["$float"])
        if set(value) == {"$tuple"}:
            return tuple(from_plain(v) for v in value["$tuple"])
        return {k: from_plain(v) for k, v in value.items()}
    return value


__all__ = [
    "BOUNDARY_INTS",
    "FACE",
    "KINDS",
    "WRONG_BYTES",
    "WRONG_INTS",
    "Finding",
    "Hostility",
    "Reentrant",
    "Ref",
    "classify",
    "crash_key",
    "draw_call",
    "draw_reentrant",
    "draw_value",
    "from_plain",
    "innermost_frame",
    "state_of",
    "to_plain",
    "zapped_only",
]
