"""SNP launch: LAUNCH_START / LAUNCH_UPDATE / LAUNCH_FINISH (backends.md 2.4, P-1..P-5)."""

from __future__ import annotations

import errno
import struct

import pytest
from snp_helpers import MIB, SnpVm, make_snp_vm

from guestmem import uapi
from guestmem.errors import FailEntryExit, KvmError
from guestmem_snp.rmp import RmpState
from guestmem_snp.sev import (
    INITIAL_VMSA_GPA,
    KVM_SEV_SNP_PAGE_TYPE_CPUID,
    KVM_SEV_SNP_PAGE_TYPE_SECRETS,
    KVM_SEV_SNP_PAGE_TYPE_UNMEASURED,
    KVM_SEV_SNP_PAGE_TYPE_ZERO,
    SEV_RET_INVALID_GUEST_STATE,
    SEV_RET_INVALID_PARAM,
    SNP_POLICY_DEFAULT,
    SNP_POLICY_MASK_DEBUG,
    SNP_POLICY_MASK_MIGRATE_MA,
    SNP_POLICY_MASK_RSVD_MBO,
    SNP_POLICY_MASK_SINGLE_SOCKET,
    SnpLaunchUpdate,
)

PAGE = uapi.PAGE_SIZE


@pytest.fixture
def snp() -> SnpVm:
    """An SNP VM after ``KVM_SEV_INIT2`` whose launch is still to come: the tests make it."""
    return make_snp_vm(launch=False)


def launched(payload: list[tuple[int, bytes]], backend: str = "snp") -> SnpVm:
    snp = make_snp_vm(backend, launch=False)
    snp.private(0, 2 * MIB)
    snp.sev.snp_launch_start()
    for gpa, data in payload:
        snp.sev.launch_update_data(gpa, data)
    return snp


def errno_of(call: object) -> int:
    with pytest.raises(KvmError) as info:
        call()  # type: ignore[operator]
    assert info.value.errno is not None
    return info.value.errno


def test_launch_update_encrypts_in_place_into_private_memory() -> None:
    """2.4: the payload lands in the gmem pages, RMP Pre-Guest -> Guest-Valid, not immutable."""
    snp = launched([(0x1000, b"A" * PAGE + b"B" * PAGE)])
    for i, byte in enumerate(b"AB"):
        pfn = snp.pfn(0x1000 + i * PAGE)
        entry = snp.rmp.lookup(pfn)
        assert entry.state is RmpState.GUEST_VALID and not entry.immutable
        assert entry.gpa == 0x1000 + i * PAGE
        assert snp.kvm.host.read(pfn, 0, 4) == bytes([byte]) * 4
    counters = snp.vm.counters
    assert counters["copied_bytes"] == 2 * PAGE
    assert counters["rmpupdate"] == 1 + 2  # the guest context page (LAUNCH_START), the two pages
    assert snp.vm.gmem_pfn(0) is None  # nothing else was touched


def test_digest_depends_on_content_and_order() -> None:
    page_a, page_b = b"a" * PAGE, b"b" * PAGE
    d1 = launched([(0, page_a), (PAGE, page_b)]).sev.snp_launch_finish()
    d2 = launched([(0, page_a), (PAGE, page_b)]).sev.snp_launch_finish()
    d3 = launched([(PAGE, page_b), (0, page_a)]).sev.snp_launch_finish()
    d4 = launched([(0, page_a), (PAGE, b"c" * PAGE)]).sev.snp_launch_finish()
    assert d1 == d2
    assert len({d1, d3, d4}) == 3
    assert len(d1) == 48  # SHA-384


def test_unmeasured_contents_do_not_change_the_digest() -> None:
    digests = set()
    for fill in (b"x", b"y"):
        snp = make_snp_vm(launch=False)
        snp.private(0, MIB)
        snp.sev.snp_launch_start()
        snp.sev.launch_update_data(0, fill * PAGE, KVM_SEV_SNP_PAGE_TYPE_UNMEASURED)
        digests.add(snp.sev.snp_launch_finish())
    assert len(digests) == 1


