"""The SEV commands and the guest side take their arguments as the kernel's C types.

``KVM_MEMORY_ENCRYPT_OP`` reads ``struct kvm_sev_cmd`` and the command's own struct
(``arch/x86/include/uapi/asm/kvm.h``): every field is stored as its C type (a wider value
truncated, as the ioctl would see it) and a field that is no integer is a TypeError naming
it, raised before the command takes an ASID, a page or an RMP entry.  The guest side's
registers are 64-bit.  The fuzzer's ``create_vcpu(2.5)``, accepted before and fatal at
LAUNCH_FINISH (``struct.error`` after the RMP and the digest changed), is a TypeError.
"""

from __future__ import annotations

import errno
import re
from typing import Any

import pytest
from snp_helpers import make_snp_vm

import guestmem
import guestmem_snp
from guestmem import uapi
from guestmem.backend import view
from guestmem_snp import (
    KVM_SEV_INIT2,
    KVM_SEV_SNP_LAUNCH_UPDATE,
    KvmSevInit,
    SevCmd,
    SnpLaunchUpdate,
)
from guestmem_snp.sev import SNP_POLICY_DEFAULT

PAGE = uapi.PAGE_SIZE


def _footprint(kvm: Any) -> tuple[Any, ...]:
    """What a command that went ahead would change: the RMP, the ASIDs, host pages."""
    host = guestmem_snp.snp_host(kvm)
    asids = tuple(a for a in range(1, 1024) if host.asids.in_use(a))
    return list(host.rmp.runs()), asids, kvm.host.allocated_pages, dict(view(kvm).counters)


def test_create_vcpu_with_a_float_id_is_a_typeerror_and_the_launch_goes_on() -> None:
    snp = make_snp_vm(launch=False)
    with pytest.raises(TypeError, match=r"^vcpu_id must be an integer"):
        snp.vm.create_vcpu(2.5)
    sev = snp.sev
    sev.snp_launch_start()
    digest = sev.snp_launch_finish()
    assert len(digest) == 48 and sorted(sev.vmsa_pfns) == [0]


@pytest.mark.parametrize(
    ("command", "name"),
    [
        (lambda sev: sev.init2(vmsa_features=1.5), "vmsa_features"),
        (lambda sev: sev.init2(ghcb_version="2"), "ghcb_version"),
        (lambda sev: sev.init2(flags=None), "flags"),
        (lambda sev: sev.vm.memory_encrypt_op(SevCmd(22.0, KvmSevInit())), "id"),
    ],
)
def test_init2_with_a_non_integer_field_takes_no_asid(command: Any, name: str) -> None:
    with guestmem.open("snp") as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_SNP_VM)
        sev = guestmem_snp.sev(vm)
        before = _footprint(kvm)
        with pytest.raises(TypeError, match=f"^{name} must be an integer"):
            command(sev)
        assert _footprint(kvm) == before and sev.asid == 0
        sev.init2()  # the VM is as new
        assert sev.asid != 0
        vm.close()


def test_wider_fields_are_truncated_as_the_ioctl_reads_them() -> None:
    """``__u32 id`` of ``KVM_SEV_INIT2 + 2**32`` is INIT2; a ``__u64`` policy of 2**64 more
    is the same policy; ``__u16 flags`` of 2**16 are 0."""
    with guestmem.open("snp") as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_SNP_VM)
        sev = guestmem_snp.sev(vm)
        vm.memory_encrypt_op(SevCmd(KVM_SEV_INIT2 + (1 << 32), KvmSevInit(ghcb_version=2 + (1 << 16))))
        assert sev.asid != 0 and sev.state.ghcb_version == 2
        sev.snp_launch_start(SNP_POLICY_DEFAULT + (1 << 64), flags=1 << 16)
        assert sev.policy == SNP_POLICY_DEFAULT
        vm.close()


def test_launch_update_with_non_integer_fields_changes_nothing() -> None:
    snp = make_snp_vm(launch=False)
    snp.private(0, 4 * PAGE)
    sev = snp.sev
    sev.snp_launch_start()
    before = _footprint(snp.kvm), sev.launch_digest
    for params, name in (
        (SnpLaunchUpdate(0.0, b"x" * PAGE, PAGE), "gfn_start"),
        (SnpLaunchUpdate(0, b"x" * PAGE, float(PAGE)), "len"),
        (SnpLaunchUpdate(0, b"x" * PAGE, PAGE, type="1"), "type"),
    ):
        with pytest.raises(TypeError, match=f"^{name} must be an integer"):
            snp.vm.memory_encrypt_op(SevCmd(KVM_SEV_SNP_LAUNCH_UPDATE, params))
    with pytest.raises(TypeError, match=r"^data must be a bytes-like object"):
        snp.vm.memory_encrypt_op(SevCmd(KVM_SEV_SNP_LAUNCH_UPDATE, SnpLaunchUpdate(0, "x" * PAGE, PAGE)))
    for call, name in (
        (lambda: sev.launch_update_data(0.0, b"x" * PAGE), "gpa"),
        (lambda: sev.launch_update_data(0, "x" * PAGE), "data"),
    ):
        with pytest.raises(TypeError, match=f"^{name} must be"):
            call()
    assert (_footprint(snp.kvm), sev.launch_digest) == before
    sev.launch_update_data(0, memoryview(b"y" * PAGE))  # any bytes-like source
    assert sev.launch_digest != before[1]


def test_the_guest_side_takes_integers_and_bytes() -> None:
    snp = make_snp_vm()
    snp.private(0, 2 * PAGE)
    g = snp.guest
    before = _footprint(snp.kvm)
    for call, name in (
        (lambda: g.pvalidate(0.5), "gpa"),
        (lambda: g.pvalidate_range(0, "4096"), "size"),
        (lambda: g.read(0, 1.0), "length"),
        (lambda: g.psc_msr(None, 1), "gfn"),
        (lambda: g.resume("0"), "ret"),
        (lambda: g.map_gpa_range(0.0, 1, 0), "args[0]"),
    ):
        with pytest.raises(TypeError, match=rf"^{re.escape(name)} must be an integer"):
            call()
    with pytest.raises(TypeError, match=r"^data must be a bytes-like object"):
        g.write(0, "x")
    assert _footprint(snp.kvm) == before
    assert g.pvalidate(0) == 0
    g.write(0, bytearray(b"ok"))
    assert g.read(0, 2) == b"ok"


@pytest.mark.parametrize("private", [True, False])
def test_a_guest_access_at_a_negative_gpa_is_einval(private: bool) -> None:
    """``SnpGuest.read``/``write`` take a gpa as ``Vcpu.access`` does: a negative one is
    EINVAL (its RMP check walks the page first: ``VcpuView.translate``), nothing changes."""
    snp = make_snp_vm()
    g = snp.guest
    before = _footprint(snp.kvm)
    for call in (
        lambda: g.read(-(1 << 63), 32, private=private),
        lambda: g.write(-PAGE, b"x", private=private),
    ):
        with pytest.raises(guestmem.KvmError) as info:
            call()
        assert info.value.errno == errno.EINVAL
    assert _footprint(snp.kvm) == before
