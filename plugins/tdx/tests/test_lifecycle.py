"""The TD's life through the uAPI: VM types, KVM_TDX_* in every state with the kernel's
errno (``arch/x86/kvm/vmx/tdx.c`` of Linux 6.18), KeyIDs, HKID release and its leaks."""

from __future__ import annotations

import errno
from typing import Any

import attrs
import pytest
from tdx_helpers import MIB, PAGE, PRIVATE, make_td

import guestmem
import guestmem_tdx
from guestmem import uapi
from guestmem.errors import KvmError
from guestmem_tdx import abi
from guestmem_tdx import status as st
from guestmem_tdx.kvm import TdState


def expect(err: int, fn: Any, *args: Any, **kwargs: Any) -> KvmError:
    with pytest.raises(KvmError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, info.value
    return info.value


@pytest.fixture
def kvm() -> Any:
    with guestmem.open("tdx") as k:
        yield k


# --- the host's VM types ---------------------------------------------------------------------------
def test_vm_types_and_capabilities(kvm: Any) -> None:
    """CAP-6: DEFAULT, SW_PROTECTED and TDX (0x23); a TD has private memory (CAP-5), so no
    INIT_SHARED gmem (CAP-3), attributes (CAP-4), no read-only memslots (S-4), one
    memslot address space (``kvm_arch_nr_memslot_as_ids``)."""
    assert kvm.check_extension(uapi.KVM_CAP_VM_TYPES) == 0x23
    with kvm.create_vm(uapi.KVM_X86_TDX_VM) as vm:
        assert vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == uapi.GUEST_MEMFD_FLAG_MMAP
        assert vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == PRIVATE
        assert vm.check_extension(uapi.KVM_CAP_READONLY_MEM) == 0
        assert vm.check_extension(uapi.KVM_CAP_MULTI_ADDRESS_SPACE) == 1
        expect(
            errno.EINVAL,
            vm.create_guest_memfd,
            MIB,
            uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED,
        )
    expect(errno.EINVAL, kvm.create_vm, uapi.KVM_X86_SNP_VM)


def test_other_vm_types_are_left_to_the_core(kvm: Any) -> None:
    """A DEFAULT VM on a TDX host has no TDX state: vCPUs right away, and
    KVM_MEMORY_ENCRYPT_OP is ENOTTY (``vt_mem_enc_ioctl``: not a TD)."""
    for vm_type in (uapi.KVM_X86_DEFAULT_VM, uapi.KVM_X86_SW_PROTECTED_VM):
        with kvm.create_vm(vm_type) as vm:
            assert guestmem.backend.view(vm).arch is None
            vm.create_vcpu(0)
            expect(errno.ENOTTY, vm.memory_encrypt_op, abi.TdxCmd(abi.KVM_TDX_CAPABILITIES))
            expect(errno.ENOTTY, guestmem_tdx.tdx, vm)


# --- KVM_TDX_CAPABILITIES ------------------------------------------------------------------------
def test_capabilities(kvm: Any) -> None:
    """``tdx_get_capabilities``: SEPT_VE_DISABLE is the only attribute, XFAM as the module
    and host allow, the configurable CPUID leaves; flags EINVAL, too little room E2BIG."""
    with kvm.create_vm(uapi.KVM_X86_TDX_VM) as vm:
        tdx = guestmem_tdx.tdx(vm)
        caps = tdx.capabilities()
        assert caps.supported_attrs == abi.TDX_TD_ATTR_SEPT_VE_DISABLE
        assert caps.supported_xfam & abi.XFEATURE_MASK_FPSSE == abi.XFEATURE_MASK_FPSSE
        assert caps.user_tdvmcallinfo_1_r11 == abi.TDVMCALLINFO_SETUP_EVENT_NOTIFY_INTERRUPT
        assert {(e.function, e.index) for e in caps.cpuid.entries} >= {(0x80000008, 0), (7, 0)}
        small = abi.KvmTdxCapabilities(cpuid=abi.KvmCpuid2(nent=2))
        expect(errno.E2BIG, vm.memory_encrypt_op, abi.TdxCmd(abi.KVM_TDX_CAPABILITIES, data=small))
        expect(errno.EINVAL, vm.memory_encrypt_op, abi.TdxCmd(abi.KVM_TDX_CAPABILITIES, 1, caps))
        expect(errno.EFAULT, vm.memory_encrypt_op, abi.TdxCmd(abi.KVM_TDX_CAPABILITIES))
        expect(
            errno.EINVAL, vm.memory_encrypt_op, abi.TdxCmd(abi.KVM_TDX_CAPABILITIES, data=caps, hw_error=1)
        )


def test_no_terminate_vm_in_618(kvm: Any) -> None:
    """6.18's ``tdx_vm_ioctl`` knows CAPABILITIES, INIT_VM and FINALIZE_VM; id 6 (the
    unmerged KVM_TDX_TERMINATE_VM) and vCPU commands on the VM fd are EINVAL."""
    with kvm.create_vm(uapi.KVM_X86_TDX_VM) as vm:
        for cmd_id in (6, abi.KVM_TDX_INIT_VCPU, abi.KVM_TDX_INIT_MEM_REGION):
            expect(errno.EINVAL, vm.memory_encrypt_op, abi.TdxCmd(cmd_id))


# --- KVM_TDX_INIT_VM ------------------------------------------------------------------------------
def _init(vm: Any, **fields: Any) -> None:
    vm.memory_encrypt_op(abi.TdxCmd(abi.KVM_TDX_INIT_VM, data=abi.KvmTdxInitVm(**fields)))


@pytest.mark.parametrize(
    ("fields", "err"),
    [
        ({"attributes": abi.TDX_TD_ATTR_DEBUG}, errno.EINVAL),  # KVM_SUPPORTED_TD_ATTRS
        ({"attributes": abi.TDX_TD_ATTR_PKS}, errno.EINVAL),
        ({"xfam": 1 << 17}, errno.EINVAL),  # not in supported_xcr0 | supported_xss
        ({"reserved": (1,) + (0,) * 11}, errno.EINVAL),
        ({"cpuid": abi.KvmCpuid2([])}, errno.EINVAL),  # no 0x80000008: no GPAW
        ({"cpuid": abi.KvmCpuid2([abi.cpuid_gpaw(50)])}, errno.EINVAL),
        ({"cpuid": abi.KvmCpuid2([abi.cpuid_gpaw(48), abi.KvmCpuidEntry2(4)])}, errno.EINVAL),
        ({"cpuid": abi.KvmCpuid2([abi.cpuid_gpaw(48), abi.KvmCpuidEntry2(7, 0, ebx=1 << 11)])}, errno.EINVAL),
        ({"cpuid": abi.KvmCpuid2([abi.cpuid_gpaw(48)], nent=257)}, errno.E2BIG),
        ({"cpuid": abi.KvmCpuid2([abi.cpuid_gpaw(48)], padding=1)}, errno.EINVAL),
    ],
)
def test_init_vm_checks(kvm: Any, fields: dict[str, Any], err: int) -> None:
    """``tdx_td_init``/``setup_tdparams``: each bad TD_PARAMS input is refused before any
    KeyID is taken."""
    pool = guestmem_tdx.tdx_host(kvm).keyids
    with kvm.create_vm(uapi.KVM_X86_TDX_VM) as vm:
        expect(err, _init, vm, **fields)
        assert pool.available == pool.nr and guestmem_tdx.tdx(vm).td_state is TdState.UNINITIALIZED


def test_init_vm(kvm: Any) -> None:
    """KVM_TDX_INIT_VM: an HKID, MNG.CREATE, KEY.CONFIG on every package, six TDCS pages,
    MNG.INIT; XFAM gets the fixed-1 bits; a second INIT_VM is EINVAL."""
    with kvm.create_vm(uapi.KVM_X86_TDX_VM) as vm:
        tdx = guestmem_tdx.tdx(vm)
        tdx.init_vm(xfam=0)
        c = vm.counters
        assert (
            c["seamcall.TDH.MNG.CREATE"],
            c["seamcall.TDH.MNG.KEY.CONFIG"],
            c["seamcall.TDH.MNG.ADDCX"],
        ) == (1, 2, 6)
        assert tdx.td_state is TdState.INITIALIZED and tdx.hkid == 32
        assert tdx.td.lifecycle is guestmem_tdx.Lifecycle.KEYS_CONFIGURED
        assert tdx.td.xfam == abi.XFEATURE_MASK_FPSSE
        expect(errno.EINVAL, tdx.init_vm)
        expect(errno.EINVAL, vm.memory_encrypt_op, abi.TdxCmd(abi.KVM_TDX_INIT_VM, flags=1))


def test_gpaw52_needs_five_level_ept(kvm: Any) -> None:
    """``setup_tdparams_eptp_controls``: GPAW 52 only with 5-level EPT; it moves the shared
    bit to 51."""
    with kvm.create_vm(uapi.KVM_X86_TDX_VM) as vm:
        guestmem_tdx.tdx(vm).init_vm(gpaw=52)
        assert guestmem_tdx.tdx(vm).state.shared_bit == 51
    host = guestmem_tdx.tdx_host(kvm)
    host.sysinfo = attrs.evolve(host.sysinfo, ept_5level=False)
    with kvm.create_vm(uapi.KVM_X86_TDX_VM) as vm:
        expect(errno.EINVAL, guestmem_tdx.tdx(vm).init_vm, gpaw=52)


def test_keyid_exhaustion(kvm: Any) -> None:
    """``tdx_guest_keyid_alloc`` on a full pool: KVM_TDX_INIT_VM fails with ENOSPC; a TD's
    destruction gives its HKID back."""
    host = guestmem_tdx.tdx_host(kvm)
    host.keyids = guestmem_tdx.KeyIdPool(start=60, nr=2)
    a, b, c = (kvm.create_vm(uapi.KVM_X86_TDX_VM) for _ in range(3))
    guestmem_tdx.tdx(a).init_vm()
    guestmem_tdx.tdx(b).init_vm()
    assert {guestmem_tdx.tdx(a).hkid, guestmem_tdx.tdx(b).hkid} == {60, 61}
    err = expect(errno.ENOSPC, guestmem_tdx.tdx(c).init_vm)
    assert err.rule == "TDX-1.1"
    a.close()
    guestmem_tdx.tdx(c).init_vm()
    assert guestmem_tdx.tdx(c).hkid == 60
    b.close()
    c.close()
    assert host.keyids.available == 2


def test_every_package_needs_an_online_cpu(kvm: Any) -> None:
    """``__tdx_td_init``: a package without an online CPU cannot get the key: EIO, and the
    HKID goes back."""
    host = guestmem_tdx.tdx_host(kvm)
    host.online_packages[1] = False
    with kvm.create_vm(uapi.KVM_X86_TDX_VM) as vm:
        expect(errno.EIO, guestmem_tdx.tdx(vm).init_vm)
        assert host.keyids.available == host.keyids.nr and not host.module.tds


def test_init_vm_failures_tear_the_td_down(kvm: Any) -> None:
    """MNG.INIT refusing TD_PARAMS (OPERAND_INVALID): EINVAL with hw_error, the TD torn down
    (HKID back, pages reclaimed), and INIT_VM can be tried again; MNG.CREATE without entropy
    is EAGAIN.  KEY.CONFIG failing is ``KVM_BUG_ON``: EIO and the VM is bugged."""
    host = guestmem_tdx.tdx_host(kvm)
    with kvm.create_vm(uapi.KVM_X86_TDX_VM) as vm:
        host.module.inject("TDH.MNG.INIT", st.with_operand(st.TDX_OPERAND_INVALID, 0x40))
        cmd = abi.TdxCmd(abi.KVM_TDX_INIT_VM, data=abi.KvmTdxInitVm())
        expect(errno.EINVAL, vm.memory_encrypt_op, cmd)
        assert cmd.hw_error == st.with_operand(st.TDX_OPERAND_INVALID, 0x40)
        assert not host.module.pamt and host.keyids.available == host.keyids.nr
        guestmem_tdx.tdx(vm).init_vm()
    with kvm.create_vm(uapi.KVM_X86_TDX_VM) as vm:
        host.module.inject("TDH.MNG.CREATE", st.TDX_RND_NO_ENTROPY)
        expect(errno.EAGAIN, guestmem_tdx.tdx(vm).init_vm)  # the user may retry
        assert host.keyids.available == host.keyids.nr and not host.module.pamt
        host.module.inject("TDH.MNG.KEY.CONFIG", st.TDX_KEY_STATE_INCORRECT)
        expect(errno.EIO, guestmem_tdx.tdx(vm).init_vm)
        assert guestmem.backend.view(vm).bugged
        expect(errno.EIO, vm.create_vcpu, 0)
    assert not host.module.pamt and host.keyids.available == host.keyids.nr


# --- vCPUs ----------------------------------------------------------------------------------------
def test_vcpus_after_init_vm_only(kvm: Any) -> None:
    """``tdx_vcpu_create``: KVM_CREATE_VCPU before KVM_TDX_INIT_VM is EIO (the id stays
    free); no more vCPUs than host CPUs (EINVAL)."""
    host = guestmem_tdx.tdx_host(kvm)
    host.sysinfo = attrs.evolve(host.sysinfo, nr_cpus=2)
    with kvm.create_vm(uapi.KVM_X86_TDX_VM) as vm:
        expect(errno.EIO, vm.create_vcpu, 0)
        guestmem_tdx.tdx(vm).init_vm()
        vm.create_vcpu(0)
        vm.create_vcpu(1)
        expect(errno.EINVAL, vm.create_vcpu, 2)


def test_init_vcpu(kvm: Any) -> None:
    """``tdx_vcpu_init``: TDVPR + 5 TDCX pages, VP.CREATE/ADDCX/INIT; flags or a second
    INIT_VCPU are EINVAL; unknown vCPU commands EINVAL; KVM_RUN before it EINVAL."""
    with kvm.create_vm(uapi.KVM_X86_TDX_VM) as vm:
        tdx = guestmem_tdx.tdx(vm)
        tdx.init_vm()
        vcpu = vm.create_vcpu(0)
        expect(errno.EINVAL, vcpu.access, 0, 1)  # tdx_vcpu_pre_run
        expect(errno.EINVAL, vcpu.memory_encrypt_op, abi.TdxCmd(abi.KVM_TDX_INIT_VCPU, flags=1))
        tdx.init_vcpu(vcpu)
        c = vm.counters
        assert (c["seamcall.TDH.VP.CREATE"], c["seamcall.TDH.VP.ADDCX"], c["seamcall.TDH.VP.INIT"]) == (
            1,
            5,
            1,
        )
        assert tdx.vcpu_state(vcpu).state is guestmem_tdx.VcpuTdState.INITIALIZED
        expect(errno.EINVAL, tdx.init_vcpu, vcpu)
        expect(errno.EINVAL, vcpu.memory_encrypt_op, abi.TdxCmd(abi.KVM_TDX_FINALIZE_VM))
        expect(errno.EINVAL, vcpu.memory_encrypt_op, abi.TdxCmd(abi.KVM_TDX_INIT_VCPU, hw_error=1))
        expect(errno.EINVAL, vcpu.access, 0, 1)  # still not RUNNABLE
        vcpu.close()


# --- KVM_TDX_FINALIZE_VM --------------------------------------------------------------------------
def test_finalize(kvm: Any) -> None:
    """``tdx_td_finalize``: EINVAL before INIT_VM and once RUNNABLE; MR.FINALIZE without an
    initialised vCPU (TDX_NO_VCPUS) is ``KVM_BUG_ON``: EIO, hw_error, the VM bugged."""
    with kvm.create_vm(uapi.KVM_X86_TDX_VM) as vm:
        tdx = guestmem_tdx.tdx(vm)
        expect(errno.EINVAL, tdx.finalize)
        tdx.init_vm()
        cmd = abi.TdxCmd(abi.KVM_TDX_FINALIZE_VM)
        expect(errno.EIO, vm.memory_encrypt_op, cmd)
        assert cmd.hw_error == st.TDX_NO_VCPUS and guestmem.backend.view(vm).bugged
    td = make_td(kvm=kvm)
    td.module.inject("TDH.MR.FINALIZE", st.TDX_OPERAND_BUSY)
    expect(errno.EBUSY, td.tdx.finalize)
    td.tdx.finalize()
    assert td.tdx.td_state is TdState.RUNNABLE and len(td.tdx.mrtd) == 48
    expect(errno.EINVAL, td.tdx.finalize)
    expect(errno.EINVAL, td.tdx.init_vcpu, td.vcpu)  # tdx_vcpu_ioctl: once RUNNABLE
    td.close()


def test_pre_fault_only_after_finalize(kvm: Any) -> None:
    """PF-2 (``tdx_td_finalize`` sets ``pre_fault_allowed``): EOPNOTSUPP before, afterwards a
    pre-fault AUGs the pages (PENDING: the guest still has to accept them)."""
    td = make_td(kvm=kvm)
    expect(errno.EOPNOTSUPP, td.vcpu.pre_fault_memory, 0, 2 * MIB)
    td.tdx.finalize()
    assert td.vcpu.pre_fault_memory(0, 2 * MIB) == 0
    assert td.vm.counters["seamcall.TDH.MEM.PAGE.AUG"] == 512
    assert td.module.tds[td.tdx.td.tdr].leaf_state(5) is guestmem_tdx.SeptState.PENDING
    td.close()


# --- KVM_TDX_INIT_MEM_REGION ------------------------------------------------------------------------
def _region(
    vcpu: Any, region: abi.KvmTdxInitMemRegion, flags: int = abi.KVM_TDX_MEASURE_MEMORY_REGION
) -> None:
    vcpu.memory_encrypt_op(abi.TdxCmd(abi.KVM_TDX_INIT_MEM_REGION, flags, region))


def test_init_mem_region_checks(kvm: Any) -> None:
    """``tdx_vcpu_init_mem_region``: flags, alignment, size, the shared bit: EINVAL; the
    gfn must be private (P-3: EINVAL) and not yet added (P-4: EEXIST)."""
    td = make_td(kvm=kvm, private=False)
    vcpu, page = td.vcpu, bytes(PAGE)
    expect(errno.EINVAL, _region, vcpu, abi.KvmTdxInitMemRegion(0, 0, 1, page), flags=2)
    expect(errno.EFAULT, vcpu.memory_encrypt_op, abi.TdxCmd(abi.KVM_TDX_INIT_MEM_REGION))
    for bad in (
        abi.KvmTdxInitMemRegion(1, 0, 1, page),
        abi.KvmTdxInitMemRegion(0, 0x800, 1, page),
        abi.KvmTdxInitMemRegion(0, 0, 0, page),
        abi.KvmTdxInitMemRegion(0, 1 << 47, 1, page),
    ):
        expect(errno.EINVAL, _region, vcpu, bad)
    err = expect(errno.EINVAL, _region, vcpu, abi.KvmTdxInitMemRegion(0, 0, 1, page))
    assert err.rule == "P-3"
    td.vm.set_memory_attributes(0, td.size, PRIVATE)
    _region(vcpu, abi.KvmTdxInitMemRegion(0, 0, 1, page))
    err = expect(errno.EEXIST, _region, vcpu, abi.KvmTdxInitMemRegion(0, 0, 1, page))
    assert err.rule == "P-4"
    td.close()


def test_init_mem_region_progress_and_costs(kvm: Any) -> None:
    """Page by page: kvm_tdp_map_page (SEPT.ADD, premap count), PAGE.ADD (a 4 KiB copy),
    16 MR.EXTEND when measured; a source that ends early is EFAULT with the region
    advanced past the pages added."""
    td = make_td(kvm=kvm)
    region = abi.KvmTdxInitMemRegion(0x10000, 0, 3, bytes(2 * PAGE))
    expect(errno.EFAULT, _region, td.vcpu, region)
    assert (region.gpa, region.nr_pages, region.source_addr) == (2 * PAGE, 1, 0x10000 + 2 * PAGE)
    c = td.vm.counters
    assert (c["seamcall.TDH.MEM.PAGE.ADD"], c["seamcall.TDH.MR.EXTEND"], c["copied_bytes"]) == (
        2,
        32,
        2 * PAGE,
    )
    assert td.tdx.nr_premapped == 0
    td.tdx.init_mem_region(td.vcpu, 4 * PAGE, b"x", measure=False)
    assert td.vm.counters["seamcall.TDH.MR.EXTEND"] == 32
    td.tdx.finalize()
    td.close()


def test_init_mem_region_page_add_failure_blocks_finalize(kvm: Any) -> None:
    """A PAGE.ADD that fails (-EIO, no KVM_BUG_ON) leaves the leaf counted in nr_premapped:
    FINALIZE is EINVAL until the page is zapped (``tdx_sept_zap_private_spte`` takes it off
    the count)."""
    td = make_td(kvm=kvm)
    td.module.inject("TDH.MEM.PAGE.ADD", st.TDX_KEY_STATE_INCORRECT)
    expect(errno.EIO, td.tdx.init_mem_region, td.vcpu, 0, b"boot")
    assert td.tdx.nr_premapped == 1 and not guestmem.backend.view(td.vm).bugged
    err = expect(errno.EINVAL, td.tdx.finalize)
    assert err.rule == "TDX-1.4"
    td.gmem.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, 0, PAGE)
    assert td.tdx.nr_premapped == 0
    assert td.vm.counters["tdx.premapped_zapped"] == 1
    td.tdx.finalize()
    td.close()


