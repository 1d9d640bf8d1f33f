"""An SEV-SNP host offers every VM type of its ``/dev/kvm``, the ordinary x86 ones included.

``KVM_X86_DEFAULT_VM`` is always there (CAP-6: ``kvm_caps.supported_vm_types`` starts with
it); ``KVM_X86_SW_PROTECTED_VM`` with ``CONFIG_KVM_SW_PROTECTED_VM`` and the TDP MMU
(``kvm_x86_vendor_init``), which the modelled kernel has; SEV, SEV-ES and SNP come from
``sev_set_cpu_caps``.  The ordinary types are the core's own and behave exactly as on ``sw``:
the conformance kit runs on them here, and the core's uAPI tests run on them with
``pytest tests --guestmem-host snp`` (tox env ``snp``).
"""

from __future__ import annotations

import bisect
from typing import Any

import attrs
import pytest

import guestmem
from guestmem import uapi
from guestmem.backend import X86_DEFAULT_VM, X86_SW_PROTECTED_VM
from guestmem.conformance import GmemConformance
from guestmem.model.profile import UPSTREAM_6_18

MIB = 1 << 20
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
HOSTS = ["snp", "snp-hugepage"]


@pytest.mark.parametrize("backend", HOSTS)
def test_cap6_vm_types_include_the_default_vm(backend: str) -> None:
    """CAP-6: DEFAULT (bit 0) always, SW_PROTECTED (bit 1), SEV, SEV-ES, SNP: 0x1f."""
    with guestmem.open(backend) as kvm:
        types = kvm.check_extension(uapi.KVM_CAP_VM_TYPES)
        assert types & 1 << uapi.KVM_X86_DEFAULT_VM
        assert types == 0x1F
        for vm_type in range(5):
            kvm.create_vm(vm_type).close()
    info = guestmem.backends()[backend]
    assert info.vm_type(uapi.KVM_X86_DEFAULT_VM) is X86_DEFAULT_VM
    assert info.vm_type(uapi.KVM_X86_SW_PROTECTED_VM) is X86_SW_PROTECTED_VM


def test_a_profile_without_sw_protected_models_a_distribution_kernel() -> None:
    """CONFIG_KVM_SW_PROTECTED_VM is an EXPERT option: a kernel without it reports 0x1d."""
    distro = attrs.evolve(UPSTREAM_6_18, name="distro", vm_types=frozenset({0, 2, 3, 4}))
    with guestmem.open("snp", profile=distro) as kvm:
        assert kvm.check_extension(uapi.KVM_CAP_VM_TYPES) == 0x1D


def _lifecycle(
    backend: str, vm_type: int
) -> tuple[list[Any], dict[str, int], list[tuple[str, dict[str, Any]]]]:
    """A guest_memfd lifecycle on *vm_type*: what every call returned, the counters, the trace."""
    results: list[Any] = []
    with guestmem.open(backend, record=True) as kvm:
        vm = kvm.create_vm(vm_type)
        results.append(vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS))
        gmem = vm.create_guest_memfd(4 * MIB)
        shared = kvm.mmap_anonymous(4 * MIB)
        vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, 4 * MIB, shared.address, gmem, 0)
        if vm_type == uapi.KVM_X86_SW_PROTECTED_VM:
            vm.set_memory_attributes(0, 2 * MIB, PRIVATE)
        vcpu = vm.create_vcpu(0)
        for gpa in range(0, 4 * MIB, 0x3000):
            vcpu.access(gpa, data=gpa.to_bytes(4, "little"))
        results.append(vcpu.pre_fault_memory(0, 4 * MIB))
        gmem.fallocate(PUNCH, 0x10000, 0x20000)
        results += [vcpu.access(gpa, 4) for gpa in (0x9000, 0x12000, 0x300000)]
        try:
            vcpu.access(0x1000, 4, private=vm_type == uapi.KVM_X86_DEFAULT_VM)
        except guestmem.KvmError as exc:  # DEFAULT: a private access; SW_PROTECTED: a mismatch
            results.append((type(exc).__name__, exc.errno, exc.rule))
        results.append(vcpu.hypercall(uapi.KVM_HC_MAP_GPA_RANGE, 0, 1, 0))
        return results, dict(vm.counters), _comparable(kvm.events or [])


def _comparable(events: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    """The trace without what differs between hosts of one process: inode numbers, and the
    process-wide sequence numbers a ``uapi`` event's ``first_seq`` names (made the index of
    the call's first event in this trace, which says the same: what happened inside it)."""
    seqs = [e.seq for e in events]
    found = []
    for e in events:
        fields = {k: v for k, v in e.fields.items() if k != "ino"}
        if "first_seq" in fields:
            fields["first_seq"] = bisect.bisect_left(seqs, fields["first_seq"])
        found.append((e.kind, fields))
    return found


@pytest.mark.parametrize("backend", HOSTS)
@pytest.mark.parametrize("vm_type", [uapi.KVM_X86_DEFAULT_VM, uapi.KVM_X86_SW_PROTECTED_VM])
def test_ordinary_vms_behave_exactly_as_on_sw(backend: str, vm_type: int) -> None:
    """The policy leaves DEFAULT and SW_PROTECTED VMs to the core: same results, same cost
    counters, same trace as on the built-in ``sw`` backend (inode numbers aside), and no RMP
    work."""
    here, reference = _lifecycle(backend, vm_type), _lifecycle("sw", vm_type)
    assert here == reference
    assert not any(kind == "ownership_update" for kind, _ in here[2])


class TestSnpHostDefaultVm(GmemConformance):
    backend = "snp"
    vm_type = uapi.KVM_X86_DEFAULT_VM


class TestSnpHostSwProtectedVm(GmemConformance):
    backend = "snp"
    vm_type = uapi.KVM_X86_SW_PROTECTED_VM
    private_access = True


class TestSnpHugepageHostDefaultVm(GmemConformance):
    backend = "snp-hugepage"
    vm_type = uapi.KVM_X86_DEFAULT_VM


class TestSnpHugepageHostSwProtectedVm(GmemConformance):
    backend = "snp-hugepage"
    vm_type = uapi.KVM_X86_SW_PROTECTED_VM
    private_access = True
