"""``guestmem.open("linux", record=True)``: the real kernel's calls recorded as the model's."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

import guestmem
from guestmem import HostSigbus, KvmError, uapi
from guestmem.diff import host_profile
from guestmem_linux.testing import kvm_unavailable

MiB = 1 << 20


def program(kvm: Any) -> None:
    vm = kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    gmem = vm.create_guest_memfd(MiB, uapi.GUEST_MEMFD_FLAG_MMAP)
    view = gmem.mmap(MiB)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, MiB, view.address, gmem, 0)
    with pytest.raises(KvmError):
        gmem.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, 1, 4096)
    with pytest.raises(HostSigbus):
        view.read(0, 1)
    view.close()
    gmem.close()
    vm.close()


def outcomes(events: list[Any]) -> list[tuple[Any, ...]]:
    return [
        (e.fields["call"], e.fields["obj"], e.fields.get("errno"), e.fields.get("exit"))
        for e in events
        if e.kind == "uapi"
    ]


def test_linux_records_the_same_uapi_events_as_the_model() -> None:
    reason = kvm_unavailable()
    if reason:
        pytest.skip(reason)
    with guestmem.open("linux", record=True) as kvm:
        program(kvm)
        real = list(kvm.events)  # type: ignore[attr-defined]
    with guestmem.open("sw", profile=host_profile(), record=True) as kvm:
        program(kvm)
        model = list(kvm.events or [])
    assert outcomes(real) == outcomes(model)
    calls = [e.fields for e in real if e.kind == "uapi"]
    assert calls[3]["args"]["userspace_addr"] == {"ref": "map1", "offset": 0}
    assert calls[4]["errno"] == "EINVAL" and calls[5]["exit"] == "sigbus"
    assert all(e.seq < f.seq for e, f in itertools.pairwise(real))
