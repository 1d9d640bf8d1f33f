"""Running a scenario on backends: one row per step, one column per backend.

:func:`run_scenario` opens each backend, launches the scenario's VM through the backend's
intents (:meth:`guestmem.guestvm.GuestVm.launch`), runs every step and records an
:class:`Outcome` per step: what happened (ok, the errno and rule of a failed call, an
exit, a SIGBUS, a hardware verdict, "n/a: reason"), the counters and cost categories it
moved, and whether it met the step's expectation.  The rows are ``launch``, the steps,
and ``teardown`` (everything closed; its value is the host pages still allocated).

A step a backend cannot express is not applicable, never a failure; an expectation that
is not met, or a backend or observer bug (:class:`guestmem.BackendError`, an invariant
violation), is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, TypeVar

import attrs

import guestmem
from guestmem import api, uapi
from guestmem.backend import Backend, HostView, view
from guestmem.errors import (
    BackendError,
    GuestExit,
    HostCrash,
    HostSigbus,
    HypercallExit,
    InternalErrorExit,
    KvmError,
    MemoryFault,
    MmioExit,
    ObserverError,
    errno_name,
)
from guestmem.guestvm import GuestVm
from guestmem.intents import CAPABILITIES, NotApplicable
from guestmem.scenario import format as fmt
from guestmem.scenario.memmap import MemoryMap, OwnerTracker, snapshot

__all__ = ["BackendRun", "Outcome", "Run", "ScenarioRun", "run_scenario", "select_backends"]

#: Row labels around the steps.
LAUNCH, TEARDOWN = "launch", "teardown"


@attrs.frozen(kw_only=True)
class Outcome:
    """What one step did on one backend.

    ``status`` is ``ok``, ``error`` (a failed call: ``errno``, ``rule``), ``exit`` (a guest
    exit: ``exit``, ``gpa``, ``size``, ``private``), ``sigbus``, ``crash`` (the host went
    down: ``detail`` is the verdict), ``raised`` (a guest-side exception or a bug: its
    class in ``exit``), ``n/a`` (``detail``: why) or ``skipped`` (an earlier crash).
    ``check`` is ``pass``/``fail``, or None when the step asserted nothing.
    """

    status: str
    text: str
    detail: str = ""
    errno: str | None = None
    rule: str | None = None
    exit: str | None = None
    gpa: int | None = None
    size: int | None = None
    private: bool | None = None
    value: int | None = None
    data: bytes | None = None
    counters: dict[str, int] = attrs.Factory(dict)
    costs: dict[str, int] | None = None
    check: str | None = None
    failures: list[str] = attrs.Factory(list)
    elapsed_ms: float = 0.0


@attrs.frozen(kw_only=True)
class BackendRun:
    """One backend's column: its outcomes (``launch``, steps, ``teardown``) and costs."""

    backend: str
    ran: bool
    reason: str = ""
    vm_type: str = ""
    notes: list[str] = attrs.Factory(list)
    outcomes: list[Outcome] = attrs.Factory(list)
    counters: dict[str, int] = attrs.Factory(dict)
    costs: dict[str, int] | None = None
    #: The architecture's own operations (:meth:`guestmem.intents.Intents.cost_details`).
    details: dict[str, int] = attrs.Factory(dict)
    #: Per row, the map of every VM after it (model backends, when asked for).
    maps: list[list[MemoryMap]] = attrs.Factory(list)
    elapsed_ms: float = 0.0

    @property
    def failed(self) -> list[tuple[int, Outcome]]:
        """``(row, outcome)`` of every failed check."""
        return [(i, o) for i, o in enumerate(self.outcomes) if o.check == "fail"]


