"""Running scenarios: outcomes, expectations, n/a, costs, maps, and ``guestmem run``."""

from __future__ import annotations

import json
import pathlib

import pytest

from guestmem.cli import main
from guestmem.scenario import builtins
from guestmem.scenario import format as fmt
from guestmem.scenario.memmap import LAYERS, snapshot
from guestmem.scenario.run import Outcome, Run, check, for_backend, run_scenario, select_backends
from guestmem.serialize import parse_scenario, structure, unstructure

CONVERSION = """
[vm]
size = "2M"

[[steps]]
do = "guest.write"
gpa = "0x1000"
data = "secret"
expect = { ok = true }

[[steps]]
do = "vcpu.access"
gpa = "0x1000"
length = 6
private = false
expect = { exit = "memory_fault", gpa = "0x1000", private = false, rule = "G-2" }

[[steps]]
do = "guest.convert"
range = "0x1000+4K"
to = "shared"
expect = { ok = true, counters = { punch_hole = 1 }, costs = { exits = 1 } }

[[steps]]
do = "guest.read"
gpa = "0x1000"
length = 6
expect = { zero = true }

[[steps]]
do = "gmem.fallocate"
mode = "punch_hole"
range = "1+4K"
expect = { errno = "EINVAL", rule = "FA-4" }

[[steps]]
do = "launch.populate"
gpa = 0
data = "late"

[teardown]
expect = { value = 0 }
"""


def run(text: str, backends: list[str] | None = None, **kwargs: object) -> object:
    scenario = parse_scenario(text, "t.toml")
    return run_scenario(scenario, backends or ["sw"], **kwargs)  # type: ignore[arg-type]


def test_each_step_gets_an_outcome_and_a_check() -> None:
    result = run(CONVERSION)
    (sw,) = result.backends  # type: ignore[attr-defined]
    texts = [o.text for o in sw.outcomes]
    assert result.rows[0] == "launch" and result.rows[-1] == "teardown"  # type: ignore[attr-defined]
    assert texts[1] == "ok"  # launch.finish, inserted before the first guest step
    write, exit_, convert, read, punch, late, teardown = sw.outcomes[2:]
    assert write.check == "pass"
    assert exit_.status == "exit" and exit_.exit == "memory_fault" and exit_.check == "pass"
    assert exit_.text == "exit MEMORY_FAULT shared gpa=0x1000 (EFAULT)"
    assert convert.counters["punch_hole"] == 1
    assert convert.costs is not None and convert.costs["exits"] == convert.costs["hypercalls"] == 1
    assert read.data == bytes(6) and read.check == "pass"
    assert punch.text == "EINVAL [FA-4]" and punch.check == "pass"
    assert late.status == "n/a" and late.check is None  # n/a is never a failure
    assert teardown.value == 0 and teardown.check == "pass"
    assert not result.failed  # type: ignore[attr-defined]
    assert sw.costs["exits"] == 2 and sw.counters["guest_accesses"] >= 2  # the raw exit, the hypercall


def test_an_unmet_expectation_fails_and_says_why() -> None:
    text = CONVERSION.replace("expect = { zero = true }", 'expect = { data = "secret" }')
    result = run(text)
    (sw,) = result.backends  # type: ignore[attr-defined]
    ((row, outcome),) = sw.failed
    assert result.rows[row] == "guest.read gpa=0x1000 length=6"  # type: ignore[attr-defined]
    assert outcome.failures == ["data: expected b'secret', got b'\\x00\\x00\\x00\\x00\\x00\\x00'"]
    assert result.failed  # type: ignore[attr-defined]


def test_check_covers_every_field() -> None:
    ok = Outcome(status="ok", text="ok", value=3, data=b"ab", detail="note here", counters={"x": 1})
    assert check(fmt.Expect(ok=True, value=3, data=b"ab", note="note", counters={"x": 1}), ok) == []
    assert (
        len(check(fmt.Expect(ok=False, value=4, zero=True, crash=True, raised="X", costs={"exits": 1}), ok))
        == 6
    )
    crash = Outcome(status="crash", text="host crash", detail="RMP #PF: host write")
    assert check(fmt.Expect(crash=True, verdict="RMP #PF"), crash) == []
    err = Outcome(status="error", text="EINVAL [B-3]", errno="EINVAL", rule="B-3")
    assert check(fmt.Expect(errno="EINVAL", rule="B-5"), err) == ["rule: expected 'B-5', got 'B-3'"]


def test_not_installed_and_not_applicable_rows() -> None:
    text = CONVERSION.replace("[vm]", '[scenario]\nnot_applicable = { sw = "not today" }\n\n[vm]')
    result = run(text, ["sw", "tdx-nonexistent"])
    sw, missing = result.backends  # type: ignore[attr-defined]
    assert not sw.ran and sw.reason == "not today" and {o.text for o in sw.outcomes} == {"n/a: not today"}
    assert missing.reason == "backend not installed" and len(missing.outcomes) == len(result.rows)  # type: ignore[attr-defined]
    assert not result.failed  # type: ignore[attr-defined]


def test_requires_only_and_skip() -> None:
    text = """
[[steps]]
do = "guest.accept"
range = "0+4K"
requires = ["acceptance"]
expect = { ok = true }
[[steps]]
do = "host.write"
offset = 0
data = "x"
only = ["snp"]
[[steps]]
do = "host.read"
offset = 0
length = 1
skip = { sw = "because" }
"""
    outcomes = run(text).backends[0].outcomes  # type: ignore[attr-defined]
    assert [o.text for o in outcomes[2:5]] == [
        "n/a: needs acceptance",
        "n/a: runs on snp only",
        "n/a: because",
    ]
    assert "must accept" in outcomes[2].detail


