"""KVM's TDX code (``arch/x86/kvm/vmx/tdx.c`` of Linux 6.18): ``struct kvm_tdx`` and
``struct vcpu_tdx``, the ``KVM_MEMORY_ENCRYPT_OP`` sub-commands, and the mirror-TDP
callbacks that turn S-EPT changes into SEAMCALLs.

A :class:`KvmTdx` is what ``guestmem_vm_init`` returns for a ``KVM_X86_TDX_VM`` (it is
``vm.arch``); each method names the kernel function it follows and keeps its order of
checks and errnos.  The TDX module behind it is the host's
:class:`~guestmem_tdx.module.TdxModule`; every SEAMCALL KVM issues is counted in
``vm.counters`` (``seamcalls`` and ``seamcall.<LEAF>``).

Removal follows 6.18 exactly: per 4 KiB leaf BLOCK, TRACK (epoch bump and a kick of every
vCPU), REMOVE, PHYMEM.PAGE.WBINVD and a MOVDIR64B clear; ``TDX_OPERAND_BUSY`` is retried
once with vCPU entry blocked; any other failure is ``KVM_BUG_ON`` (the VM is bugged) and
the page is leaked.  The HKID is released at VM pre-destroy, after every guest_memfd is
gone, so no private leaf is left to zap by then: 6.18 has no ``KVM_TDX_TERMINATE_VM``.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable
from typing import Any, Final

import attrs

from guestmem import uapi
from guestmem.backend import Leaf, VcpuView, VmView, view
from guestmem.errors import GuestExit, HypercallExit, InternalErrorExit, KvmError, MemoryFault, MmioExit
from guestmem_tdx import abi
from guestmem_tdx import status as st
from guestmem_tdx.host import TdxHost
from guestmem_tdx.module import MIN_NUM_TDCS_PAGES, MIN_TDVPS_PAGES, Outcome, Td, Vp

PAGE_SHIFT: Final = uapi.PAGE_SHIFT
PAGE_SIZE: Final = uapi.PAGE_SIZE
#: ``TDX_SEAMCALL_RETRIES``: TDH.PHYMEM.CACHE.WB resumptions before KVM gives up.
TDX_SEAMCALL_RETRIES: Final = 10000
#: How often a busy SEAMCALL in the fault path is retried (the vCPU re-enters and
#: faults again in the kernel) before the model reports ``EAGAIN`` (core rule 3.3).
MAX_FAULT_RETRIES: Final = 16
#: Rule IDs (README "Rules"): named after the sections of backends.md part 1.
_LIFECYCLE_RULE: Final = "TDX-1.1"
_SEPT_RULE: Final = "TDX-1.2"
_POPULATE_RULE: Final = "TDX-1.4"
_REMOVE_RULE: Final = "TDX-1.6"


class TdState(enum.Enum):
    """``kvm_tdx->state``."""

    UNINITIALIZED = "TD_STATE_UNINITIALIZED"
    INITIALIZED = "TD_STATE_INITIALIZED"
    RUNNABLE = "TD_STATE_RUNNABLE"


class VcpuTdState(enum.Enum):
    """``vcpu_tdx->state``."""

    UNINITIALIZED = "VCPU_TD_STATE_UNINITIALIZED"
    INITIALIZED = "VCPU_TD_STATE_INITIALIZED"


class PendingAccessVe(GuestExit):
    """The TD touched a PENDING (not yet accepted) private page without
    ``SEPT_VE_DISABLE``: the TDX module injects #VE into the TD (KVM sees nothing)."""

    def __init__(self, gpa: int) -> None:
        self.gpa = gpa
        super().__init__(f"#VE in the TD: access to unaccepted private gpa {gpa:#x}")


@attrs.define(eq=False)
class TdxVcpu:
    """``struct vcpu_tdx``: TD vCPU state, its control pages and a pending TDVMCALL exit."""

    vcpu_id: int
    state: VcpuTdState = VcpuTdState.UNINITIALIZED
    vp: Vp | None = None
    tdvpr: int | None = None
    tdcx: list[int] = attrs.Factory(list)
    #: ``vcpu->cpu``: -1 until a vCPU ioctl or KVM_RUN loads it.
    cpu: int = -1
    map_gpa_next: int = 0
    map_gpa_end: int = 0
    #: ``vcpu->arch.complete_userspace_io``: what re-entry with ``hypercall.ret`` does.
    pending: Callable[[int], int] | None = None
    #: ``run->hypercall.ret``: what userspace left in the shared ``kvm_run`` for the next
    #: ``KVM_RUN``; ``__tdx_map_gpa`` sets it to 0 with every exit (QEMU <= 9.2 never
    #: writes it), so a re-entry without an answer completes the chunk as successful.
    hypercall_ret: int = 0
    #: R10 the last ``complete_userspace_io`` gave the TD; ``TdxGuest.resume`` clears it
    #: first.
    completed: int | None = None
    #: R11 as the TD reads it back after a TDG.VP.VMCALL.
    r11: int = 0
    #: ``kvm_vcpu_has_events``: an interrupt is pending for the vCPU.
    interrupt_pending: bool = False


@attrs.frozen
class PopulateArg:
    """``struct tdx_gmem_post_populate_arg``."""

    vcpu: VcpuView
    flags: int


