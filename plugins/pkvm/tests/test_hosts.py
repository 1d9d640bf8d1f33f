"""One pKVM hypervisor per modelled host: its state is ``host.arch``, not the policy's."""

from __future__ import annotations

import pytest

import guestmem
from guestmem import HostSigbus, uapi
from guestmem.backend import view
from guestmem_pkvm import plugin
from guestmem_pkvm.abi import ARM_SMCCC_VENDOR_HYP_KVM_HYP_MEMINFO_FUNC_ID, KVM_VM_TYPE_ARM_PROTECTED
from guestmem_pkvm.ownership import HANDLE_OFFSET, Hypervisor, PageState
from guestmem_pkvm.policy import hypervisor, pkvm_state

from .conftest import GPA, Guest

PAGE = uapi.PAGE_SIZE


def test_each_open_has_its_own_hypervisor_in_host_arch_3_1() -> None:
    with guestmem.open("pkvm") as a, guestmem.open("pkvm") as b:
        hyp_a, hyp_b = view(a).arch, view(b).arch
        assert isinstance(hyp_a, Hypervisor) and isinstance(hyp_b, Hypervisor)
        assert hyp_a is not hyp_b
        assert hypervisor(view(a)) is hyp_a
        ga, gb = Guest(a), Guest(b)
        assert pkvm_state(ga.vm).hyp is hyp_a and pkvm_state(gb.vm).hyp is hyp_b
        for g in (ga, gb):  # the first KVM_RUN makes the hyp VM (pkvm_create_hyp_vm)
            g.vcpu.hypercall(ARM_SMCCC_VENDOR_HYP_KVM_HYP_MEMINFO_FUNC_ID, 0, 0, 0)
        # Separate VM tables: both first VMs get the first handle and VMID.
        assert pkvm_state(ga.vm).handle == pkvm_state(gb.vm).handle == HANDLE_OFFSET
        assert pkvm_state(ga.vm).vmid == pkvm_state(gb.vm).vmid == 1

        ga.map.madvise(uapi.MADV_DONTNEED, 0, PAGE)
        ga.vcpu.access(GPA, data=b"a's secret")
        pfn = ga.vm.gmem_pfn(GPA >> 12)
        assert pfn is not None and hyp_a.host_state(pfn).state == PageState.NOPAGE
        # Host b's memory has a page with the same number: its hypervisor never gave it away.
        assert gb.vm.gmem_pfn(GPA >> 12) is None
        gb.map.write(0, b"b's own")
        assert gb.vm.gmem_pfn(GPA >> 12) == pfn
        assert hyp_b.host_state(pfn).state == PageState.OWNED and len(hyp_b.host) == 0
        assert gb.map.read(0, 7) == b"b's own"
        with pytest.raises(HostSigbus):
            ga.map.read(0, 1)
        ga.teardown()
        gb.teardown()
        assert len(hyp_a.host) == 0 and hyp_a.vm_table == [None]


def test_the_policy_keeps_no_host_state() -> None:
    """Hosts come and go with their ``guestmem.open``; the one policy object holds nothing."""
    with guestmem.open("pkvm") as kvm:
        kvm.create_vm(KVM_VM_TYPE_ARM_PROTECTED).close()
    assert vars(plugin.POLICY) == {}


def test_a_host_of_another_backend_is_no_pkvm_host() -> None:
    with guestmem.open("sw") as kvm:
        with pytest.raises(TypeError):
            hypervisor(view(kvm))
        vm = kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        with pytest.raises(TypeError):
            pkvm_state(vm)
        vm.close()
    with pytest.raises(TypeError):
        pkvm_state(object())