# --- HKID release ---------------------------------------------------------------------------------------
def test_teardown_releases_the_hkid_and_every_page(kvm: Any) -> None:
    """``tdx_mmu_release_hkid`` at pre-destroy (VP.FLUSH per loaded vCPU, VPFLUSHDONE,
    CACHE.WB per package, KEY.FREEID), then RECLAIM of every S-EPT, TDVPS, TDCS page and
    the TDR: the PAMT is empty and the HKID back in the pool."""
    td = make_td(kvm=kvm, nvcpus=2, finalize=True)
    guest = td.guest
    assert guest.accept_memory(0, 2 * MIB)
    vm = td.vm
    hkid = td.tdx.hkid
    td.close()
    c = vm.counters
    assert c["seamcall.TDH.VP.FLUSH"] == 2 and c["seamcall.TDH.MNG.VPFLUSHDONE"] == 1
    assert c["seamcall.TDH.PHYMEM.CACHE.WB"] == 2 and c["seamcall.TDH.MNG.KEY.FREEID"] == 1
    assert c["seamcall.TDH.PHYMEM.PAGE.RECLAIM"] == 3 + 2 * 6 + 6 + 1  # S-EPT, vCPUs, TDCS, TDR
    host = guestmem_tdx.tdx_host(kvm)
    assert not host.module.pamt and not host.module.tds and not host.leaked
    assert hkid not in host.keyids.in_use and host.nr_configured_hkid == 0


