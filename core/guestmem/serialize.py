"""The one cattrs converter behind every JSON and TOML form: traces, scenario files, runs.

Values stay free of serialization (attrs classes in their own modules); this module
teaches one private :class:`cattrs.Converter` (``forbid_extra_keys``) how to read and write
them.  A scenario file with a mistake gets every error at once, each naming the file, the
line and the field (``conversion.toml:14: steps[2].expect.errno: ...``).
"""

from __future__ import annotations

import difflib
import errno as _errno
import json
import re
import tomllib
from collections.abc import Iterable, Iterator
from typing import IO, Any, Literal

import attrs
import cattrs
from cattrs.errors import ForbiddenExtraKeysError, IterableValidationError
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from guestmem import snapshot as snap
from guestmem.backend import TraceEvent
from guestmem.scenario import format as fmt

__all__ = [
    "ScenarioError",
    "event_from_json",
    "event_to_json",
    "load_scenario",
    "parse_scenario",
    "snapshot_from_json",
    "snapshot_to_json",
    "structure",
    "unstructure",
    "write_trace",
]

_converter = cattrs.Converter(forbid_extra_keys=True)


# --- traces ------------------------------------------------------------------------------------
_EVENT_KEYS = frozenset({"seq", "kind", "vm", "ts"})


def event_to_json(event: TraceEvent) -> str:
    """One JSON line for *event* (its fields beside ``seq``, ``kind``, ``vm`` and ``ts``)."""
    data: dict[str, Any] = _converter.unstructure(event)
    fields = data.pop("fields")
    clash = _EVENT_KEYS & set(fields)
    if clash:
        raise ValueError(f"event {event.kind!r} has fields named like the event's own: {sorted(clash)}")
    return json.dumps({**data, **fields}, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if attrs.has(type(value)):
        return _converter.unstructure(value)
    return str(value)


def event_from_json(line: str) -> TraceEvent:
    """Parse a line written by :func:`event_to_json`."""
    data = json.loads(line)
    head = {k: data.pop(k) for k in ("seq", "kind", "vm", "ts") if k in data}
    try:
        return _converter.structure({**head, "fields": data}, TraceEvent)
    except cattrs.BaseValidationError as exc:
        raise ValueError("; ".join(cattrs.transform_error(exc))) from None


def write_trace(events: Iterable[TraceEvent], out: IO[str]) -> int:
    """Write *events* as JSON lines; returns how many."""
    n = 0
    for event in events:
        out.write(event_to_json(event) + "\n")
        n += 1
    return n


# --- snapshots ---------------------------------------------------------------------------------
_SNAPSHOT_TYPES: tuple[type[Any], ...] = (
    snap.Span,
    snap.AttributeRun,
    snap.MemslotState,
    snap.FolioRun,
    snap.BindingRun,
    snap.GmemFileState,
    snap.GmemState,
    snap.VcpuState,
    snap.Leaf,
    snap.VmSnapshot,
    snap.MemoryRun,
    snap.MappingState,
    snap.FdState,
    snap.HostSnapshot,
)
for _cls in _SNAPSHOT_TYPES:
    _converter.register_structure_hook(
        _cls, make_dict_structure_fn(_cls, _converter, _cattrs_forbid_extra_keys=True)
    )
    _converter.register_unstructure_hook(_cls, make_dict_unstructure_fn(_cls, _converter))


def snapshot_to_json(snapshot: snap.HostSnapshot | snap.VmSnapshot) -> str:
    """*snapshot* (``kvm.snapshot()`` or ``vm.snapshot()``) as one JSON document, with
    ``"snapshot": "host"`` or ``"vm"`` saying which."""
    kind = "host" if isinstance(snapshot, snap.HostSnapshot) else "vm"
    return json.dumps({"snapshot": kind, **_converter.unstructure(snapshot)}, sort_keys=True)


def snapshot_from_json(text: str) -> snap.HostSnapshot | snap.VmSnapshot:
    """Read what :func:`snapshot_to_json` wrote (``ValueError`` naming every problem)."""
    data = json.loads(text)
    kind = data.pop("snapshot", None) if isinstance(data, dict) else None
    cls = {"host": snap.HostSnapshot, "vm": snap.VmSnapshot}.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f'not a snapshot: "snapshot" is {kind!r}, not "host" or "vm"')
    try:
        found: snap.HostSnapshot | snap.VmSnapshot = _converter.structure(data, cls)
    except cattrs.BaseValidationError as exc:
        raise ValueError("; ".join(cattrs.transform_error(exc))) from None
    return found