def test_a_variant_inherits_its_familys_entries() -> None:
    per = {"snp": "a", "pkvm": "b", "snp-quiet": ""}
    assert for_backend(per, "snp-hugepage") == "a"
    assert for_backend(per, "snp-quiet") is None
    assert for_backend(per, "sw", "d") == "d"


def test_a_missing_object_makes_later_steps_not_applicable() -> None:
    text = """
[[steps]]
do = "gmem.mmap"
length = "4K"
as = "view"
expect = { errno = "ENODEV", rule = "M-1" }
[[steps]]
do = "host.read"
map = "view"
offset = 0
length = 1
"""
    outcomes = run(text).backends[0].outcomes  # type: ignore[attr-defined]
    assert outcomes[1].check == "pass"
    assert outcomes[2].text == "n/a: there is no 'view': the step creating it did not succeed"


def test_what_if_policies_reach_the_model_profile() -> None:
    result = run(builtins._folder().joinpath("gmem-closed-while-bound-pinned.toml").read_text())
    (sw,) = result.backends  # type: ignore[attr-defined]
    assert sw.outcomes[-1].value == 1 and not result.failed  # type: ignore[attr-defined]


def test_maps_record_every_vm_after_every_row() -> None:
    result = run(CONVERSION, maps=True)
    (sw,) = result.backends  # type: ignore[attr-defined]
    assert len(sw.maps) == len(result.rows)  # type: ignore[attr-defined]
    after_write = sw.maps[2][0]
    assert after_write.vm == "vm" and (after_write.start, after_write.end) == (0, 512)
    assert set(after_write.layers) == set(LAYERS) - {"owner"}  # sw has no ownership table
    assert [(b.start, b.end, b.value) for b in after_write.layers["stage2"]] == [(1, 2, "private 4K")]
    after_convert = sw.maps[4][0]
    assert [b.value for b in after_convert.layers["attribute"]] == ["private", "shared", "private"]
    assert [b.value for b in after_convert.layers["gmem"]] == ["hole"]


def test_snapshot_of_a_real_kernel_vm_is_none() -> None:
    assert snapshot(object()) is None


def test_the_run_round_trips_through_json() -> None:
    result = Run(scenarios=[run(CONVERSION, maps=True)])  # type: ignore[list-item]
    data = json.loads(json.dumps(unstructure(result)))
    assert data["scenarios"][0]["backends"][0]["outcomes"][5]["data"] == {"hex": "000000000000"}
    again = structure(data, Run)
    assert again == result


def test_select_backends() -> None:
    scenario = parse_scenario('[scenario]\nbackends = ["sw", "tdx"]\n')
    assert select_backends(scenario) == ["sw", "tdx"]
    assert select_backends(scenario, ["snp", "snp"]) == ["snp"]
    assert select_backends(scenario, all_=True)[:2] == ["sw", "tdx"]
    assert "sw" in select_backends(parse_scenario(""))


# --- guestmem run / guestmem scenarios --------------------------------------------------------
def test_run_exit_status_follows_the_checks(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, bad, broken = tmp_path / "good.toml", tmp_path / "bad.toml", tmp_path / "broken.toml"
    good.write_text(CONVERSION)
    bad.write_text(CONVERSION.replace("expect = { zero = true }", 'expect = { data = "nope" }'))
    broken.write_text("[vm]\nsize = 'Q'\n")
    assert main(["run", str(good), "--backend", "sw"]) == 0
    out = capsys.readouterr().out
    assert "good" in out and "costs" in out and "asserted outcomes met" in out
    assert main(["run", str(bad), "--backend", "sw"]) == 1
    assert main(["run", str(broken)]) == 2
    assert f"{broken}:2: vm.size" in capsys.readouterr().err
    assert main(["run", "no-such-scenario"]) == 2


def test_run_json_to_stdout(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.toml"
    path.write_text(CONVERSION)
    assert main(["run", str(path), "--backend", "sw", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["scenarios"][0]["backends"][0]["backend"] == "sw"
    assert data["scenarios"][0]["backends"][0]["maps"]


def test_scenarios_lists_the_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scenarios", "--json"]) == 0
    names = [row["name"] for row in json.loads(capsys.readouterr().out)]
    assert names == builtins.names() and "destructive-conversion" in names
    assert main(["scenarios"]) == 0
    assert "early-boot-acceptance" in capsys.readouterr().out


def test_backend_specific_cost_rows() -> None:
    """Each architecture's own operations get rows of their own; others show "—" there."""
    import io

    from rich.console import Console

    from guestmem.scenario.run import BackendRun, ScenarioRun
    from guestmem.scenario.table import cost_table

    fake = ScenarioRun(
        name="x",
        rows=["launch", "teardown"],
        backends=[
            BackendRun(backend="a", ran=True, costs={}, details={"RMPUPDATE": 3}),
            BackendRun(backend="b", ran=True, costs={}, details={}),
        ],
    )
    console = Console(file=io.StringIO(), width=100)
    console.print(cost_table(fake))
    line = next(text for text in console.file.getvalue().splitlines() if "RMPUPDATE" in text)  # type: ignore[attr-defined]
    assert "3" in line and "—" in line
    assert run(CONVERSION).backends[0].details == {}  # type: ignore[attr-defined]