class KvmTdx:
    """``struct kvm_tdx`` of one TD."""

    def __init__(self, vm: VmView) -> None:
        self.vm = vm
        host = vm.host.arch
        assert isinstance(host, TdxHost), "guestmem_host_init made the TDX host state"
        self.host: TdxHost = host
        self.module = host.module
        self.state = TdState.UNINITIALIZED
        self.hkid = -1
        self.td: Td | None = None
        self.tdr: int | None = None
        self.tdcs: list[int] = []
        self.attributes = 0
        self.xfam = 0
        self.gpaw52 = False
        #: ``kvm_tdx->nr_premapped``: leaves mapped by KVM_TDX_INIT_MEM_REGION not yet ADDed.
        self.nr_premapped = 0
        self.vcpus: dict[int, TdxVcpu] = {}

    def __repr__(self) -> str:
        return f"<KvmTdx {self.state.value} hkid={self.hkid} vm={self.vm.vm_id}>"

    # --- helpers -----------------------------------------------------------------------------
    @property
    def hkid_assigned(self) -> bool:
        """``is_hkid_assigned``."""
        return self.hkid > 0

    @property
    def shared_bit(self) -> int:
        """``kvm_gfn_direct_bits`` as a gpa bit: 47 (GPAW 48) or 51 (GPAW 52)."""
        return 51 if self.gpaw52 else 47

    @property
    def sept_ve_disable(self) -> bool:
        """``TDX_TD_ATTR_SEPT_VE_DISABLE``: an unaccepted-page access is a VM exit, not #VE."""
        return bool(self.attributes & abi.TDX_TD_ATTR_SEPT_VE_DISABLE)

    def _td(self) -> Td:
        assert self.td is not None, "the TD exists once KVM_TDX_INIT_VM succeeded"
        return self.td

    def vcpu_state(self, vcpu: VcpuView) -> TdxVcpu:
        """``to_tdx(vcpu)``."""
        state = vcpu.arch
        assert isinstance(state, TdxVcpu), "guestmem_vcpu_init made the vCPU state"
        return state

    def seamcalls(self, leaf: str, n: int) -> None:
        """Count *n* SEAMCALLs of *leaf* for this VM."""
        if n:
            self.vm.count("seamcalls", n)
            self.vm.count(f"seamcall.{leaf}", n)

    def _outcome(self, leaf: str, out: Outcome) -> Outcome:
        self.seamcalls(leaf, out.calls)
        return out

    def _status(self, leaf: str, status: int) -> int:
        self.seamcalls(leaf, 1)
        return status

    def _warn(self, event: str, **fields: Any) -> None:
        """The kernel's ``pr_warn`` (``HostView.warn``: silent until structlog is configured;
        the trace has the event either way)."""
        self.vm.host.warn("guestmem.tdx", event, **fields)

    def bug(self, what: str, status: int, rule: str = _SEPT_RULE) -> KvmError:
        """``KVM_BUG_ON(err, kvm)`` (``pr_tdx_error``): the VM is bugged; the error to return."""
        reason = f"KVM_BUG_ON: {what} failed: {st.status_name(status)}"
        self._warn("tdx seamcall failed", what=what, status=st.status_name(status), vm=self.vm.vm_id)
        self.vm.bug(reason)
        return KvmError(errno.EIO, rule, reason)

    def _alloc(self, npages: int) -> int:
        return self.vm.host.alloc(npages)

    def _kick(self) -> None:
        """``kvm_make_all_cpus_request(kvm, KVM_REQ_OUTSIDE_GUEST_MODE)``."""
        self.vm.count("tdx.vcpu_kicks", len(self.vm.vcpus()))

    def _clear(self, pfn: int, npages: int) -> None:
        """``tdx_clear_page``: MOVDIR64B zeroes the pages and clears their poison."""
        self.vm.host.zero(pfn, npages)
        self.host.clear(pfn, npages)
        self.vm.count("tdx.page_clears", npages)
        self.vm.count("tdx.cleared_bytes", npages * PAGE_SIZE)

    # --- KVM_MEMORY_ENCRYPT_OP on the VM fd -----------------------------------------------------
    def vm_ioctl(self, cmd: abi.TdxCmd) -> int:
        """``tdx_vm_ioctl``: the command read in its C types first (:func:`abi.read_command`)."""
        abi.read_command(cmd)
        if cmd.hw_error:
            raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, "kvm_tdx_cmd.hw_error must be 0 on entry")
        if cmd.id == abi.KVM_TDX_CAPABILITIES:
            return self.get_capabilities(cmd)
        if cmd.id == abi.KVM_TDX_INIT_VM:
            return self.td_init(cmd)
        if cmd.id == abi.KVM_TDX_FINALIZE_VM:
            return self.td_finalize(cmd)
        raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, f"TDX VM command {cmd.id} is not a VM command")

    def supported_attrs(self) -> int:
        """``tdx_get_supported_attrs``."""
        conf = self.host.sysinfo
        val = abi.KVM_SUPPORTED_TD_ATTRS
        if val & conf.attributes_fixed1 != conf.attributes_fixed1:
            return 0
        return val & conf.attributes_fixed0

    def supported_xfam(self) -> int:
        """``tdx_get_supported_xfam``."""
        conf = self.host.sysinfo
        val = conf.supported_xcr0 | conf.supported_xss
        if val & conf.xfam_fixed1 != conf.xfam_fixed1:
            return 0
        return val & conf.xfam_fixed0

    def get_capabilities(self, cmd: abi.TdxCmd) -> int:
        """``tdx_get_capabilities``: ``KVM_TDX_CAPABILITIES``."""
        if cmd.flags:
            raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, "KVM_TDX_CAPABILITIES: flags must be 0")
        caps = cmd.data
        if not isinstance(caps, abi.KvmTdxCapabilities):
            raise KvmError(errno.EFAULT, _LIFECYCLE_RULE, "KVM_TDX_CAPABILITIES needs a kvm_tdx_capabilities")
        config = self.host.sysinfo.cpuid_config
        if caps.cpuid.nent < len(config):
            raise KvmError(
                errno.E2BIG,
                _LIFECYCLE_RULE,
                f"room for {caps.cpuid.nent} CPUID entries, {len(config)} needed",
            )
        attrs_, xfam = self.supported_attrs(), self.supported_xfam()
        if not attrs_ or not xfam:
            raise KvmError(errno.EIO, _LIFECYCLE_RULE, "the TDX module supports no TD KVM can run")
        caps.supported_attrs, caps.supported_xfam = attrs_, xfam
        caps.user_tdvmcallinfo_1_r11 = abi.TDVMCALLINFO_SETUP_EVENT_NOTIFY_INTERRUPT
        entries = []
        for function, index in config:
            entry = abi.KvmCpuidEntry2(function, 0 if index == abi.KVM_TDX_CPUID_NO_SUBLEAF else index)
            if function == 0x80000008:
                entry.eax = 0xFF << 16  # the guest PA bits are how userspace picks GPAW
            entries.append(entry)
        caps.cpuid = abi.KvmCpuid2(entries)
        return 0

    def td_init(self, cmd: abi.TdxCmd) -> int:
        """``tdx_td_init``: ``KVM_TDX_INIT_VM``."""
        if self.state is not TdState.UNINITIALIZED:
            raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, f"KVM_TDX_INIT_VM in {self.state.value}")
        if cmd.flags:
            raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, "KVM_TDX_INIT_VM: flags must be 0")
        init = cmd.data
        if not isinstance(init, abi.KvmTdxInitVm):
            raise KvmError(errno.EFAULT, _LIFECYCLE_RULE, "KVM_TDX_INIT_VM needs a kvm_tdx_init_vm")
        if init.cpuid.nent > abi.KVM_MAX_CPUID_ENTRIES:
            raise KvmError(errno.E2BIG, _LIFECYCLE_RULE, f"{init.cpuid.nent} CPUID entries")
        if any(init.reserved) or init.cpuid.padding:
            raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, "KVM_TDX_INIT_VM: reserved fields must be 0")
        attributes, xfam, gpaw52 = self._setup_tdparams(init)
        self._td_init(attributes, xfam, gpaw52, cmd)
        self.attributes, self.xfam, self.gpaw52 = attributes, xfam, gpaw52
        self.state = TdState.INITIALIZED
        self.vm.trace(
            "tdx_init_vm", hkid=self.hkid, attributes=attributes, xfam=xfam, gpaw=52 if gpaw52 else 48
        )
        return 0

    def _setup_tdparams(self, init: abi.KvmTdxInitVm) -> tuple[int, int, bool]:
        """``setup_tdparams``: vCPUs, attributes, XFAM, GPAW and CPUID, in the kernel's order."""
        conf = self.host.sysinfo
        if self.vm.vcpus():
            raise KvmError(errno.EBUSY, _LIFECYCLE_RULE, "KVM_TDX_INIT_VM after KVM_CREATE_VCPU")
        if init.attributes & ~self.supported_attrs():
            raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, f"TD attributes {init.attributes:#x} not supported")
        if init.xfam & ~self.supported_xfam():
            raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, f"XFAM {init.xfam:#x} not supported")
        entries = init.cpuid.entries[: init.cpuid.nent]
        gpaw = next((e for e in entries if e.function == 0x80000008 and e.index == 0), None)
        if gpaw is None:
            raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, "no CPUID 0x80000008: GPAW unknown")
        guest_pa = (gpaw.eax >> 16) & 0xFF
        if guest_pa not in (48, 52) or (guest_pa == 52 and not conf.ept_5level):
            raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, f"guest physical address bits {guest_pa}")
        copied = 0
        for function, subleaf in conf.cpuid_config:
            index = 0 if subleaf == abi.KVM_TDX_CPUID_NO_SUBLEAF else subleaf
            entry = next((e for e in entries if e.function == function and e.index == index), None)
            if entry is None:
                continue
            if function == 7 and index == 0 and (entry.ebx & 0x810 or entry.ecx & 0x20):
                raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, "TSX and WAITPKG cannot be given to a TD")
            copied += 1
        if copied != len(entries):
            raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, "CPUID entries the TDX module cannot configure")
        return init.attributes | conf.attributes_fixed1, init.xfam | conf.xfam_fixed1, guest_pa == 52

    def _td_init(self, attributes: int, xfam: int, gpaw52: bool, cmd: abi.TdxCmd) -> None:
        """``__tdx_td_init``: HKID, TDR and TDCS pages, MNG.CREATE, KEY.CONFIG per package,
        ADDCX, MNG.INIT; any failure after MNG.CREATE tears the TD down again."""
        self.hkid = self.host.keyids.alloc()
        self.host.nr_configured_hkid += 1
        tdr = self._alloc(1)
        tdcs = [self._alloc(1) for _ in range(MIN_NUM_TDCS_PAGES)]
        if not all(self.host.online_packages):
            self._free_unused(tdr, tdcs)
            raise KvmError(errno.EIO, _LIFECYCLE_RULE, "All packages need to have online CPU to create TD")
        err, td = self.module.mng_create(tdr, self.hkid)
        self._status("TDH.MNG.CREATE", err)
        if err or td is None:
            self._free_unused(tdr, tdcs)
            code = errno.EAGAIN if err == st.TDX_RND_NO_ENTROPY else errno.EIO
            raise KvmError(code, _LIFECYCLE_RULE, f"TDH.MNG.CREATE failed: {st.status_name(err)}")
        self.td, self.tdr = td, tdr
        self.host.bind(td, self.vm)
        for package in range(self.module.packages):
            err = self._status("TDH.MNG.KEY.CONFIG", self.module.mng_key_config(td, package))
            if err:
                self._teardown(tdcs)
                raise self.bug("TDH.MNG.KEY.CONFIG", err)
        for i, pfn in enumerate(tdcs):
            err = self._status("TDH.MNG.ADDCX", self.module.mng_addcx(td, pfn))
            if err:
                self._teardown(tdcs[i:])
                code = errno.EAGAIN if err == st.TDX_RND_NO_ENTROPY else errno.EIO
                raise KvmError(code, _LIFECYCLE_RULE, f"TDH.MNG.ADDCX failed: {st.status_name(err)}")
            self.tdcs.append(pfn)
        err = self._status("TDH.MNG.INIT", self.module.mng_init(td, attributes, xfam, gpaw52))
        if err:
            self._teardown([])
            if st.status_class(err) == st.TDX_OPERAND_INVALID:
                cmd.hw_error = err
                raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, f"TDH.MNG.INIT: {st.status_name(err)}")
            raise KvmError(errno.EIO, _LIFECYCLE_RULE, f"TDH.MNG.INIT failed: {st.status_name(err)}")

    def _free_unused(self, tdr: int, tdcs: list[int]) -> None:
        """``free_tdcs``/``free_tdr``/``free_hkid``: nothing was given to the module."""
        for pfn in [tdr, *tdcs]:
            self.vm.host.free(pfn, 1)
        self._hkid_free()

    def _teardown(self, unused: list[int]) -> None:
        """``__tdx_td_init``'s ``teardown:``: free the pages not added, release the HKID,
        reclaim what was added."""
        for pfn in unused:
            self.vm.host.free(pfn, 1)
        self.mmu_release_hkid()
        self.reclaim_td_control_pages()

    def _hkid_free(self) -> None:
        """``tdx_hkid_free``."""
        self.host.keyids.free(self.hkid)
        self.hkid = -1
        self.host.nr_configured_hkid -= 1

    def td_finalize(self, cmd: abi.TdxCmd) -> int:
        """``tdx_td_finalize``: ``KVM_TDX_FINALIZE_VM``; pre-faulting is allowed afterwards."""
        if not self.hkid_assigned or self.state is TdState.RUNNABLE:
            raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, f"KVM_TDX_FINALIZE_VM in {self.state.value}")
        if self.nr_premapped:
            raise KvmError(
                errno.EINVAL,
                _POPULATE_RULE,
                f"{self.nr_premapped} page(s) mapped by KVM_TDX_INIT_MEM_REGION were never added",
            )
        cmd.hw_error = self._status("TDH.MR.FINALIZE", self.module.mr_finalize(self._td()))
        if st.is_busy(cmd.hw_error):
            raise KvmError(errno.EBUSY, _LIFECYCLE_RULE, "TDH.MR.FINALIZE: operand busy")
        if cmd.hw_error:
            raise self.bug("TDH.MR.FINALIZE", cmd.hw_error)
        self.state = TdState.RUNNABLE
        self.vm.pre_fault_allowed = True
        self.vm.trace("tdx_finalize", mrtd=self.mrtd.hex())
        return 0

    @property
    def mrtd(self) -> bytes:
        """MRTD as TDH.MR.FINALIZE froze it (empty before)."""
        return b"" if self.td is None or self.td.mrtd is None else self.td.mrtd

    # --- vCPUs ------------------------------------------------------------------------------------
    def vcpu_create(self, vcpu: VcpuView) -> TdxVcpu:
        """``kvm_vm_ioctl_create_vcpu`` (``max_vcpus``) and ``tdx_vcpu_create``."""
        if len(self.vm.vcpus()) >= self.host.sysinfo.nr_cpus:
            raise KvmError(
                errno.EINVAL, _LIFECYCLE_RULE, "a TD has at most as many vCPUs as the host has CPUs"
            )
        if self.state is not TdState.INITIALIZED:
            raise KvmError(errno.EIO, _LIFECYCLE_RULE, f"KVM_CREATE_VCPU on a TD in {self.state.value}")
        state = TdxVcpu(vcpu.vcpu_id)
        self.vcpus[vcpu.vcpu_id] = state
        return state

    def vcpu_ioctl(self, vcpu: VcpuView, cmd: abi.TdxCmd) -> int:
        """``tdx_vcpu_ioctl`` (after ``vcpu_load``); the command read in its C types first
        (:func:`abi.read_command`)."""
        abi.read_command(cmd)
        tdx = self.vcpu_state(vcpu)
        if not self.hkid_assigned or self.state is TdState.RUNNABLE:
            raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, f"TDX vCPU command in {self.state.value}")
        tdx.cpu = 0
        if cmd.hw_error:
            raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, "kvm_tdx_cmd.hw_error must be 0 on entry")
        if cmd.id == abi.KVM_TDX_INIT_VCPU:
            return self.vcpu_init(vcpu, cmd)
        if cmd.id == abi.KVM_TDX_INIT_MEM_REGION:
            return self.init_mem_region(vcpu, cmd)
        if cmd.id == abi.KVM_TDX_GET_CPUID:
            raise KvmError(errno.ENOTTY, "", "KVM_TDX_GET_CPUID is not modelled")
        raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, f"TDX vCPU command {cmd.id} is not a vCPU command")

    def vcpu_init(self, vcpu: VcpuView, cmd: abi.TdxCmd) -> int:
        """``tdx_vcpu_init`` + ``tdx_td_vcpu_init``: ``KVM_TDX_INIT_VCPU``."""
        tdx = self.vcpu_state(vcpu)
        if cmd.flags:
            raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, "KVM_TDX_INIT_VCPU: flags must be 0")
        if tdx.state is not VcpuTdState.UNINITIALIZED:
            raise KvmError(errno.EINVAL, _LIFECYCLE_RULE, f"vCPU {vcpu.vcpu_id} is already initialised")
        td = self._td()
        tdvpr = self._alloc(1)
        tdcx = [self._alloc(1) for _ in range(MIN_TDVPS_PAGES - 1)]
        err, vp = self.module.vp_create(td, tdvpr)
        self._status("TDH.VP.CREATE", err)
        if err or vp is None:
            for pfn in [tdvpr, *tdcx]:
                self.vm.host.free(pfn, 1)
            raise self.bug("TDH.VP.CREATE", err)
        tdx.vp, tdx.tdvpr = vp, tdvpr
        for i, pfn in enumerate(tdcx):
            err = self._status("TDH.VP.ADDCX", self.module.vp_addcx(vp, pfn))
            if err:
                for rest in tdcx[i:]:  # the ones added are reclaimed by tdx_vcpu_free
                    self.vm.host.free(rest, 1)
                raise self.bug("TDH.VP.ADDCX", err)
            tdx.tdcx.append(pfn)
        err = self._status("TDH.VP.INIT", self.module.vp_init(vp))
        if err:
            raise self.bug("TDH.VP.INIT", err)
        tdx.state = VcpuTdState.INITIALIZED
        self.vm.trace("tdx_init_vcpu", vcpu=vcpu.vcpu_id)
        return 0

    def complete_userspace_io(self, vcpu: VcpuView) -> None:
        """The head of ``kvm_arch_vcpu_ioctl_run``: a pending ``complete_userspace_io``
        (``tdx_complete_vmcall_map_gpa``) is cleared and called with ``run->hypercall.ret``
        (:attr:`TdxVcpu.hypercall_ret`), whether userspace answered the exit or not; without
        one (``NULL``) the field is ignored.  The TD's R10 lands in
        :attr:`TdxVcpu.completed`; a completion that leaves to userspace again raises the
        next ``KVM_EXIT_HYPERCALL`` and the TD is not entered (``cui()`` returned 0)."""
        tdx = self.vcpu_state(vcpu)
        cui, tdx.pending = tdx.pending, None
        if cui is not None:
            tdx.completed = cui(tdx.hypercall_ret)

    def vcpu_pre_run(self, vcpu: VcpuView) -> None:
        """``tdx_vcpu_pre_run``; then TDH.VP.ENTER of a fatal TD fails (``tdx_handle_exit``:
        ``KVM_EXIT_INTERNAL_ERROR``)."""
        tdx = self.vcpu_state(vcpu)
        if tdx.state is not VcpuTdState.INITIALIZED or self.state is not TdState.RUNNABLE:
            raise KvmError(
                errno.EINVAL, _LIFECYCLE_RULE, f"KVM_RUN: vCPU {tdx.state.value}, TD {self.state.value}"
            )
        tdx.cpu = 0
        if self.td is not None and self.td.fatal:
            self.seamcalls("TDH.VP.ENTER", 1)
            raise InternalErrorExit(abi.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON)

    # --- KVM_TDX_INIT_MEM_REGION --------------------------------------------------------------
    def init_mem_region(self, vcpu: VcpuView, cmd: abi.TdxCmd) -> int:
        """``tdx_vcpu_init_mem_region``: PAGE.ADD (and MR.EXTEND) page by page through
        ``kvm_gmem_populate``; the region advances in place, even when a page fails."""
        tdx = self.vcpu_state(vcpu)
        if tdx.state is not VcpuTdState.INITIALIZED:
            raise KvmError(errno.EINVAL, _POPULATE_RULE, "KVM_TDX_INIT_MEM_REGION before KVM_TDX_INIT_VCPU")
        if self.state is TdState.RUNNABLE:
            raise KvmError(errno.EINVAL, _POPULATE_RULE, "KVM_TDX_INIT_MEM_REGION after KVM_TDX_FINALIZE_VM")
        if cmd.flags & ~abi.KVM_TDX_MEASURE_MEMORY_REGION:
            raise KvmError(errno.EINVAL, _POPULATE_RULE, f"KVM_TDX_INIT_MEM_REGION: flags {cmd.flags:#x}")
        region = cmd.data
        if not isinstance(region, abi.KvmTdxInitMemRegion):
            raise KvmError(
                errno.EFAULT, _POPULATE_RULE, "KVM_TDX_INIT_MEM_REGION needs a kvm_tdx_init_mem_region"
            )
        end = region.gpa + (region.nr_pages << PAGE_SHIFT)
        if (
            region.source_addr % PAGE_SIZE
            or region.gpa % PAGE_SIZE
            or not region.nr_pages
            or end > uapi.U64_MAX
            or not self.is_private_gpa(region.gpa)
            or not self.is_private_gpa(end - 1)
        ):
            raise KvmError(errno.EINVAL, _POPULATE_RULE, "KVM_TDX_INIT_MEM_REGION: bad source, gpa or size")
        arg = PopulateArg(vcpu, cmd.flags)
        while region.nr_pages:
            page = None if region.source is None else region.source[:PAGE_SIZE]
            done = self.vm.gmem_populate(region.gpa >> PAGE_SHIFT, page, 1, arg)
            if done != 1:
                raise KvmError(errno.EIO, _POPULATE_RULE, "kvm_gmem_populate added no page")
            region.source_addr += PAGE_SIZE
            region.gpa += PAGE_SIZE
            region.nr_pages -= 1
            if region.source is not None:
                region.source = region.source[PAGE_SIZE:]
        return 0

    def is_private_gpa(self, gpa: int) -> bool:
        """``vt_is_tdx_private_gpa``: the shared bit is clear."""
        return not gpa & (1 << self.shared_bit)

    def post_populate(self, gfn: int, pfn: int, src: bytes | None, order: int, opaque: Any) -> int:
        """``tdx_gmem_post_populate``: ``kvm_tdp_map_page``, TDH.MEM.PAGE.ADD, MR.EXTEND x16."""
        if not isinstance(opaque, PopulateArg):
            raise KvmError(errno.EINVAL, "P-5", "kvm_gmem_populate on a TD outside KVM_TDX_INIT_MEM_REGION")
        if order:
            raise KvmError(errno.EINVAL, "P-5", "KVM_TDX_INIT_MEM_REGION populates one page at a time")
        if src is None or len(src) < PAGE_SIZE:
            return -errno.EFAULT  # get_user_pages_fast: the source is not there
        ret = self._tdp_map_page(gfn)
        if ret:
            return ret
        td = self._td()
        err = self._status("TDH.MEM.PAGE.ADD", self.module.page_add(td, gfn, pfn, src))
        if err:
            return -errno.EBUSY if st.is_busy(err) else -errno.EIO
        self.host.clear(pfn, 1)  # the copy is MOVDIR64B with the TD's key
        self.vm.count("copied_bytes", PAGE_SIZE)
        if self.nr_premapped:
            self.nr_premapped -= 1
        else:
            self.bug("nr_premapped accounting (TDH.MEM.PAGE.ADD)", st.TDX_SUCCESS)
        if opaque.flags & abi.KVM_TDX_MEASURE_MEMORY_REGION:
            for off in range(0, PAGE_SIZE, 256):
                err = self._status("TDH.MR.EXTEND", self.module.mr_extend(td, (gfn << PAGE_SHIFT) + off))
                if err:
                    return -errno.EIO
        return 0

    def _tdp_map_page(self, gfn: int) -> int:
        """``kvm_tdp_map_page`` with ``PFERR_GUEST_FINAL_MASK | PFERR_PRIVATE_ACCESS``: the
        vCPU's MMU from its ioctl, outside ``KVM_RUN`` (none of its checks: the TD is not
        runnable yet)."""
        try:
            self.vm.fault_range(gfn, 1, private=True)
        except MemoryFault as exc:
            return -(exc.errno or errno.EFAULT)
        except MmioExit:
            return -errno.ENOENT
        except KvmError as exc:
            return -(exc.errno or errno.EIO)
        return 0

    # --- the mirror root: private leaves come and go ------------------------------------------
    def uniform_prefix(self, gfn: int, pfn: int, npages: int) -> int:
        """How many pages from *gfn* one batch of TDH.MEM.PAGE.AUG can take as the same
        number of single calls would: FREE entries over ``PT_NDA`` pages (at least 1)."""
        td = self.td
        if td is None or self.state is not TdState.RUNNABLE:
            return npages
        n = npages
        ent = td.leaves.entry(gfn)
        if ent is not None:
            return 1
        nxt = next(td.leaves.items(gfn, gfn + n), None)
        if nxt is not None:
            n = nxt[0] - gfn
        busy = next(self.module.pamt.items(pfn, pfn + n), None)
        if busy is not None:
            n = max(1, busy[0] - pfn)
        return max(1, n)

    def set_private_spte(self, leaf: Leaf) -> None:
        """``tdx_sept_link_private_spt`` for the missing S-EPT pages, then
        ``tdx_sept_set_private_spte`` per 4 KiB leaf: AUG once the TD runs, before that
        only ``nr_premapped`` (``tdx_mem_page_record_premap_cnt``)."""
        if leaf.level != uapi.PG_LEVEL_4K:
            raise self.bug("tdx_sept_set_private_spte at a level above 4K", st.TDX_OPERAND_INVALID)
        td = self._td()
        self._link_tables(td, leaf.gfn, leaf.end_gfn)
        if self.state is not TdState.RUNNABLE:
            if self.vm.pre_fault_allowed:
                raise self.bug(
                    "tdx_mem_page_record_premap_cnt after pre-faulting was allowed", st.TDX_SUCCESS
                )
            self.nr_premapped += leaf.npages
            self.vm.count("tdx.premapped_pages", leaf.npages)
            return
        for _ in range(MAX_FAULT_RETRIES):
            out = self._outcome("TDH.MEM.PAGE.AUG", self.module.page_aug(td, leaf.gfn, leaf.pfn, leaf.npages))
            if out.status == st.TDX_SUCCESS:
                self.vm.count("tdx.augmented_pages", leaf.npages)
                return
            if not st.is_busy(out.status) or out.done:
                raise self.bug("TDH.MEM.PAGE.AUG", out.status)
            self.vm.count("fault_retries")  # -EBUSY: RET_PF_RETRY, the vCPU faults again
        raise KvmError(errno.EAGAIN, "3.3", "TDH.MEM.PAGE.AUG kept failing with TDX_OPERAND_BUSY")

    def _link_tables(self, td: Td, start: int, end: int) -> None:
        """``tdx_sept_link_private_spt``: TDH.MEM.SEPT.ADD of a new page for every level-l
        entry over ``[start, end)`` that has none, top level first."""
        for level in range(td.top_level, 0, -1):
            shift = 9 * level
            for s, e in list(td.table(level).gaps(start >> shift, ((end - 1) >> shift) + 1)):
                pfn = self._alloc(e - s)
                for _ in range(MAX_FAULT_RETRIES):
                    out = self._outcome("TDH.MEM.SEPT.ADD", self.module.sept_add(td, level, s, pfn, e - s))
                    if out.status == st.TDX_SUCCESS:
                        break
                    if not st.is_busy(out.status) or out.done:
                        self.vm.host.free(pfn + out.done, e - s - out.done)
                        raise self.bug("TDH.MEM.SEPT.ADD", out.status)
                    self.vm.count("fault_retries")
                else:
                    self.vm.host.free(pfn, e - s)
                    raise KvmError(errno.EAGAIN, "3.3", "TDH.MEM.SEPT.ADD kept failing with TDX_OPERAND_BUSY")
                self.vm.count("tdx.sept_pages", e - s)

    def remove_private_spte(self, leaf: Leaf) -> None:
        """``tdx_sept_remove_private_spte`` per 4 KiB leaf of *leaf*: BLOCK, TRACK, REMOVE,
        WBINVD, clear.  A failure bugs the VM and leaks that page; the others go on."""
        if not self.hkid_assigned:
            # HKID is released after every private page was removed (6.18 has no
            # KVM_TDX_TERMINATE_VM): a zap after release is a KVM bug.
            self.bug(
                "tdx_sept_remove_private_spte without an HKID", st.TDX_LIFECYCLE_STATE_INCORRECT, _REMOVE_RULE
            )
            self.host.leak(leaf.pfn, leaf.npages, "removed after the HKID was released")
            return
        td = self._td()
        pos, end = leaf.gfn, leaf.end_gfn
        delta = leaf.pfn - leaf.gfn
        while pos < end:
            pos = self._zap_from(td, pos, end, delta)

    def _zap_from(self, td: Td, pos: int, end: int, delta: int) -> int:
        """``tdx_sept_zap_private_spte`` from *pos*: block as many leaves as one batch can,
        track and drop them; then handle the leaf that did not block.  Returns where the
        next batch starts."""
        out = self._retry_no_vcpus(
            "TDH.MEM.RANGE.BLOCK", lambda p, n: self.module.range_block(td, p, n), pos, end
        )
        blocked = out.done
        start = pos
        while start < pos + blocked:
            tracked = self._track(td, pos + blocked - start)
            # A failed TRACK is followed by its leaf's REMOVE before any other TRACK.
            stop = min(start + tracked + 1, pos + blocked)
            self._drop(td, start, stop, delta)
            start = stop
        pos += blocked
        if out.status == st.TDX_SUCCESS:
            return pos
        premap = self._premapped_run(td, out, pos, end)
        if premap:
            return pos + premap
        err = self.bug("TDH.MEM.RANGE.BLOCK", out.status, _REMOVE_RULE)
        self.host.leak(pos + delta, 1, err.detail)
        return pos + 1

    def _premapped_run(self, td: Td, out: Outcome, pos: int, end: int) -> int:
        """``tdx_is_sept_zap_err_due_to_premap``: before FINALIZE, a leaf KVM only counted
        (the S-EPT entry is FREE) fails BLOCK with ``EPT_ENTRY_STATE_INCORRECT``; KVM takes
        it off ``nr_premapped``.  Returns how many such leaves start at *pos* (0: none)."""
        premap_err = st.with_operand(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX)
        if self.state is TdState.RUNNABLE or out.status != premap_err:
            return 0
        if out.state is not None and out.state.is_leaf:
            return 0
        nxt = next(td.leaves.items(pos, end), None)
        n = min((end if nxt is None else nxt[0]) - pos, self.nr_premapped)
        if n <= 0:
            return 0
        self.seamcalls("TDH.MEM.RANGE.BLOCK", n - 1)  # one failed BLOCK per leaf
        self.nr_premapped -= n
        self.vm.count("tdx.premapped_zapped", n)
        return n

    def _retry_no_vcpus(self, leaf: str, call: Callable[[int, int], Outcome], pos: int, end: int) -> Outcome:
        """A batch of S-EPT zap SEAMCALLs; the first call that is ``TDX_OPERAND_BUSY`` is
        retried once with vCPU entry blocked (``tdx_no_vcpus_enter_start``/``_stop``)."""
        out = self._outcome(leaf, call(pos, end - pos))
        if not st.is_busy(out.status):
            return out
        self.vm.count("tdx.no_vcpus_enter")
        self._kick()
        retry = self._outcome(leaf, call(pos + out.done, 1))
        if retry.status:
            return Outcome(retry.status, out.done, retry.state)
        rest = end - pos - out.done - 1
        if not rest:
            return Outcome(st.TDX_SUCCESS, out.done + 1)
        more = self._retry_no_vcpus(leaf, call, pos + out.done + 1, end)
        return Outcome(more.status, out.done + 1 + more.done, more.state)

    def _track(self, td: Td, times: int) -> int:
        """``tdx_track`` once per blocked leaf: TDH.MEM.TRACK (busy: retried once with vCPU
        entry blocked) and a kick of every vCPU.  Returns how many succeeded before one
        failed (``KVM_BUG_ON``; KVM goes on to the REMOVE, which then finds the TLB not
        tracked).  Nothing before FINALIZE: no vCPU has run."""
        if self.state is not TdState.RUNNABLE:
            return times
        nvcpus = len(self.vm.vcpus())
        done = 0
        while done < times:
            out = self._outcome("TDH.MEM.TRACK", self.module.mem_track(td, times - done))
            self.vm.count("tdx.track_epochs", out.done)
            self.vm.count("tdx.vcpu_kicks", out.done * nvcpus)
            done += out.done
            if out.status == st.TDX_SUCCESS:
                break
            err = out.status
            if st.is_busy(err):
                self.vm.count("tdx.no_vcpus_enter")
                self._kick()
                err = self._outcome("TDH.MEM.TRACK", self.module.mem_track(td)).status
            self._kick()
            if err:
                self.bug("TDH.MEM.TRACK", err, _REMOVE_RULE)
                return done
            self.vm.count("tdx.track_epochs")
            done += 1
        return times

    def _drop(self, td: Td, start: int, end: int, delta: int) -> None:
        """``tdx_sept_drop_private_spte`` for blocked, tracked leaves ``[start, end)``:
        REMOVE (busy: retried once with vCPU entry blocked), then WBINVD and clear."""
        pos = start
        while pos < end:
            out = self._retry_no_vcpus(
                "TDH.MEM.PAGE.REMOVE", lambda p, n: self.module.page_remove(td, p, n), pos, end
            )
            self._flush(pos, pos + out.done, delta)
            pos += out.done
            if out.status:
                err = self.bug("TDH.MEM.PAGE.REMOVE", out.status, _REMOVE_RULE)
                self.host.leak(pos + delta, 1, err.detail)
                pos += 1

    def _flush(self, start: int, end: int, delta: int) -> None:
        """TDH.PHYMEM.PAGE.WBINVD with the HKID and ``tdx_clear_page`` of removed pages; a
        page whose flush fails is not cleared: KVM_BUG_ON, leaked."""
        pos = start
        while pos < end:
            wb = self._outcome(
                "TDH.PHYMEM.PAGE.WBINVD", self.module.page_wbinvd(self.hkid, pos + delta, end - pos)
            )
            if wb.done:
                self._clear(pos + delta, wb.done)
                self.vm.count("tdx.removed_pages", wb.done)
            pos += wb.done
            if wb.status:
                err = self.bug("TDH.PHYMEM.PAGE.WBINVD", wb.status, _REMOVE_RULE)
                self.host.leak(pos + delta, 1, err.detail)
                pos += 1

    # --- HKID release and teardown ------------------------------------------------------------
    def mmu_release_hkid(self) -> None:
        """``tdx_mmu_release_hkid`` (``vm_pre_destroy``): VP.FLUSH each loaded vCPU,
        VPFLUSHDONE, CACHE.WB on one CPU per package, KEY.FREEID; the HKID goes back to the
        pool.  When a step fails the HKID is leaked, and with it every TD page."""
        if not self.hkid_assigned:
            return
        td = self._td()
        for tdx in self.vcpus.values():
            if tdx.cpu == -1:
                continue
            if tdx.state is not VcpuTdState.UNINITIALIZED and tdx.vp is not None:
                err = self._status("TDH.VP.FLUSH", self.module.vp_flush(tdx.vp))
                if err and err != st.TDX_VCPU_NOT_ASSOCIATED:
                    self.bug("TDH.VP.FLUSH", err)
            tdx.cpu = -1
        err = self._status("TDH.MNG.VPFLUSHDONE", self.module.mng_vpflushdone(td))
        if err == st.TDX_FLUSHVP_NOT_DONE:
            self._leak_hkid("TDH.MNG.VPFLUSHDONE: TDX_FLUSHVP_NOT_DONE")
            return
        if err:
            self.bug("TDH.MNG.VPFLUSHDONE", err)
            self._leak_hkid(f"TDH.MNG.VPFLUSHDONE: {st.status_name(err)}")
            return
        for package, online in enumerate(self.host.online_packages):
            if online:
                self._phymem_cache_wb(package)
        err = self._status("TDH.MNG.KEY.FREEID", self.module.mng_key_freeid(td))
        if err:
            self.bug("TDH.MNG.KEY.FREEID", err)
            self._leak_hkid(f"TDH.MNG.KEY.FREEID: {st.status_name(err)}")
            return
        hkid = self.hkid
        self._hkid_free()
        self.vm.trace("tdx_hkid_release", hkid=hkid)

    def _leak_hkid(self, why: str) -> None:
        self._warn("tdx hkid leaked", hkid=self.hkid, why=why, vm=self.vm.vm_id)
        self.host.keyids.leak(self.hkid)
        self.vm.trace("tdx_hkid_leaked", hkid=self.hkid, why=why)

    def _phymem_cache_wb(self, package: int) -> None:
        """``smp_func_do_phymem_cache_wb``: resumed while interrupted; "no HKID ready" is done."""
        err = 0
        for _ in range(TDX_SEAMCALL_RETRIES):
            err = self._status("TDH.PHYMEM.CACHE.WB", self.module.phymem_cache_wb(package, resume=bool(err)))
            if err == st.TDX_INTERRUPTED_RESUMABLE:
                continue
            if err == st.TDX_NO_HKID_READY_TO_WBCACHE:
                err = st.TDX_SUCCESS
            break
        if err:  # WARN_ON_ONCE: KEY.FREEID will fail
            self._warn("TDH.PHYMEM.CACHE.WB failed", status=st.status_name(err), package=package)

    def _reclaim(self, pfn: int, what: str, *, clear: bool = True) -> bool:
        """``tdx_reclaim_page`` (``__tdx_reclaim_page`` and, with *clear*, ``tdx_clear_page``);
        a failure (WARN) leaks the page."""
        err = self._outcome("TDH.PHYMEM.PAGE.RECLAIM", self.module.page_reclaim(pfn)).status
        if err:
            self._warn("TDH.PHYMEM.PAGE.RECLAIM failed", what=what, status=st.status_name(err))
            self.host.leak(pfn, 1, f"TDH.PHYMEM.PAGE.RECLAIM of the {what}: {st.status_name(err)}")
            return False
        if clear:
            self._clear(pfn, 1)
        return True

    def _reclaim_control_page(self, pfn: int, what: str) -> None:
        """``tdx_reclaim_control_page``: reclaim, clear and free, or leak."""
        if self._reclaim(pfn, what):
            self.vm.host.free(pfn, 1)

    def free_private_spt(self) -> None:
        """``tdx_sept_free_private_spt`` for every S-EPT page-table page (VM teardown, after
        the HKID was released): RECLAIM and clear, then free; leaked otherwise."""
        td = self.td
        if td is None:
            return
        for table in td.tables.values():
            for s, e, (delta, _) in list(table.items()):
                if self.hkid_assigned:
                    self.host.leak(s + delta, e - s, "S-EPT page freed while the HKID is assigned")
                    continue
                out = self._outcome("TDH.PHYMEM.PAGE.RECLAIM", self.module.page_reclaim(s + delta, e - s))
                if out.done:
                    self._clear(s + delta, out.done)
                    self.vm.host.free(s + delta, out.done)
                if out.status:
                    self.host.leak(s + delta + out.done, e - s - out.done, st.status_name(out.status))

    def vcpu_free(self, vcpu: VcpuView) -> None:
        """``tdx_vcpu_free``: reclaim the TDCX and TDVPR pages (not while the HKID is
        assigned: then they are leaked)."""
        tdx = self.vcpu_state(vcpu)
        if self.hkid_assigned:
            pages = [*tdx.tdcx, *([] if tdx.tdvpr is None else [tdx.tdvpr])]
            for pfn in pages:
                self.host.leak(pfn, 1, "vCPU pages of a TD whose HKID is assigned")
        else:
            for pfn in tdx.tdcx:
                self._reclaim_control_page(pfn, "TDCX")
            if tdx.tdvpr is not None:
                self._reclaim_control_page(tdx.tdvpr, "TDVPR")
        tdx.tdcx, tdx.tdvpr = [], None
        tdx.state = VcpuTdState.UNINITIALIZED

    def reclaim_td_control_pages(self) -> None:
        """``tdx_reclaim_td_control_pages``: the TDCS pages, then the TDR (RECLAIM,
        WBINVD with the global KeyID, clear).  Nothing while the HKID is assigned."""
        td = self.td
        if td is None:
            return
        if self.hkid_assigned:
            self.host.leak(self.tdr or 0, 1, "TDR of a TD whose HKID is leaked")
            for pfn in self.tdcs:
                self.host.leak(pfn, 1, "TDCS of a TD whose HKID is leaked")
            return
        for pfn in self.tdcs:
            self._reclaim_control_page(pfn, "TDCS")
        self.tdcs = []
        if self.tdr is None or not self._reclaim(self.tdr, "TDR", clear=False):
            return
        err = self._status("TDH.PHYMEM.PAGE.WBINVD", self.module.page_wbinvd_tdr(td))
        if err:
            self.bug("TDH.PHYMEM.PAGE.WBINVD (TDR)", err)
            self.host.leak(self.tdr, 1, "TDR cache flush failed")
            return
        self._clear(self.tdr, 1)
        self.vm.host.free(self.tdr, 1)
        self.host.unbind(td)
        self.tdr = None

    def vm_destroy(self) -> None:
        """``tdx_vm_destroy`` (after the MMU zap freed the S-EPT pages)."""
        self.free_private_spt()
        self.reclaim_td_control_pages()
        self.state = TdState.UNINITIALIZED

    # --- the guest ------------------------------------------------------------------------------
    def guest_access(
        self, vcpu: VcpuView, gfn: int, pfn: int, offset: int = 0, length: int = PAGE_SIZE
    ) -> None:
        """A TD load/store of bytes ``[offset, offset + length)`` of a private page: a PENDING
        page is an EPT violation (``tdx_handle_ept_violation``: "Guest access before
        accepting" kills the VM with ``SEPT_VE_DISABLE``, else the module injects #VE); a
        poisoned line among them is #MC in SEAM non-root (a store reads the line first):
        the module marks the TD fatal and KVM reports an internal error."""
        td = self._td()
        state = td.leaf_state(gfn)
        gpa = gfn << PAGE_SHIFT
        if state.any_pending:
            if not self.sept_ve_disable:
                raise PendingAccessVe(gpa)
            reason = f"Guest access before accepting {gpa:#x} on vCPU {vcpu.vcpu_id}"
            self._warn(reason, vm=self.vm.vm_id)
            self.vm.count("ept_violation_exits")
            self.vm.kill(f"tdx_handle_ept_violation: {reason}")
            raise KvmError(errno.EIO, _SEPT_RULE, f"tdx_handle_ept_violation: {reason}")
        if self.host.is_poisoned(pfn, offset, length):
            td.fatal = True
            at = gpa + offset
            verdict = (
                f"TDX #MC: TD {self.vm.vm_id} read poisoned private memory at gpa {at:#x} (pfn {pfn:#x})"
            )
            self.host.mce.append(verdict)
            self._warn("TDX private memory error. Possible kernel bug.", pfn=pfn, vm=self.vm.vm_id)
            self.vm.trace("tdx_machine_check", gpa=at, pfn=pfn)
            raise InternalErrorExit(abi.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, at)

    def handle_accept_violation(self, vcpu: VcpuView, gfn: int, npages: int) -> int:
        """``tdx_handle_ept_violation`` for TDG.MEM.PAGE.ACCEPT of pages that are not AUGed
        (always treated as a write fault): fault them in; returns the pages mapped."""
        try:
            mapped = self.vm.fault_range(gfn, npages, private=True, write=True, vcpu=vcpu)
        except (KvmError, GuestExit):
            self.vm.count("ept_violation_exits")
            raise
        self.vm.count("ept_violation_exits", mapped)
        return mapped

    # --- TDG.VP.VMCALL -------------------------------------------------------------------------
    def handle_tdvmcall(self, vcpu: VcpuView, args: tuple[int, ...]) -> int:
        """``handle_tdvmcall`` (R10 = ``TDX_HYPERCALL_STANDARD``): the leaf is ``args[0]``
        (R11), its operands follow (R12, R13...); returns R10 for the TD."""
        tdx = self.vcpu_state(vcpu)
        leaf, r12, r13 = (*args, 0, 0, 0)[:3]
        self.vm.count("tdvmcalls")
        if leaf == abi.TDVMCALL_MAP_GPA:
            return self.map_gpa(vcpu, tdx, r12, r13)
        if leaf == abi.TDVMCALL_GET_TD_VM_CALL_INFO and r12 == 0:
            tdx.r11 = 0
            return abi.TDVMCALL_STATUS_SUCCESS
        if leaf in (
            abi.TDVMCALL_GET_TD_VM_CALL_INFO,
            abi.TDVMCALL_GET_QUOTE,
            abi.TDVMCALL_REPORT_FATAL_ERROR,
            abi.TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT,
        ):
            raise KvmError(
                errno.EOPNOTSUPP, "", f"TDG.VP.VMCALL leaf {leaf:#x} (an exit to userspace) is not modelled"
            )
        return abi.TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED

    def _legal_gpa(self, gpa: int) -> bool:
        """``kvm_vcpu_is_legal_gpa``: below the TD's GPAW."""
        return 0 <= gpa < 1 << (52 if self.gpaw52 else 48)

    def map_gpa(self, vcpu: VcpuView, tdx: TdxVcpu, gpa: int, size: int) -> int:
        """``tdx_map_gpa``: TDG.VP.VMCALL<MapGPA> becomes ``KVM_EXIT_HYPERCALL``
        (``KVM_HC_MAP_GPA_RANGE``) in chunks of at most 2 MiB, if userspace enabled it."""
        self.vm.count("tdvmcall.MapGPA")
        gpa, size = gpa & uapi.U64_MAX, size & uapi.U64_MAX
        if not self.vm.hypercall_exit_enabled & (1 << uapi.KVM_HC_MAP_GPA_RANGE):
            ret = abi.TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED
        elif (
            (gpa + size) & uapi.U64_MAX <= gpa
            or not self._legal_gpa(gpa)
            or not self._legal_gpa(gpa + size - 1)
            or self.is_private_gpa(gpa) != self.is_private_gpa(gpa + size - 1)
        ):
            ret = abi.TDVMCALL_STATUS_INVALID_OPERAND
        elif gpa % PAGE_SIZE or size % PAGE_SIZE:
            ret = abi.TDVMCALL_STATUS_ALIGN_ERROR
        else:
            tdx.map_gpa_end = gpa + size
            tdx.map_gpa_next = gpa
            return self._map_gpa_exit(vcpu, tdx)
        tdx.r11 = gpa
        return ret

    def _map_gpa_exit(self, vcpu: VcpuView, tdx: TdxVcpu) -> int:
        """``__tdx_map_gpa``: the next chunk as ``KVM_EXIT_HYPERCALL``."""
        gpa = tdx.map_gpa_next
        size = min(tdx.map_gpa_end - gpa, abi.TDX_MAP_GPA_MAX_LEN)
        private = self.is_private_gpa(gpa)
        attrs_ = uapi.KVM_MAP_GPA_RANGE_ENCRYPTED if private else uapi.KVM_MAP_GPA_RANGE_DECRYPTED
        args = (gpa & ~(1 << self.shared_bit), size // PAGE_SIZE, attrs_)
        tdx.pending = lambda ret: self._complete_map_gpa(vcpu, tdx, ret)
        self.vm.count("userspace_exits")
        self.vm.trace(
            "hypercall_exit", nr=uapi.KVM_HC_MAP_GPA_RANGE, gpa=args[0], npages=args[1], attrs=attrs_
        )
        exit_ = HypercallExit(uapi.KVM_HC_MAP_GPA_RANGE, args, flags=uapi.KVM_EXIT_HYPERCALL_LONG_MODE)
        exit_.ret = tdx.hypercall_ret = 0  # QEMU <= 9.2 expects run->hypercall.ret to be 0 on exit
        raise exit_

    def _complete_map_gpa(self, vcpu: VcpuView, tdx: TdxVcpu, ret: int) -> int:
        """``tdx_complete_vmcall_map_gpa``: next chunk, RETRY for a pending interrupt, or done."""
        if ret:
            tdx.r11 = tdx.map_gpa_next
            return abi.TDVMCALL_STATUS_INVALID_OPERAND
        tdx.map_gpa_next += abi.TDX_MAP_GPA_MAX_LEN
        if tdx.map_gpa_next >= tdx.map_gpa_end:
            return abi.TDVMCALL_STATUS_SUCCESS
        if tdx.interrupt_pending:
            tdx.interrupt_pending = False  # delivered when the TD is entered again
            tdx.r11 = tdx.map_gpa_next
            return abi.TDVMCALL_STATUS_RETRY
        return self._map_gpa_exit(vcpu, tdx)


def as_tdx(vm: Any) -> KvmTdx:
    """``vm.arch`` of a TD, or ``ENOTTY`` (``vt_mem_enc_ioctl`` on another VM type)."""
    try:
        arch = view(vm).arch
    except TypeError:
        arch = None
    if not isinstance(arch, KvmTdx):
        raise KvmError(errno.ENOTTY, "", f"{vm!r} is not a TD of the tdx backend")
    return arch
