"""The kit for an installed backend by name: kit_for / kits_for, the flags its declarations
and its plugin's guestmem_conformance_options give, and the kit's pytest plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from gmem_helpers import BackendPlugin, NoHooks, arm64_type, junit_outcomes, plugin, x86_type

import guestmem
from guestmem import uapi
from guestmem.backend import X86_DEFAULT_VM, X86_SW_PROTECTED_VM, VmTypeInfo, hookimpl
from guestmem.conformance import GmemConformance, kit_for, kits_for
from guestmem.conformance.pytest_plugin import backend_names, kit_module

ARM_PRIVATE = arm64_type(0x80000000, name="ARM_PRIVATE_VM", conversion="in_place")
ARM_PLAIN = arm64_type(0, name="ARM_VM")


class Options(BackendPlugin):
    def __init__(self, name: str, answer: dict[str, Any]) -> None:
        super().__init__(name, (ARM_PLAIN, ARM_PRIVATE), NoHooks())
        self.answer = answer

    @hookimpl
    def guestmem_conformance_options(self, backend: guestmem.Backend, vm_type: VmTypeInfo) -> Any:
        return self.answer if vm_type.private else None


def test_kit_for_sw_picks_the_private_type_first() -> None:
    kit = kit_for("sw")
    assert issubclass(kit, GmemConformance) and kit.__name__ == "TestKit_sw_KVM_X86_SW_PROTECTED_VM"
    assert (kit.backend, kit.vm_type, kit.private_access, kit.slot_gmem_flags) == ("sw", 1, True, 0)
    plain = kit_for("sw", uapi.KVM_X86_DEFAULT_VM)
    assert (plain.vm_type, plain.private_access, plain.init_shared_coherent) == (0, False, True)
    assert [k.vm_type for k in kits_for("sw")] == [0, 1]


def test_kit_for_picks_an_x86_backends_own_private_type() -> None:
    """An x86 host offers the core's DEFAULT and SW_PROTECTED types next to its own: the
    kit (and ``guestmem fuzz``) picks the backend's own private type, wherever it is listed."""
    own = x86_type(5, name="OWN_VM")
    with plugin(BackendPlugin("t-kitfor-x86", (X86_DEFAULT_VM, X86_SW_PROTECTED_VM, own), NoHooks())):
        assert kit_for("t-kitfor-x86").vm_type == 5
    with plugin(BackendPlugin("t-kitfor-x86", (X86_DEFAULT_VM, X86_SW_PROTECTED_VM), NoHooks())):
        assert kit_for("t-kitfor-x86").vm_type == uapi.KVM_X86_SW_PROTECTED_VM


def test_flags_come_from_the_declarations_then_the_options() -> None:
    """arm64 gmem-only memslots need MMAP files (S-16); an in-place type is not coherent
    without a conversion; the plugin's options override flags and name observers."""
    options = {"private_unmap": "revoke", "host_private_access": "reclaim", "observers": (dict,)}
    with plugin(Options("t-kitfor", options)):
        plain, private = kits_for("t-kitfor")
        assert (plain.slot_gmem_flags, plain.init_shared_coherent, plain.host_private_access) == (
            uapi.GUEST_MEMFD_FLAG_MMAP,
            True,
            "sigbus",
        )
        assert (private.init_shared_coherent, private.private_unmap, private.host_private_access) == (
            False,
            "revoke",
            "reclaim",
        )
        assert private.observers == (dict,)
        assert kit_for("t-kitfor") is not private and kit_for("t-kitfor").vm_type == ARM_PRIVATE.type


def test_bad_options_and_unknown_types_are_errors() -> None:
    with plugin(Options("t-kitfor-bad", {"private_acess": True}), distribution="guestmem-typo"):
        with pytest.raises(
            guestmem.PluginError, match=r"'guestmem-typo' returned unknown key\(s\) \['private_acess'\]"
        ):
            kit_for("t-kitfor-bad")
        with pytest.raises(LookupError, match=r"offers no VM type 5 .*ARM_PRIVATE_VM"):
            kit_for("t-kitfor-bad", 5)
    with pytest.raises(LookupError, match="no guestmem backend named"):
        kit_for("t-kitfor-bad")
    # The driver is the backend's intents, not an option: a plugin naming one is told so.
    with (
        plugin(Options("t-kitfor-vmm", {"vmm": object}), distribution="guestmem-vmm"),
        pytest.raises(guestmem.PluginError, match=r"unknown key\(s\) \['vmm'\]"),
    ):
        kit_for("t-kitfor-vmm")


def test_skip_option_marks_the_class() -> None:
    with plugin(Options("t-kitfor-skip", {"skip": "not modelled yet"})):
        marks = kit_for("t-kitfor-skip").pytestmark  # type: ignore[attr-defined]
    assert [m.kwargs["reason"] for m in marks] == ["t-kitfor-skip ARM_PRIVATE_VM: not modelled yet"]


def test_kit_module_holds_one_class_per_vm_type() -> None:
    assert backend_names(" sw, pkvm,sw ,, ") == ["sw", "pkvm"]
    module = kit_module(["sw"])
    assert sorted(n for n in vars(module) if n.startswith("TestKit_")) == [
        "TestKit_sw_KVM_X86_DEFAULT_VM",
        "TestKit_sw_KVM_X86_SW_PROTECTED_VM",
    ]


def _pytest(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_empty.py").write_text("")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "guestmem.conformance.pytest_plugin",
            *args,
        ],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_plugin_runs_the_kit_for_named_backends(tmp_path: Path) -> None:
    """No test file, no subclass: the environment names the backend."""
    report = tmp_path / "report.xml"
    run = _pytest(
        tmp_path,
        {"GUESTMEM_KIT_BACKENDS": "sw"},
        "-k",
        "conversion or leak or stateful",
        f"--junitxml={report}",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    outcomes = junit_outcomes(report)
    conversions = (
        "test_conversion_private_to_shared_to_private",
        "test_conversion_shared_to_private_to_shared",
    )
    conversions += ("test_host_access_after_conversion",)
    always = ("test_leak_check_after_a_lifecycle", "test_stateful_machine")
    # The kit of each VM type ran: the private one converts, the default one has nothing to
    # convert (VmTypeInfo.conversion is None), and both run the leak check and the machine.
    want = {f"TestKit_sw_KVM_X86_SW_PROTECTED_VM::{name}": "passed" for name in conversions + always}
    want |= {f"TestKit_sw_KVM_X86_DEFAULT_VM::{name}": "skipped" for name in conversions}
    want |= {f"TestKit_sw_KVM_X86_DEFAULT_VM::{name}": "passed" for name in always}
    assert {name: outcomes.get(name) for name in want} == want
    assert not {name for name, outcome in outcomes.items() if outcome in ("failed", "error")}
    bad = _pytest(tmp_path, {"GUESTMEM_KIT_BACKENDS": "no-such"})
    assert (
        bad.returncode == 4 and "guestmem conformance kit: no guestmem backend named 'no-such'" in bad.stderr
    )


def test_the_plugin_reads_the_ini_option(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\nguestmem_kit_backends = sw\n")
    env = {"GUESTMEM_KIT_BACKENDS": ""}
    run = _pytest(tmp_path, env, "--collect-only")
    assert "guestmem-kit[sw]::TestKit_sw_KVM_X86_SW_PROTECTED_VM::test_stateful_machine" in run.stdout