def test_zero_and_secrets_pages() -> None:
    snp = make_snp_vm(launch=False)
    snp.private(0, MIB)
    snp.sev.snp_launch_start()
    snp.sev.launch_update_data(0, None, KVM_SEV_SNP_PAGE_TYPE_ZERO, length=2 * PAGE)
    snp.sev.launch_update_data(2 * PAGE, b"\xff" * PAGE, KVM_SEV_SNP_PAGE_TYPE_SECRETS)
    assert snp.kvm.host.read(snp.pfn(0), 0, 8) == bytes(8)
    secrets = snp.kvm.host.read(snp.pfn(2 * PAGE), 0, 48)
    assert secrets != b"\xff" * 48 and any(secrets)
    assert snp.vm.counters["copied_bytes"] == PAGE  # ZERO pages are not copied
    assert all(snp.rmp.lookup(snp.pfn(i * PAGE)).validated for i in range(3))


def test_bad_cpuid_page_is_reclaimed_and_reported() -> None:
    """2.4: firmware rejects the CPUID page -> snp_page_reclaim, error copied back, -EIO."""
    snp = make_snp_vm(launch=False)
    snp.private(0, MIB)
    snp.sev.snp_launch_start()
    table = struct.pack("<I", 65) + bytes(PAGE - 4)
    params = SnpLaunchUpdate(0, table, PAGE, KVM_SEV_SNP_PAGE_TYPE_CPUID)
    assert errno_of(lambda: snp.sev.snp_launch_update(params)) == errno.EIO
    assert params.error == SEV_RET_INVALID_PARAM
    assert not snp.rmp.is_assigned(snp.pfn(0))
    ok = SnpLaunchUpdate(0, struct.pack("<I", 3) + bytes(PAGE - 4), PAGE, KVM_SEV_SNP_PAGE_TYPE_CPUID)
    snp.sev.snp_launch_update(ok)
    assert ok.len == 0 and snp.rmp.lookup(snp.pfn(0)).validated


def test_partial_progress_advances_the_parameters() -> None:
    """P-5: a failure after >= 1 page returns the count; the struct is advanced, call again.

    The next call fails at its first page (P-3, kvm_gmem_populate -EINVAL): snp_launch_update
    turns every negative count into -EIO.
    """
    snp = make_snp_vm(launch=False)
    snp.private(0, 2 * PAGE)  # the third page is shared: P-3 stops there
    snp.sev.snp_launch_start()
    params = SnpLaunchUpdate(0, b"z" * 3 * PAGE, 3 * PAGE)
    snp.sev.snp_launch_update(params)
    assert (params.gfn_start, params.len, len(params.data or b"")) == (2, PAGE, PAGE)
    assert errno_of(lambda: snp.sev.snp_launch_update(params)) == errno.EIO
    assert params.gfn_start == 2 and params.error == 0  # not a firmware error


def test_no_page_is_prepared_before_the_launch_update(snp: SnpVm) -> None:
    """P-4 (kvm_gmem_populate refuses a prepared folio) cannot be reached on SNP: before the
    launch no guest access enters the guest (SNP-2.4: VMRUN fails) and KVM_PRE_FAULT_MEMORY is
    refused (PF-2), so nothing prepares a folio; LAUNCH_UPDATE then populates the page."""
    snp.private(0, MIB)
    with pytest.raises(FailEntryExit):
        snp.vcpu.access(0, private=True)
    assert errno_of(lambda: snp.vcpu.pre_fault_memory(0, PAGE)) == errno.EOPNOTSUPP
    assert snp.vm.gmem_pfn(0) is None
    snp.sev.snp_launch_start()
    snp.sev.launch_update_data(0, b"q" * PAGE)
    assert snp.rmp.lookup(snp.pfn(0)).validated


