"""The pytest plugin for VMM developers: backend selection, fixtures, the requires marker,
and the documented example test (``examples/vmm-testing``)."""

from __future__ import annotations

import pathlib

import pytest

import guestmem

pytest_plugins = ["pytester"]

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "vmm-testing" / "test_conversion_handler.py"
MODEL_BACKENDS = sorted(n for n, b in guestmem.backends().items() if b.opener is None)
#: A backend no distribution provides.
MISSING = "no-such-backend"

TESTS = """
import pytest

def test_backend(guestmem_backend):
    assert guestmem_backend

def test_kvm(guestmem_kvm):
    assert guestmem_kvm.backend

def test_default_vm(guestmem_vm):
    guest = guestmem_vm(vm_type="default", size=1 << 20)
    guest.write(0x1000, b"hi")
    assert guest.read(0x1000, 2) == b"hi"

@pytest.mark.guestmem_requires("acceptance")
def test_needs_acceptance(guestmem_vm):
    assert "acceptance" in guestmem_vm().capabilities
"""


def test_the_plugin_is_registered_through_pytest11(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("--help")
    result.stdout.fnmatch_lines(
        [
            "*--guestmem-backend=NAME*",
            "*run guestmem fixtures on these backends*",
            "*--guestmem-kit*also run the guestmem conformance kit*",
        ]
    )


def test_default_is_every_installed_model_backend(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(TESTS)
    result = pytester.runpytest_inprocess("-v", "-rs")
    for name in MODEL_BACKENDS:
        result.stdout.fnmatch_lines([f"*test_backend?{name}? PASSED*"])
    assert "linux" not in {n for n in MODEL_BACKENDS}


def test_the_option_narrows_and_names_missing_backends(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(TESTS)
    result = pytester.runpytest_inprocess("--guestmem-backend", "sw", "--guestmem-backend", MISSING, "-rs")
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] == 4  # sw: backend, kvm, default_vm; the missing one: its name alone
    assert outcomes["skipped"] == 4  # sw: acceptance; the missing one: kvm, default_vm, acceptance
    result.stdout.fnmatch_lines(
        ["*sw: needs acceptance (guest.accept: the guest must accept*", f"*{MISSING}: backend not installed*"]
    )
    result = pytester.runpytest_inprocess("--guestmem-backend", "sw,sw")
    assert result.parseoutcomes()["passed"] == 3


def test_an_unknown_capability_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
import pytest

@pytest.mark.guestmem_requires("telepathy")
def test_x(guestmem_kvm):
    pass
"""
    )
    result = pytester.runpytest_inprocess("--guestmem-backend", "sw")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*unknown capabilities*telepathy*"])


def test_the_documented_example_passes_on_sw(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_conversion_handler=EXAMPLE.read_text())
    result = pytester.runpytest_inprocess("--guestmem-backend", "sw")
    assert result.parseoutcomes() == {"passed": 3}


def test_the_documented_example_on_every_installed_backend(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_conversion_handler=EXAMPLE.read_text())
    names = ",".join(guestmem.backends())
    result = pytester.runpytest_inprocess("--guestmem-backend", names, "-rs")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes["passed"] >= 2


def test_the_kit_is_collected_only_when_asked_for(pytester: pytest.Pytester) -> None:
    """``--guestmem-backend sw`` runs the VMM's own tests; ``--guestmem-kit`` adds the
    conformance kit of every VM type of each selected backend (no test file, no subclass),
    which passes on sw; the ini option ``guestmem_kit`` asks for it too."""
    pytester.makepyfile(TESTS)
    own = pytester.runpytest_inprocess("--guestmem-backend", "sw", "--collect-only", "-q")
    assert "guestmem-kit" not in own.stdout.str()
    result = pytester.runpytest_inprocess(
        "--guestmem-backend", "sw", "--guestmem-kit", "-k", "TestKit and conversion_private_to_shared", "-rs"
    )
    outcomes = result.parseoutcomes()  # the private type converts, the default one has nothing to
    assert (outcomes["passed"], outcomes["skipped"]) == (1, 1)
    listed = pytester.runpytest_inprocess(
        "--guestmem-backend", "sw", "--guestmem-kit", "--collect-only", "-q"
    )
    for kit in ("TestKit_sw_KVM_X86_DEFAULT_VM", "TestKit_sw_KVM_X86_SW_PROTECTED_VM"):
        listed.stdout.fnmatch_lines([f"guestmem-kit?sw?::{kit}::test_stateful_machine"])
    pytester.makeini("[pytest]\nguestmem_kit = true\n")
    by_ini = pytester.runpytest_inprocess("--guestmem-backend", "sw", "--collect-only", "-q")
    by_ini.stdout.fnmatch_lines(["guestmem-kit?sw?::TestKit_sw_KVM_X86_SW_PROTECTED_VM::*"])


def test_the_kit_of_a_backend_not_installed_is_one_skip(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("--guestmem-backend", MISSING, "--guestmem-kit", "-rs")
    assert result.parseoutcomes() == {"skipped": 1}
    result.stdout.fnmatch_lines([f"*{MISSING}: backend not installed*"])


def test_the_kit_is_never_collected_twice(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess(
        "-p", "guestmem.conformance.pytest_plugin", "--guestmem-backend", "sw", "--guestmem-kit"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*do not also load -p guestmem.conformance.pytest_plugin*"])
