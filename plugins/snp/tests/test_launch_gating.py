"""What an SEV, SEV-ES or SNP vCPU may do before its VM is set up (rules SNP-2.1, SNP-2.4).

Linux 6.18, as ``arch/x86/kvm/svm`` has it:

* ``KVM_CREATE_VCPU`` is never refused for being early.  Before ``KVM_SEV_INIT2`` the VM is
  no SEV-ES guest yet (``sev_es_guest``), so ``sev_vcpu_create`` gives the vCPU no VMSA;
  ``__sev_guest_init`` then refuses INIT2 (``kvm->created_vcpus``: EINVAL).
* ``KVM_RUN`` before INIT2 fails with EINVAL (``svm_vcpu_pre_run``: ``sev->need_init``).
* After INIT2 KVM's checks pass (an SEV-ES/SNP vCPU created then has a VMSA, so
  ``pre_sev_run`` finds ``vmsa_pa`` valid) and VMRUN runs.  For an SNP guest the hardware
  enters only through a VMSA that the launch made a guest-owned VMSA page of its ASID
  (``SNP_LAUNCH_FINISH``, ``snp_launch_update_vmsa``); VMRUN of any other fails with
  VMEXIT_INVALID, which ``svm_handle_exit`` reports as ``KVM_RUN`` returning 0 with
  ``KVM_EXIT_FAIL_ENTRY``.  That holds for a vCPU created after LAUNCH_FINISH too: 6.18
  gives it a VMSA that is never launched.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
from snp_helpers import MIB, make_snp_vm

import guestmem
import guestmem_snp
from guestmem import uapi
from guestmem.errors import FailEntryExit, KvmError
from guestmem_snp.rmp import RmpState
from guestmem_snp.sev import (
    KVM_SEV_INIT2,
    KVM_SEV_SNP_LAUNCH_FINISH,
    KVM_SEV_SNP_LAUNCH_START,
    KVM_SEV_SNP_LAUNCH_UPDATE,
    SVM_EXIT_ERR,
    SevCmd,
    SnpLaunchUpdate,
)

PAGE = uapi.PAGE_SIZE
SEV_TYPES = [uapi.KVM_X86_SEV_VM, uapi.KVM_X86_SEV_ES_VM, uapi.KVM_X86_SNP_VM]


def ram(kvm: Any, vm: Any, *, private: bool) -> None:
    """1 MiB of guest_memfd RAM at gpa 0, private or shared."""
    gmem = vm.create_guest_memfd(MIB)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, MIB, kvm.mmap_anonymous(MIB).address, gmem, 0)
    if private:
        vm.set_memory_attributes(0, MIB, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)


def fails_entry(run: Any) -> FailEntryExit:
    with pytest.raises(FailEntryExit) as info:
        run()
    exit_ = info.value
    assert (exit_.exit_reason, exit_.hardware_entry_failure_reason, exit_.rule) == (
        uapi.KVM_EXIT_FAIL_ENTRY,
        SVM_EXIT_ERR,
        "SNP-2.4",
    )
    return exit_


@pytest.mark.parametrize("vm_type", SEV_TYPES)
def test_vcpu_created_before_init2_leaves_the_vm_stuck(vm_type: int) -> None:
    """SNP-2.1: KVM_CREATE_VCPU before INIT2 succeeds (no VMSA), INIT2 is then EINVAL
    (``__sev_guest_init``), and KVM_RUN is EINVAL for good (``svm_vcpu_pre_run``)."""
    with guestmem.open("snp") as kvm, kvm.create_vm(vm_type) as vm:
        ram(kvm, vm, private=vm_type == uapi.KVM_X86_SNP_VM)
        vcpu = vm.create_vcpu(0)
        sev = guestmem_snp.sev(vm)
        assert sev.state.vcpu_state(0).vmsa_pfn is None
        for call in (sev.init2, lambda: vcpu.access(0x1000, 4), lambda: vcpu.hypercall(uapi.KVM_HC_KICK_CPU)):
            with pytest.raises(KvmError) as info:
                call()
            assert (info.value.errno, info.value.rule) == (errno.EINVAL, "SNP-2.1")
        assert vm.gmem_pfn(1) is None and not vm.is_mapped(1)


@pytest.mark.parametrize("vm_type", [uapi.KVM_X86_SEV_VM, uapi.KVM_X86_SEV_ES_VM])
def test_sev_and_sev_es_vcpus_run_once_init2_is_done(vm_type: int) -> None:
    """After INIT2 KVM lets an SEV or SEV-ES vCPU run; their own launch commands are not
    modelled, so nothing more gates them."""
    with guestmem.open("snp") as kvm, kvm.create_vm(vm_type) as vm:
        guestmem_snp.sev(vm).init2()
        ram(kvm, vm, private=False)
        vcpu = vm.create_vcpu(0)
        vcpu.access(0x1000, data=b"sev")
        assert vcpu.access(0x1000, 3) == b"sev"


def test_snp_vcpu_runs_only_through_a_launched_vmsa() -> None:
    """SNP-2.4: after INIT2 and before SNP_LAUNCH_FINISH every way into the guest is
    KVM_EXIT_FAIL_ENTRY (a load or store, a hypercall, PVALIDATE), with nothing faulted in;
    LAUNCH_FINISH makes the VMSA a guest VMSA page and the vCPU runs."""
    snp = make_snp_vm(launch=False)
    snp.private(0, MIB)
    g = snp.guest
    pvalidate = lambda: g.pvalidate(0x2000)  # noqa: E731
    for run in (lambda: snp.vcpu.access(0x2000, 4), lambda: snp.vcpu.hypercall(12, 0, 1, 0), pvalidate):
        fails_entry(run)
    snp.sev.snp_launch_start()
    fails_entry(lambda: snp.vcpu.access(0x2000, 4, private=True))
    assert snp.vm.gmem_pfn(2) is None and snp.vm.counters["rmpupdate"] == 1  # the context page
    vmsa = snp.state.vcpu_state(0).vmsa_pfn
    assert vmsa is not None and not snp.rmp.is_assigned(vmsa)  # a plain page until the launch
    snp.sev.snp_launch_finish()
    assert snp.rmp.lookup(vmsa).vmsa and snp.sev.vmsa_pfns == {0: vmsa}
    assert g.pvalidate(0x2000) == 0
    g.write(0x2000, b"runs")
    assert g.read(0x2000, 4) == b"runs"


def test_snp_vcpu_created_after_launch_finish_never_runs() -> None:
    """SNP-2.4: Linux 6.18 gives a vCPU created after LAUNCH_FINISH a VMSA that no launch
    will measure; VMRUN of it fails.  Its page is given back at teardown all the same."""
    snp = make_snp_vm()
    late = snp.vm.create_vcpu(1)
    vmsa = snp.state.vcpu_state(1).vmsa_pfn
    assert vmsa is not None and snp.kvm.host.is_allocated(vmsa)
    exit_ = fails_entry(lambda: late.access(0, 1, private=False))
    assert "after KVM_SEV_SNP_LAUNCH_FINISH" in str(exit_)
    snp.vcpu.access(0, data=b"boot", private=False)  # vCPU 0 was launched
    launched = snp.sev.vmsa_pfns[0]
    late.close()
    snp.vcpu.close()
    snp.gmem.close()
    snp.vm.close()  # sev_free_vcpu: back to shared in the RMP, then freed
    assert not snp.kvm.host.is_allocated(vmsa) and not snp.kvm.host.is_allocated(launched)
    assert snp.rmp.lookup(launched).state is RmpState.HYPERVISOR
    assert not snp.sev.host.leaked and snp.rmp.assigned_pages() == 0


def test_an_unlaunched_vmsa_is_freed_at_teardown() -> None:
    """``sev_free_vcpu`` frees the VMSA of a vCPU whose VM was never launched."""
    snp = make_snp_vm(launch=False)
    vmsa = snp.state.vcpu_state(0).vmsa_pfn
    assert vmsa is not None
    snp.vcpu.close()
    snp.gmem.close()
    snp.vm.close()
    assert not snp.kvm.host.is_allocated(vmsa)


@pytest.mark.parametrize("vm_type", [uapi.KVM_X86_DEFAULT_VM, uapi.KVM_X86_SW_PROTECTED_VM])
def test_sev_commands_on_a_vm_of_no_sev_type(vm_type: int) -> None:
    """``sev_mem_enc_ioctl`` takes the commands on every VM of the host; a DEFAULT or
    SW_PROTECTED VM has an all-zero ``kvm_sev_info``: INIT2 is EINVAL (``sev_guest_init2``:
    no ``need_init``), LAUNCH_START and LAUNCH_FINISH ENOTTY (``!sev_snp_guest``),
    LAUNCH_UPDATE EINVAL; its vCPUs are never gated."""
    with guestmem.open("snp") as kvm, kvm.create_vm(vm_type) as vm:
        expected = {
            KVM_SEV_INIT2: errno.EINVAL,
            KVM_SEV_SNP_LAUNCH_START: errno.ENOTTY,
            KVM_SEV_SNP_LAUNCH_UPDATE: errno.EINVAL,
            KVM_SEV_SNP_LAUNCH_FINISH: errno.ENOTTY,
        }
        for cmd_id, err in expected.items():
            data = SnpLaunchUpdate(0, b"x" * PAGE, PAGE) if cmd_id == KVM_SEV_SNP_LAUNCH_UPDATE else None
            with pytest.raises(KvmError) as info:
                vm.memory_encrypt_op(SevCmd(cmd_id, data))
            assert info.value.errno == err, cmd_id
        with pytest.raises(KvmError) as info:
            vm.memory_encrypt_op(SevCmd(KVM_SEV_INIT2))
        assert info.value.rule == "SNP-2.1"
        ram(kvm, vm, private=False)
        vcpu = vm.create_vcpu(0)
        vcpu.access(0x1000, data=b"plain")
        assert vcpu.access(0x1000, 5) == b"plain"
        assert guestmem.backend.view(vm).arch is None  # the policy keeps no SEV state for it
