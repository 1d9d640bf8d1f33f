"""Running the stateful machine against one backend for a budget of steps.

A fuzz run is a series of Hypothesis runs of the backend's machine
(:func:`fuzz_machine`: :class:`~guestmem.conformance.machine.GmemMachine` configured from
the backend's kit, :func:`guestmem.conformance.kit_for`), each from its own seed, until
the budget of steps is spent or one fails.  A failure is shrunk to a minimal program and
kept as a :class:`FuzzResult` whose ``reproducer`` is a Python script that replays it.

Kept small on purpose: the hostile-input rules and campaigns over many processes build on
:class:`FuzzConfig` (which machine, which budget) and :func:`run_fuzz` (one process).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs

from guestmem.conformance.machine import GmemMachine, run_machine
from guestmem.conformance.options import kit_for
from guestmem.registry import get_registry

#: Hypothesis's mark on invariant methods: their calls are left out of a reproducer.
_INVARIANT_MARK = "hypothesis_stateful_invariant"


@attrs.frozen
class FuzzConfig:
    """What to fuzz and for how long."""

    #: The backend's name.
    backend: str
    #: The ``KVM_CREATE_VM`` type; None: what the kit picks (the backend's own first
    #: private type, :func:`~guestmem.conformance.kit_for`).
    vm_type: int | None = None
    #: Steps in total (a step is one rule of the machine).
    steps: int = 1000
    #: Steps per run of the machine (Hypothesis's ``stateful_step_count``).
    run_length: int = 25
    #: The first run's seed; run *i* uses ``seed + i``.
    seed: int = 0
    #: Shrink a failure to a minimal program.
    shrink: bool = True
    #: Mix hostile calls into the machine and count outcomes (:mod:`guestmem.fuzz.hostile`).
    hostile: bool = False
    #: The kernel profile of a model backend (None: its default).
    profile: str | None = None
    #: Seconds a hostile step may run before it counts as a hang (0: no limit).
    call_timeout: float = 1.0

    def to_json(self) -> dict[str, Any]:
        """The config as plain data."""
        return attrs.asdict(self)


@attrs.define
class FuzzResult:
    """What a fuzz run did."""

    config: FuzzConfig
    #: The VM type's name.
    vm_type_name: str = ""
    runs: int = 0
    steps: int = 0
    seconds: float = 0.0
    #: The failure, ``"ExceptionType: message"``, or None.
    failure: str | None = None
    #: The failing program, one machine call a line (invariant checks left out).
    program: list[str] = attrs.Factory(list)

    @property
    def reproducer(self) -> str:
        """A Python script replaying :attr:`program` (empty without a failure)."""
        if self.failure is None:
            return ""
        profile = f", profile={self.config.profile!r}" if self.config.profile else ""
        header = [
            f"# guestmem fuzz --backend {self.config.backend}: the minimal failing program",
            f"# {self.failure.splitlines()[0]}",
            "from guestmem.fuzz import fuzz_machine",
            "",
            f"Machine = fuzz_machine({self.config.backend!r}, {self.config.vm_type!r}{profile})",
        ]
        body = ["state = Machine()" if line.startswith("state = ") else line for line in self.program]
        return "\n".join(header + body) + "\n"

    def to_json(self) -> dict[str, Any]:
        """The result as plain data."""
        return {
            "backend": self.config.backend,
            "vm_type": self.vm_type_name,
            "seed": self.config.seed,
            "runs": self.runs,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "failure": self.failure,
            "program": self.program,
        }


def fuzz_machine(
    backend: str,
    vm_type: int | None = None,
    on_step: Callable[[], None] | None = None,
    *,
    hostile: bool = False,
    profile: str | None = None,
) -> type[GmemMachine]:
    """The machine of *backend*'s *vm_type* configured as its kit is (driver, observers,
    options): what ``guestmem fuzz`` runs and a reproducer replays.  *hostile* mixes in
    hostile calls; *profile* opens the backend with that kernel profile."""
    kit = kit_for(backend, vm_type)
    info = get_registry().backend(backend).vm_type(kit.vm_type) if kit.vm_type is not None else None
    if info is None:
        info = get_registry().backend(backend).default_vm_type
    machine: type[GmemMachine] = kit.machine(info, on_step, hostile=hostile)
    if profile is not None:
        options = {**machine.open_options, "profile": profile}
        machine = type(machine.__name__, (machine,), {"open_options": options})
    return machine


def _program(machine: type[GmemMachine], notes: list[str]) -> list[str]:
    invariants = {name for name in dir(machine) if hasattr(getattr(machine, name, None), _INVARIANT_MARK)}
    program = []
    for line in notes:
        if not line.startswith("state"):
            continue
        call = line.removeprefix("state.").split("(", 1)[0]
        if call not in invariants:
            program.append(line)
    return program


def run_fuzz(config: FuzzConfig, on_step: Callable[[], None] | None = None) -> FuzzResult:
    """Run the machine of *config* until its budget of steps is spent or a run fails.

    *on_step* is called after every step (a progress bar).  Every failure of the model or
    the backend (an assertion, an invariant, a leak, an unexpected exception) ends the
    fuzz run with a :class:`FuzzResult` carrying the shrunk program.
    """
    result = FuzzResult(config)
    started = time.perf_counter()

    def step() -> None:
        result.steps += 1
        if on_step is not None:
            on_step()

    machine = fuzz_machine(config.backend, config.vm_type, step, profile=config.profile)
    info = machine.info
    result.vm_type_name = info.name if info is not None else ""
    while result.steps < config.steps:
        left = config.steps - result.steps
        examples = max(1, -(-left // config.run_length))
        before = result.steps
        try:
            run_machine(
                machine,
                examples=examples,
                steps=config.run_length,
                seed=config.seed + result.runs,
                shrink=config.shrink,
            )
        except Exception as exc:  # noqa: BLE001 - every failure becomes the result
            first = exc
            while isinstance(first, ExceptionGroup):  # several distinct failures: the first
                first = first.exceptions[0]
            result.failure = f"{type(first).__name__}: {first}"
            result.program = _program(machine, list(getattr(first, "__notes__", [])))
            break
        finally:
            result.runs += 1
        if result.steps == before:  # pragma: no cover - a machine that takes no step
            break
    result.seconds = time.perf_counter() - started
    return result