def test_cache_wb_is_resumed(kvm: Any) -> None:
    """``smp_func_do_phymem_cache_wb``: TDX_INTERRUPTED_RESUMABLE is retried with resume."""
    td = make_td(kvm=kvm, finalize=True)
    td.module.inject("TDH.PHYMEM.CACHE.WB", st.TDX_INTERRUPTED_RESUMABLE, 3)
    vm = td.vm
    td.close()
    assert vm.counters["seamcall.TDH.PHYMEM.CACHE.WB"] == 5
    assert not guestmem_tdx.tdx_host(kvm).module.pamt


@pytest.mark.parametrize(
    ("leaf", "status", "bugged"),
    [
        ("TDH.MNG.VPFLUSHDONE", st.TDX_FLUSHVP_NOT_DONE, False),
        ("TDH.MNG.VPFLUSHDONE", st.TDX_LIFECYCLE_STATE_INCORRECT, True),
        ("TDH.MNG.KEY.FREEID", st.TDX_WBCACHE_NOT_COMPLETE, True),
    ],
)
def test_a_failed_release_leaks_the_hkid_forever(kvm: Any, leaf: str, status: int, bugged: bool) -> None:
    """When VPFLUSHDONE or KEY.FREEID fails the HKID is leaked ("HKID %d is leaked"): it never
    returns to the pool, and no TD page can be reclaimed (they are leaked too)."""
    td = make_td(kvm=kvm, finalize=True)
    host = guestmem_tdx.tdx_host(kvm)
    hkid, view = td.tdx.hkid, guestmem.backend.view(td.vm)
    td.module.inject(leaf, status)
    td.close()
    assert view.bugged is bugged
    assert hkid in host.keyids.leaked and hkid in host.keyids.in_use
    assert host.module.pamt  # TDR, TDCS, TDVPS and S-EPT pages stay with the TD
    assert all(why for _, _, why in host.leaked_runs())
    guestmem_tdx.check_tdx_host(kvm)