def test_unreadable_source_stops_at_its_page(snp: SnpVm) -> None:
    """sev_gmem_post_populate: copy_from_user faults on the page past the readable source.

    Pages before it are launched and counted (partial progress, success); the next call
    fails at its first page with -EIO and leaves that page unassigned.
    """
    snp.private(0, MIB)
    snp.sev.snp_launch_start()
    params = SnpLaunchUpdate(0, b"r" * (PAGE + 100), 3 * PAGE)
    snp.sev.snp_launch_update(params)
    assert (params.gfn_start, params.len) == (1, 2 * PAGE)
    assert snp.rmp.lookup(snp.pfn(0)).validated
    assert errno_of(lambda: snp.sev.snp_launch_update(params)) == errno.EIO
    assert not snp.rmp.is_assigned(snp.pfn(PAGE)) and params.gfn_start == 1


def test_launch_update_after_finish_is_a_firmware_error(snp: SnpVm) -> None:
    """snp_launch_update checks only the context; the firmware refuses a launched guest.

    SNP_LAUNCH_UPDATE fails with INVALID_GUEST_STATE: the page is reclaimed (snp_page_reclaim)
    and the ioctl returns -EIO with the firmware error in ``error``.
    """
    snp.sev.snp_launch_start()
    snp.sev.snp_launch_finish()
    snp.private(0, MIB)
    params = SnpLaunchUpdate(0, b"x" * PAGE, PAGE)
    before = snp.vm.counters["psp_commands"]
    assert errno_of(lambda: snp.sev.snp_launch_update(params)) == errno.EIO
    assert params.error == SEV_RET_INVALID_GUEST_STATE and params.len == PAGE
    assert not snp.rmp.is_assigned(snp.pfn(0))
    assert snp.vm.counters["psp_commands"] - before == 2  # LAUNCH_UPDATE, PAGE_RECLAIM
    assert not snp.vm.dead


def test_failed_page_reclaim_bugs_the_vm_and_leaks(snp: SnpVm, monkeypatch: pytest.MonkeyPatch) -> None:
    """snp_page_reclaim: SNP_PAGE_RECLAIM failing is KVM_BUG (VM dead) + snp_leak_pages."""
    snp.private(0, MIB)
    snp.sev.snp_launch_start()
    monkeypatch.setattr(snp.rmp, "page_reclaim", lambda pfn, npages=1: 1)
    table = struct.pack("<I", 65) + bytes(PAGE - 4)
    params = SnpLaunchUpdate(0, table, PAGE, KVM_SEV_SNP_PAGE_TYPE_CPUID)
    assert errno_of(lambda: snp.sev.snp_launch_update(params)) == errno.EIO
    pfn = snp.pfn(0)
    assert snp.vm.dead and snp.sev.host.leaked.get(pfn)
    assert snp.rmp.lookup(pfn).state is RmpState.PRE_GUEST  # never given back


@pytest.mark.parametrize(
    ("params", "err"),
    [
        (SnpLaunchUpdate(0, b"x" * PAGE, PAGE, type=2), errno.EINVAL),  # VMSA is KVM's only
        (SnpLaunchUpdate(0, b"x" * PAGE, PAGE, flags=1), errno.EINVAL),
        (SnpLaunchUpdate(0, b"x" * PAGE, 100), errno.EINVAL),
        (SnpLaunchUpdate(0, b"x" * PAGE, 0), errno.EINVAL),
        (SnpLaunchUpdate(0, b"x", PAGE), errno.EIO),  # copy_from_user -EFAULT, count < 0
        (SnpLaunchUpdate(0, None, PAGE), errno.EIO),
        (SnpLaunchUpdate(0x10000, b"x" * PAGE, PAGE), errno.EINVAL),  # P-2: no memslot there
    ],
)
def test_launch_update_argument_checks(snp: SnpVm, params: SnpLaunchUpdate, err: int) -> None:
    snp.private(0, MIB)
    snp.sev.snp_launch_start()
    assert errno_of(lambda: snp.sev.snp_launch_update(params)) == err


