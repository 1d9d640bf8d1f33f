"""Differential tests: the sw model (this host's kernel profile) against the running kernel.

Every op's outcome is compared (return values, errno, fstat, bytes read by the host and
by the guest, SIGBUS vs not, guest exits); see guestmem.diff and docs/profiles.md.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guestmem import diff, uapi
from guestmem_linux.testing import is_kvm_pvm, kvm_unavailable

pytestmark = pytest.mark.skipif(kvm_unavailable() is not None, reason=kvm_unavailable() or "")

MODEL = diff.opener("sw", diff.host_profile())
KERNEL = diff.opener("linux")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rng=st.randoms(use_true_random=False), length=st.integers(min_value=1, max_value=120))
def test_random_programs_agree(rng: random.Random, length: int) -> None:
    program = diff.generate(rng, length)
    found = diff.compare(MODEL, KERNEL, program)
    assert found is None, "\n" + diff.shrink(MODEL, KERNEL, found).render("sw", "linux")


def test_campaign_of_2000_operations_has_no_disagreement() -> None:
    summary = diff.run_campaign(MODEL, KERNEL, seed=0, steps=2000, labels=("sw", "linux"))
    assert summary.operations >= 2000
    assert summary.disagreements == [], summary.render()


#: Every op of the uAPI face the generator must make.
ALL_OPS = {
    "create_vm",
    "close_vm",
    "close_kvm",
    "check_extension",
    "create_guest_memfd",
    "dup_gmem",
    "close_gmem",
    "fallocate",
    "fstat",
    "gmem_read",
    "gmem_write",
    "gmem_truncate",
    "mmap",
    "mmap_anonymous",
    "munmap",
    "host_read",
    "host_write",
    "set_user_memory_region",
    "set_user_memory_region2",
    "set_memory_attributes",
    "create_vcpu",
    "close_vcpu",
    "access_read",
    "access_write",
    "pre_fault_memory",
}
#: (op, outcome) pairs the kernel must have given: data, errors and exits.
EXPECTED_OUTCOMES = {
    ("access_read", "ok"),
    ("access_read", "mmio"),
    ("access_write", "ok"),
    ("access_write", "mmio"),
    ("access_write", "raised"),  # write=True without data
    ("access_write:data", "ok"),  # data= alone is a store
    ("access_write:write", "ok"),
    ("access_write:other_length", "ok"),
    ("access_read:keywords", "ok"),
    ("host access", "ok"),
    ("host access", "sigbus"),
    ("set_user_memory_region", "ok"),
    ("set_user_memory_region2", "ok"),
    ("set_user_memory_region2", "EEXIST"),
    ("set_user_memory_region2", "EBADF"),
    ("fallocate", "ok"),
    ("fallocate", "EFBIG"),
    ("fallocate", "EOPNOTSUPP"),
    ("mmap", "EOVERFLOW"),
    ("mmap_anonymous", "ENOMEM"),
    ("create_vcpu", "EINVAL"),
    ("create_vcpu", "EEXIST"),
    ("dup_gmem", "ok"),
    ("fstat", "ok"),
    ("pre_fault_memory", "EINVAL"),
}


def test_generated_programs_reach_every_op_and_outcome() -> None:
    """The generator exercises the whole uAPI face, and the kernel answers with data, errors
    and exits: guest RAM (stores in every calling convention, then host and guest loads),
    arguments at the limits (EOVERFLOW, ENOMEM, EFBIG), dup'd and closed descriptors."""
    rng = random.Random(1)
    kinds: set[tuple[str, str]] = set()
    names: set[str] = set()
    for _ in range(300):
        program = diff.generate(rng, 40)
        for op, outcome in zip(program, diff.run_program(KERNEL, program), strict=True):
            names.add(op.name)
            kinds.add((op.name, str(outcome[0]) if outcome[0] != "errno" else str(outcome[1])))
            if op.name.startswith("access") and outcome[0] == "ok":
                kinds.add((f"{op.name}:{op.args[3]}", "ok"))
            if op.name.startswith("host_"):
                kinds.add(("host access", str(outcome[0])))
        if names >= ALL_OPS and kinds >= EXPECTED_OUTCOMES:
            break
    assert ALL_OPS - names == set()
    assert EXPECTED_OUTCOMES - kinds == set()


@pytest.mark.skipif(not is_kvm_pvm(), reason="the upstream profile matches hosts with the TDP MMU")
def test_wrong_profile_is_caught_and_shrunk() -> None:
    """The harness can fail: the upstream-6.18 profile is not this kvm_pvm host (smm)."""
    upstream = diff.opener("sw", "upstream-6.18")
    program = [
        diff.Op(0, "create_vm", (0,)),
        diff.Op(1, "mmap_anonymous", (4 * uapi.PAGE_SIZE,)),
        diff.Op(2, "fstat", (1,)),
        diff.Op(3, "check_extension", (None, uapi.KVM_CAP_MULTI_ADDRESS_SPACE)),
    ]
    found = diff.compare(upstream, KERNEL, program)
    assert found is not None
    assert found.op.name == "check_extension"
    assert found.left == ("ok", 2) and found.right == ("ok", 0)
    small = diff.shrink(upstream, KERNEL, found)
    assert [op.name for op in small.program] == ["check_extension"]


def test_cli_reports_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    from guestmem.cli import main

    assert main(["diff", "--steps", "300", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "operations:    300" in out
    assert "disagreements: 0" in out