# --- generic ---------------------------------------------------------------------------------
def structure(data: Any, cls: type[Any]) -> Any:
    """*data* (JSON-shaped) as an instance of *cls*."""
    return _converter.structure(data, cls)


def unstructure(value: Any) -> Any:
    """*value* as JSON-shaped data."""
    return _converter.unstructure(value)


# --- scenario values ---------------------------------------------------------------------------
def _size(value: Any, _: Any) -> int:
    return fmt.parse_size(value)


def _data(value: Any, _: Any) -> bytes:
    return fmt.parse_data(value)


def _span(value: Any, _: Any) -> fmt.Span:
    return fmt.parse_span(value)


def _flags(value: Any, _: Any) -> list[str] | int:
    if isinstance(value, bool):
        raise ValueError(f"expected flag names or a number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"expected a list of flag names or a number, got {value!r}")


def _str_or_int(value: Any, _: Any) -> str | int:
    if isinstance(value, str | int) and not isinstance(value, bool):
        return value
    raise ValueError(f"expected a name or a number, got {value!r}")


def _str_int_none(value: Any, _: Any) -> str | int | None:
    return None if value is None else _str_or_int(value, None)


def _bool_or_int(value: Any, _: Any) -> bool | int:
    if isinstance(value, bool | int):
        return value
    raise ValueError(f"expected true, false or a number, got {value!r}")


def _attributes(value: Any, _: Any) -> str | int:
    if value in ("private", "shared") or (isinstance(value, int) and not isinstance(value, bool)):
        return value  # type: ignore[no-any-return]
    raise ValueError(f'attributes are "private", "shared" or a number, got {value!r}')


def _mode(value: Any, _: Any) -> str | int:
    if value in ("punch_hole", "allocate") or (isinstance(value, int) and not isinstance(value, bool)):
        return value  # type: ignore[no-any-return]
    raise ValueError(f'mode is "punch_hole", "allocate" or a number, got {value!r}')


_converter.register_structure_hook(fmt.Size, _size)
_converter.register_structure_hook(fmt.Data, _data)
_converter.register_structure_hook(fmt.Span, _span)
_converter.register_structure_hook(list[str] | int, _flags)
_converter.register_structure_hook(str | int, _str_or_int)
_converter.register_structure_hook(str | int | None, _str_int_none)
_converter.register_structure_hook(bool | int, _bool_or_int)
_converter.register_structure_hook_func(lambda t: t == (Literal["private", "shared"] | int), _attributes)
_converter.register_structure_hook_func(lambda t: t == (Literal["punch_hole", "allocate"] | int), _mode)
_converter.register_unstructure_hook(bytes, lambda b: {"hex": b.hex()})
_converter.register_structure_hook(bytes, lambda v, _: bytes.fromhex(v["hex"]))
_converter.register_unstructure_hook(fmt.Span, str)


def _renames(cls: type[Any]) -> dict[str, Any]:
    fields = {a.name for a in attrs.fields(cls)}
    renames = {"as_": override(rename="as"), "vm_kind": override(rename="kind")}
    return {name: how for name, how in renames.items() if name in fields}


for _cls in fmt.STEP_TYPES.values():
    _converter.register_structure_hook(
        _cls, make_dict_structure_fn(_cls, _converter, _cattrs_forbid_extra_keys=True, **_renames(_cls))
    )
    _converter.register_unstructure_hook(_cls, make_dict_unstructure_fn(_cls, _converter, **_renames(_cls)))


class _FieldError(ValueError):
    """A value error about one field of the table being structured."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _step(value: Any, _: Any) -> fmt.Step:
    if not isinstance(value, dict):
        raise ValueError(f"a step is a table, got {value!r}")
    do = value.get("do")
    if not isinstance(do, str):
        why = "required field missing" if do is None else f"expected a step name, got {do!r}"
        raise _FieldError("do", why)
    cls = fmt.STEP_TYPES.get(do)
    if cls is None:
        near = difflib.get_close_matches(do, fmt.STEP_TYPES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else f" (known: {', '.join(sorted(fmt.STEP_TYPES))})"
        raise _FieldError("do", f"unknown step {do!r}{hint}")
    found: fmt.Step = _converter.structure(value, cls)
    return found


_converter.register_structure_hook_func(lambda t: t is fmt.Step, _step)
_converter.register_unstructure_hook_func(
    lambda t: t is fmt.Step, lambda step: _converter.unstructure(step, unstructure_as=type(step))
)


# --- errors: file, line and field --------------------------------------------------------------
class ScenarioError(ValueError):
    """A scenario file that cannot be read; ``problems`` are ``(line, field, message)``."""

    def __init__(self, path: str, problems: list[tuple[int | None, str, str]]) -> None:
        self.path = path
        self.problems = problems
        lines = []
        for line, field, message in problems:
            where = f"{path}:{line}" if line else path
            lines.append(f"{where}: {field + ': ' if field else ''}{message}")
        super().__init__("\n".join(lines))


Path = tuple[str | int, ...]


def _walk(exc: BaseException, path: Path) -> Iterator[tuple[Path, str]]:
    """``(path, message)`` for every leaf error of a cattrs exception group."""
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [a.name for a in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        known = ["as" if k == "as_" else "kind" if k == "vm_kind" else k for k in known]
        for extra in sorted(exc.extra_fields):
            near = difflib.get_close_matches(extra, known, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (allowed: {', '.join(known)})"
            yield (*path, extra), f"unknown field{hint}"
        return
    if isinstance(exc, cattrs.ClassValidationError | IterableValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            key: str | int
            if isinstance(note, cattrs.AttributeValidationNote):
                key = {"as_": "as", "vm_kind": "kind"}.get(note.name, note.name)
            else:
                index = getattr(note, "index", None)
                key = index if isinstance(index, int) else str(getattr(note, "key", ""))
            yield from _walk(sub, (*path, key))
        for sub in without:
            yield from _walk(sub, path)
        return
    if isinstance(exc, cattrs.BaseValidationError):
        for sub in exc.exceptions:
            yield from _walk(sub, path)
        return
    if isinstance(exc, KeyError):
        yield path, "required field missing"
        return
    if isinstance(exc, _FieldError):
        yield (*path, exc.field), str(exc)
        return
    if isinstance(exc, ValueError | TypeError):
        text = str(exc)
        if "not in" in text or "Literal" in text or isinstance(exc, TypeError):
            text = f"invalid value ({text})" if text else "invalid value"
        yield path, text
        return
    yield path, f"{type(exc).__name__}: {exc}"


def _show_path(path: Path) -> str:
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


_TABLE = re.compile(r"^\s*\[(\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_.\"' -]+?)\s*=(.*)$")
_INLINE_KEY = re.compile(r"([A-Za-z0-9_]+)\s*=")


def _split_key(text: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in text.split("."))


def line_index(text: str) -> dict[Path, int]:
    """Where each table and key of a TOML text is: path -> line number.

    Array-of-tables entries are indexed (``("steps", 2, "to")``); keys inside an inline
    table are given the line the table starts on.
    """
    index: dict[Path, int] = {}
    table: Path = ()
    arrays: dict[tuple[str, ...], int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        found = _TABLE.match(line)
        if found and not _KEY.match(line):
            name = _split_key(found.group(2))
            if found.group(1):
                arrays[name] = arrays.get(name, -1) + 1
                table = (*name, arrays[name])
            else:
                table = name
            index.setdefault(table, lineno)
            continue
        found = _KEY.match(line)
        if found is None or line.lstrip().startswith("#"):
            continue
        key = (*table, *_split_key(found.group(1)))
        index.setdefault(key, lineno)
        value = found.group(2)
        if "{" in value:
            for inner in _INLINE_KEY.findall(value.split("{", 1)[1]):
                index.setdefault((*key, inner), lineno)
    return index


def _line_of(index: dict[Path, int], path: Path) -> int | None:
    for n in range(len(path), 0, -1):
        if path[:n] in index:
            return index[path[:n]]
    return None


# --- reading a scenario ---------------------------------------------------------------------------
def parse_scenario(text: str, path: str = "<scenario>") -> fmt.Scenario:
    """Read a scenario from TOML *text*; :class:`ScenarioError` lists every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        raise ScenarioError(path, [(int(found.group(1)) if found else None, "", f"TOML: {exc}")]) from None
    index = line_index(text)
    try:
        scenario: fmt.Scenario = _converter.structure(data, fmt.Scenario)
    except cattrs.BaseValidationError as exc:
        problems = [(_line_of(index, p), _show_path(p), msg) for p, msg in _walk(exc, ())]
        raise ScenarioError(path, sorted(problems, key=lambda p: (p[0] or 0, p[1]))) from None
    problems = [(_line_of(index, p), _show_path(p), msg) for p, msg in _check(scenario)]
    if problems:
        raise ScenarioError(path, problems)
    name = scenario.scenario.name or _stem(path)
    steps = _with_launch_finish(scenario.steps)
    return attrs.evolve(scenario, scenario=attrs.evolve(scenario.scenario, name=name), steps=steps, path=path)


def load_scenario(path: str) -> fmt.Scenario:
    """Read the scenario file at *path*."""
    with open(path, encoding="utf-8") as f:
        return parse_scenario(f.read(), path)


def _stem(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.removesuffix(".toml")


def _with_launch_finish(steps: list[fmt.Step]) -> list[fmt.Step]:
    """Insert ``launch.finish`` before the first guest step when no step finished it."""
    out: list[fmt.Step] = []
    finished = False
    for step in steps:
        if step.do == "launch.finish":
            finished = True
        elif step.do in fmt.GUEST_STEPS and not finished:
            out.append(fmt.LaunchFinish(do="launch.finish"))
            finished = True
        out.append(step)
    return out


def _is_errno(name: str) -> bool:
    return isinstance(getattr(_errno, name, None), int) or name in ("EHWPOISON", "EOPNOTSUPP")


def _is_exit(name: str) -> bool:
    """One of the shared exits, or a class name (a backend's ``GuestExit``: ``PageFaultExit``)."""
    return name in fmt.EXIT_KINDS or (name.isidentifier() and name[0].isupper())


def _check(scenario: fmt.Scenario) -> Iterator[tuple[Path, str]]:
    """What the types cannot say: names, capabilities, errnos, policies, page sizes."""
    from guestmem.intents import CAPABILITIES, PAGE_SIZES
    from guestmem.model.profile import KernelProfile

    fields = {a.name for a in attrs.fields(KernelProfile)} - {"name", "description", "version"}
    for key in scenario.host.policies:
        if key not in fields:
            yield (
                ("host", "policies", key),
                f"not a kernel profile field (known: {', '.join(sorted(fields))})",
            )
    regions = len(scenario.vm.layout())
    names = {"kvm", "vm"} | {f"vcpu{i}" for i in range(scenario.vm.vcpus)}
    names |= {f"gmem{i}" for i in range(regions)} | {f"shared{i}" for i in range(regions)}

    def expectations(
        path: Path, expect: fmt.Expect | None, per: dict[str, fmt.Expect]
    ) -> Iterator[tuple[Path, str]]:
        for sub, value in [
            ((*path, "expect"), expect),
            *[((*path, "expect_on", k), v) for k, v in per.items()],
        ]:
            if value is not None and value.errno is not None and not _is_errno(value.errno):
                yield (*sub, "errno"), f"not an errno name: {value.errno!r}"
            if value is not None and value.exit is not None and not _is_exit(value.exit):
                known = ", ".join(fmt.EXIT_KINDS)
                yield (*sub, "exit"), f"not an exit: {value.exit!r} ({known}, or a backend's exit class name)"

    for i, step in enumerate(scenario.steps):
        path: Path = ("steps", i)
        for cap in step.requires:
            if cap not in CAPABILITIES:
                yield (*path, "requires"), f"unknown capability {cap!r} (known: {', '.join(CAPABILITIES)})"
        for field in step.refs:
            ref = getattr(step, field)
            if isinstance(ref, str):
                base = ref.split("+", 1)[0].strip()
                if base not in names:
                    yield (*path, field), f"no object named {base!r} yet (known: {', '.join(sorted(names))})"
        page_size = getattr(step, "page_size", None)
        if page_size is not None and page_size not in PAGE_SIZES:
            yield (*path, "page_size"), "a page size is 4K or 2M"
        if isinstance(step, fmt.VcpuAccess) and (step.length is None) == (step.data is None):
            yield path, "vcpu.access needs exactly one of length (a load) and data (a store)"
        yield from expectations(path, step.expect, step.expect_on)
        created = step.created()
        if created is not None:
            names.add(created)
    yield from expectations(("teardown",), scenario.teardown.expect, scenario.teardown.expect_on)
