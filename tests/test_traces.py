"""Traces: every uAPI call recorded (rejected ones too), exits and zaps, show and replay."""

from __future__ import annotations

import io
import pathlib
from typing import Any

import attrs
import pytest

import guestmem
from guestmem import HostSigbus, KvmError, MemoryFault, uapi
from guestmem.backend import TraceEvent
from guestmem.cli import main
from guestmem.recording import RecordingKvm, record
from guestmem.serialize import event_from_json, event_to_json, write_trace
from guestmem.traces import format_call, read_trace, replay, show

MiB = 1 << 20
GMEM = uapi.KVM_MEM_GUEST_MEMFD


def program(kvm: Any) -> None:
    """A small VMM sequence with a success, a rejected ioctl, an exit and a SIGBUS."""
    vm = kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    gmem = vm.create_guest_memfd(MiB, uapi.GUEST_MEMFD_FLAG_MMAP)
    view = gmem.mmap(MiB)
    vm.set_user_memory_region2(0, GMEM, 0, MiB, view.address, gmem, 0)
    with pytest.raises(KvmError):
        vm.set_memory_attributes(0, 1, 0)  # unaligned size
    vcpu = vm.create_vcpu(0)
    with pytest.raises(HostSigbus):
        view.read(0x2000, 1)  # M-4: not INIT_SHARED
    gmem.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, 0, 0x1000)
    view.close()
    vcpu.close()
    gmem.close()
    vm.close()


def uapi_events(events: list[TraceEvent]) -> list[dict[str, Any]]:
    return [e.fields for e in events if e.kind == "uapi"]


def test_every_call_is_one_uapi_event_with_its_outcome() -> None:
    with guestmem.open("sw", record=True) as kvm:
        program(kvm)
        events = list(kvm.events or [])
    calls = uapi_events(events)
    assert [c["call"] for c in calls] == [
        "Kvm.create_vm",
        "Vm.create_guest_memfd",
        "GuestMemfd.mmap",
        "Vm.set_user_memory_region2",
        "Vm.set_memory_attributes",
        "Vm.create_vcpu",
        "HostMapping.read",
        "GuestMemfd.fallocate",
        "HostMapping.close",
        "Vcpu.close",
        "GuestMemfd.close",
        "Vm.close",
    ]
    region = calls[3]
    assert region["obj"] == "vm1" and region["args"]["guest_memfd"] == {"ref": "gmem1"}
    assert region["args"]["userspace_addr"] == {"ref": "map1", "offset": 0}
    assert region["result"] is None and "raised" not in region
    rejected = calls[4]
    assert (rejected["errno"], rejected["rule"], rejected["raised"]) == ("EINVAL", "A-6", "KvmError")
    sigbus = calls[6]
    assert sigbus["exit"] == "sigbus" and sigbus["rule"] == "M-4"
    kinds = [e.kind for e in events]
    assert "host_sigbus" in kinds and "punch_hole" in kinds and "mmu_invalidate" in kinds


