"""``guestmem fuzz --hostile``: the stateful machine with hostile calls, outcomes counted.

The kit's Hypothesis runs stop at the first failure; a hostile campaign must go on and
count.  So this module drives the same machine
(:class:`~guestmem.conformance.machine.GmemMachine`, ``hostile`` set) itself: each
sequence draws rules and their arguments (:class:`~guestmem.conformance.machine.Draw`)
from a :class:`random.Random` of its own, runs the invariants after every step, and ends
at its length, at a finding, or when a hostile call changed the machine's own objects.
Then everything is closed and the leak check runs (the kit's teardown: ownership tables
empty, host pages freed, descriptors closed).

A finding is a class (``crash: KeyError @ guestmem.model.vm:delete_memslot``,
``half-applied: ...``, ``invariant: mmu-balanced``, ``leak: pages-freed``,
``check: guest_read ...`` for a reference check that failed after hostile calls,
``hang: ...`` for a call that ran past its time limit).  The first sequence of each class
is kept as its program (plain data: rule names and arguments), :func:`minimise` deletes
steps while the class still shows, and :func:`write_reproducer` writes it as JSON that
``guestmem fuzz --replay FILE`` (:func:`replay`) runs again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import attrs

from guestmem.conformance.hostile import Finding, crash_key, from_plain, innermost_frame, to_plain
from guestmem.conformance.ledger import LeakError
from guestmem.conformance.machine import STEP_MARK, GmemMachine
from guestmem.errors import HostCrash, ObserverError
from guestmem.fuzz.run import FuzzConfig, fuzz_machine
from guestmem.invariants import InvariantViolation

#: Hypothesis's mark on invariant methods.
_INVARIANT_MARK = "hypothesis_stateful_invariant"
#: The reproducer's format.
FORMAT = "guestmem-fuzz-reproducer/1"
#: Replays :func:`minimise` may spend on one class.
MINIMISE_BUDGET = 120

#: One step of a program: a rule's name and its arguments.
Step = tuple[str, dict[str, Any]]


class CallTimeout(BaseException):
    """A step ran past its time limit (a BaseException, so that no ``except Exception``
    of the model swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`CallTimeout` in the block once *seconds* passed: ``SIGALRM`` in the
    main thread, a trace function elsewhere (a Dask worker's thread); 0: no limit."""
    if seconds <= 0:
        yield
        return
    if threading.current_thread() is threading.main_thread():

        def alarm(signum: int, frame: FrameType | None) -> None:
            raise CallTimeout(f"over {seconds}s")

        old = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        return
    deadline = time.monotonic() + seconds

    def tracer(frame: FrameType, event: str, arg: Any) -> None:
        if time.monotonic() > deadline:
            raise CallTimeout(f"over {seconds}s")

    old_trace = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(old_trace)


def rules_of(machine: type[GmemMachine]) -> dict[str, tuple[dict[str, Any], Any]]:
    """The machine's rules by name: ``(arguments, precondition)``."""
    found = {}
    for name in sorted(dir(machine)):
        mark = getattr(getattr(machine, name, None), STEP_MARK, None)
        if mark is not None:
            found[name] = mark
    return found


def invariants_of(machine: type[GmemMachine]) -> list[str]:
    """The names of the machine's invariant checks."""
    return [name for name in sorted(dir(machine)) if hasattr(getattr(machine, name, None), _INVARIANT_MARK)]


def hostile_call(on: str, op: str, *args: Any, wrong: tuple[str, ...] = ()) -> Step:
    """The ``hostile_call`` step of a program (as a reproducer file holds it): *op* called on
    role *on* with *args* (``"arch:NAME"`` for the backend's arch face), *wrong* naming the
    arguments of the wrong type."""
    return (
        "hostile_call",
        {"call": {"on": on, "op": op, "args": list(args), "kw": {}, "wrong": list(wrong)}},
    )


def well_typed(steps: list[Step]) -> bool:
    """No hostile call of *steps* passes an argument of the wrong type."""
    return not any(kwargs.get("call", {}).get("wrong") for name, kwargs in steps if name == "hostile_call")


def failure_key(exc: BaseException, step: str) -> str:
    """The class of a failure of the machine's own checks in the step named *step*."""
    if isinstance(exc, ObserverError) and isinstance(exc.error, InvariantViolation):
        exc = exc.error
    if isinstance(exc, InvariantViolation):
        return f"invariant: {str(exc).split(' ', 1)[0].rstrip(':')}"
    if isinstance(exc, LeakError):
        return f"leak: {str(exc).split(':', 1)[0]}"
    if isinstance(exc, AssertionError):
        return f"check: {step}: {type(exc).__name__} @ {innermost_frame(exc)}"
    if isinstance(exc, OSError):
        return f"check: {step}: {type(exc).__name__} {exc.errno}"
    return crash_key(exc)


@attrs.define
class Played:
    """What one sequence did."""

    steps: list[Step] = attrs.Factory(list)
    #: ``(class, message)`` of what ended it, or None.
    finding: tuple[str, str] | None = None
    tally: dict[str, int] = attrs.Factory(dict)
    #: ``budget``, ``desynced`` (a hostile call changed the machine's objects), ``finding``.
    ended: str = "budget"


def play(
    machine: type[GmemMachine],
    *,
    rng: random.Random | None = None,
    length: int = 0,
    steps: list[Step] | None = None,
    timeout: float = 1.0,
) -> Played:
    """One sequence on a fresh *machine*: *length* steps drawn from *rng*, or *steps*
    replayed (a step whose precondition does not hold is left out); then the teardown and
    its leak check."""
    rules = rules_of(machine)
    checks = invariants_of(machine)
    played = Played()
    try:
        with time_limit(timeout * 5):
            state = machine()
    except CallTimeout as exc:
        played.finding, played.ended = (f"hang: setup @ {innermost_frame(exc)}", str(exc)), "finding"
        return played
    except Exception as exc:  # noqa: BLE001 - a machine that cannot start is a finding
        played.finding, played.ended = (f"setup: {crash_key(exc)}", str(exc)), "finding"
        return played
    abandoned = False
    try:
        total = len(steps) if steps is not None else length
        for index in range(total):
            if steps is not None:
                name, kwargs = steps[index]
                when = rules[name][1]
                if when is not None and not when(state):
                    continue
            else:
                assert rng is not None
                enabled = [n for n, (_, when) in rules.items() if when is None or when(state)]
                name = rng.choice(enabled)
                kwargs = {arg: draw.draw(rng, state) for arg, draw in rules[name][0].items()}
            played.steps.append((name, kwargs))
            try:
                with time_limit(timeout):
                    getattr(state, name)(**kwargs)
                    for check in () if state.ended else checks:
                        getattr(state, check)()
            except Finding as found:
                played.finding = (found.key, str(found))
            except CallTimeout as exc:
                abandoned = True
                played.finding = (f"hang: {name} @ {innermost_frame(exc)}", str(exc))
            except Exception as exc:  # noqa: BLE001 - every failure is a class
                played.finding = (failure_key(exc, name), f"{type(exc).__name__}: {exc}")
            if played.finding is not None:
                played.ended = "finding"
                break
            if state.ended:
                played.ended = "desynced"
                break
    finally:
        if state.hostility is not None:
            played.tally = dict(state.hostility.tally)
        _teardown(state, played, timeout, abandoned)
    return played


def _teardown(state: GmemMachine, played: Played, timeout: float, abandoned: bool) -> None:
    try:
        with time_limit(timeout * 5):
            crashed = state.hostility is not None and state.hostility.host_crashed
            if abandoned or crashed or played.finding is not None:
                state.closed = True  # a broken sequence, or a crashed host, is not checked for leaks
            if crashed:
                with contextlib.suppress(HostCrash):
                    state.teardown()
            else:
                state.teardown()
    except CallTimeout as exc:
        if played.finding is None:
            played.finding, played.ended = (f"hang: teardown @ {innermost_frame(exc)}", str(exc)), "finding"
    except Exception as exc:  # noqa: BLE001 - a leak or a failure to close is a class
        if played.finding is None:
            played.finding = (failure_key(exc, "teardown"), f"{type(exc).__name__}: {exc}")
            played.ended = "finding"
    finally:
        state._remove_plugins()  # the registry is global: never leave an observer behind


def reproduces(machine: type[GmemMachine], steps: list[Step], key: str, timeout: float) -> bool:
    """Replaying *steps* ends with finding *key*."""
    played = play(machine, steps=steps, timeout=timeout)
    return played.finding is not None and played.finding[0] == key


def minimise(
    machine: type[GmemMachine],
    steps: list[Step],
    key: str,
    *,
    timeout: float = 1.0,
    budget: int = MINIMISE_BUDGET,
) -> list[Step]:
    """Delete steps of *steps* (halves, then quarters ... then single steps) while
    replaying still ends with finding *key*; at most *budget* replays."""
    best = list(steps)
    chunk = max(1, len(best) // 2)
    spent = 0
    while chunk >= 1 and spent < budget:
        start = 0
        while start < len(best) and spent < budget:
            candidate = best[:start] + best[start + chunk :]
            spent += 1
            if candidate and reproduces(machine, candidate, key, timeout):
                best = candidate
            else:
                start += chunk
        chunk //= 2
    return best


@attrs.define
class Found:
    """A finding class in a hostile run: how often, and the first sequence that showed it."""

    key: str
    count: int
    message: str
    #: The program of the first sequence that showed it (minimised once :func:`minimise`
    #: ran).
    steps: list[Step]
    #: Where it was first seen: ``(unit seed, sequence)``.
    first: tuple[int, int]

    @property
    def well_typed(self) -> bool:
        """Every argument of its program has the right type."""
        return well_typed(self.steps)


@attrs.define
class HostileResult:
    """What a hostile run did (one unit of a campaign)."""

    config: FuzzConfig
    vm_type_name: str = ""
    sequences: int = 0
    steps: int = 0
    seconds: float = 0.0
    #: Outcome counts, ``"kind: role.op: detail"``.
    tally: dict[str, int] = attrs.Factory(dict)
    #: How sequences ended.
    ended: dict[str, int] = attrs.Factory(dict)
    findings: dict[str, Found] = attrs.Factory(dict)


def hostile_machine(config: FuzzConfig) -> type[GmemMachine]:
    """The machine ``guestmem fuzz --hostile`` runs for *config*."""
    return fuzz_machine(config.backend, config.vm_type, hostile=True, profile=config.profile)


def run_hostile(config: FuzzConfig, machine: type[GmemMachine] | None = None) -> HostileResult:
    """Sequences of ``config.run_length`` steps until ``config.steps`` steps ran; sequence
    *n* draws from ``random.Random(f"{config.seed}:{n}")``, so the result depends on the
    config alone.  Findings are not minimised here (:func:`minimise`).  *machine*: another
    machine than :func:`hostile_machine`'s (a kit subclass's own)."""
    started = time.perf_counter()
    machine = machine or hostile_machine(config)
    result = HostileResult(config, machine.info.name if machine.info is not None else "")
    while result.steps < config.steps:
        rng = random.Random(f"{config.seed}:{result.sequences}")
        length = min(config.run_length, config.steps - result.steps)
        played = play(machine, rng=rng, length=length, timeout=config.call_timeout)
        result.sequences += 1
        result.steps += max(1, len(played.steps))
        result.ended[played.ended] = result.ended.get(played.ended, 0) + 1
        for key, n in played.tally.items():
            result.tally[key] = result.tally.get(key, 0) + n
        if played.finding is not None:
            key, message = played.finding
            found = result.findings.get(key)
            if found is None:
                result.findings[key] = Found(
                    key, 1, message, played.steps, (config.seed, result.sequences - 1)
                )
            else:
                found.count += 1
    result.seconds = time.perf_counter() - started
    return result


# --- reproducers ------------------------------------------------------------------------------------
def reproducer(config: FuzzConfig, found: Found) -> dict[str, Any]:
    """The reproducer of *found* as JSON-able data."""
    return {
        "format": FORMAT,
        "backend": config.backend,
        "vm_type": config.vm_type,
        "profile": config.profile,
        "class": found.key,
        "well_typed": found.well_typed,
        "message": found.message.splitlines()[0] if found.message else "",
        "first_seen": {"seed": found.first[0], "sequence": found.first[1]},
        "steps": [[name, to_plain(kwargs)] for name, kwargs in found.steps],
    }


def reproducer_name(config: FuzzConfig, key: str) -> str:
    """A file name for the reproducer of class *key*: readable and unique."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    slug = "".join(c if c.isalnum() else " " for c in key.split(" @ ", maxsplit=1)[0])
    slug = "-".join(slug.split())[:48]
    where = config.backend + (f"-{config.profile}" if config.profile else "")
    return f"{where}-{slug}-{digest}.json"


def write_reproducer(directory: Path, config: FuzzConfig, found: Found) -> Path:
    """Write the reproducer of *found* into *directory*; its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / reproducer_name(config, found.key)
    path.write_text(json.dumps(reproducer(config, found), indent=1) + "\n", encoding="utf-8")
    return path


@attrs.frozen
class Replayed:
    """What replaying a reproducer came to."""

    expected: str
    #: The class the replay ended with, or None.
    got: str | None
    message: str
    steps: int

    @property
    def reproduced(self) -> bool:
        """The replay ended with the reproducer's class."""
        return self.got == self.expected

    def to_json(self) -> dict[str, Any]:
        """As plain data."""
        return {
            "class": self.expected,
            "got": self.got,
            "reproduced": self.reproduced,
            "message": self.message,
            "steps": self.steps,
        }


def load_reproducer(path: str | Path) -> tuple[FuzzConfig, str, list[Step]]:
    """The config, class and program of a reproducer file."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a guestmem fuzz reproducer (format {data.get('format')!r})")
    config = FuzzConfig(data["backend"], data.get("vm_type"), hostile=True, profile=data.get("profile"))
    steps = [(str(name), from_plain(kwargs)) for name, kwargs in data["steps"]]
    return config, str(data["class"]), steps


def replay(path: str | Path, *, timeout: float = 1.0, machine: type[GmemMachine] | None = None) -> Replayed:
    """Run a reproducer file again (on *machine*, default the one its backend names)."""
    config, key, steps = load_reproducer(path)
    played = play(machine or hostile_machine(config), steps=steps, timeout=timeout)
    got, message = played.finding if played.finding is not None else (None, "")
    return Replayed(key, got, message, len(played.steps))


def check_hostile_run(
    machine: type[GmemMachine], directory: Path, *, steps: int = 300, seed: int = 0, timeout: float = 1.0
) -> HostileResult:
    """A bounded hostile run of *machine*, checked as the conformance kit checks it
    (``GmemConformance.test_hostile_machine``): the steps ran, outcomes were counted, and
    every finding class minimises to a reproducer (written into *directory*) that replays
    to the same class.  Finding classes themselves are not failures here: they are the
    run's result.  Raises AssertionError naming what did not work."""
    config = FuzzConfig(machine.backend, machine.info.type if machine.info else None, steps=steps, seed=seed)
    config = attrs.evolve(config, hostile=True, call_timeout=timeout)
    result = run_hostile(config, machine)
    assert result.steps >= steps, f"the hostile run took {result.steps} of {steps} steps"
    assert result.tally, "the hostile run counted no outcome"
    hostile_calls = sum(n for key, n in result.tally.items() if not key.startswith("ok: "))
    assert hostile_calls, "no hostile call failed: the hostile rules did not run"
    for key, found in sorted(result.findings.items()):
        found.steps = minimise(machine, found.steps, key, timeout=timeout, budget=40)
        path = write_reproducer(directory, config, found)
        replayed = replay(path, timeout=timeout, machine=machine)
        assert replayed.reproduced, f"the reproducer of {key} replayed as {replayed.got} ({path})"
    return result
