"""``guestmem trace show`` and ``guestmem trace replay``: reading recorded traces.

A trace is JSON lines of :class:`guestmem.backend.TraceEvent` (``guestmem demo --trace``,
``guestmem run --trace DIR``, ``write_trace(kvm.events, f)`` of a ``record=True`` host).

* :func:`show` prints it, filtered by kind, VM or text: each ``uapi`` event as a call line
  (``Vm.set_memory_attributes(vm1, address=0x1000, ...) = -1 EINVAL [A-4]``), the events
  that happened inside the call indented above it.
* :func:`replay` re-executes the ``uapi`` calls of a trace on another backend and lists
  the calls whose outcome differs: the same VMM sequence, judged by another
  architecture or by the real kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import re
import sys
from collections.abc import Iterable, Sequence
from typing import IO, Any

import attrs

import guestmem
from guestmem import api
from guestmem.backend import TraceEvent
from guestmem.recording import Recorder, outcome_fields

__all__ = ["Divergence", "add_cli", "format_call", "read_trace", "replay", "show"]


def read_trace(source: IO[str]) -> list[TraceEvent]:
    """The events of a JSON-lines trace."""
    from guestmem.serialize import event_from_json

    return [event_from_json(line) for line in source if line.strip()]


# --- show ----------------------------------------------------------------------------------------
def _value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return hex(value) if abs(value) >= 10 else str(value)
    if isinstance(value, dict):
        if "ref" in value:
            return str(value["ref"]) + (f"+{value['offset']:#x}" if value.get("offset") else "")
        if "hex" in value:
            raw = bytes.fromhex(value["hex"])
            return repr(raw[:16]) + ("..." if len(raw) > 16 else "")
        if "repr" in value:
            return str(value["repr"])
        return "{" + ", ".join(f"{k}={_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return str(value)


def format_call(fields: dict[str, Any]) -> str:
    """A ``uapi`` event as one strace-like line."""
    args = ", ".join(f"{k}={_value(v)}" for k, v in fields.get("args", {}).items())
    head = f"{fields.get('call', '?')}({fields.get('obj', '?')}{', ' if args else ''}{args})"
    if "raised" not in fields:
        return f"{head} = {_value(fields.get('result'))}"
    if fields.get("exit") == "memory_fault":
        where = f"gpa={fields['gpa']:#x} size={fields['size']:#x}"
        return f"{head} -> KVM_EXIT_MEMORY_FAULT {where} ({fields.get('errno')})"
    if fields.get("exit") == "sigbus":
        return f"{head} -> SIGBUS [{fields.get('rule')}]"
    if fields.get("exit"):
        return f"{head} -> {fields['exit']}"
    rule = f" [{fields['rule']}]" if fields.get("rule") else ""
    return f"{head} = -1 {fields.get('errno', fields['raised'])}{rule}"


def _detail(event: TraceEvent) -> str:
    if event.kind == "uapi":
        return format_call(event.fields)
    return " ".join(f"{k}={_value(v)}" for k, v in event.fields.items())


def show(
    events: Sequence[TraceEvent],
    *,
    kinds: Iterable[str] = (),
    vm: int | None = None,
    grep: str | None = None,
    out: Any = None,
) -> int:
    """Print *events* (filtered); returns how many were shown."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    wanted = set(kinds)
    pattern = re.compile(grep) if grep else None
    inside: set[int] = set()
    for event in events:
        if event.kind == "uapi":
            inside.update(range(int(event.fields.get("first_seq", event.seq)), event.seq))
    start = events[0].ts if events else 0
    table = Table(box=None, show_header=True, pad_edge=False)
    for name, justify in (("seq", "right"), ("ms", "right"), ("vm", "right"), ("kind", "left"), ("", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    shown = 0
    for event in events:
        if wanted and event.kind not in wanted:
            continue
        if vm is not None and event.vm != vm:
            continue
        detail = _detail(event)
        if pattern is not None and not pattern.search(f"{event.kind} {detail}"):
            continue
        style = "bold" if event.kind == "uapi" else "dim" if event.seq in inside else ""
        if event.kind == "uapi" and "raised" in event.fields:
            style = "bold yellow"
        indent = "  " if event.seq in inside else ""
        table.add_row(
            str(event.seq),
            f"{(event.ts - start) / 1e6:.3f}",
            "" if event.vm is None else str(event.vm),
            Text(indent + event.kind, style=style),
            Text(detail, style=style),
        )
        shown += 1
    (out or Console()).print(table)
    return shown


# --- replay -------------------------------------------------------------------------------------
@attrs.frozen
class Divergence:
    """A recorded call whose outcome differs on the replaying backend."""

    seq: int
    call: str
    recorded: str
    replayed: str


class _NotReplayable(Exception):
    """A call replay cannot make (an object that does not exist, a backend's own value)."""


def _outcome(fields: dict[str, Any]) -> str:
    """What is compared: success and its result, or the errno / exit (not the rule: the
    real kernel names none)."""
    if "raised" not in fields:
        result = fields.get("result")
        if isinstance(result, dict) and "st_size" in result:
            result = {"st_size": result["st_size"]}  # inode numbers differ by nature
        return f"ok {_value(result)}"
    if fields.get("exit") == "memory_fault":
        return f"exit memory_fault gpa={fields['gpa']:#x} {fields.get('errno')}"
    if fields.get("exit"):
        return f"exit {fields['exit']}"
    return f"error {fields.get('errno') or fields.get('raised')}"


class _Replayer:
    def __init__(self, kvm: api.Kvm, vm_type: int | None) -> None:
        self.kvm = kvm
        self.vm_type = vm_type
        self.objects: dict[str, Any] = {"kvm": kvm}
        self.recorder = Recorder()
        self.recorder.handle(kvm)
        self.notes: list[str] = []

    def decode(self, value: Any) -> Any:
        if isinstance(value, dict):
            if "ref" in value:
                found = self.objects.get(value["ref"])
                if found is None:
                    raise _NotReplayable(f"{value['ref']} does not exist here")
                return int(found.address) + int(value["offset"]) if "offset" in value else found
            if "hex" in value:
                return bytes.fromhex(value["hex"])
            raise _NotReplayable(
                f"a {value.get('type', 'value')} of the recording backend: {value.get('repr')}"
            )
        if isinstance(value, list):
            return [self.decode(v) for v in value]
        return value

    def vm_type_for(self, recorded: int) -> int:
        if self.vm_type is not None:
            return self.vm_type
        backend = guestmem.backends()[self.kvm.backend]
        if backend.vm_type(recorded) is not None:
            return recorded
        private = recorded & (1 << 31) or any(
            info.has_private_mem
            for b in guestmem.backends().values()
            for info in b.vm_types
            if info.type == recorded
        )
        from guestmem.intents import Intents

        intents = backend.intents or Intents()
        try:
            info, _ = intents.vm_type(backend, "private" if private else "default")
        except Exception:  # noqa: BLE001 - no such kind here: let the kernel refuse the type
            return recorded
        self.notes.append(f"VM type {recorded} is {info.name} ({info.type}) on {backend.name}")
        return info.type

    def call(self, fields: dict[str, Any]) -> dict[str, Any]:
        target = self.objects.get(fields.get("obj", ""))
        if target is None:
            raise _NotReplayable(f"{fields.get('obj')} does not exist here")
        method_name = str(fields["call"]).split(".", 1)[1]
        args = {k: self.decode(v) for k, v in fields.get("args", {}).items()}
        if method_name == "create_vm" and "vm_type" in args:
            args["vm_type"] = self.vm_type_for(int(args["vm_type"]))
        method = getattr(target, method_name)
        positional, keywords = _bind(method, args)
        try:
            result = method(*positional, **keywords)
        except Exception as exc:  # noqa: BLE001 - every outcome is compared, none stops the replay
            return outcome_fields(exc)
        recorded_ref = fields.get("result")
        if isinstance(recorded_ref, dict) and "ref" in recorded_ref:
            self.objects[recorded_ref["ref"]] = result
        return {"result": self.recorder.encode(result)}


def _bind(method: Any, args: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    for name, param in inspect.signature(method).parameters.items():
        if name not in args:
            continue
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            positional.extend(args[name])
        elif param.kind is inspect.Parameter.KEYWORD_ONLY:
            keywords[name] = args[name]
        else:
            positional.append(args[name])
    return positional, keywords


def replay(
    events: Sequence[TraceEvent], backend: str, *, vm_type: int | None = None
) -> tuple[list[Divergence], list[str], int]:
    """Re-execute the ``uapi`` calls of *events* on *backend*.

    Returns the divergences, notes (VM types substituted, calls not replayable) and the
    number of calls replayed.  Every object the replay creates is closed at the end.
    """
    kvm = guestmem.open(backend)
    replayer = _Replayer(kvm, vm_type)
    divergences: list[Divergence] = []
    done = 0
    try:
        for event in events:
            if event.kind != "uapi":
                continue
            fields = event.fields
            try:
                got = replayer.call(fields)
            except _NotReplayable as exc:
                replayer.notes.append(f"seq {event.seq}: {fields.get('call')} not replayed: {exc}")
                continue
            done += 1
            recorded, replayed = _outcome(fields), _outcome(got)
            if recorded != replayed:
                divergences.append(Divergence(event.seq, format_call(fields), recorded, replayed))
    finally:
        for obj in reversed(list(replayer.objects.values())):
            close = getattr(obj, "close", None)
            if close is not None:  # teardown of a replay never hides its result
                with contextlib.suppress(Exception):
                    close()
    return divergences, replayer.notes, done


# --- the CLI -------------------------------------------------------------------------------------
def add_cli(subparsers: Any) -> None:
    """Add ``guestmem trace show`` and ``guestmem trace replay``."""
    p = subparsers.add_parser(
        "trace", help="show a recorded trace, or replay its uAPI calls on another backend"
    )
    sub = p.add_subparsers(dest="trace_command", required=True)
    s = sub.add_parser("show", help="print a trace (JSON lines), filtered")
    s.add_argument("file", metavar="FILE", help="the trace ('-': standard input)")
    s.add_argument("--kind", action="append", default=[], help="only events of this kind (repeatable)")
    s.add_argument("--vm", type=int, help="only events of this VM id")
    s.add_argument("--grep", metavar="REGEX", help="only events whose text matches")
    s.set_defaults(func=_cmd_show)
    r = sub.add_parser(
        "replay", help="re-execute the trace's uAPI calls on a backend; list where outcomes differ"
    )
    r.add_argument("file", metavar="FILE", help="the trace ('-': standard input)")
    r.add_argument("--backend", required=True, help="the backend to replay on")
    r.add_argument("--vm-type", type=lambda v: int(v, 0), help="create VMs of this type instead")
    r.set_defaults(func=_cmd_replay)


def _events(path: str) -> list[TraceEvent]:
    if path == "-":
        return read_trace(sys.stdin)
    with open(path, encoding="utf-8") as f:
        return read_trace(f)


def _cmd_show(args: argparse.Namespace) -> int:
    show(_events(args.file), kinds=args.kind, vm=args.vm, grep=args.grep)
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    divergences, notes, done = replay(_events(args.file), args.backend, vm_type=args.vm_type)
    out = Console()
    for note in notes:
        out.print(f"[dim]{note}[/]", highlight=False)
    if not divergences:
        out.print(f"{done} call(s) replayed on {args.backend}: every outcome is the recorded one")
        return 0
    table = Table(
        title=f"{len(divergences)} of {done} call(s) differ on {args.backend}", title_justify="left"
    )
    for column in ("seq", "call", "recorded", args.backend):
        table.add_column(column, overflow="fold")
    for d in divergences:
        table.add_row(str(d.seq), d.call, d.recorded, d.replayed)
    out.print(table)
    return 1
