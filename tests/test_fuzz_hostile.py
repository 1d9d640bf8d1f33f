"""``guestmem fuzz --hostile``: outcome classes counted, finding classes minimised to JSON
reproducers that replay, and the checks after every sequence (invariants, no half-applied
change, leaks, time limits) shown to fire on throwaway backends that break them."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from gmem_helpers import BackendPlugin, plugin
from test_conformance_broken import DESTRUCTIVE, LeakyPages, Sound

from guestmem import uapi
from guestmem.backend import hookimpl
from guestmem.cabi import ArgumentTypeError
from guestmem.cli import main
from guestmem.conformance.hostile import Ref, classify, crash_key, from_plain, state_of, to_plain, zapped_only
from guestmem.conformance.machine import machine_for
from guestmem.errors import HostCrash, HostSigbus, KvmError, MemoryFault
from guestmem.fuzz.campaign import campaign_units
from guestmem.fuzz.hostile import (
    Step,
    check_hostile_run,
    hostile_call,
    hostile_machine,
    minimise,
    play,
    replay,
    run_hostile,
    well_typed,
)
from guestmem.fuzz.run import FuzzConfig

PAGE = uapi.PAGE_SIZE


def test_outcomes_are_classified() -> None:
    """ok, a kernel errno with its rule, a TypeError naming a wrong-typed parameter, host
    signals, guest exits, modelled verdicts; anything else is a crash class keyed by type
    and frame, and a wrong type that is accepted is counted as such."""
    assert classify(None) == ("ok", "")
    assert classify(None, ["size"]) == ("accepted", "size")
    assert classify(KvmError(22, "C-4", "bad size")) == ("errno", "EINVAL [C-4]")
    assert classify(HostSigbus(0x1000, "M-4", "private")) == ("signal", "SIGBUS")
    assert classify(MemoryFault(14, 0, PAGE, 0, "G-2")) == ("exit", "MemoryFault")
    assert classify(HostCrash("rmp #PF")) == ("verdict", "HostCrash")
    assert classify(LookupError("modelled"), (), (LookupError,)) == ("verdict", "LookupError")
    assert classify(TypeError("size must be an integer, not float"), ["size"]) == ("type_error", "size")
    named = ArgumentTypeError("args[0] must be an integer, not float")
    assert classify(named, ["mask"]) == ("type_error", "args[0]")
    try:
        {}[1]
    except KeyError as exc:
        kind, detail = classify(exc, ["size"])
        assert kind == "crash" and detail == crash_key(exc).removeprefix("crash: ")
        assert detail.startswith("KeyError @ test_fuzz_hostile:test_outcomes_are_classified")


def test_calls_are_plain_data() -> None:
    """Drawn arguments survive JSON: NaN, infinities, bytes, tuples and object roles."""
    value = {"args": [math.nan, -math.inf, b"\x00\x10", Ref("closed_gmem"), (1 << 64, "x"), None, 2.5]}
    back = from_plain(json.loads(json.dumps(to_plain(value))))
    args = back["args"]
    assert math.isnan(args[0]) and args[1] == -math.inf and args[2] == b"\x00\x10"
    assert args[3] == Ref("closed_gmem") and args[4] == (1 << 64, "x") and args[5:] == [None, 2.5]


def test_a_hostile_run_counts_outcomes_and_depends_on_its_config_alone() -> None:
    config = FuzzConfig("sw", steps=400, hostile=True, seed=3)
    first, again = run_hostile(config), run_hostile(config)
    kinds = {key.split(":", 1)[0] for key in first.tally}
    assert {"ok", "errno", "exit"} <= kinds
    assert first.steps >= 400 and first.sequences >= 16
    assert first.tally == again.tally and sorted(first.findings) == sorted(again.findings)
    assert sum(first.ended.values()) == first.sequences


def test_the_kits_bounded_run_checks_its_reproducers(tmp_path: Path) -> None:
    result = check_hostile_run(hostile_machine(FuzzConfig("sw")), tmp_path, steps=300)
    assert len(list(tmp_path.glob("*.json"))) == len(result.findings)


def test_well_typed_means_no_wrong_argument_in_the_program() -> None:
    assert well_typed([hostile_call("vm", "create_guest_memfd", PAGE, 0), ("guest_read", {"page": 0})])
    assert not well_typed([hostile_call("vm", "create_guest_memfd", 2.5, 0, wrong=("size",))])


def test_a_crash_class_is_minimised_to_a_reproducer_that_replays(tmp_path: Path) -> None:
    """Noise before the crash goes; the JSON file replays the class through the CLI."""
    noise: list[Step] = [("guest_write", {"page": p, "offset": 0, "data": b"x"}) for p in range(4)]
    with plugin(BackendPlugin("t-hostile-crash", (DESTRUCTIVE,), CrashesOnVcpu1())):
        machine = hostile_machine(FuzzConfig("t-hostile-crash"))
        vcpu1 = hostile_call("scratch_vm", "create_vcpu", 1)
        played = play(machine, steps=[*noise, vcpu1])
        assert played.finding is not None
        key = played.finding[0]
        assert key.startswith("crash: BackendError(KeyError) @ ")
        assert minimise(machine, [*noise, vcpu1], key) == [vcpu1]
        out = tmp_path / "crashes"
        argv = ["fuzz", "--hostile", "--backend", "t-hostile-crash", "--steps", "600", "--jobs", "1"]
        assert main([*argv, "--json", "--crashes", str(out)]) == 1
        files = sorted(out.glob("*.json"))
        assert any(json.loads(path.read_text())["class"] == key for path in files)
        for path in files:
            data = json.loads(path.read_text())
            assert data["format"] == "guestmem-fuzz-reproducer/1" and data["backend"] == "t-hostile-crash"
            assert replay(path).reproduced, path
        assert main(["fuzz", "--replay", str(files[0])]) == 1


def test_cli_json_merges_counts_per_backend(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["fuzz", "--hostile", "--steps", "200", "--jobs", "1", "--no-shrink", "--json"]
    main([*argv, "--crashes", str(tmp_path), "--output", str(tmp_path / "out.json")])
    merged = json.loads(capsys.readouterr().out)
    assert merged == json.loads((tmp_path / "out.json").read_text())
    (group,) = merged["results"]
    assert group["backend"] == "sw" and group["steps"] >= 200
    assert group["outcomes"]["errno"] == sum(group["errnos"].values())
    assert merged["crash_classes"] == len(group["findings"])


class FailsAfterAllocating(Sound):
    """Refuses memslot 3 after taking a host page it never gives back: a failed call that
    changed the state."""

    @hookimpl
    def guestmem_prepare_memory_region(self, vm: Any, old: Any, new: Any, change: str) -> None:
        if new is not None and new.id == 3:
            vm.host.alloc(1)
            raise KvmError(22, "", "refused after allocating")


class CrashesOnVcpu1(Sound):
    """A bug in a backend: setting up any vCPU but vCPU 0 raises KeyError."""

    @hookimpl
    def guestmem_vcpu_init(self, vcpu: Any) -> None:
        if vcpu.vcpu_id != 0:
            raise KeyError(vcpu.vcpu_id)


class HangsOnSlot3(Sound):
    """Never returns from preparing memslot 3."""

    @hookimpl
    def guestmem_prepare_memory_region(self, vm: Any, old: Any, new: Any, change: str) -> None:
        while new is not None and new.id == 3:
            time.sleep(0.01)


SLOT3 = hostile_call("scratch_vm", "set_user_memory_region", 3, 0, 1 << 30, PAGE, Ref("scratch_uaddr"))


def test_a_failed_call_that_changed_the_state_is_half_applied() -> None:
    with plugin(BackendPlugin("t-hostile-half", (DESTRUCTIVE,), FailsAfterAllocating())):
        played = play(hostile_machine(FuzzConfig("t-hostile-half")), steps=[SLOT3])
    assert played.finding is not None
    assert played.finding[0] == "half-applied: scratch_vm.set_user_memory_region: errno EINVAL"


def test_only_stage2_leaves_gone_is_no_change() -> None:
    """Stage-2 is a cache: a failed call that zapped leaves before it failed (as
    ``kvm_set_memslot`` flushes a slot before the architecture refuses its deletion)
    changed nothing; a leaf that appeared, or any other difference, did."""
    import guestmem

    with guestmem.open("sw") as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = vm.create_guest_memfd(4 * PAGE)
        vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, 4 * PAGE, 0, gmem, 0)
        vm.set_memory_attributes(0, 4 * PAGE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        vcpu = vm.create_vcpu(0)
        empty = state_of(kvm)
        vcpu.access(0, 1)
        vcpu.access(PAGE, 1)
        mapped = state_of(kvm)
        assert mapped != empty and not zapped_only(empty, mapped)  # leaves appeared
        gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0, PAGE)
        punched = state_of(kvm)
        assert not zapped_only(mapped, punched)  # the folio went too
        vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, 0, 0, gmem, 0)
        vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, 4 * PAGE, 0, gmem, 0)
        rebound = state_of(kvm)
        assert rebound != punched and zapped_only(punched, rebound)  # the delete zapped


def test_a_step_past_its_time_limit_is_a_hang() -> None:
    with plugin(BackendPlugin("t-hostile-hang", (DESTRUCTIVE,), HangsOnSlot3())):
        played = play(hostile_machine(FuzzConfig("t-hostile-hang")), steps=[SLOT3], timeout=0.2)
    assert played.finding is not None
    assert played.finding[0].startswith("hang: hostile_call @ ")


def test_the_leak_check_runs_after_every_sequence() -> None:
    with plugin(BackendPlugin("t-hostile-leak", (DESTRUCTIVE,), LeakyPages())):
        result = run_hostile(FuzzConfig("t-hostile-leak", steps=40, run_length=10, hostile=True))
    assert "leak: pages-freed" in result.findings
    assert result.findings["leak: pages-freed"].count == result.sequences - result.ended.get("desynced", 0)


def test_the_invariants_run_after_every_step() -> None:
    """The machine's checks run after every step: one that fails is a class named by the
    step after which it failed."""
    steps: list[Step] = [("guest_write", {"page": 0, "offset": 0, "data": b"x"})]
    machine = hostile_machine(FuzzConfig("sw"))

    def broken(self: Any) -> None:
        raise AssertionError("broken invariant")

    broken.hypothesis_stateful_invariant = True  # type: ignore[attr-defined]
    checked = type("Checked", (machine,), {"zz_broken": broken})
    played = play(checked, steps=steps)
    assert played.finding is not None and played.finding[0].startswith("check: guest_write: AssertionError")


def test_no_crash_class_for_well_typed_input() -> None:
    """The acceptance bar of a hostile campaign: every class a bounded run on sw finds,
    minimised, needs an argument of the wrong type."""
    typed = set()
    for config in campaign_units(["sw"], steps=6000, chunk=2000, hostile=True):
        machine = hostile_machine(config)
        for key, found in sorted(run_hostile(config, machine).findings.items()):
            if well_typed(minimise(machine, found.steps, key, budget=40)):
                typed.add(key)
    assert sorted(typed) == []


def test_an_arch_exit_of_the_machines_guest_ends_the_sequence() -> None:
    """An arch call that leaves the machine's own guest inside an exit (a RIPAS change the
    VMM never answers, which the next KVM_RUN completes all the same) ends the sequence:
    the reference cannot follow what the completion changes.  The same exit on the
    scratch vCPU, or a core exit of the machine's vCPU, does not."""

    def exits(vcpu: Any, gpa: int) -> None:
        raise MemoryFault(14, gpa, PAGE, 0, "", "the guest asks the VMM for something")

    machine = machine_for("sw", hostile=True, hostile_ops={"guest.ask": ("vcpu", exits, ("gpa",))})
    write = ("guest_write", {"page": 0, "offset": 0, "data": b"x"})
    played = play(machine, steps=[hostile_call("vcpu", "arch:guest.ask", PAGE), write])
    assert (played.ended, played.steps[-1][0]) == ("desynced", "hostile_call")
    for first in (
        hostile_call("scratch_vcpu", "arch:guest.ask", PAGE),
        hostile_call("vcpu", "access", 1 << 40, 8),
    ):
        played = play(machine, steps=[first, write])
        assert (played.ended, len(played.steps)) == ("budget", 2), first


def test_what_a_backend_says_it_still_holds_is_a_leak() -> None:
    """The ``leaks`` conformance option (guestmem-snp: ASIDs, guestmem-tdx: KeyIDs) is
    asked after the sequence, once everything is closed."""
    machine = machine_for("sw", hostile=True, leaks=lambda kvm: ["ASID 7"])
    played = play(machine, steps=[("guest_write", {"page": 0, "offset": 0, "data": b"x"})])
    assert played.finding == (
        "leak: backend-released",
        "LeakError: backend-released: after closing everything the host holds ASID 7",
    )
