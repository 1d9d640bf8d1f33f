"""guestmem.diff, the differential harness, driven with two model backends.

Against the real kernel it runs in plugins/linux/tests; here it must find a difference
that two kernel profiles really have, shrink it, and find none between equal backends.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest
from gmem_helpers import BackendPlugin, NoHooks, arm64_type, plugin

from guestmem import diff, uapi
from guestmem.cli import main

PVM = diff.opener("sw", "kvm_pvm-6.18")
UPSTREAM = diff.opener("sw", "upstream-6.18")


def test_equal_backends_never_disagree() -> None:
    summary = diff.run_campaign(PVM, PVM, seed=5, steps=600)
    assert summary.operations >= 600 and summary.sequences >= 15
    assert summary.disagreements == []


def test_profiles_that_differ_are_told_apart_and_shrunk() -> None:
    """S-7 / G-7 / PF-2 differ between upstream-6.18 and kvm_pvm-6.18."""
    summary = diff.run_campaign(UPSTREAM, PVM, seed=1, steps=1500, labels=("upstream", "pvm"))
    assert summary.disagreements
    for found in summary.disagreements:
        assert found.index == len(found.program) - 1  # shrunk to end at the disagreeing op
        assert len(found.program) <= 12
        assert found.left != found.right
    assert "disagreement 1 at" in summary.render()


def test_shrink_keeps_only_what_the_disagreement_needs() -> None:
    noise = [diff.Op(i, "mmap_anonymous", (uapi.PAGE_SIZE,)) for i in range(6)]
    program = [
        *noise,
        diff.Op(6, "create_vm", (0,)),
        *[diff.Op(7 + i, "check_extension", (None, uapi.KVM_CAP_GUEST_MEMFD)) for i in range(4)],
        diff.Op(11, "set_user_memory_region2", (6, 1 << 16, 0, 0, uapi.PAGE_SIZE, 0, None, 0)),
    ]
    found = diff.compare(UPSTREAM, PVM, program)
    assert found is not None and found.left == ("ok", None) and found.right == ("errno", "EINVAL")
    small = diff.shrink(UPSTREAM, PVM, found)
    assert [op.id for op in small.program] == [6, 11]


def test_missing_objects_are_skipped_alike() -> None:
    """An op whose object was never created (or was shrunk away) is a skip, not an error."""
    program = [diff.Op(0, "fallocate", (99, uapi.FALLOC_FL_KEEP_SIZE, 0, uapi.PAGE_SIZE))]
    assert diff.run_program(PVM, program) == [("skip",)]


def test_outcomes_cover_errno_sigbus_and_guest_exits() -> None:
    page = uapi.PAGE_SIZE
    program = [
        diff.Op(0, "create_vm", (0,)),
        diff.Op(1, "create_guest_memfd", (0, 2 * page, uapi.GUEST_MEMFD_FLAG_MMAP)),
        diff.Op(2, "mmap", (1, 2 * page, 0, True)),
        diff.Op(3, "host_read", (2, page + 5, 4)),
        diff.Op(4, "fallocate", (1, uapi.FALLOC_FL_KEEP_SIZE, 1, page)),
        diff.Op(5, "create_vcpu", (0, 0)),
        diff.Op(6, "access_read", (5, 0x3000, 2)),
        diff.Op(7, "fstat", (1,)),
    ]
    outcomes = diff.run_program(PVM, program)
    assert outcomes[3] == ("sigbus", 1)  # M-4, reported by the page of the mapping
    assert outcomes[4] == ("errno", "EINVAL")  # FA-4
    assert outcomes[6] == ("mmio", 0x3000, False)  # G-4, no memslot
    assert outcomes[7] == ("ok", (2 * page, page, 0, 0o100600, 1))  # size, blksize, blocks, mode, nlink


def test_generated_programs_are_reproducible() -> None:
    assert diff.generate(random.Random(9), 50) == diff.generate(random.Random(9), 50)


def test_cli_diff(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["diff", "--base", "sw", "--profile", "kvm_pvm-6.18", "--against", "sw", "--steps", "300"]
    assert main(argv) == 1  # the two profiles differ
    out = capsys.readouterr().out
    assert "sw[kvm_pvm-6.18] vs sw" in out
    assert "operations:    300" in out
    assert "minimal reproducer" in out


#: The harness's modules and those each may import: one job a module, no cycles.
_LAYERS = {
    "program": set(),
    "interpreter": {"program"},
    "shrink": {"program", "interpreter"},
    "generator": {"program"},
    "campaign": {"program", "interpreter", "shrink", "generator"},
    "cli": {"interpreter", "campaign"},
}


def test_harness_modules_import_only_their_layers() -> None:
    package = Path(diff.__file__).parent
    assert {p.stem for p in package.glob("*.py")} - {"__init__"} == set(_LAYERS)
    for name, allowed in _LAYERS.items():
        tree = ast.parse((package / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        used = {m.removeprefix("guestmem.diff.") for m in imported if m.startswith("guestmem.diff")}
        assert used <= allowed, f"guestmem.diff.{name} imports {sorted(used - allowed)}"


ARM64_TYPES = (arm64_type(0), arm64_type(1 << 31, conversion="in_place"))


def test_programs_use_the_base_backends_vm_types() -> None:
    """An arm64 backend's programs create its VM types (its default mostly, the private one
    now and then), not x86 constants; sw's stay as they were."""
    assert diff.backend_vm_types("sw") == (0, 1)
    with plugin(BackendPlugin("t-diff-arm", (ARM64_TYPES[1], ARM64_TYPES[0]), NoHooks())):
        assert diff.backend_vm_types("t-diff-arm") == (0, 1 << 31)
    assert diff.vm_type_choices(0, (0, 1)) == (0, 0, 0, 1, 2, 3, 4, 5, 31, 32, 1 << 31, uapi.U64_MAX)
    rng = random.Random(3)
    made = [
        op.args[0] for _ in range(60) for op in diff.generate(rng, 40, (0x100, 0)) if op.name == "create_vm"
    ]
    assert made.count(0x100) > len(made) // 2 and 0 in made


def test_an_arm64_backend_agrees_with_itself() -> None:
    with plugin(BackendPlugin("t-diff-arm", ARM64_TYPES, NoHooks())):
        both = diff.opener("t-diff-arm")
        summary = diff.run_campaign(
            both, both, seed=2, steps=300, vm_types=diff.backend_vm_types("t-diff-arm")
        )
    assert summary.operations >= 300 and summary.disagreements == []


def test_accesses_into_a_memslot_smaller_than_a_page() -> None:
    """A moved memslot of an unaligned (refused) size is still a place the generator aims
    accesses at; every access it draws there must be a valid program step."""
    for seed in range(200):
        gen = diff.generator.Generator(random.Random(seed))
        vm = gen._op("create_vm", 0)
        gen.slots.append((vm, 0x10000, 100))
        for _ in range(5):
            gen._access(vm)
        assert all(op.name.startswith(("access", "create")) for op in gen.ops)