@attrs.frozen(kw_only=True)
class ScenarioRun:
    """A scenario run on several backends side by side."""

    name: str
    title: str = ""
    shows: str = ""
    cites: list[str] = attrs.Factory(list)
    path: str = ""
    rows: list[str] = attrs.Factory(list)
    kinds: list[str] = attrs.Factory(list)
    backends: list[BackendRun] = attrs.Factory(list)

    @property
    def failed(self) -> bool:
        """Some asserted outcome was not met."""
        return any(b.failed for b in self.backends)

    def unasserted(self) -> list[str]:
        """Every outcome that ran but did not pass a check: failed, or asserted nothing.

        Not applicable and skipped steps, and the launch rows, are left out.  An empty
        list is what "every applicable step executed and asserted" means.
        """
        found = []
        for backend in self.backends:
            for row, kind, outcome in zip(self.rows, self.kinds, backend.outcomes, strict=True):
                if outcome.status in ("n/a", "skipped") or kind in (LAUNCH, "launch.finish"):
                    continue
                if outcome.check != "pass":
                    found.append(f"{backend.backend}: {row}: {outcome.text} {outcome.failures}")
        return found


@attrs.frozen(kw_only=True)
class Run:
    """What ``guestmem run --json`` writes and ``guestmem report`` reads."""

    version: str = "1"
    scenarios: list[ScenarioRun] = attrs.Factory(list)

    @property
    def failed(self) -> bool:
        """Some asserted outcome of some scenario was not met."""
        return any(s.failed for s in self.scenarios)


# --- choosing backends -----------------------------------------------------------------------
def select_backends(
    scenario: fmt.Scenario, requested: Iterable[str] | None = None, *, all_: bool = False
) -> list[str]:
    """The columns: *requested*; with *all_* every installed backend and every one the
    scenario lists; else the scenario's list, or every installed backend."""
    installed = sorted(guestmem.backends())
    if requested:
        return list(dict.fromkeys(requested))
    listed = scenario.scenario.backends
    if all_:
        return list(dict.fromkeys([*(listed or []), *installed]))
    return list(listed) if listed else installed


# --- running -----------------------------------------------------------------------------------
StepCallback = Callable[[str, int, int], None]


def run_scenario(
    scenario: fmt.Scenario,
    backends: Iterable[str],
    *,
    maps: bool = False,
    record: bool = False,
    on_step: StepCallback | None = None,
    events: dict[str, list[Any]] | None = None,
) -> ScenarioRun:
    """Run *scenario* on each of *backends*.

    *maps* records memory maps after every row (for reports); *record* opens the backends
    with ``record=True`` and, if *events* is given, stores each backend's trace there.
    *on_step(backend, row, rows)* is called before each row (progress displays).
    """
    rows = [LAUNCH, *(s.describe() for s in scenario.steps), TEARDOWN]
    kinds = [LAUNCH, *(s.do for s in scenario.steps), TEARDOWN]
    results = []
    for name in backends:
        runner = _BackendRunner(scenario, name, maps=maps, record=record, on_step=on_step)
        results.append(runner.run())
        if events is not None and runner.events is not None:
            events[name] = runner.events
    meta = scenario.scenario
    return ScenarioRun(
        name=meta.name,
        title=meta.title,
        shows=meta.shows,
        cites=list(meta.cites),
        path=scenario.path,
        rows=rows,
        kinds=kinds,
        backends=results,
    )


def _not_run(scenario: fmt.Scenario, name: str, reason: str) -> BackendRun:
    na = Outcome(status="n/a", text=f"n/a: {reason}", detail=reason)
    return BackendRun(backend=name, ran=False, reason=reason, outcomes=[na] * (len(scenario.steps) + 2))


