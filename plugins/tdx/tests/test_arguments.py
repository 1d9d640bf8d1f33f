"""The TDX commands and the TD's instructions take their arguments as the kernel's C types.

``tdx_vm_ioctl`` and ``tdx_vcpu_ioctl`` read ``struct kvm_tdx_cmd`` and the sub-command's
struct (``arch/x86/include/uapi/asm/kvm.h``) field by field: a wider value is truncated as
the ioctl sees it, a field that is no integer is a TypeError naming it before the command
takes a KeyID, a page or a PAMT entry.  The TD's registers are 64-bit.
"""

from __future__ import annotations

import errno
import re
from typing import Any

import pytest
from tdx_helpers import MIB, PAGE, make_td

import guestmem
import guestmem_tdx
from guestmem import uapi
from guestmem.backend import view
from guestmem_tdx import KVM_TDX_INIT_VM, KvmCpuid2, KvmTdxInitMemRegion, KvmTdxInitVm, TdxCmd
from guestmem_tdx.abi import KVM_TDX_INIT_MEM_REGION, cpuid_gpaw


def _footprint(kvm: Any) -> tuple[Any, ...]:
    host = guestmem_tdx.tdx_host(kvm)
    return (
        dict(view(kvm).counters),
        kvm.host.allocated_pages,
        list(host.module.pamt.items()),
        sorted(host.keyids.in_use),
    )


def _typeerror(call: Any, name: str) -> None:
    with pytest.raises(TypeError, match=rf"^{re.escape(name)} must be"):
        call()


@pytest.mark.parametrize(
    ("cmd", "name"),
    [
        (TdxCmd(float(KVM_TDX_INIT_VM), 0, KvmTdxInitVm()), "id"),
        (TdxCmd(KVM_TDX_INIT_VM, None, KvmTdxInitVm()), "flags"),
        (TdxCmd(KVM_TDX_INIT_VM, 0, KvmTdxInitVm(attributes=0.0)), "attributes"),
        (TdxCmd(KVM_TDX_INIT_VM, 0, KvmTdxInitVm(mrowner="owner")), "mrowner"),
        (TdxCmd(KVM_TDX_INIT_VM, 0, KvmTdxInitVm(cpuid=KvmCpuid2([cpuid_gpaw(48)], nent=1.0))), "nent"),
        (TdxCmd(KVM_TDX_INIT_VM, 0, "data"), "data"),
    ],
)
def test_init_vm_with_a_non_integer_field_takes_no_keyid(cmd: TdxCmd, name: str) -> None:
    with guestmem.open("tdx") as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_TDX_VM)
        before = _footprint(kvm)
        _typeerror(lambda: vm.memory_encrypt_op(cmd), name)
        assert _footprint(kvm) == before
        tdx = guestmem_tdx.tdx(vm)
        assert tdx.state.hkid < 0
        tdx.init_vm()  # the VM is as new
        assert tdx.state.hkid >= 0
        vm.close()


def test_wider_fields_are_truncated_as_the_ioctl_reads_them() -> None:
    """A ``__u32 id`` of ``KVM_TDX_INIT_VM + 2**32`` is INIT_VM; a ``__u64`` attributes
    value 2**64 more is the same attributes."""
    with guestmem.open("tdx") as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_TDX_VM)
        init = KvmTdxInitVm(attributes=guestmem_tdx.TDX_TD_ATTR_SEPT_VE_DISABLE + (1 << 64))
        vm.memory_encrypt_op(TdxCmd(KVM_TDX_INIT_VM + (1 << 32), 0, init))
        state = guestmem_tdx.tdx(vm).state
        assert state.hkid >= 0 and init.attributes == guestmem_tdx.TDX_TD_ATTR_SEPT_VE_DISABLE
        vm.close()


def test_init_mem_region_and_the_tds_instructions_take_integers() -> None:
    td = make_td(2 * MIB)
    vcpu, guest = td.vcpu, td.guest
    before = _footprint(td.kvm)
    for region, name in (
        (KvmTdxInitMemRegion(0, 0.0, 1, bytes(PAGE)), "gpa"),
        (KvmTdxInitMemRegion(0, 0, "1", bytes(PAGE)), "nr_pages"),
        (KvmTdxInitMemRegion(0, 0, 1, "page"), "source"),
    ):
        _typeerror(
            lambda region=region: vcpu.memory_encrypt_op(TdxCmd(KVM_TDX_INIT_MEM_REGION, 1, region)), name
        )
    _typeerror(lambda: td.tdx.init_mem_region(vcpu, 0, "payload"), "data")
    assert _footprint(td.kvm) == before
    td.tdx.init_mem_region(vcpu, 0, bytearray(b"boot"))
    td.tdx.finalize()
    for call, name in (
        (lambda: guest.accept(float(PAGE)), "gpa"),
        (lambda: guest.accept_range(PAGE, "4096"), "size"),
        (lambda: guest.accept_memory(0, None), "end"),
        (lambda: guest.read(0.0, 4), "gpa"),
        (lambda: guest.map_gpa(PAGE, 1.5), "args[2]"),
        (lambda: guest.resume(None), "ret"),
    ):
        _typeerror(call, name)
    _typeerror(lambda: guest.write(0, "x"), "data")
    assert guest.read(0, 4) == b"boot"
    td.close()


@pytest.mark.parametrize("vcpu", [0, 2**31, None, "vcpu 0"])
def test_vcpu_commands_take_a_vcpu_object(vcpu: Any) -> None:
    """``KVM_TDX_INIT_VCPU`` and ``KVM_TDX_INIT_MEM_REGION`` are ioctls on a vCPU fd; the
    ``Tdx`` calls take the uAPI ``Vcpu``, not a descriptor number: anything else is a
    TypeError naming it, before the command takes a page."""
    td = make_td(2 * MIB)
    before = _footprint(td.kvm)
    _typeerror(lambda: td.tdx.init_vcpu(vcpu, 0), "vcpu")
    _typeerror(lambda: td.tdx.init_mem_region(vcpu, 0, b"boot"), "vcpu")
    assert _footprint(td.kvm) == before
    td.close()


def test_a_vcpu_command_on_the_vm_fd_is_einval() -> None:
    """A vCPU command made on the VM fd reaches ``tdx_vm_ioctl``, which knows no such
    command: EINVAL, as the kernel answers it."""
    td = make_td(2 * MIB)
    before = _footprint(td.kvm)
    with pytest.raises(guestmem.KvmError) as info:
        td.tdx.init_vcpu(td.vm, 0)
    assert info.value.errno == errno.EINVAL
    assert _footprint(td.kvm) == before
    td.close()