def test_command_order() -> None:
    """LAUNCH_* need INIT2 (ENOTTY), a started launch (EINVAL), and end at FINISH."""
    snp = make_snp_vm(init=False)
    assert errno_of(snp.sev.snp_launch_start) == errno.ENOTTY
    assert errno_of(lambda: snp.sev.launch_update_data(0, b"x" * PAGE)) == errno.EINVAL
    assert errno_of(snp.sev.snp_launch_finish) == errno.ENOTTY
    snp = make_snp_vm(launch=False)
    assert errno_of(snp.sev.snp_launch_finish) == errno.EINVAL
    snp.sev.snp_launch_start()
    assert errno_of(snp.sev.snp_launch_start) == errno.EINVAL
    snp.sev.snp_launch_finish()
    snp.private(0, MIB)
    assert errno_of(lambda: snp.sev.launch_update_data(0, b"x" * PAGE)) == errno.EIO  # firmware
    assert errno_of(snp.sev.snp_launch_finish) == errno.EINVAL


@pytest.mark.parametrize(
    "policy",
    [
        SNP_POLICY_DEFAULT & ~SNP_POLICY_MASK_RSVD_MBO,
        SNP_POLICY_DEFAULT | 1 << 30,
        SNP_POLICY_DEFAULT | 1 << 21,
        SNP_POLICY_DEFAULT | SNP_POLICY_MASK_MIGRATE_MA,
    ],
)
def test_launch_start_policy_checks(snp: SnpVm, policy: int) -> None:
    """snp_launch_start: bits outside SNP_POLICY_MASK_VALID (6.18: no MIGRATE_MA) or no MBO -> EINVAL."""
    assert errno_of(lambda: snp.sev.snp_launch_start(policy)) == errno.EINVAL
    assert snp.sev.gctx_pfn is None


@pytest.mark.parametrize(
    "policy",
    [
        SNP_POLICY_MASK_RSVD_MBO,  # SMT=0 is fine: 6.18 requires only the MBO bit
        SNP_POLICY_DEFAULT | SNP_POLICY_MASK_SINGLE_SOCKET,
        SNP_POLICY_DEFAULT | SNP_POLICY_MASK_DEBUG | 0xFFFF,  # API major/minor, DEBUG
    ],
)
def test_launch_start_accepts_every_bit_of_the_6_18_mask(snp: SnpVm, policy: int) -> None:
    """snp_launch_start: SNP_POLICY_MASK_VALID has SMT, DEBUG and SINGLE_SOCKET; none is refused."""
    snp.sev.snp_launch_start(policy)
    assert snp.sev.policy == policy and snp.sev.gctx_pfn is not None


def test_launch_start_creates_a_firmware_context_page(snp: SnpVm) -> None:
    snp.sev.snp_launch_start()
    gctx = snp.sev.gctx_pfn
    assert gctx is not None and snp.rmp.lookup(gctx).state is RmpState.FIRMWARE


def test_launch_finish_measures_each_vmsa() -> None:
    """2.4: LAUNCH_FINISH turns each vCPU's VMSA into a measured guest page at INITIAL_VMSA_GPA."""
    one = make_snp_vm(launch=False)
    one.sev.snp_launch_start()
    d_one = one.sev.snp_launch_finish()
    two = make_snp_vm(launch=False)
    two.vm.create_vcpu(1)
    two.sev.snp_launch_start()
    d_two = two.sev.snp_launch_finish()
    assert d_one != d_two
    vmsa = two.rmp.lookup(two.sev.vmsa_pfns[1])
    assert vmsa.vmsa and vmsa.gpa == INITIAL_VMSA_GPA and vmsa.state is RmpState.GUEST_VALID