class _BackendRunner:
    """One backend's column."""

    def __init__(
        self,
        scenario: fmt.Scenario,
        name: str,
        *,
        maps: bool,
        record: bool,
        on_step: StepCallback | None,
    ) -> None:
        self.scenario = scenario
        self.name = name
        self.want_maps = maps
        self.record = record
        self.on_step = on_step
        self.objects: dict[str, Any] = _Objects()
        self.created: list[Any] = []
        self.vms: list[tuple[str, Any]] = []
        self.guest: GuestVm | None = None
        self.kvm: api.Kvm | None = None
        self.crashed: str | None = None
        self.tracker = OwnerTracker()
        self.events: list[Any] | None = None

    # --- the column -------------------------------------------------------------------------
    def run(self) -> BackendRun:
        scenario, name = self.scenario, self.name
        backends = guestmem.backends()
        reason = for_backend(scenario.scenario.not_applicable, name)
        if reason is not None:
            return _not_run(scenario, name, reason)
        backend = backends.get(name)
        if backend is None:
            return _not_run(scenario, name, "backend not installed")
        options = self._options(backend)
        if isinstance(options, str):
            return _not_run(scenario, name, options)
        registry = guestmem.get_registry()
        registry.add_plugin(
            self.tracker, name=f"guestmem.scenario.owners.{id(self)}", distribution="guestmem"
        )
        started = time.perf_counter()
        try:
            try:
                self.kvm = guestmem.open(name, **options)
            except OSError as exc:
                return _not_run(scenario, name, f"cannot open the backend: {exc.strerror or exc}")
            return self._column(backend, started)
        finally:
            registry.remove_plugin(self.tracker)

    def _options(self, backend: Backend) -> dict[str, Any] | str:
        host = self.scenario.host
        options: dict[str, Any] = {}
        model = backend.opener is None
        if host.profile is not None or host.policies:
            if not model:
                return "what-if kernel profiles and policies apply to the model backends only"
            from guestmem.model.profile import get_profile

            profile = get_profile(host.profile)
            if host.policies:
                shown = ",".join(f"{k}={v}" for k, v in sorted(host.policies.items()))
                changes: dict[str, Any] = dict(host.policies)
                profile = attrs.evolve(profile, name=f"{profile.name}+{shown}", **changes)
            options["profile"] = profile
        if self.record:
            options["record"] = True
        return options

    def _column(self, backend: Backend, started: float) -> BackendRun:
        assert self.kvm is not None
        outcomes: list[Outcome] = []
        maps: list[list[MemoryMap]] = []
        total = len(self.scenario.steps) + 2
        launch = self._row(0, total, self._launch)
        outcomes.append(launch)
        maps.append(self._maps())
        for i, step in enumerate(self.scenario.steps, 1):
            if self.guest is None:
                outcomes.append(Outcome(status="n/a", text=f"n/a: {launch.detail}", detail=launch.detail))
            else:
                outcomes.append(self._row(i, total, partial(self._step, step)))
            maps.append(self._maps())
        counters = self._counters()
        costs = self._costs(counters)
        details = self.guest.intents.cost_details(counters) if self.guest is not None and counters else {}
        outcomes.append(self._row(total - 1, total, self._teardown))
        maps.append([])
        self.events = getattr(self.kvm, "events", None)
        return BackendRun(
            backend=self.name,
            ran=True,
            vm_type=self.guest.vm_type.name if self.guest is not None else "",
            notes=list(self.guest.notes) if self.guest is not None else [],
            outcomes=outcomes,
            counters=counters,
            costs=costs,
            details=details,
            maps=maps if self.want_maps else [],
            elapsed_ms=round((time.perf_counter() - started) * 1000, 3),
        )

    def _row(self, index: int, total: int, body: Callable[[], Outcome]) -> Outcome:
        if self.on_step is not None:
            self.on_step(self.name, index, total)
        return body()

    # --- launch and teardown --------------------------------------------------------------------
    def _launch(self) -> Outcome:
        assert self.kvm is not None
        spec, vmm = self.scenario.vm, self.scenario.vmm

        def launch() -> tuple[Any, str]:
            assert self.kvm is not None
            guest = GuestVm.launch(
                self.kvm,
                kind=spec.kind,
                memory=spec.layout(),
                vcpus=spec.vcpus,
                handle_exits=vmm.handle_exits,
                prefault=vmm.prefault,
            )
            self.guest = guest
            self.objects.update({"kvm": self.kvm, "vm": guest.vm})
            for i, vcpu in enumerate(guest.vcpus):
                self.objects[f"vcpu{i}"] = vcpu
            for i, region in enumerate(guest.regions):
                self.objects[f"gmem{i}"] = region.gmem
                self.objects[f"shared{i}"] = region.shared
            self.vms.append(("vm", guest.vm))
            return None, "; ".join([guest.vm_type.name, *guest.notes])

        outcome = self._outcome(launch, None)
        if self.guest is None and outcome.status != "n/a":
            return attrs.evolve(outcome, check="fail", failures=["the VM could not be launched"])
        return outcome

    def _teardown(self) -> Outcome:
        def close() -> tuple[Any, str]:
            for obj in reversed(self.created):
                obj.close()
            if self.guest is not None:
                self.guest.close()
            assert self.kvm is not None
            self.kvm.close()
            if host is None:
                return None, "every file closed (the real kernel's memory is not observable)"
            left = host.allocated_pages
            return left, f"every file closed; {left} host page(s) still allocated"

        try:
            host: HostView | None = view(self.kvm)
        except TypeError:
            host = None
        expect = for_backend(self.scenario.teardown.expect_on, self.name, self.scenario.teardown.expect)
        if expect is None or host is None:  # at least every close succeeds (nothing to count on
            expect = fmt.Expect(ok=True)  # the real kernel)
        return self._outcome(close, expect)

    # --- one step -------------------------------------------------------------------------------
    def _step(self, step: fmt.Step) -> Outcome:
        why = self._not_applicable(step)
        if why is not None:
            meaning = "; ".join(f"{c}: {CAPABILITIES[c]}" for c in step.requires if c in why)
            return Outcome(status="n/a", text=f"n/a: {why}", detail=meaning or why)
        if self.crashed is not None:
            return Outcome(status="skipped", text="skipped: host crashed", detail=self.crashed)
        expect = for_backend(step.expect_on, self.name, step.expect)
        return self._outcome(lambda: self._execute(step), expect)

    def _not_applicable(self, step: fmt.Step) -> str | None:
        if step.only is not None and self.name not in step.only and _family(self.name) not in step.only:
            return f"runs on {', '.join(step.only)} only"
        skip = for_backend(step.skip, self.name)
        if skip is not None:
            return skip
        assert self.guest is not None
        missing = [c for c in step.requires if c not in self.guest.capabilities]
        if missing:
            return "needs " + ", ".join(missing)
        return None

    def _outcome(self, body: Callable[[], tuple[Any, str]], expect: fmt.Expect | None) -> Outcome:
        before = self._counters()
        started = time.perf_counter()
        fields: dict[str, Any] = {}
        bug = False
        try:
            value, detail = body()
            fields = _value_fields(value)
            fields.update(status="ok", detail=detail, text=_ok_text(value, detail))
        except NotApplicable as exc:
            fields = {"status": "n/a", "text": f"n/a: {exc.reason}", "detail": exc.reason}
        except HostCrash as exc:
            self.crashed = exc.verdict
            fields = {"status": "crash", "text": "host crash", "detail": exc.verdict}
        except HostSigbus as exc:
            fields = _error_fields(exc, status="sigbus", exit_="sigbus", text=f"SIGBUS [{exc.rule}]")
        except MemoryFault as exc:
            side = "private" if exc.is_private else "shared"
            fields = _error_fields(exc, status="exit", exit_="memory_fault")
            fields.update(gpa=exc.gpa, size=exc.size, private=exc.is_private)
            fields["text"] = f"exit MEMORY_FAULT {side} gpa={exc.gpa:#x} ({errno_name(exc.errno or 0)})"
        except HypercallExit as exc:
            args = ", ".join(f"{a:#x}" for a in exc.args)
            fields = {
                "status": "exit",
                "exit": "hypercall",
                "text": f"exit HYPERCALL nr={exc.nr:#x}",
                "detail": args,
            }
            fields["gpa"] = exc.args[0] if exc.args else None
        except MmioExit as exc:
            fields = {"status": "exit", "exit": "mmio", "gpa": exc.gpa, "text": f"exit MMIO gpa={exc.gpa:#x}"}
        except InternalErrorExit as exc:
            fields = {
                "status": "exit",
                "exit": "internal_error",
                "text": "exit INTERNAL_ERROR",
                "detail": str(exc),
            }
        except GuestExit as exc:
            fields = {"status": "exit", "exit": type(exc).__name__, "text": f"exit {type(exc).__name__}"}
        except KvmError as exc:
            fields = _error_fields(exc, status="error")
        except (BackendError, ObserverError, AssertionError) as exc:  # a bug, never a modelled outcome
            bug = True
            fields = {"status": "raised", "exit": type(exc).__name__, "text": f"bug: {type(exc).__name__}"}
            fields["detail"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a guest-side exception (#VC...) is an outcome
            fields = {
                "status": "raised",
                "exit": type(exc).__name__,
                "text": type(exc).__name__,
                "detail": str(exc),
            }
        elapsed = round((time.perf_counter() - started) * 1000, 3)
        after = self._counters()
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))}
        delta = {k: v for k, v in delta.items() if v}
        costs = self._cost_delta(before, after)
        outcome = Outcome(**fields, counters=delta, costs=costs, elapsed_ms=elapsed)
        if bug:
            return attrs.evolve(outcome, check="fail", failures=[f"{outcome.exit}: {outcome.detail}"])
        if expect is None or outcome.status == "n/a":
            return outcome
        failures = check(expect, outcome)
        return attrs.evolve(outcome, check="fail" if failures else "pass", failures=failures)

    def _execute(self, step: fmt.Step) -> tuple[Any, str]:
        guest = self.guest
        assert guest is not None
        obj = self.objects
        match step:
            case fmt.Populate():
                return None, guest.populate(step.gpa, step.data, measure=step.measure)
            case fmt.LaunchFinish():
                return None, guest.finish_launch()
            case fmt.Convert():
                private = step.to == "private"
                note = guest.convert(
                    step.range.start,
                    step.range.size,
                    private=private,
                    page_size=step.page_size,
                    coalesce=step.coalesce,
                )
                return None, note
            case fmt.Accept():
                note = guest.accept(
                    step.range.start,
                    step.range.size,
                    page_size=step.page_size,
                    coalesce=step.coalesce,
                    entries=step.entries,
                )
                return None, note
            case fmt.GuestRead():
                return guest.read(step.gpa, step.length, private=_side(step.side)), ""
            case fmt.GuestWrite():
                guest.write(step.gpa, step.data, private=_side(step.side))
                return None, ""
            case fmt.Touch():
                return guest.touch(step.range.start, step.range.size), ""
            case fmt.CreateVm():
                info, note = guest.intents.vm_type(guest.backend, step.vm_kind)
                vm = guest.kvm.create_vm(info.type)
                self._keep(step.as_, vm)
                self.vms.append((step.as_, vm))
                return None, info.name + (f"; {note}" if note else "")
            case fmt.MmapAnonymous():
                self._keep(step.as_, guest.kvm.mmap_anonymous(step.size))
                return None, ""
            case fmt.CreateGmem():
                self._keep(step.as_, obj[step.vm].create_guest_memfd(step.size, _flags(step.flags)))
                return None, ""
            case fmt.SetRegion():
                gmem = obj[step.gmem] if step.gmem is not None else None
                obj[step.vm].set_user_memory_region2(
                    step.slot,
                    _flags(step.flags),
                    step.gpa,
                    step.size,
                    self._address(step.userspace),
                    gmem,
                    step.gmem_offset,
                )
                return None, ""
            case fmt.SetAttributes():
                value = step.attributes
                attributes = {"private": uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE, "shared": 0}.get(
                    str(value), value
                )
                obj[step.vm].set_memory_attributes(step.range.start, step.range.size, int(attributes))
                return None, ""
            case fmt.CreateVcpu():
                self._keep(step.as_, obj[step.vm].create_vcpu(step.id))
                return None, ""
            case fmt.EnableCap():
                return obj[step.vm].enable_cap(_constant(step.cap), *step.args), ""
            case fmt.CheckExtension():
                return obj[step.on].check_extension(_constant(step.cap)), ""
            case fmt.Fallocate():
                mode = {
                    "punch_hole": uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE,
                    "allocate": uapi.FALLOC_FL_KEEP_SIZE,
                }.get(str(step.mode), step.mode)
                obj[step.gmem].fallocate(int(mode), step.range.start, step.range.size)
                return None, ""
            case fmt.GmemMmap():
                self._keep(step.as_, obj[step.gmem].mmap(step.length, step.offset))
                return None, ""
            case fmt.InjectMemoryFailure():
                obj[step.gmem].inject_memory_failure(step.offset)
                return None, ""
            case fmt.HostRead():
                return obj[step.map].read(step.offset, step.length), ""
            case fmt.HostWrite():
                obj[step.map].write(step.offset, step.data)
                return None, ""
            case fmt.Madvise():
                advice = uapi.MADV_DONTNEED if step.advice == "dontneed" else uapi.MADV_REMOVE
                obj[step.map].madvise(advice, step.range.start, step.range.size)
                return None, ""
            case fmt.VcpuAccess():
                vcpu = obj[step.vcpu]
                if step.data is not None:
                    vcpu.access(step.gpa, data=step.data, private=step.private)
                    return None, ""
                return vcpu.access(step.gpa, step.length, private=step.private), ""
            case fmt.PreFault():
                return obj[step.vcpu].pre_fault_memory(step.range.start, step.range.size), ""
            case fmt.Hypercall():
                return obj[step.vcpu].hypercall(step.nr, *step.args), ""
            case fmt.Close():
                obj[step.object].close()
                return None, ""
        raise NotApplicable(f"step {step.do!r} is not implemented by the runner")

    # --- objects, counters, maps -----------------------------------------------------------------
    def _keep(self, name: str, value: Any) -> None:
        self.objects[name] = value
        self.created.append(value)

    def _address(self, ref: str | int | None) -> int:
        if ref is None:
            return 0
        if isinstance(ref, int):
            return ref
        base, _, offset = ref.partition("+")
        mapping = self.objects[base.strip()]
        return int(mapping.address) + (fmt.parse_size(offset.strip()) if offset else 0)

    def _counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        sources = [vm for _, vm in self.vms] + ([self.kvm] if self.kvm is not None else [])
        for source in sources:
            for key, value in dict(getattr(source, "counters", None) or {}).items():
                total[key] = total.get(key, 0) + value
        return total

    def _costs(self, counters: dict[str, int]) -> dict[str, int] | None:
        if self.guest is None or not counters:
            return None
        return self.guest.intents.costs(counters)

    def _cost_delta(self, before: dict[str, int], after: dict[str, int]) -> dict[str, int] | None:
        a, b = self._costs(after), self._costs(before) if before else None
        if a is None:
            return None
        b = b or {}
        return {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)}

    def _maps(self) -> list[MemoryMap]:
        if not self.want_maps:
            return []
        found = []
        for name, vm in self.vms:
            if getattr(vm, "closed", False) and name != "vm":
                continue
            shot = snapshot(vm, name, self.tracker)
            if shot is not None:
                found.append(shot)
        return found


