"""``guestmem new-backend``: the distribution it writes is complete, crosses no plugin
boundary, and passes the conformance kit and its own tests as generated (x86 and arm64)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gmem_helpers import DEEP, junit_outcomes
from test_plugin_boundary import violations

from guestmem import hookref, newbackend
from guestmem.cli import main
from guestmem.conformance import GmemConformance


@pytest.mark.parametrize("arch", newbackend.ARCHES)
def test_the_distribution_is_complete(arch: str) -> None:
    files = newbackend.files("acme-tee", arch)
    assert set(files) == {
        "pyproject.toml",
        "README.md",
        "tox.ini",
        "guestmem_acme_tee/__init__.py",
        "guestmem_acme_tee/plugin.py",
        "guestmem_acme_tee/policy.py",
        "guestmem_acme_tee/py.typed",
        "tests/test_acme_tee_kit.py",
        "tests/test_acme_tee.py",
    }
    assert '[project.entry-points.guestmem]\nacme-tee = "guestmem_acme_tee.plugin"' in files["pyproject.toml"]
    policy = files["guestmem_acme_tee/policy.py"]
    for spec in hookref.hook_specs():
        stubbed = f"def {spec.name}(" in policy
        assert stubbed == (not spec.plugin_level and spec.name not in newbackend._OBSERVER_HOOKS), spec.name
        if stubbed:
            assert spec.summary in policy  # documented from hookspecs.py
    for path, text in files.items():
        if path.endswith(".py"):
            compile(text, path, "exec")
            if path.startswith("guestmem_acme_tee/"):
                assert violations(text, path) == []


def test_names_and_directories_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("Acme", "sw", "9x", "a--b", ""):
        with pytest.raises(ValueError, match="cannot name a backend"):
            newbackend.files(bad)
    with pytest.raises(ValueError, match="--arch"):
        newbackend.files("acme", "riscv")
    target = tmp_path / "out"
    assert main(["new-backend", "acme", "--directory", str(target)]) == 0
    assert "wrote guestmem-acme (x86)" in capsys.readouterr().out
    assert main(["new-backend", "acme", "--directory", str(target)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_the_generated_code_is_ruff_clean(tmp_path: Path) -> None:
    for arch in newbackend.ARCHES:
        newbackend.write(f"demo-{arch}", tmp_path / arch, arch)
        for args in (["check", "."], ["format", "--check", "."]):
            run = subprocess.run(
                ["ruff", *args], cwd=tmp_path / arch, capture_output=True, text=True, check=False
            )
            assert run.returncode == 0, run.stdout + run.stderr


def test_the_generated_distributions_pass_the_kit_and_their_tests(tmp_path: Path) -> None:
    """Both architectures' distributions, their plugin registered as the entry point would
    (here without installing them: the tox env ``template`` pip-installs one)."""
    newbackend.write("demo", tmp_path / "x86", "x86")
    newbackend.write("demo-arm", tmp_path / "arm64", "arm64")
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings = error\n")  # one rootdir for both
    (tmp_path / "conftest.py").write_text(
        "import guestmem, guestmem_demo.plugin, guestmem_demo_arm.plugin\n"
        "for module, name in ((guestmem_demo.plugin, 'demo'), (guestmem_demo_arm.plugin, 'demo-arm')):\n"
        "    guestmem.get_registry().add_plugin(module, name=name, distribution=f'guestmem-{name}')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "x86"), str(tmp_path / "arm64")])}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "error",
            f"--junitxml={tmp_path / 'report.xml'}",
            "x86/tests",
            "arm64/tests",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    outcomes = junit_outcomes(tmp_path / "report.xml")
    assert not {name for name, outcome in outcomes.items() if outcome in ("failed", "error")}
    ran = {name.split("[")[0] for name in outcomes}
    kit = {name for name in dir(GmemConformance) if name.startswith("test_")}
    for cls in ("TestDemoVm", "TestDemoDefaultVm", "TestDemoArmVm", "TestDemoArmDefaultVm"):
        assert {f"{cls}::{name}" for name in kit} <= ran, f"{cls} runs the whole kit"
    for cls in ("TestDemoVm", "TestDemoArmVm"):  # the confidential VM types: the deep kit runs
        for name in DEEP:
            assert outcomes[f"{cls}::{name}"] == "passed", f"{cls}::{name}"
    for module in ("test_demo", "test_demo_arm"):
        assert (
            outcomes[f"{module}::test_a_guest_lifecycle_keeps_the_invariants_and_leaks_nothing"] == "passed"
        )