def test_events_inside_a_call_come_before_it() -> None:
    with guestmem.open("sw", record=True) as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = vm.create_guest_memfd(MiB)
        vm.set_user_memory_region2(0, GMEM, 0, MiB, 0, gmem, 0)
        vm.set_memory_attributes(0, MiB, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        vcpu = vm.create_vcpu(0)
        vcpu.access(0x1000, data=b"x")
        with pytest.raises(MemoryFault):
            vcpu.access(0x1000, 1, private=False)
        events = list(kvm.events or [])
    access = [e for e in events if e.kind == "uapi" and e.fields["call"] == "Vcpu.access"]
    store, exit_ = access
    inside = [e.kind for e in events if store.fields["first_seq"] <= e.seq < store.seq]
    assert inside == ["fault"]
    assert store.fields["counters"]["faults"] == 1 and store.fields["counters"]["gmem_pages_allocated"] == 1
    assert (
        exit_.fields["exit"] == "memory_fault"
        and exit_.fields["gpa"] == 0x1000
        and exit_.fields["rule"] == "G-2"
    )
    zap = [e for e in events if e.kind == "zap"]
    assert zap == [] or all(e.fields["pages"] for e in zap)


def test_zaps_are_traced() -> None:
    with guestmem.open("sw", record=True) as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = vm.create_guest_memfd(MiB)
        vm.set_user_memory_region2(0, GMEM, 0, MiB, 0, gmem, 0)
        vm.set_memory_attributes(0, MiB, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        vm.create_vcpu(0).access(0x3000, data=b"x")
        gmem.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, 0x3000, 0x1000)
        zaps = [e.fields for e in kvm.events or [] if e.kind == "zap"]
    assert zaps == [{"gfn_start": 3, "gfn_end": 4, "pages": 1, "private_pages": 1}]


def test_a_wrapped_kvm_records_the_same_calls_as_the_model() -> None:
    """guestmem.recording.record is how the real kernel records: same calls, same outcomes."""
    with guestmem.open("sw", record=True) as kvm:
        program(kvm)
        model = uapi_events(list(kvm.events or []))
    wrapped = record(guestmem.open("sw"))
    assert isinstance(wrapped, RecordingKvm) and record(wrapped) is wrapped
    program(wrapped)
    wrapped.close()
    proxied = uapi_events(wrapped.events)

    def comparable(calls: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [
            (c["call"], c["obj"], c["args"], c.get("result"), c.get("errno"), c.get("exit")) for c in calls
        ]

    assert comparable(proxied[:-1]) == comparable(model)
    assert [c["call"] for c in proxied][-1] == "Kvm.close"


def test_reserved_field_names_are_refused() -> None:
    with pytest.raises(ValueError, match="seq"):
        event_to_json(TraceEvent(1, "x", None, {"seq": 2}))


def test_trace_show_prints_calls_and_filters(capsys: pytest.CaptureFixture[str]) -> None:
    from rich.console import Console

    with guestmem.open("sw", record=True) as kvm:
        program(kvm)
        events = list(kvm.events or [])
    out = Console(file=io.StringIO(), width=200)
    assert show(events, out=out) == len(events)
    text = out.file.getvalue()  # type: ignore[attr-defined]
    assert "Vm.set_memory_attributes(vm1, address=0, size=1, attributes=0, flags=0) = -1 EINVAL [A-6]" in text
    assert "HostMapping.read(map1, offset=0x2000, n=1) -> SIGBUS [M-4]" in text
    assert show(events, kinds=["punch_hole"], out=Console(file=io.StringIO())) == 1
    assert show(events, grep="SIGBUS", out=Console(file=io.StringIO())) == 1


def test_format_call_of_each_outcome() -> None:
    base = {"call": "Vcpu.access", "obj": "vcpu1", "args": {"gpa": 0x1000, "data": {"hex": "6869"}}}
    assert format_call({**base, "result": None}) == "Vcpu.access(vcpu1, gpa=0x1000, data=b'hi') = None"
    fault = {
        **base,
        "raised": "MemoryFault",
        "exit": "memory_fault",
        "gpa": 0x1000,
        "size": 4096,
        "errno": "EFAULT",
    }
    assert format_call(fault).endswith("-> KVM_EXIT_MEMORY_FAULT gpa=0x1000 size=0x1000 (EFAULT)")


def _trace_file(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "t.jsonl"
    with guestmem.open("sw", record=True) as kvm:
        program(kvm)
        with path.open("w") as f:
            write_trace(kvm.events or [], f)
    return path


def test_replay_on_the_same_backend_matches(tmp_path: pathlib.Path) -> None:
    path = _trace_file(tmp_path)
    with path.open() as f:
        events = read_trace(f)
    divergences, notes, done = replay(events, "sw")
    assert (divergences, notes, done) == ([], [], 12)


def test_replay_reports_where_outcomes_diverge(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _trace_file(tmp_path)
    lines = path.read_text().splitlines()
    events = [event_from_json(line) for line in lines]
    # As if the recording backend had accepted the unaligned attributes.
    tampered = [
        attrs.evolve(
            e,
            fields={k: v for k, v in e.fields.items() if k not in ("raised", "errno", "rule", "error")}
            | {"result": None},
        )
        if e.kind == "uapi" and e.fields["call"] == "Vm.set_memory_attributes"
        else e
        for e in events
    ]
    divergences, _, _ = replay(tampered, "sw")
    assert [(d.recorded, d.replayed) for d in divergences] == [("ok None", "error EINVAL")]
    path.write_text("\n".join(event_to_json(e) for e in tampered) + "\n")
    assert main(["trace", "replay", str(path), "--backend", "sw"]) == 1
    assert "1 of 12 call(s) differ on sw" in capsys.readouterr().out
    assert main(["trace", "show", str(path), "--kind", "uapi"]) == 0


def test_replay_substitutes_vm_types_and_skips_what_it_cannot_make(tmp_path: pathlib.Path) -> None:
    events = [
        TraceEvent(
            1,
            "uapi",
            None,
            {"call": "Kvm.create_vm", "obj": "kvm", "args": {"vm_type": 99}, "result": {"ref": "vm1"}},
        ),
        TraceEvent(
            2,
            "uapi",
            1,
            {
                "call": "Vm.memory_encrypt_op",
                "obj": "vm1",
                "args": {"cmd": {"repr": "SevCmd(...)", "type": "SevCmd"}},
                "result": 0,
            },
        ),
        TraceEvent(
            3,
            "uapi",
            1,
            {"call": "Vm.create_vcpu", "obj": "vm7", "args": {"vcpu_id": 0}, "result": {"ref": "vcpu1"}},
        ),
    ]
    divergences, notes, done = replay(events, "sw")
    assert done == 1 and divergences == []
    assert notes[0] == "VM type 99 is KVM_X86_DEFAULT_VM (0) on sw"  # no such type anywhere: a default VM
    assert "SevCmd" in notes[1] and "vm7 does not exist" in notes[2]
    divergences, notes, _ = replay(events[:1], "sw", vm_type=uapi.KVM_X86_SW_PROTECTED_VM)
    assert divergences == []