T = TypeVar("T")


def _family(name: str) -> str:
    return name.split("-", 1)[0]


def for_backend(per: dict[str, T], name: str, default: T | None = None) -> T | None:
    """``per[name]``, else ``per`` of the backend's family (``snp`` for ``snp-hugepage``:
    a variant named ``<base>-<variant>`` inherits its base's entries), else *default*.

    An empty string entered for the variant itself cancels the family's entry (a skip or a
    not-applicable reason that does not hold for the variant).
    """
    if name in per:
        found = per[name]
        return None if found == "" else found
    return per.get(_family(name), default)


class _Objects(dict[str, Any]):
    """The named objects of a run; a name whose creating step failed makes a step n/a."""

    def __missing__(self, key: str) -> Any:
        raise NotApplicable(f"there is no {key!r}: the step creating it did not succeed")


def _side(side: str | None) -> bool | None:
    return None if side is None else side == "private"


def _constant(value: str | int) -> int:
    if isinstance(value, int):
        return value
    found = getattr(uapi, value, None)
    if not isinstance(found, int):
        raise NotApplicable(f"{value} is not a constant of guestmem.uapi")
    return found


def _flags(value: list[str] | int) -> int:
    if isinstance(value, int):
        return value
    out = 0
    for name in value:
        out |= _constant(name)
    return out


