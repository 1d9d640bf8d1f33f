"""The ``guestmem`` command line: demo, trace output, errors without tracebacks."""

from __future__ import annotations

import json
import pathlib

import pytest

from guestmem.cli import main
from guestmem.serialize import event_from_json


def test_demo_runs_the_lifecycle_and_checks_invariants(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for needle in (
        "KVM_EXIT_MEMORY_FAULT errno=14 gpa=0x1000 size=0x1000 flags=0x0",
        "guest shared load now sees the host's bytes: b'from the host'",
        "ENODEV: [M-1]",
        "HostSigbus: EFAULT: [M-4]",
        "0x14000 (punched): b'\\x00\\x00\\x00\\x00'",
        "EHWPOISON: [E-2]",
        "memory map of VM",
        "invariants",
    ):
        assert needle in out, needle


def test_demo_trace_is_json_lines(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "trace.jsonl"
    assert main(["demo", "--trace", str(trace)]) == 0
    events = [event_from_json(line) for line in trace.read_text().splitlines()]
    kinds = {e.kind for e in events}
    assert {"vm_create", "gmem_create", "memslot_create", "fault", "memory_fault_exit", "punch_hole"} <= kinds
    assert all(isinstance(json.loads(line), dict) for line in trace.read_text().splitlines())
    capsys.readouterr()


def test_unknown_backend_is_a_message_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--backend", "no-such-backend"]) == 2
    err = capsys.readouterr().err
    assert "no guestmem backend named 'no-such-backend'" in err
    assert "Traceback" not in err
