"""Programs of ``guestmem fuzz --hostile`` on the TD that once ended in a crash class:
replayed on the kit's machine, each must end without a finding."""

from __future__ import annotations

import pytest

from guestmem.fuzz.hostile import hostile_call, hostile_machine, play
from guestmem.fuzz.run import FuzzConfig

PROGRAMS = {
    # KVM_RUN without a pending exit ignores run->hypercall.ret.
    "resume-with-nothing-pending": [hostile_call("vcpu", "arch:guest.resume", 1)],
    # A MapGPA exit of the machine's guest nobody answers ends the sequence (desynced);
    # the next KVM_RUN would complete the chunk with ret 0 (test_guest.py).
    "convert-after-an-unanswered-exit": [
        hostile_call("vcpu", "arch:guest.map_gpa", 0x10005000, (1 << 64) + 4096),
        ("convert", {"page": 10, "n": 3}),
    ],
    # A number where the vCPU goes: a TypeError naming it.
    "init-vcpu-of-a-number": [hostile_call("scratch_vm", "arch:tdx.init_vcpu", 0, 1 << 31)],
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_the_program_ends_without_a_finding(name: str) -> None:
    played = play(hostile_machine(FuzzConfig("tdx", hostile=True)), steps=PROGRAMS[name])
    assert played.finding is None, played.finding
    assert not any(key.startswith("crash") for key in played.tally)
