"""The ``guestmem`` command line: demo, trace output, errors without tracebacks."""

from __future__ import annotations

import json
import pathlib

import pytest

import guestmem
from guestmem.cli import main
from guestmem.serialize import event_from_json


def test_demo_runs_the_lifecycle_scenario_with_its_tables_and_report(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "demo.html"
    assert main(["demo", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    for needle in (
        "lifecycle: one VM's guest_memfd lifecycle",
        "exit MEMORY_FAULT shared",
        "ENODEV [M-1]",
        "EHWPOIS",
        "lifecycle: costs",
        "asserted outcomes met",
        "memory map of the VM on sw after the last step",
        "invariants",
        f"report: {report}",
    ):
        assert needle in out, needle
    assert "✗" not in out
    html = report.read_text()
    assert html.startswith("<!DOCTYPE html>") and "lifecycle" in html and 'class="memmap"' in html


def test_demo_on_several_backends_goes_through_their_launch(capsys: pytest.CaptureFixture[str]) -> None:
    backends = [b for b in ("sw", "snp", "pkvm") if b in guestmem.backends()]
    assert main(["demo", "--no-report", "--backend", ",".join(backends)]) == 0
    out = capsys.readouterr().out
    for name in backends:
        assert name in out
    assert "report:" not in out


def test_demo_trace_is_json_lines(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "trace.jsonl"
    assert main(["demo", "--no-report", "--trace", str(trace)]) == 0
    events = [event_from_json(line) for line in trace.read_text().splitlines()]
    kinds = {e.kind for e in events}
    assert {"vm_create", "gmem_create", "memslot_create", "fault", "memory_fault_exit", "punch_hole"} <= kinds
    assert all(isinstance(json.loads(line), dict) for line in trace.read_text().splitlines())
    assert f"{len(events)} trace events written" in capsys.readouterr().out


def test_unknown_backend_is_a_message_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--backend", "no-such-backend"]) == 2
    err = capsys.readouterr().err
    assert "no guestmem backend named 'no-such-backend'" in err
    assert "Traceback" not in err