def _value_fields(value: Any) -> dict[str, Any]:
    if isinstance(value, bytes | bytearray):
        return {"data": bytes(value)}
    if isinstance(value, int) and not isinstance(value, bool):
        return {"value": value}
    return {}


def _ok_text(value: Any, detail: str) -> str:
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
        if not any(data):
            return f"ok: {len(data)} zero byte(s)"
        shown = data[:12].decode("utf-8", "replace")
        return f"ok: {shown!r}" + ("..." if len(data) > 12 else "")
    if isinstance(value, int) and not isinstance(value, bool):
        return f"ok: {value:#x}" if value > 9 else f"ok: {value}"
    return "ok"


def _error_fields(
    exc: KvmError, *, status: str, exit_: str | None = None, text: str | None = None
) -> dict[str, Any]:
    name = errno_name(exc.errno or 0)
    rule = exc.rule or None
    return {
        "status": status,
        "errno": name,
        "rule": rule,
        "exit": exit_,
        "text": text or (f"{name} [{rule}]" if rule else name),
        "detail": exc.detail,
    }


def check(expect: fmt.Expect, outcome: Outcome) -> list[str]:
    """The ways *outcome* misses *expect* (empty: it meets it)."""
    found: list[str] = []

    def want(what: str, expected: Any, got: Any) -> None:
        if expected is not None and expected != got:
            found.append(f"{what}: expected {_shown(expected)}, got {_shown(got)}")

    if expect.ok is not None and (outcome.status == "ok") != expect.ok:
        found.append(f"expected {'success' if expect.ok else 'a failure'}, got {outcome.text}")
    want("errno", expect.errno, outcome.errno)
    want("rule", expect.rule, outcome.rule)
    want("exit", expect.exit, outcome.exit)
    want("gpa", expect.gpa, outcome.gpa)
    want("size", expect.size, outcome.size)
    want("private", expect.private, outcome.private)
    want("value", expect.value, outcome.value)
    if expect.data is not None and outcome.data != expect.data:
        found.append(f"data: expected {expect.data!r}, got {outcome.data!r}")
    if expect.zero is not None and (outcome.data is not None and not any(outcome.data)) != expect.zero:
        found.append(f"expected {'zeroes' if expect.zero else 'non-zero data'}, got {outcome.data!r}")
    if expect.crash is not None and (outcome.status == "crash") != expect.crash:
        found.append(f"expected {'a host crash' if expect.crash else 'no crash'}, got {outcome.text}")
    if expect.verdict is not None and expect.verdict not in outcome.detail:
        found.append(f"verdict: expected it to mention {expect.verdict!r}, got {outcome.detail!r}")
    if expect.raised is not None and (outcome.status, outcome.exit) != ("raised", expect.raised):
        found.append(f"expected {expect.raised} raised, got {outcome.text}")
    if expect.note is not None and expect.note not in outcome.detail:
        found.append(f"note: expected it to mention {expect.note!r}, got {outcome.detail!r}")
    for label, wanted, got in (
        ("counter", expect.counters, outcome.counters),
        ("cost", expect.costs, outcome.costs),
    ):
        for key, value in (wanted or {}).items():
            have = (got or {}).get(key, 0)
            if have != value:
                found.append(f"{label} {key}: expected {value}, got {have}")
    return found


def _shown(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value > 9:
        return hex(value)
    return repr(value) if isinstance(value, str) else str(value)
