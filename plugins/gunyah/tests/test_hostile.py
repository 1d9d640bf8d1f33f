"""Programs of ``guestmem fuzz --hostile`` on the Gunyah VM that once ended in a finding
class: replayed on the kit's machine, each must end without one."""

from __future__ import annotations

import pytest

from guestmem.fuzz.hostile import hostile_call, hostile_machine, play
from guestmem.fuzz.run import FuzzConfig

PROGRAMS = {
    # A parcel over RAM the guest holds: the RM refuses; the lent folios stayed out of the
    # host's direct map (G-3), the folio the call grabbed stays in the file (partial).
    "parcel-of-lent-ram": [hostile_call("vm", "arch:share_parcel", 0x10008000, 0x4000)],
    "parcel-grabbing-a-folio": [
        ("reentrant", {"arm": {"hook": "guestmem_fault", "action": "close_gmem", "trigger": "punch"}}),
        hostile_call("scratch_vm", "arch:share_parcel", 0x10000000, 0x2000),
    ],
    # A handle the VM's driver holds no parcel for: ENOENT.
    "reclaim-unknown-handle": [hostile_call("scratch_vm", "arch:reclaim_parcel", 2, -4096)],
    # A touch of less than a page touches that page.
    "touch-part-of-a-page": [hostile_call("scratch_vm", "arch:touch", 0x10006000, 0xFFF)],
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_the_program_ends_without_a_finding(name: str) -> None:
    played = play(hostile_machine(FuzzConfig("gunyah", hostile=True)), steps=PROGRAMS[name])
    assert played.finding is None, played.finding
    assert sum(played.tally.values()) >= 1 and not any(key.startswith("crash") for key in played.tally)
