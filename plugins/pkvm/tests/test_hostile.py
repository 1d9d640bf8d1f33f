"""Programs of ``guestmem fuzz --hostile`` on the protected VM that once ended in a
finding: replayed on the kit's machine, each must end without one."""

from __future__ import annotations

import pytest

from guestmem.conformance.hostile import Ref
from guestmem.fuzz.hostile import hostile_call, hostile_machine, play
from guestmem.fuzz.run import FuzzConfig

PROGRAMS = {
    # A memory_size of 2**64 is 0 as the __u64 the ioctl reads: a DELETE of the scratch VM's
    # RAM slot, which the protected VM that ran refuses (EPERM, pKVM-3.6) after
    # kvm_set_memslot flushed the slot: the leaves are gone and refault, nothing else moved.
    "refused-delete-after-the-flush": [
        hostile_call(
            "scratch_vm", "set_user_memory_region2", 1, 0, 0x10002000, 1 << 64, 0, Ref("gmem"), 0xC000
        )
    ],
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_the_program_ends_without_a_finding(name: str) -> None:
    played = play(hostile_machine(FuzzConfig("pkvm", hostile=True)), steps=PROGRAMS[name])
    assert played.finding is None, played.finding
    assert any(key.startswith("errno: scratch_vm.set_user_memory_region2: EPERM") for key in played.tally)
