"""``guestmem fuzz``: the stateful machine against a backend for a budget of steps; a clean
run on sw, and on a throwaway backend that lets the host map private memory a shrunk
reproducer that replays the failure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from gmem_helpers import BackendPlugin, plugin
from test_conformance_broken import DESTRUCTIVE, HostMapsPrivate

from guestmem.cli import main
from guestmem.fuzz import FuzzConfig, run_fuzz


def test_a_clean_run_spends_its_budget() -> None:
    seen = []
    result = run_fuzz(FuzzConfig("sw", steps=150, run_length=15, seed=4), on_step=lambda: seen.append(1))
    assert result.failure is None and result.program == [] and result.reproducer == ""
    assert result.steps >= 150 and len(seen) == result.steps
    assert result.vm_type_name == "KVM_X86_SW_PROTECTED_VM"
    assert run_fuzz(FuzzConfig("sw", vm_type=0, steps=30)).vm_type_name == "KVM_X86_DEFAULT_VM"


def test_a_failure_is_shrunk_to_a_reproducer_that_replays_it(tmp_path: Path) -> None:
    with plugin(BackendPlugin("t-fuzz-maps", (DESTRUCTIVE,), HostMapsPrivate())):
        result = run_fuzz(FuzzConfig("t-fuzz-maps", steps=200, seed=1))
        assert result.failure is not None
        assert result.failure.startswith("AssertionError: the host mapped private guest_memfd page 0")
        assert result.program == [
            "state = GmemMachine_t_fuzz_maps_BROKEN_VM()",
            "state.host_probe_private(page=0)",
            "state.teardown()",
        ]
        script = tmp_path / "repro.py"
        script.write_text(result.reproducer)
        namespace: dict[str, Any] = {"__name__": "repro"}
        try:
            with pytest.raises(AssertionError, match="the host mapped private guest_memfd page 0"):
                exec(compile(result.reproducer, str(script), "exec"), namespace)
        finally:
            namespace["state"].teardown()  # the script stops at the failure; its observers go


def test_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["fuzz", "--backend", "sw", "--steps", "40", "--json"]) == 0
    (group,) = json.loads(capsys.readouterr().out)["results"]
    assert group["steps"] >= 40 and "failures" not in group
    out = tmp_path / "repro.py"
    with plugin(BackendPlugin("t-fuzz-cli", (DESTRUCTIVE,), HostMapsPrivate())):
        assert main(["fuzz", "--backend", "t-fuzz-cli", "--steps", "400", "--reproducer", str(out)]) == 1
    text = capsys.readouterr().out
    assert "FAILED: AssertionError: the host mapped private" in text and "minimal reproducer:" in text
    assert "state.host_probe_private(page=0)" in text
    assert "Machine = fuzz_machine('t-fuzz-cli', None)" in out.read_text()
    assert main(["fuzz", "--backend", "no-such"]) == 2
