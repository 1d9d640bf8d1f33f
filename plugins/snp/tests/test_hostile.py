"""Programs of ``guestmem fuzz --hostile`` on the SNP VM that once ended in a crash class:
replayed on the kit's machine, each must end without a finding."""

from __future__ import annotations

import pytest

from guestmem.fuzz.hostile import hostile_call, hostile_machine, play
from guestmem.fuzz.run import FuzzConfig

PROGRAMS = {
    # KVM_RUN without a pending exit ignores run->hypercall.ret.
    "resume-with-nothing-pending": [hostile_call("scratch_vcpu", "arch:guest.resume", 0)],
    # An MSR-protocol exit of the machine's guest nobody answers ends the sequence
    # (desynced); the next KVM_RUN would complete it with ret 0 (test_guest.py).
    "convert-after-an-unanswered-exit": [
        hostile_call("vcpu", "arch:guest.psc_msr", 0x1000C, 1),
        ("convert", {"page": 11, "n": 4}),
    ],
    # A guest load at a negative gpa: EINVAL, as Vcpu.access.
    "read-at-a-negative-gpa": [hostile_call("scratch_vcpu", "arch:guest.read", -(1 << 63), 32, True)],
    # A host kernel store outside its page: the declared usage error.
    "kernel-write-outside-its-page": [
        hostile_call("scratch_vm", "arch:sev.host_kernel_write", 0x10001C, b"aw\x9d", -4096)
    ],
    # The VMM turned KVM_HC_MAP_GPA_RANGE exits off; the guest's next page-state change
    # (accepting again the page a punch took) gets VMGEXIT_PSC_ERROR_GENERIC: the guest
    # terminates, a modelled outcome (snp_begin_psc).
    "page-state-change-with-exits-off": [
        hostile_call("scratch_vm", "arch:sev.enable_cap_exit_hypercall", 0),
        ("reentrant", {"arm": {"hook": "guestmem_gmem_unbind", "action": "close_vcpu", "trigger": "punch"}}),
        (
            "reentrant",
            {"arm": {"hook": "guestmem_vm_pre_destroy", "action": "delete_slot", "trigger": "punch"}},
        ),
    ],
    # A private store to a page the host punched: the guest accepts it again with a
    # page-state change, whose conversion (QEMU's kvm_convert_memory to private) discards
    # the page's shared side; the host then reads zeroes there.
    "reaccept-discards-the-shared-side": [
        ("punch", {"start": 1, "n": 4}),
        ("host_write", {"page": 2, "offset": 2742, "data": b"shared bytes before the reaccept"}),
        ("guest_write", {"page": 2, "offset": 1962, "data": b"private"}),
        ("host_read", {"page": 2, "offset": 2761, "n": 61}),
    ],
}


@pytest.mark.parametrize("backend", ["snp", "snp-hugepage"])
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_the_program_ends_without_a_finding(backend: str, name: str) -> None:
    played = play(hostile_machine(FuzzConfig(backend, hostile=True)), steps=PROGRAMS[name])
    assert played.finding is None, played.finding
    assert not any(key.startswith("crash") for key in played.tally)
