"""Differential testing: the same uAPI program against two backends, outcome by outcome.

A *program* is a list of :class:`Op` (plain data: an operation name and its arguments).
Objects a program creates (VMs, guest_memfds, host mappings, vCPUs) are named by the id of
the op that created them, so deleting ops while shrinking never re-targets another op: an
op whose object is missing is skipped on both sides alike.

:func:`run_program` executes a program on one backend and returns one normalised
:data:`Outcome` per op (return value, errno, SIGBUS, guest exit ...).  :func:`compare`
runs it on two backends and reports the first op whose outcomes differ;
:func:`shrink` cuts a disagreeing program down to a minimal reproducer.  :func:`generate`
makes random programs from a seed; :func:`run_campaign` is what ``guestmem diff`` runs.

The default pair is the ``sw`` model, with the kernel profile of this host
(:func:`host_profile`), against the ``linux`` backend (the running kernel).  Neither side
is privileged: a disagreement is a bug in the model, in the profile, or a documented
difference (docs/profiles.md).
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

import guestmem
from guestmem import api, uapi
from guestmem.errors import GuestExit, HostSigbus, InternalErrorExit, KvmError, MemoryFault, MmioExit

PAGE = uapi.PAGE_SIZE
#: Outcome of one op: a tuple whose first item is its kind ("ok", "errno", "sigbus", ...).
Outcome = tuple[Any, ...]

#: Capabilities compared by ``check_extension`` ops.
CAPS = (
    uapi.KVM_CAP_USER_MEMORY2,
    uapi.KVM_CAP_MEMORY_FAULT_INFO,
    uapi.KVM_CAP_MEMORY_ATTRIBUTES,
    uapi.KVM_CAP_GUEST_MEMFD,
    uapi.KVM_CAP_VM_TYPES,
    uapi.KVM_CAP_PRE_FAULT_MEMORY,
    uapi.KVM_CAP_GUEST_MEMFD_FLAGS,
    uapi.KVM_CAP_NR_MEMSLOTS,
    uapi.KVM_CAP_READONLY_MEM,
    uapi.KVM_CAP_MULTI_ADDRESS_SPACE,
)


@attrs.frozen
class Op:
    """One uAPI operation; ``id`` names the object it creates (if any)."""

    id: int
    name: str
    args: tuple[Any, ...] = ()

    def __str__(self) -> str:
        shown = ", ".join(_show(a) for a in self.args)
        return f"#{self.id} {self.name}({shown})"


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return hex(value) if abs(value) >= 10 else str(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    return repr(value)


@attrs.frozen
class Disagreement:
    """The first op of *program* whose outcomes differ between the two backends."""

    program: tuple[Op, ...]
    index: int
    left: Outcome
    right: Outcome

    @property
    def op(self) -> Op:
        """The op that disagreed."""
        return self.program[self.index]

    def render(self, left: str = "left", right: str = "right") -> str:
        """A reproducer: the program and both outcomes of its disagreeing op."""
        lines = [f"  {op}" for op in self.program[: self.index + 1]]
        lines.append(f"  -> {left}: {self.left}")
        lines.append(f"  -> {right}: {self.right}")
        return "\n".join(lines)


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
            return (st.st_size, st.st_blksize)
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
        case "access_read":
            return s.get(a[0], api.Vcpu).access(a[1], a[2])
        case "access_write":
            return s.get(a[0], api.Vcpu).access(a[1], write=True, data=a[2])
        case "pre_fault_memory":
            return s.get(a[0], api.Vcpu).pre_fault_memory(a[1], a[2], a[3])
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
        return ("sigbus", (exc.address - base) // PAGE if base is not None else None)
    except KvmError as exc:
        return ("errno", errno.errorcode.get(exc.errno or 0, exc.errno))
    except MmioExit as exc:
        return ("mmio", exc.gpa, exc.is_write)
    except InternalErrorExit:
        return ("internal_error",)
    except GuestExit as exc:
        return ("exit", type(exc).__name__)
    except (TypeError, ValueError) as exc:  # the uAPI face refused the arguments
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


def shrink(left: Opener, right: Opener, found: Disagreement) -> Disagreement:
    """Delete ops while a disagreement on the same kind of op remains (greedy, one pass per size)."""
    program = list(found.program[: found.index + 1])
    best = Disagreement(tuple(program), found.index, found.left, found.right)
    name = found.op.name
    chunk = max(1, len(program) // 2)
    while chunk >= 1:
        start = len(program) - 1 - chunk
        while start >= 0:
            candidate = program[:start] + program[start + chunk :]
            result = compare(left, right, candidate)
            if result is not None and result.op.name == name:
                program = list(result.program[: result.index + 1])
                best = result
                start = min(start, len(program) - 1) - chunk
            else:
                start -= 1
        chunk //= 2
    return best


# --- random programs ------------------------------------------------------------------------
_GMEM_SIZES = (PAGE, 2 * PAGE, 4 * PAGE, 8 * PAGE, 16 * PAGE)
_BAD_GMEM_SIZES = (0, PAGE + 1, 1 << 63)
_GMEM_FLAGS = (
    0,
    uapi.GUEST_MEMFD_FLAG_MMAP,
    uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED,
    uapi.GUEST_MEMFD_FLAG_INIT_SHARED,
)
_KEEP = uapi.FALLOC_FL_KEEP_SIZE
_PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
_GPA_PAGES = 48  # guest-physical space the programs use: [0, 48 pages)
_SLOT_IDS = (0, 1, 2, 3, 4, 5)


class Generator:
    """Random programs from a :class:`random.Random` (Hypothesis can pass its own)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.ops: list[Op] = []
        self.vms: list[int] = []
        self.gmems: list[tuple[int, int, int]] = []  # (id, size, flags)
        self.maps: list[tuple[int, int]] = []  # (id, length)
        self.gmem_maps: dict[int, list[tuple[int, int, int]]] = {}  # gmem id -> (map id, offset, length)
        #: Mappings a memslot points into.  They are never unmapped: the real process may
        #: reuse the freed range for anything, which the guest would then read.
        self.slot_maps: set[int] = set()
        self.vcpus: list[tuple[int, int]] = []  # (id, vm id)
        self.slots: list[tuple[int, int, int]] = []  # (vm id, gpa, size) of memslot ops

    def _op(self, name: str, *args: Any) -> int:
        op_id = len(self.ops)
        self.ops.append(Op(op_id, name, args))
        return op_id

    def _pick(self, items: Sequence[Any]) -> Any:
        return self.rng.choice(items)

    def _offset(self, limit: int) -> int:
        """A file offset or length around *limit*: aligned, unaligned, beyond."""
        r = self.rng.random()
        if r < 0.7:
            return self.rng.randrange(0, max(1, limit // PAGE) + 1) * PAGE
        if r < 0.85:
            return self.rng.randrange(0, limit + PAGE)
        return limit + self.rng.randrange(0, 4) * PAGE

    def _address(self, size: int) -> tuple[Any, int]:
        """A ``userspace_addr`` and the memslot size to use with it.

        A memslot inside a mapping never extends past its end: past it, the real process
        has whatever the allocator put there.  Raw addresses are unmapped in both (0x10000
        is below every mapping), not user addresses (TASK_SIZE) or unaligned.
        """
        if self.maps and self.rng.random() < 0.8:
            map_id, length = self._pick(self.maps)
            pages = length // PAGE
            first = self.rng.randrange(0, pages)
            off = first * PAGE + (8 if self.rng.random() < 0.05 else 0)
            self.slot_maps.add(map_id)
            return ("map", map_id, off), min(size, (pages - first) * PAGE)
        return self._pick((0, 0x10000, 0x10008, uapi.TASK_SIZE)), size

    def step(self) -> None:
        rng = self.rng
        if not self.vms or rng.random() < 0.03:
            self.vms.append(self._op("create_vm", 0 if rng.random() < 0.95 else 1))
            return
        vm = self._pick(self.vms)
        choices: list[tuple[float, Callable[[], object]]] = [
            (0.12, lambda: self._create_gmem(vm)),
            (0.10, self._fallocate),
            (0.08, self._mmap),
            (0.04, lambda: self.maps.append((self._op("mmap_anonymous", 8 * PAGE), 8 * PAGE))),
            (0.12, self._host_access),
            (0.18, lambda: self._memslot(vm)),
            (0.05, lambda: self._delete_slot(vm)),
            (0.20, lambda: self._access(vm)),
            (0.02, lambda: self._op("check_extension", self._pick((None, vm)), self._pick(CAPS))),
            (0.03, self._file_op),
            (0.02, self._close),
            (0.02, lambda: self._pre_fault(vm)),
            (0.02, lambda: self._op("set_memory_attributes", vm, 0, PAGE, self._pick((0, 8)), 0)),
        ]
        total = sum(w for w, _ in choices)
        r = rng.random() * total
        for weight, action in choices:
            r -= weight
            if r <= 0:
                action()
                return
        choices[-1][1]()

    def _create_gmem(self, vm: int) -> None:
        if self.rng.random() < 0.1:
            self._op("create_guest_memfd", vm, self._pick(_BAD_GMEM_SIZES), self._pick((0, 4, 8)))
            return
        size, flags = self._pick(_GMEM_SIZES), self._pick(_GMEM_FLAGS)
        self.gmems.append((self._op("create_guest_memfd", vm, size, flags), size, flags))

    def _fallocate(self) -> None:
        if not self.gmems:
            return
        gmem, size, _ = self._pick(self.gmems)
        mode = self._pick((_KEEP, _PUNCH, _PUNCH, 0, _KEEP | 0x4))
        length = self._offset(size) or PAGE
        self._op("fallocate", gmem, mode, self._offset(size), length)

    def _mmap(self) -> None:
        if not self.gmems:
            return
        gmem, size, _ = self._pick(self.gmems)
        length = self._pick((size, size, PAGE, 2 * size))
        offset = self._pick((0, 0, PAGE, size))
        shared = self.rng.random() < 0.9
        map_id = self._op("mmap", gmem, length, offset, shared)
        self.maps.append((map_id, length))
        self.gmem_maps.setdefault(gmem, []).append((map_id, offset, length))

    def _host_access(self) -> None:
        if not self.maps:
            return
        mapping, length = self._pick(self.maps)
        offset = self.rng.randrange(0, length)
        n = min(self.rng.randrange(1, 16), length - offset)
        if self.rng.random() < 0.5:
            self._op("host_read", mapping, offset, n)
        else:
            self._op("host_write", mapping, offset, self.rng.randbytes(n))

    def _memslot(self, vm: int) -> None:
        rng = self.rng
        odd_slots = (1 << 16, uapi.KVM_USER_MEM_SLOTS)  # address space 1 (S-7); beyond the user slots (S-3)
        slot = self._pick(_SLOT_IDS) if rng.random() < 0.95 else self._pick(odd_slots)
        gpa = rng.randrange(0, _GPA_PAGES - 8) * PAGE
        size = rng.randrange(1, 9) * PAGE
        self.slots.append((vm, gpa, size))
        if rng.random() < 0.3 or not self.gmems:
            flags = self._pick((0, 0, uapi.KVM_MEM_READONLY, uapi.KVM_MEM_LOG_DIRTY_PAGES))
            address, size = self._address(size)
            if rng.random() < 0.3:
                self._op("set_user_memory_region", vm, slot, flags, gpa, size, address)
            else:
                self._op("set_user_memory_region2", vm, slot, flags, gpa, size, address, None, 0)
            return
        gmem, gsize, _ = self._pick(self.gmems)
        flags = uapi.KVM_MEM_GUEST_MEMFD
        if rng.random() < 0.1:
            flags |= self._pick((uapi.KVM_MEM_READONLY, uapi.KVM_MEM_LOG_DIRTY_PAGES))
        target: Any = ("gmem", gmem)
        if rng.random() < 0.05:
            target = ("vm", vm)
        address, size = self._address(size) if rng.random() < 0.7 else (0, size)
        own = self.gmem_maps.get(gmem)
        if own and rng.random() < 0.6:  # userspace_addr = the gmem's own mapping of the bound range
            map_id, map_offset, map_length = self._pick(own)
            first = rng.randrange(0, max(1, map_length // PAGE))
            self.slot_maps.add(map_id)
            offset = map_offset + first * PAGE
            size = max(PAGE, min(size, map_length - first * PAGE, gsize - offset))
            self.slots[-1] = (vm, gpa, size)
            self._op("set_user_memory_region2", vm, slot, flags, gpa, size, ("map", map_id, first * PAGE),
                     target, offset)
            return
        if rng.random() < 0.1:  # the v1 ioctl rejects GUEST_MEMFD (S-2)
            self._op("set_user_memory_region", vm, slot, flags, gpa, size, address)
            return
        if rng.random() < 0.7:  # mostly a binding that fits the file (B-4)
            offset = rng.randrange(0, gsize // PAGE) * PAGE
            size = min(size, gsize - offset)
        else:
            offset = self._offset(gsize)
        self.slots[-1] = (vm, gpa, size)
        self._op("set_user_memory_region2", vm, slot, flags, gpa, size, address, target, offset)

    def _delete_slot(self, vm: int) -> None:
        slot = self._pick(_SLOT_IDS)
        self._op("set_user_memory_region2", vm, slot, 0, 0, 0, 0, None, 0)

    def _vcpu(self, vm: int) -> tuple[int, int]:
        ids = [v for v in self.vcpus if v[1] == vm]
        if not ids or self.rng.random() < 0.05:
            created = (self._op("create_vcpu", vm, len(ids)), vm)
            self.vcpus.append(created)
            return created
        return tuple(self._pick(ids))

    def _access(self, vm: int) -> None:
        vcpu, _ = self._vcpu(vm)
        slots = [s for s in self.slots if s[0] == vm]
        if slots and self.rng.random() < 0.8:  # mostly inside (or just past) a memslot
            _, base, size = self._pick(slots)
            gpa = base + self.rng.randrange(0, size + 16)
        else:
            gpa = self.rng.randrange(0, _GPA_PAGES * PAGE)
        if self.rng.random() < 0.5:
            self._op("access_read", vcpu, gpa, self.rng.randrange(1, 24))
        else:  # stores stay within one page: the guest runner of the real kernel copies bytewise
            n = min(self.rng.randrange(1, 16), PAGE - gpa % PAGE)
            self._op("access_write", vcpu, gpa, self.rng.randbytes(n))

    def _pre_fault(self, vm: int) -> None:
        vcpu, _ = self._vcpu(vm)
        gpa = self.rng.randrange(0, _GPA_PAGES) * PAGE
        self._op("pre_fault_memory", vcpu, gpa, PAGE, self._pick((0, 0, 1)))

    def _file_op(self) -> None:
        if not self.gmems:
            return
        gmem = self._pick(self.gmems)[0]
        name = self._pick(("fstat", "gmem_read", "gmem_write", "gmem_truncate"))
        arg = {"fstat": (), "gmem_read": (8,), "gmem_write": (b"x",), "gmem_truncate": (0,)}[name]
        self._op(name, gmem, *arg)

    def _close(self) -> None:
        r = self.rng.random()
        if r < 0.4 and self.gmems:
            self._op("close_gmem", self._pick(self.gmems)[0])
        elif r < 0.8 and self.maps:
            map_id = self._pick(self.maps)[0]
            if map_id not in self.slot_maps:
                self._op("munmap", map_id)
                self.maps = [m for m in self.maps if m[0] != map_id]
                for own in self.gmem_maps.values():
                    own[:] = [m for m in own if m[0] != map_id]
        elif self.vms:
            vm = self._pick(self.vms)
            self._op("close_vm", vm)


def generate(rng: random.Random, steps: int) -> list[Op]:
    """A random program of about *steps* ops."""
    gen = Generator(rng)
    while len(gen.ops) < steps:
        gen.step()
    return gen.ops


# --- campaigns and the CLI ------------------------------------------------------------------
@attrs.define
class Summary:
    """What a campaign did."""

    left: str
    right: str
    seed: int
    sequences: int = 0
    operations: int = 0
    disagreements: list[Disagreement] = attrs.Factory(list)
    seconds: float = 0.0

    def render(self) -> str:
        """Human-readable report."""
        lines = [
            f"guestmem diff: {self.left} vs {self.right} (seed {self.seed})",
            f"  sequences:     {self.sequences}",
            f"  operations:    {self.operations}",
            f"  disagreements: {len(self.disagreements)}",
            f"  time:          {self.seconds:.2f}s",
        ]
        for n, found in enumerate(self.disagreements, 1):
            lines.append(f"disagreement {n} at {found.op.name} (minimal reproducer):")
            lines.append(found.render(self.left, self.right))
        return "\n".join(lines)


def run_campaign(
    left: Opener,
    right: Opener,
    *,
    seed: int,
    steps: int,
    length: int = 40,
    labels: tuple[str, str] = ("left", "right"),
    minimise: bool = True,
) -> Summary:
    """Random programs totalling *steps* ops; one shrunk reproducer per distinct op kind."""
    started = time.perf_counter()
    summary = Summary(labels[0], labels[1], seed)
    rng = random.Random(seed)
    seen: set[tuple[str, str, str]] = set()
    while summary.operations < steps:
        program = generate(rng, min(length, steps - summary.operations))
        summary.sequences += 1
        summary.operations += len(program)
        found = compare(left, right, program)
        if found is None:
            continue
        key = (found.op.name, str(found.left[0]), str(found.right[0]))
        if key in seen:
            continue
        seen.add(key)
        summary.disagreements.append(shrink(left, right, found) if minimise else found)
    summary.seconds = time.perf_counter() - started
    return summary


def add_cli(subparsers: Any) -> None:
    """Add ``guestmem diff`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "diff", help="run random uAPI programs on two backends and report every disagreement"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--steps", type=int, default=500, help="operations in total (default 500)")
    p.add_argument("--length", type=int, default=40, help="operations per program (default 40)")
    p.add_argument("--against", default="linux", help="backend to compare with (default: linux)")
    p.add_argument("--base", default="sw", help="model backend (default: sw)")
    p.add_argument("--profile", default=None, help="kernel profile of the model (default: this host's)")
    p.add_argument("--no-shrink", action="store_true", help="report disagreements without minimising")
    p.set_defaults(func=_cmd_diff)


def _cmd_diff(args: argparse.Namespace) -> int:
    profile = args.profile or host_profile()
    left = f"{args.base}[{profile}]"
    try:
        guestmem.open(args.against).close()
    except OSError as exc:
        print(f"guestmem diff: backend {args.against!r} is unavailable: {exc}")
        return 2
    summary = run_campaign(
        opener(args.base, profile),
        opener(args.against),
        seed=args.seed,
        steps=args.steps,
        length=args.length,
        labels=(left, args.against),
        minimise=not args.no_shrink,
    )
    print(summary.render())
    return 1 if summary.disagreements else 0


def format_program(program: Iterable[Op]) -> str:
    """One op per line."""
    return "\n".join(str(op) for op in program)
