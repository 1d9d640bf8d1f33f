"""Threads against one host: vCPUs, punches, conversions and host mappings at once.

:func:`stress` runs for a bounded time on one VM of a backend's own private VM type (the
one :func:`~guestmem.conformance.kit_for` picks), launched and driven through the
backend's intents as the deep kit's VM is (:class:`~guestmem.conformance.vmm.KitVmm`),
with these threads:

- ``vcpu-N``, one per vCPU: the guest storing unique 8-byte tokens to random pages of its
  RAM and loading them back, on the side (private or shared) the page was last converted
  to;
- ``convert``: the guest converting runs of pages to the other side on a vCPU of its own,
  the VMM carrying it out (``KVM_SET_MEMORY_ATTRIBUTES`` and the discard of the old side
  on an x86 VM, the backend's own calls elsewhere), where the guest converts at all
  (``guest.convert``; a Gunyah guest does not);
- ``punch``: the VMM punching holes in the RAM's guest_memfd, and allocating ranges of it;
- ``host``: the host mapping ``INIT_SHARED | MMAP`` guest_memfd and storing and loading
  tokens through it: the RAM's own where it is one, and that of a second VM of the
  backend's plain VM type (where that is another type), whose guest (``plain-vcpu``) and
  VMM (``plain-punch``) run threads too.

The guest is a well-behaved one: it never touches a page while converting it (its
threads take a per-page lock of the harness, outside the model).  On an architecture
whose punch takes a page from the running guest for good (``private_unmap = "revoke"``:
pKVM poisons it, a realm's IPA is left DESTROYED) the VMM punches a spare region of the
VM the guest never touches, which the host maps too.  Everything the host does races the
guest freely.

What it checks: every exception a thread meets is a documented outcome of the uAPI
(:class:`~guestmem.KvmError` and its subclasses with a kernel errno, a
:class:`~guestmem.GuestExit`, the fault the backend's intents name for a page the guest
has not accepted), nothing else; no load returns bytes no store wrote, or a
token stored to another page or side; no load is stale (it began after a punch or discard
of its page that began after the store of what it returned had completed); the invariant
checkers (the core's, the ownership ledger's, the backend's own) hold after every
operation; no MMU invalidation is left open; the VM is still usable afterwards; and, once
everything is closed, the leak check.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import random
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import attrs

import guestmem
from guestmem import uapi
from guestmem.backend import X86_SW_PROTECTED_VM, VmTypeInfo, view
from guestmem.conformance.ledger import OwnershipLedger, allocated, check_released
from guestmem.conformance.options import options_for
from guestmem.conformance.vmm import KitExits, KitVmm, Ram
from guestmem.errors import GuestExit, KvmError, errno_name
from guestmem.guestvm import GuestVm
from guestmem.invariants import InvariantChecker, check_vm

PAGE = uapi.PAGE_SIZE
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
KEEP = uapi.FALLOC_FL_KEEP_SIZE
SHARED_GMEM = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
#: Pages of the stressed RAM: few, so that the threads meet on the same pages.
STRESS_PAGES = 32
#: Where the stressed RAM, the spare region and the second VM's host-mapped memory lie.
RAM_GPA, SPARE_GPA, PLAIN_GPA = 0x10000000, 0x20000000, 0x50000000
#: The interpreter's switch interval while the threads run (seconds): short, so that they
#: interleave at many more points than Python's default 5 ms lets them.
SWITCH_INTERVAL = 1e-5
#: The top byte of every token: a load of anything else non-zero is a foreign one.
_MARK = 0xA5 << 56
_MARK_MASK = 0xFF << 56


@attrs.define
class StressReport:
    """What :func:`stress` saw: operations and outcomes per thread, the VM's counters,
    and every violation (none: the run passed)."""

    backend: str
    vm_type: str
    seconds: float
    #: Thread name -> operations it ran.
    ops: dict[str, int] = attrs.field(factory=dict)
    #: Thread name -> outcome class (``ok``, ``MemoryFault(EFAULT)``...) -> count.
    outcomes: dict[str, dict[str, int]] = attrs.field(factory=dict)
    #: The stressed VM's cost counters at the end (faults, fault races, punches...).
    counters: dict[str, int] = attrs.field(factory=dict)
    #: The other VMs' (the plain VM's), summed.
    other_counters: dict[str, int] = attrs.field(factory=dict)
    #: What went wrong: undocumented exceptions (with their traceback), foreign, crossed
    #: or stale loads, broken invariants, open invalidations, an unusable VM, leaks.
    violations: list[str] = attrs.field(factory=list)

    def summary(self) -> str:
        """A few lines for a person."""
        lines = [f"{self.backend} {self.vm_type}: {self.seconds:g} s"]
        for name in sorted(self.ops):
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes[name].items()))
            lines.append(f"  {name}: {self.ops[name]} ops ({outcomes})")
        keys = ("faults", "fault_races", "fault_retries", "punch_hole", "set_memory_attributes")
        lines.append("  counters: " + ", ".join(f"{k} {self.counters.get(k, 0)}" for k in keys))
        if self.other_counters:
            other = ", ".join(f"{k} {self.other_counters.get(k, 0)}" for k in keys)
            lines.append(f"  other VMs: {other}")
        lines.append(f"  violations: {len(self.violations)}")
        lines.extend(f"    {v.splitlines()[0]}" for v in self.violations[:10])
        return "\n".join(lines)


class History:
    """Where each token went and when its store completed, when each page was discarded:
    what the load checks need.  Thread-safe with a lock of its own (never the host's)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._ids = itertools.count(1)
        #: token -> (side, page, when its store returned in ns, or None while in flight)
        self._stores: dict[int, tuple[str, int, int | None]] = {}
        #: (side, page) -> when each discard returned (ascending), and the latest start of
        #: the discards up to each of them (a running maximum)
        self._ends: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
        self._starts: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
        self.violations: list[str] = []

    def token(self, side: str, page: int) -> bytes:
        """A new token for a store to *side*'s page *page*, as the 8 bytes to store."""
        token = _MARK | next(self._ids)
        with self.lock:
            self._stores[token] = (side, page, None)
        return struct.pack("<Q", token)

    def stored(self, data: bytes) -> None:
        """The store of token *data* returned."""
        (token,) = struct.unpack("<Q", data)
        with self.lock:
            side, page, _ = self._stores[token]
            self._stores[token] = (side, page, time.monotonic_ns())

    def discarded(self, side: str, pages: range, start: int) -> None:
        """*side*'s pages *pages* were discarded by a call that began at *start* (ns) and
        has just returned (the time is taken under the lock, so the ends ascend)."""
        with self.lock:
            end = time.monotonic_ns()
            for page in pages:
                starts = self._starts[side, page]
                self._ends[side, page].append(end)
                starts.append(max(start, starts[-1]) if starts else start)

    def loaded(self, side: str, page: int, data: bytes, start: int) -> None:
        """A load of *side*'s page *page* that began at *start* (ns) returned *data*."""
        (value,) = struct.unpack("<Q", data)
        if not value:
            return
        where = f"{side} page {page}"
        with self.lock:
            found = self._stores.get(value) if value & _MARK_MASK == _MARK else None
            if found is None:
                self.violations.append(f"foreign load: {where} read {value:#x}, which no store wrote")
                return
            s_side, s_page, s_end = found
            if (s_side, s_page) != (side, page):
                self.violations.append(f"crossed load: {where} read a token stored to {s_side} page {s_page}")
                return
            if s_end is None:
                return  # its store had not returned yet: nothing can be stale
            i = bisect.bisect_left(self._ends.get((side, page), []), start)
            if i and self._starts[side, page][i - 1] > s_end:
                self.violations.append(
                    f"stale load: {where} read token {value:#x} although a discard of the page that "
                    "began after its store had returned ended before the load began"
                )


def outcome(exc: BaseException, guest: GuestVm | None = None) -> str | None:
    """The documented outcome class of *exc* (``MemoryFault(EFAULT)``, ``MmioExit``...),
    or None for anything else (an errno of 0 is no kernel's).  With *guest*, the fault its
    backend's intents name as a page the guest has not accepted
    (:meth:`~guestmem.intents.Intents.unaccepted`: SNP's #VC) is one too: the host took the
    page away again while the guest was accepting it."""
    if isinstance(exc, KvmError) and exc.errno:
        return f"{type(exc).__name__}({errno_name(exc.errno)})"
    if isinstance(exc, GuestExit):
        return type(exc).__name__
    if guest is not None and guest.intents.unaccepted(guest, exc) is not None:
        return f"{type(exc).__name__} (unaccepted)"
    return None


class _Run:
    """The threads of one run and what they saw."""

    def __init__(self, seconds: float, seed: int) -> None:
        self.seconds = seconds
        self.seed = seed
        #: The stressed guest, whose intents name its unaccepted-page faults.
        self.guest: GuestVm | None = None
        self.history = History()
        self.ops: dict[str, int] = {}
        self.outcomes: dict[str, collections.Counter[str]] = {}
        self._steps: list[tuple[str, Callable[[random.Random], None]]] = []

    def add(self, name: str, step: Callable[[random.Random], None]) -> None:
        """A thread called *name* running *step* until the time is up."""
        self._steps.append((name, step))

    def _body(self, name: str, step: Callable[[random.Random], None], deadline: float) -> None:
        rng = random.Random(f"{self.seed}:{name}")
        outcomes = self.outcomes[name] = collections.Counter()
        n = 0
        while time.monotonic() < deadline:
            n += 1
            try:
                step(rng)
            except Exception as exc:  # noqa: BLE001 - classified; anything else is a violation
                kind = outcome(exc, self.guest)
                if kind is None:
                    kind = f"undocumented {type(exc).__name__}"
                    text = f"{name}: {kind}: {exc}\n{traceback.format_exc()}"
                    with self.history.lock:
                        self.history.violations.append(text)
                outcomes[kind] += 1
            else:
                outcomes["ok"] += 1
        self.ops[name] = n

    def run(self) -> None:
        """Run every thread until the time is up."""
        deadline = time.monotonic() + self.seconds
        run_together(
            threading.Thread(target=self._body, args=(name, step, deadline), name=f"guestmem-stress-{name}")
            for name, step in self._steps
        )


def run_together(threads: Iterable[threading.Thread]) -> None:
    """Start *threads* with the interpreter's switch interval at :data:`SWITCH_INTERVAL`
    (restored after), and wait for them all."""
    started: list[threading.Thread] = []
    before = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        for thread in threads:
            thread.start()
            started.append(thread)
    finally:
        for thread in started:
            thread.join()
        sys.setswitchinterval(before)


@contextmanager
def _observers(plugins: list[object]) -> Iterator[None]:
    registry = guestmem.get_registry()
    added: list[object] = []
    try:
        for plugin in plugins:
            registry.add_plugin(plugin, name=f"guestmem.stress.{id(plugin):x}")
            added.append(plugin)
        yield
    finally:
        for plugin in reversed(added):
            registry.remove_plugin(plugin)


def stress_vm_type(backend: str) -> VmTypeInfo:
    """The VM type :func:`stress` runs on: the backend's own private type (as
    :func:`~guestmem.conformance.kit_for` picks it), else its first private one, else its
    plain one."""
    info = guestmem.get_registry().backend(backend)
    private = info.private_vm_types
    own = [t for t in private if t != X86_SW_PROTECTED_VM]
    return (own or private or [info.default_vm_type])[0]


def stress(backend: str, seconds: float = 2.0, *, vcpus: int = 3, seed: int = 0) -> StressReport:
    """Run the threads of this module against *backend* for *seconds* (*vcpus* guest vCPU
    threads); the report's ``violations`` is empty when every check held."""
    info = stress_vm_type(backend)
    options = options_for(guestmem.get_registry().backend(backend), info)
    ledger = OwnershipLedger(cross_check=True)
    observers = [ledger, InvariantChecker(), *(factory() for factory in options.get("observers", ()))]
    report = StressReport(backend, info.name, seconds)
    run = _Run(seconds, seed)
    with _observers(observers), guestmem.open(backend, **options.get("open_options", {})) as kvm:
        baseline = allocated(kvm)
        with ExitStack() as objects:  # closed in reverse: mappings, vCPUs, VMs, guest_memfd
            guest = _Guest(kvm, info, vcpus, options.get("private_unmap", "keep"), objects)
            guest.threads(run)
            _host_threads(run, kvm, guest, objects)
            run.run()
            report.ops = dict(run.ops)
            report.outcomes = {name: dict(counts) for name, counts in run.outcomes.items()}
            report.counters = guest.kit.guest.counters()
            others = collections.Counter[str]()
            for vm in view(kvm).vms():
                if vm is not view(guest.vm):
                    others.update(vm.counters)
            report.other_counters = dict(others)
            report.violations += run.history.violations
            report.violations += [
                f"idle: thread {name} never completed an operation ({dict(counts)})"
                for name, counts in run.outcomes.items()
                if not counts["ok"]
            ]
            report.violations += _after(kvm, guest)
        try:
            check_released(kvm, ledger, baseline)
        except AssertionError as exc:
            report.violations.append(f"leak: {exc}")
    return report


class _Guest:
    """The stressed VM: the kit's VM with a vCPU per guest thread, the guest's page locks
    and its threads."""

    def __init__(
        self, kvm: Any, info: VmTypeInfo, vcpus: int, private_unmap: str, objects: ExitStack
    ) -> None:
        self.info = info
        self.kit = KitVmm(kvm, info, RAM_GPA, STRESS_PAGES * PAGE, vcpus=vcpus + 1)
        objects.callback(self.kit.close)
        self.vm, self.ram = self.kit.vm, self.kit.ram
        #: Where the VMM punches: the RAM, except where a punch takes a page from the
        #: running guest (``private_unmap = "revoke"``: pKVM poisons it for the guest, shared
        #: or not, a realm's IPA is left DESTROYED); there a second region the guest never
        #: touches, which the host maps too.
        self.spare: Ram | None = None
        if private_unmap == "revoke":
            guest = self.kit.guest
            gmem = self.vm.create_guest_memfd(STRESS_PAGES * PAGE, guest.intents.gmem_flags(guest))
            self.spare = self.kit.add_ram(gmem, SPARE_GPA, STRESS_PAGES * PAGE, slot=len(guest.regions))
            objects.callback(self.spare.close)
        #: The guest's own locks: it never touches a page while converting it.
        self.locks = [threading.Lock() for _ in range(STRESS_PAGES)]
        #: What each page was last converted to (the guest's view, under its lock).
        self.private = [info.private] * STRESS_PAGES
        self.destructive = info.conversion == "destructive"
        #: Closes the host's mappings (a host mapping keeps pKVM from taking a page back).
        self.unmap_host: Callable[[], None] = lambda: None

    def on_vcpu(self, index: int, *, converting: bool = False) -> GuestVm:
        """The guest running on vCPU *index*, with exit handling of its own (*converting*:
        the VMM answers its memory-fault exits, as while the guest converts)."""
        guest = self.kit.guest.on_vcpu(index)
        exits = KitExits(guest)
        exits.converting = converting
        guest.vmm = exits
        return guest

    def side(self, page: int) -> str:
        """Where a guest access of *page* goes: guest_memfd, or the anonymous shared side."""
        return "gmem" if self.private[page] or self.ram.shared is None else "shared"

    def access_arg(self, page: int) -> bool | None:
        """The private/shared bit of the guest's access (none without private memory)."""
        return self.private[page] if self.info.has_private_mem else None

    @contextmanager
    def holding(self, pages: range) -> Iterator[None]:
        """The guest's locks of *pages*, taken in order."""
        with ExitStack() as stack:
            for page in pages:
                stack.enter_context(self.locks[page])
            yield

    def threads(self, run: _Run) -> None:
        history = run.history
        ram = self.ram

        def vcpu_step(guest: GuestVm) -> Callable[[random.Random], None]:
            def step(rng: random.Random) -> None:
                page = rng.randrange(STRESS_PAGES)
                with self.locks[page]:
                    side, private = self.side(page), self.access_arg(page)
                    if rng.random() < 0.5:
                        data = history.token(side, page)
                        guest.write(ram.gpa_of(page), data, private=private)
                        history.stored(data)
                    else:
                        start = time.monotonic_ns()
                        got = guest.read(ram.gpa_of(page), 8, private=private)
                        history.loaded(side, page, got, start)

            return step

        converts = self.info.private and self.kit.conversion_not_applicable() is None
        vcpus = len(self.kit.guest.vcpus)  # the first is the kit's; the last converts
        for i in range(1, vcpus - 1 if converts else vcpus):
            run.add(f"vcpu-{i}", vcpu_step(self.on_vcpu(i)))
        target, where = (ram, "gmem") if self.spare is None else (self.spare, "spare")

        def punch(rng: random.Random) -> None:
            page = rng.randrange(STRESS_PAGES)
            pages = range(page, min(page + rng.randint(1, 4), STRESS_PAGES))
            offset, length = page * PAGE, len(pages) * PAGE
            if rng.random() < 0.2:
                target.gmem.fallocate(KEEP, offset, length)
                return
            start = time.monotonic_ns()
            target.gmem.fallocate(PUNCH, offset, length)
            history.discarded(where, pages, start)

        run.add("punch", punch)
        run.guest = self.kit.guest
        if converts:
            run.add("convert", self._convert_step(history, self.on_vcpu(vcpus - 1, converting=True)))

    def _convert_step(self, history: History, guest: GuestVm) -> Callable[[random.Random], None]:
        def step(rng: random.Random) -> None:
            page = rng.randrange(STRESS_PAGES)
            pages = range(page, min(page + rng.randint(1, 4), STRESS_PAGES))
            with self.holding(pages):
                to_private = not self.private[page]
                pages = range(page, next((p for p in pages if self.private[p] == to_private), pages.stop))
                old = self.side(page)
                start = time.monotonic_ns()
                try:
                    guest.convert(self.ram.gpa_of(page), len(pages) * PAGE, private=to_private)
                finally:
                    if self.destructive and (old == "gmem" or self.ram.shared is not None):
                        history.discarded(old, pages, start)  # what got done of it, at most
                for p in pages:
                    self.private[p] = to_private

        return step


def _host_threads(run: _Run, kvm: Any, guest: _Guest, objects: ExitStack) -> None:
    """The host's thread on ``INIT_SHARED | MMAP`` guest_memfd: the RAM's and the spare
    region's where they are such files, and that of a second VM of the backend's plain
    type (where it is another type), whose guest and VMM get a thread each."""
    history = run.history
    targets: list[tuple[Any, str]] = []
    if guest.spare is not None and guest.spare.gmem.flags & SHARED_GMEM == SHARED_GMEM:
        targets.append((guest.spare.gmem, "spare"))
    if guest.ram.gmem.flags & SHARED_GMEM == SHARED_GMEM:
        targets.append((guest.ram.gmem, "gmem"))
    plain_type = guestmem.get_registry().backend(kvm.backend).default_vm_type
    if plain_type.type != guest.info.type:
        plain = _plain_vm(run, kvm, plain_type, objects)
        if plain is not None:
            targets.append((plain, "plain"))
    mappings: dict[str, Any] = {}

    def unmap() -> None:
        while mappings:
            mappings.popitem()[1].close()

    guest.unmap_host = unmap
    objects.callback(unmap)

    def host(rng: random.Random) -> None:
        gmem, side = rng.choice(targets)
        if side not in mappings or rng.random() < 0.05:  # now and then munmap, mmap again
            if side in mappings:
                mappings.pop(side).close()
            mappings[side] = gmem.mmap(STRESS_PAGES * PAGE)
        mapping, page = mappings[side], rng.randrange(STRESS_PAGES)
        if rng.random() < 0.5:
            data = history.token(side, page)
            mapping.write(page * PAGE, data)
            history.stored(data)
        else:
            start = time.monotonic_ns()
            history.loaded(side, page, mapping.read(page * PAGE, 8), start)

    if targets:
        run.add("host", host)


def _plain_vm(run: _Run, kvm: Any, info: VmTypeInfo, objects: ExitStack) -> Any:
    """A VM of type *info* (the backend's plain one) with an ``INIT_SHARED | MMAP``
    guest_memfd-only memslot, whose guest (``plain-vcpu``) and VMM (``plain-punch``) get a
    thread each; returns the file, or None where the host offers no such file."""
    history, side = run.history, "plain"
    vm = kvm.create_vm(info.type)
    objects.callback(vm.close)
    if vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) & SHARED_GMEM != SHARED_GMEM:
        return None
    gmem = vm.create_guest_memfd(STRESS_PAGES * PAGE, SHARED_GMEM)
    objects.callback(gmem.close)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, PLAIN_GPA, STRESS_PAGES * PAGE, 0, gmem, 0)
    cpu = vm.create_vcpu(0)
    objects.callback(cpu.close)

    def plain_vcpu(rng: random.Random) -> None:
        page = rng.randrange(STRESS_PAGES)
        if rng.random() < 0.5:
            data = history.token(side, page)
            cpu.access(PLAIN_GPA + page * PAGE, data=data)
            history.stored(data)
        else:
            start = time.monotonic_ns()
            history.loaded(side, page, cpu.access(PLAIN_GPA + page * PAGE, 8), start)

    def plain_punch(rng: random.Random) -> None:
        page = rng.randrange(STRESS_PAGES)
        start = time.monotonic_ns()
        gmem.fallocate(PUNCH, page * PAGE, PAGE)
        history.discarded(side, range(page, page + 1), start)

    run.add("plain-vcpu", plain_vcpu)
    run.add("plain-punch", plain_punch)
    return gmem


def _after(kvm: Any, guest: _Guest) -> list[str]:
    """The checks once the threads stopped: no open invalidation, the invariants, and a
    guest that still converts, stores and loads every page of its RAM."""
    found: list[str] = []
    for vm in view(kvm).vms():
        if vm.mmu_invalidate_in_progress:
            found.append(f"open invalidation: {vm!r} has {vm.mmu_invalidate_in_progress} in progress")
        try:
            check_vm(vm, "the stress threads")
        except AssertionError as exc:
            found.append(f"invariant: {exc}")
    kit, ram = guest.kit, guest.ram
    guest.unmap_host()
    try:
        for page in range(STRESS_PAGES):
            if guest.info.private and not guest.private[page]:
                kit.convert(ram.gpa_of(page), PAGE, private=True)
                guest.private[page] = True
            data = f"usable {page}".encode()
            kit.write(ram.gpa_of(page), data, private=guest.private[page])
            back = kit.read(ram.gpa_of(page), len(data), private=guest.private[page])
            if back != data:
                found.append(f"unusable: page {page} read {back!r} after storing {data!r}")
                break
    except Exception as exc:  # noqa: BLE001 - reported as the violation it is
        found.append(f"unusable: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    return found
