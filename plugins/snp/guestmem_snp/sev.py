"""Per-VM SEV state (``struct kvm_sev_info``) and the ``KVM_MEMORY_ENCRYPT_OP`` commands.

A :class:`SevVm` is what ``guestmem_vm_init`` returns for SEV, SEV-ES and SNP VMs (it is
``vm.arch``).  A VMM reaches it through ``KVM_MEMORY_ENCRYPT_OP`` on the VM fd:
``vm.memory_encrypt_op(SevCmd(KVM_SEV_INIT2, KvmSevInit(...)))``, which the policy hands
to :meth:`SevVm.ioctl` (``sev_mem_enc_ioctl``), or through the :class:`Sev` helper that
:func:`guestmem_snp.sev` returns and that issues those ioctls.  The other methods of
:class:`SevVm` are the kernel paths the policy hooks run (``sev_gmem_prepare``,
``sev_gmem_invalidate``, ``sev_gmem_post_populate``...).

Costs go to ``vm.count``: ``rmpupdate``, ``psmash``, ``pvalidate``, ``psp_commands``,
``clflush``/``clflush_bytes``, ``direct_map_splits``, ``copied_bytes``, ``zeroed_bytes``,
``psc_exits``, ``userspace_exits``, ``rmp_npf``, ``wbinvd``, ``df_flush``, ``asid_recycles``.

Modelling notes: page contents are kept in plaintext (encryption is not modelled, so a
host read of a private page returns the guest's bytes, where hardware returns
ciphertext); PSP commands always succeed but for the checks listed on each command.
"""

from __future__ import annotations

import errno
import hashlib
import struct
from typing import TYPE_CHECKING, Any, Final

import attrs

from guestmem import cabi, uapi
from guestmem.backend import VmView, view
from guestmem.errors import FailEntryExit, KvmError
from guestmem_snp.ghcb import PscBuffer, PscEngine
from guestmem_snp.host import SVM_SEV_FEAT_SECURE_TSC, SnpHost
from guestmem_snp.rmp import PTRS_PER_PMD, RMP_RC_NAMES, RMP_SUCCESS, RmpEntry

if TYPE_CHECKING:
    from collections.abc import Callable


PAGE_SHIFT: Final = uapi.PAGE_SHIFT
PAGE_SIZE: Final = uapi.PAGE_SIZE

# enum sev_cmd_id (arch/x86/include/uapi/asm/kvm.h): the commands modelled.
KVM_SEV_INIT2: Final = 22
KVM_SEV_SNP_LAUNCH_START: Final = 100
KVM_SEV_SNP_LAUNCH_UPDATE: Final = 101
KVM_SEV_SNP_LAUNCH_FINISH: Final = 102

# KVM_SEV_SNP_PAGE_TYPE_* (arch/x86/include/uapi/asm/kvm.h)
KVM_SEV_SNP_PAGE_TYPE_NORMAL: Final = 0x1
KVM_SEV_SNP_PAGE_TYPE_VMSA: Final = 0x2
KVM_SEV_SNP_PAGE_TYPE_ZERO: Final = 0x3
KVM_SEV_SNP_PAGE_TYPE_UNMEASURED: Final = 0x4
KVM_SEV_SNP_PAGE_TYPE_SECRETS: Final = 0x5
KVM_SEV_SNP_PAGE_TYPE_CPUID: Final = 0x6
_USER_PAGE_TYPES = frozenset({0x1, 0x3, 0x4, 0x5, 0x6})

# Guest policy bits (SEV-SNP firmware ABI; arch/x86/kvm/svm/sev.c SNP_POLICY_MASK_*).
SNP_POLICY_MASK_API_MINOR: Final = 0xFF
SNP_POLICY_MASK_API_MAJOR: Final = 0xFF << 8
SNP_POLICY_MASK_SMT: Final = 1 << 16
SNP_POLICY_MASK_RSVD_MBO: Final = 1 << 17
SNP_POLICY_MASK_MIGRATE_MA: Final = 1 << 18
SNP_POLICY_MASK_DEBUG: Final = 1 << 19
SNP_POLICY_MASK_SINGLE_SOCKET: Final = 1 << 20
SNP_POLICY_MASK_VALID: Final = (
    SNP_POLICY_MASK_API_MINOR
    | SNP_POLICY_MASK_API_MAJOR
    | SNP_POLICY_MASK_SMT
    | SNP_POLICY_MASK_RSVD_MBO
    | SNP_POLICY_MASK_DEBUG
    | SNP_POLICY_MASK_SINGLE_SOCKET
)
"""What Linux 6.18 accepts (``SNP_POLICY_MASK_VALID``); MIGRATE_MA and bits >= 21 are refused."""
SNP_POLICY_DEFAULT: Final = SNP_POLICY_MASK_RSVD_MBO | SNP_POLICY_MASK_SMT

# SEV_FEATURES of the VMSA (arch/x86/include/asm/svm.h SVM_SEV_FEAT_*).
SVM_SEV_FEAT_SNP_ACTIVE: Final = 1 << 0

INITIAL_VMSA_GPA: Final = 0xFFFFFFFFF000
#: ``SVM_EXIT_ERR`` (-1, VMEXIT_INVALID) as 6.18 reports a failed VMRUN in
#: ``fail_entry.hardware_entry_failure_reason``: through the 32-bit ``vmcb->control.exit_code``.
SVM_EXIT_ERR: Final = 0xFFFF_FFFF
#: Rule of the ``KVM_SEV_INIT2`` ordering (backends.md 2.1): KVM_RUN before it, INIT2 after
#: ``KVM_CREATE_VCPU`` or on a VM that needs none.
INIT2_RULE: Final = "SNP-2.1"
#: Rule of ``KVM_RUN`` before the launch made the vCPU's VMSA (backends.md 2.4).
LAUNCH_RULE: Final = "SNP-2.4"
SNP_CPUID_COUNT_MAX: Final = 64
SEV_RET_INVALID_GUEST_STATE: Final = 0x2
SEV_RET_INVALID_PARAM: Final = 0x16
GHCB_VERSION_MAX: Final = 2
#: The VM types ``svm_vm_init`` gives SEV state (``sev->need_init``).
SEV_VM_TYPES: Final = frozenset({uapi.KVM_X86_SEV_VM, uapi.KVM_X86_SEV_ES_VM, uapi.KVM_X86_SNP_VM})
_DIGEST_SIZE: Final = 48
_PAGE_INFO_LEN: Final = 0x70


class HostWriteOutsidePage(ValueError):
    """:meth:`Sev.host_kernel_write` was asked to store bytes that are not all within page
    *pfn* (a negative pfn or offset, or a span past the page end): a usage error of that
    helper, which stands for one store of the host kernel into one page (not a uAPI call,
    so it has no errno).  Raised before the host kernel touches anything."""

    def __init__(self, pfn: int, offset: int, length: int) -> None:
        self.pfn, self.offset, self.length = pfn, offset, length
        super().__init__(f"host_kernel_write: bytes [{offset:#x}, +{length:#x}) are not within page {pfn:#x}")


@attrs.define
class SevCmd:
    """``struct kvm_sev_cmd``: the argument of ``KVM_MEMORY_ENCRYPT_OP`` on an SEV host
    (``__u32 id; __u32 pad0; __u64 data; __u32 error; __u32 sev_fd``).

    ``data`` is the command's own struct (:class:`KvmSevInit`, :class:`KvmSevSnpLaunchStart`,
    :class:`SnpLaunchUpdate`, :class:`KvmSevSnpLaunchFinish`); ``error`` is the firmware
    error the kernel copies back.
    """

    id: int
    data: Any = None
    error: int = 0


@attrs.define
class KvmSevInit:
    """``struct kvm_sev_init`` (``KVM_SEV_INIT2``): ``__u64 vmsa_features; __u32 flags;
    __u16 ghcb_version``."""

    vmsa_features: int = 0
    flags: int = 0
    ghcb_version: int = 0


@attrs.define
class KvmSevSnpLaunchStart:
    """``struct kvm_sev_snp_launch_start``: ``__u64 policy; __u8 gosvw[16]; __u16 flags``."""

    policy: int = 0
    flags: int = 0


@attrs.define
class KvmSevSnpLaunchFinish:
    """``struct kvm_sev_snp_launch_finish``: ``__u16 flags`` (the ID block and host data are
    not modelled)."""

    flags: int = 0


@attrs.define
class SnpLaunchUpdate:
    """``struct kvm_sev_snp_launch_update`` (``__u64 gfn_start; __u64 uaddr; __u64 len;
    __u8 type; __u8 pad0; __u16 flags``), updated in place on partial progress.

    ``data`` stands for the bytes at ``uaddr`` (bytes-like; ``None`` only for ZERO pages);
    ``error`` is the firmware error the kernel copies back.
    """

    gfn_start: int
    data: bytes | None
    len: int
    type: int = KVM_SEV_SNP_PAGE_TYPE_NORMAL
    flags: int = 0
    error: int = 0


def _read_command(cmd: SevCmd) -> Any:
    """``struct kvm_sev_cmd`` and the command's own struct as the kernel reads them: each
    field stored as its C type in place (guestmem.cabi); returns ``cmd.data``."""
    cabi.fields(cmd, id=cabi.u32, error=cabi.u32)
    data = cmd.data
    if isinstance(data, KvmSevInit):
        cabi.fields(data, vmsa_features=cabi.u64, flags=cabi.u32, ghcb_version=cabi.u16)
    elif isinstance(data, KvmSevSnpLaunchStart):
        cabi.fields(data, policy=cabi.u64, flags=cabi.u16)
    elif isinstance(data, KvmSevSnpLaunchFinish):
        cabi.fields(data, flags=cabi.u16)
    elif isinstance(data, SnpLaunchUpdate):
        cabi.fields(data, gfn_start=cabi.u64, len=cabi.u64, type=cabi.u8, flags=cabi.u16, error=cabi.u32)
        if data.data is not None:
            data.data = cabi.buffer(data.data, "data")
    return data


@attrs.frozen
class _Populate:
    """``struct sev_gmem_populate_args`` (the opaque of ``kvm_gmem_populate``)."""

    params: SnpLaunchUpdate
    start_gfn: int
    npages: int


@attrs.define
class SevVcpu:
    """Per-vCPU SEV state (``struct vcpu_sev_es_state``): the VMSA page, the GHCB's PSC
    descriptor and the pending userspace exit."""

    #: ``svm->sev_es.vmsa``: allocated at ``KVM_CREATE_VCPU`` once the VM is an SEV-ES or
    #: SNP guest (``sev_vcpu_create``), None for a vCPU created before ``KVM_SEV_INIT2``.
    vmsa_pfn: int | None = None
    #: ``vcpu->arch.guest_state_protected``: the VMSA was encrypted and measured (SNP:
    #: made a guest-owned VMSA page by ``SNP_LAUNCH_FINISH``).
    guest_state_protected: bool = False
    psc: PscBuffer | None = None
    engine: PscEngine = attrs.Factory(PscEngine)
    #: ``vcpu->arch.complete_userspace_io``: called with ``run->hypercall.ret`` on re-entry.
    pending: Callable[[int], int] | None = None
    #: ``run->hypercall.ret``: what userspace left in the shared ``kvm_run`` for the next
    #: ``KVM_RUN``; KVM sets it to 0 with every ``KVM_EXIT_HYPERCALL`` (QEMU <= 9.2 never
    #: writes it), so a re-entry without an answer completes the request as successful.
    hypercall_ret: int = 0
    #: What the last ``complete_userspace_io`` gave the guest (the hypercall's ``rax``, the
    #: GHCB's ``sw_exit_info_2`` or MSR); ``SnpGuest.resume`` clears it first.
    completed: int | None = None


def page_info_digest(current: bytes, contents: bytes, page_type: int, gpa: int) -> bytes:
    """The launch digest extended by one page: SHA-384 over the PAGE_INFO structure.

    PAGE_INFO = digest so far, SHA-384 of the contents (zero for ZERO, UNMEASURED,
    SECRETS and CPUID pages), length 0x70, page type, IMI, VMPL permissions, gpa.
    """
    info = current + contents + struct.pack("<HBBBBBBQ", _PAGE_INFO_LEN, page_type, 0, 0, 0, 0, 0, gpa)
    assert len(info) == _PAGE_INFO_LEN
    return hashlib.sha384(info).digest()


class SevVm:
    """``struct kvm_sev_info`` of one SEV / SEV-ES / SNP VM.

    Every VM of an SVM host has one; the policy keeps it (as ``vm.arch``) for the SEV
    types only.  That of another VM type is all zero, which is how ``sev_mem_enc_ioctl``
    answers it: see :func:`no_sev_ioctl`.
    """

    def __init__(self, vm: VmView) -> None:
        self.vm = vm
        host = vm.host.arch
        assert isinstance(host, SnpHost), "guestmem_host_init made the SNP host state"
        self.host: SnpHost = host
        self.snp = vm.vm_type == uapi.KVM_X86_SNP_VM
        self.es = self.snp or vm.vm_type == uapi.KVM_X86_SEV_ES_VM
        #: ``svm_vm_init``: every VM type but DEFAULT and SW_PROTECTED waits for INIT2.
        self.need_init = vm.vm_type in SEV_VM_TYPES
        self.active = False
        self.asid = 0
        self.ghcb_version = 0
        self.vmsa_features = 0
        self.policy = 0
        self.gctx_pfn: int | None = None
        self.guest_req_pfn: int | None = None
        self.guest_resp_pfn: int | None = None
        self.snp_finished = False
        self.launch_digest = bytes(_DIGEST_SIZE)
        self.vmsa_pfns: dict[int, int] = {}
        self.vcpus: dict[int, SevVcpu] = {}

    def __repr__(self) -> str:
        kind = "SNP" if self.snp else "SEV-ES" if self.es else "SEV"
        return f"<SevVm {kind} asid={self.asid} vm={self.vm.vm_id}>"

    # --- helpers ---------------------------------------------------------------------------
    @property
    def snp_active(self) -> bool:
        """``sev_snp_guest(kvm)``: an SNP VM after KVM_SEV_INIT2."""
        return self.snp and self.active

    def vcpu_state(self, vcpu_id: int) -> SevVcpu:
        """The SEV state of vCPU *vcpu_id* (``sev_vcpu_create`` made it)."""
        return self.vcpus[vcpu_id]

    # --- vCPUs: creation, KVM_RUN, teardown ---------------------------------------------------
    def vcpu_create(self, vcpu_id: int) -> SevVcpu:
        """``sev_vcpu_create``: an SEV-ES/SNP guest's vCPU gets a VMSA page.

        Only once the VM is one (``sev_es_guest``: after ``KVM_SEV_INIT2``); a vCPU created
        earlier is a plain vCPU, and ``KVM_SEV_INIT2`` is refused from then on (SNP-2.1).
        Linux 6.18 allocates the page after ``SNP_LAUNCH_FINISH`` too: such a vCPU's VMSA
        is never launched, so it cannot run (SNP-2.4).
        """
        state = self.vcpus[vcpu_id] = SevVcpu()
        if self.es and self.active:
            pfn = state.vmsa_pfn = self.vm.host.alloc(1)  # snp_safe_alloc_page
            self.host.freed.erase(pfn, pfn + 1)  # KVM holds the page again
        return state

    def complete_userspace_io(self, vcpu_id: int) -> None:
        """The head of ``kvm_arch_vcpu_ioctl_run``: a pending ``complete_userspace_io`` is
        cleared and called, reading ``run->hypercall.ret`` (:attr:`SevVcpu.hypercall_ret`)
        whether userspace answered the exit or not; without one (``NULL``) the field is
        ignored.  What the completion gives the guest lands in :attr:`SevVcpu.completed`; a
        completion that leaves to userspace again raises the next ``KVM_EXIT_HYPERCALL``
        and the guest is not entered (``cui()`` returned 0)."""
        state = self.vcpus[vcpu_id]
        cui, state.pending = state.pending, None
        if cui is not None:
            state.completed = cui(state.hypercall_ret)

    def vcpu_pre_run(self, vcpu_id: int) -> None:
        """``KVM_RUN``'s checks of an SEV vCPU, then VMRUN's of an SNP one.

        ``svm_vcpu_pre_run``: before ``KVM_SEV_INIT2`` (``sev->need_init``) KVM_RUN fails
        with EINVAL.  An SNP vCPU then enters only through a VMSA the launch made a
        guest-owned VMSA page (``SNP_LAUNCH_FINISH``, ``snp_launch_update_vmsa``): VMRUN of
        any other fails with VMEXIT_INVALID, which ``svm_handle_exit`` reports as
        ``KVM_EXIT_FAIL_ENTRY``.  SEV and SEV-ES launches are not modelled: their vCPUs run
        once INIT2 is done.
        """
        if self.need_init:
            raise KvmError(
                errno.EINVAL, INIT2_RULE, "KVM_RUN before KVM_SEV_INIT2 (svm_vcpu_pre_run: need_init)"
            )
        state = self.vcpus[vcpu_id]
        if self.snp and not state.guest_state_protected:
            when = "after" if self.snp_finished else "before"
            raise FailEntryExit(
                SVM_EXIT_ERR,
                f"VMRUN of vCPU {vcpu_id}: its VMSA is no launched VMSA page (created {when} "
                "KVM_SEV_SNP_LAUNCH_FINISH)",
                rule=LAUNCH_RULE,
            )

    def free_vcpu(self, vcpu_id: int) -> None:
        """``sev_free_vcpu``: an SNP guest's VMSA goes back to shared in the RMP before it
        is freed; if that fails it is leaked."""
        state = self.vcpus.get(vcpu_id)
        if state is None or state.vmsa_pfn is None:
            return
        pfn, state.vmsa_pfn = state.vmsa_pfn, None
        self.vmsa_pfns.pop(vcpu_id, None)
        with self.host.acting(self.vm):
            if self.snp_active and not self._kvm_rmp_make_shared(pfn, bug_vm=False):
                return
        self.vm.host.free(pfn, 1)
        self.host.freed.set(pfn, pfn + 1, True)

    def _psp(self, command: str, n: int = 1) -> None:
        self.vm.count("psp_commands", n)
        self.vm.trace("snp_psp_command", command=command, n=n)

    def _adjust_direct_map(self, pfn: int, npages: int) -> None:
        """``adjust_direct_map`` before 4K RMPUPDATEs: split the 2M direct-map blocks they hit.

        ``rmpupdate()`` does it for every 4K update (to private or to shared, before the
        instruction and whatever its outcome); 2M updates and PSMASH leave the direct map alone.
        """
        self.vm.count("direct_map_splits", self.host.split_direct_map(pfn, npages))

    def _alloc_firmware_page(self) -> int:
        """``snp_alloc_firmware_page``: a new page, Firmware in the RMP (``rmp_mark_pages_firmware``)."""
        pfn = self.vm.host.alloc(1)
        self._adjust_direct_map(pfn, 1)
        with self.host.acting(self.vm):
            rc = self.host.rmp.mark_firmware(pfn)
        self.vm.count("rmpupdate")
        assert rc == RMP_SUCCESS, "a freshly allocated page is never assigned"
        return pfn

    def _free_firmware_page(self, pfn: int) -> None:
        """``snp_free_firmware_page``: PAGE_RECLAIM + shared (``snp_reclaim_pages``), then free.

        A page that cannot be reclaimed is leaked, never given back to the host.
        """
        with self.host.acting(self.vm):
            if self._page_reclaim(pfn, bug_vm=False):
                self.vm.host.free(pfn, 1)
                self.host.freed.set(pfn, pfn + 1, True)

    def _rmp_failed(self, what: str, pfn: int, rc: int) -> None:
        self.vm.count("rmp_update_failures")
        self.vm.trace("snp_rmp_warn", what=what, pfn=pfn, rc=RMP_RC_NAMES.get(rc, str(rc)))
        self.vm.host.warn("guestmem.snp", "rmp update failed", what=what, pfn=pfn, rc=rc, vm=self.vm.vm_id)

    # --- uAPI: KVM_MEMORY_ENCRYPT_OP ---------------------------------------------------------
    def ioctl(self, cmd: SevCmd) -> int:
        """``sev_mem_enc_ioctl``: run one command; 0 on success, :class:`KvmError` otherwise.

        The command's structs are read first, each field as its C type (``copy_from_user``;
        :func:`guestmem.cabi.fields`): a field that is no integer is a TypeError naming it,
        before anything changes.
        """
        data = _read_command(cmd)
        if self.snp_active and cmd.id < KVM_SEV_SNP_LAUNCH_START:
            # Once an SNP guest, only the SNP commands (id >= 100) are allowed.
            raise KvmError(errno.EPERM, "", f"SEV command {cmd.id} on an initialised SNP VM")
        if cmd.id == KVM_SEV_INIT2:
            init = data if isinstance(data, KvmSevInit) else KvmSevInit()
            self.init2(init.vmsa_features, init.ghcb_version, init.flags)
        elif cmd.id == KVM_SEV_SNP_LAUNCH_START:
            start = data if isinstance(data, KvmSevSnpLaunchStart) else KvmSevSnpLaunchStart()
            self.snp_launch_start(start.policy, start.flags)
        elif cmd.id == KVM_SEV_SNP_LAUNCH_UPDATE:
            if not isinstance(data, SnpLaunchUpdate):
                raise KvmError(
                    errno.EFAULT, "", "KVM_SEV_SNP_LAUNCH_UPDATE needs a kvm_sev_snp_launch_update"
                )
            try:
                self.snp_launch_update(data)
            finally:
                cmd.error = data.error
        elif cmd.id == KVM_SEV_SNP_LAUNCH_FINISH:
            finish = data if isinstance(data, KvmSevSnpLaunchFinish) else KvmSevSnpLaunchFinish()
            self.snp_launch_finish(finish.flags)
        else:
            raise KvmError(errno.EINVAL, "", f"SEV command {cmd.id} is not modelled")
        return 0

    def init2(self, vmsa_features: int = 0, ghcb_version: int = 0, flags: int = 0) -> None:
        """``KVM_SEV_INIT2`` (``sev_guest_init2`` / ``__sev_guest_init``): allocate the ASID."""
        if not self.need_init or self.active:
            raise KvmError(errno.EINVAL, INIT2_RULE, "KVM_SEV_INIT2: the VM is already initialised")
        if self.vm.vcpus():
            raise KvmError(errno.EINVAL, INIT2_RULE, "KVM_SEV_INIT2 must come before KVM_CREATE_VCPU")
        if flags:
            raise KvmError(errno.EINVAL, "", f"KVM_SEV_INIT2: flags must be 0, got {flags:#x}")
        valid = self.host.vmsa_features if self.es else 0
        if not self.snp:
            valid &= ~SVM_SEV_FEAT_SECURE_TSC
        if vmsa_features & ~valid:
            raise KvmError(
                errno.EINVAL, "", f"KVM_SEV_INIT2: vmsa_features {vmsa_features:#x} not in {valid:#x}"
            )
        if ghcb_version > GHCB_VERSION_MAX or (not self.es and ghcb_version):
            raise KvmError(errno.EINVAL, "", f"KVM_SEV_INIT2: bad ghcb_version {ghcb_version}")
        if self.es and ghcb_version == 0:
            ghcb_version = 2
        if self.snp and ghcb_version < 2:
            raise KvmError(errno.EINVAL, "", "KVM_SEV_INIT2: SNP needs GHCB protocol version 2")
        recycles = self.host.asids.stats["asid_recycle"]
        self.asid = self.host.asids.allocate(es=self.es, snp=self.snp)
        if self.host.asids.stats["asid_recycle"] != recycles:
            self.vm.count("asid_recycles")
            self.vm.count("wbinvd")
            self.vm.count("df_flush")
        self.ghcb_version = ghcb_version
        self.vmsa_features = vmsa_features | (SVM_SEV_FEAT_SNP_ACTIVE if self.snp else 0)
        if self.snp:
            # snp_guest_req_init: the bounce pages of SNP guest requests; the response page
            # is a firmware page for the guest's whole life.
            self.guest_req_pfn = self.vm.host.alloc(1)
            self.guest_resp_pfn = self._alloc_firmware_page()
        self.active = True
        self.need_init = False
        self.vm.trace("sev_init", asid=self.asid, snp=self.snp, es=self.es)

    def snp_launch_start(self, policy: int = SNP_POLICY_DEFAULT, flags: int = 0) -> None:
        """``KVM_SEV_SNP_LAUNCH_START``: create the guest context (a firmware page), bind the ASID."""
        if not self.snp_active:
            raise KvmError(errno.ENOTTY, "", "KVM_SEV_SNP_LAUNCH_START needs an initialised SNP VM")
        if self.gctx_pfn is not None:
            raise KvmError(errno.EINVAL, "", "KVM_SEV_SNP_LAUNCH_START: the launch already started")
        if flags:
            raise KvmError(errno.EINVAL, "", f"KVM_SEV_SNP_LAUNCH_START: flags must be 0, got {flags:#x}")
        if policy & ~SNP_POLICY_MASK_VALID:
            raise KvmError(errno.EINVAL, "", f"SNP policy {policy:#x} has unknown bits")
        if not policy & SNP_POLICY_MASK_RSVD_MBO:
            raise KvmError(errno.EINVAL, "", "SNP policy lacks the must-be-one bit 17")
        pfn = self._alloc_firmware_page()
        self.gctx_pfn = pfn
        self.policy = policy
        self.launch_digest = bytes(_DIGEST_SIZE)
        self._psp("SNP_GCTX_CREATE")
        self._psp("SNP_LAUNCH_START")
        self._psp("SNP_ACTIVATE")
        self.vm.trace("snp_launch_start", policy=policy, gctx_pfn=pfn)

    def snp_launch_update(self, params: SnpLaunchUpdate) -> None:
        """``KVM_SEV_SNP_LAUNCH_UPDATE`` (P-1..P-5 through ``kvm_gmem_populate``).

        On partial progress *params* is advanced (``gfn_start``, ``data``, ``len``) and the
        call returns normally, as the kernel does; call again until ``len == 0``.  When
        ``kvm_gmem_populate`` fails before the first page (whatever its reason: a shared or
        already prepared gfn, an unreadable source, a firmware error) the ioctl fails with
        ``EIO`` and ``params.error`` holds the firmware's error, as ``snp_launch_update`` does.
        """
        if not self.snp_active or self.gctx_pfn is None:
            raise KvmError(errno.EINVAL, "", "KVM_SEV_SNP_LAUNCH_UPDATE outside of a launch")
        if params.flags or params.type not in _USER_PAGE_TYPES:
            raise KvmError(errno.EINVAL, "", f"KVM_SEV_SNP_LAUNCH_UPDATE: bad type {params.type} or flags")
        if params.len <= 0 or params.len % PAGE_SIZE:
            raise KvmError(
                errno.EINVAL, "", f"KVM_SEV_SNP_LAUNCH_UPDATE: len {params.len:#x} not page aligned"
            )
        npages = params.len >> PAGE_SHIFT
        # ``data`` stands for the memory at uaddr: bytes past its end (or None) are unreadable,
        # so copy_from_user faults on the page that reaches them (sev_gmem_post_populate).
        src = None if params.type == KVM_SEV_SNP_PAGE_TYPE_ZERO else params.data or b""
        slot = self.vm.slot_for_gfn(params.gfn_start)
        if slot is None or not slot.has_gmem:
            raise KvmError(errno.EINVAL, "P-2", f"gfn {params.gfn_start:#x} is not in a guest_memfd memslot")
        params.error = 0
        opaque = _Populate(params, params.gfn_start, npages)
        try:
            count = self.vm.gmem_populate(params.gfn_start, src, npages, opaque)
        except KvmError as exc:
            raise KvmError(
                errno.EIO, exc.rule, f"KVM_SEV_SNP_LAUNCH_UPDATE: kvm_gmem_populate failed: {exc.strerror}"
            ) from exc
        params.gfn_start += count
        params.len -= count * PAGE_SIZE
        if params.data is not None and params.type != KVM_SEV_SNP_PAGE_TYPE_ZERO:
            params.data = params.data[count * PAGE_SIZE :]

    def snp_launch_finish(self, flags: int = 0) -> bytes:
        """``KVM_SEV_SNP_LAUNCH_FINISH``: measure every vCPU's VMSA, seal; returns the digest."""
        if not self.snp_active:
            raise KvmError(errno.ENOTTY, "", "KVM_SEV_SNP_LAUNCH_FINISH needs an initialised SNP VM")
        if self.gctx_pfn is None or self.snp_finished:
            raise KvmError(errno.EINVAL, "", "KVM_SEV_SNP_LAUNCH_FINISH outside of a launch")
        if flags:
            raise KvmError(errno.EINVAL, "", f"KVM_SEV_SNP_LAUNCH_FINISH: flags must be 0, got {flags:#x}")
        rmp = self.host.rmp
        for vcpu_id in (vcpu.vcpu_id for vcpu in self.vm.vcpus()):
            state = self.vcpus[vcpu_id]
            pfn = state.vmsa_pfn
            assert pfn is not None, "every vCPU of an initialised SNP VM has a VMSA"
            vmsa = struct.pack("<QQ", vcpu_id, self.vmsa_features)  # sev_es_sync_vmsa
            self.vm.host.write(pfn, 0, vmsa)
            self._adjust_direct_map(pfn, 1)
            with self.host.acting(self.vm):
                rc = rmp.make_private(pfn, INITIAL_VMSA_GPA, uapi.PG_LEVEL_4K, self.asid, immutable=True)
                self.vm.count("rmpupdate")
                if rc:
                    raise KvmError(errno.EINVAL, "", f"VMSA of vCPU {vcpu_id}: RMPUPDATE failed ({rc})")
                rmp.launch_update(pfn, vmsa=True)
            self._psp("SNP_LAUNCH_UPDATE(VMSA)")
            contents = hashlib.sha384(self.vm.host.read(pfn, 0, PAGE_SIZE)).digest()
            self.launch_digest = page_info_digest(
                self.launch_digest, contents, KVM_SEV_SNP_PAGE_TYPE_VMSA, INITIAL_VMSA_GPA
            )
            self.vmsa_pfns[vcpu_id] = pfn
            state.guest_state_protected = True
        self._psp("SNP_LAUNCH_FINISH")
        self.snp_finished = True
        # sev.c snp_launch_finish: no more LAUNCH_UPDATE, so private pages may now be handed
        # out by marking the RMP entry private, on first access or by KVM_PRE_FAULT_MEMORY.
        self.vm.pre_fault_allowed = True
        self.vm.trace("snp_launch_finish", digest=self.launch_digest.hex(), vcpus=len(self.vmsa_pfns))
        return self.launch_digest

    # --- kernel paths run by the policy hooks -----------------------------------------------
    def gmem_prepare(self, gfn: int, pfn: int, order: int, npages: int) -> None:
        """``sev_gmem_prepare``: make new gmem folios private in the RMP (Guest-Invalid).

        2 MiB iff the folio is 2 MiB (order >= 9), naturally aligned, and all 512 RMP
        entries are unassigned (``is_large_rmp_possible``); else 4 KiB entries.  A run of
        folios (the core hands a run over at once: ``range_faults``) is what preparing each
        folio in turn does: a folio already assigned is left alone, as the kernel's
        per-folio check does, and a run none of whose pages is assigned costs one RMP update.
        """
        if not self.snp_active:
            return
        rmp = self.host.rmp
        self.host.freed.erase(pfn, pfn + npages)
        with self.host.acting(self.vm):
            if not order:
                # 6.18 folios are order 0: one 4K entry each (a run: one RMPUPDATE per page).
                rc, failed = self._prepare_4k(gfn, pfn, pfn, pfn + npages)
            elif order >= uapi.PMD_ORDER and not rmp.any_assigned(pfn, npages):
                rc, failed = self._prepare_fresh_2m(gfn, pfn, npages)
            else:
                rc, failed = RMP_SUCCESS, pfn
                nr = min(1 << order, npages)
                for head in range(pfn, pfn + npages, nr):
                    rc, failed = self._prepare_folio(gfn + head - pfn, head, min(nr, pfn + npages - head))
                    if rc:
                        break
        if rc:
            self._rmp_failed("sev_gmem_prepare", failed, rc)
            raise KvmError(errno.EINVAL, "", f"sev_gmem_prepare: RMPUPDATE of pfn {failed:#x} failed ({rc})")

    def _prepare_fresh_2m(self, gfn: int, pfn: int, npages: int) -> tuple[int, int]:
        """Folios of order 9 none of whose pages is assigned: a 2M entry each if the gpa is
        2 MiB aligned too (the pfn is: large folios are naturally aligned), else 4K entries."""
        if pfn % PTRS_PER_PMD or gfn % PTRS_PER_PMD:
            return self._prepare_4k(gfn, pfn, pfn, pfn + npages)
        rc = self.host.rmp.make_private(
            pfn, gfn << PAGE_SHIFT, uapi.PG_LEVEL_2M, self.asid, immutable=False, npages=npages
        )
        self.vm.count("rmpupdate", npages // PTRS_PER_PMD)
        return rc, pfn

    def _prepare_folio(self, gfn: int, pfn: int, npages: int) -> tuple[int, int]:
        """One large folio, as ``sev_gmem_prepare`` sees it: nothing if its first page is
        assigned, a 2M entry if possible, else 4K entries for its unassigned pages."""
        rmp = self.host.rmp
        if rmp.is_assigned(pfn):
            return RMP_SUCCESS, pfn
        if npages >= PTRS_PER_PMD and not rmp.any_assigned(pfn - pfn % PTRS_PER_PMD, PTRS_PER_PMD):
            return self._prepare_fresh_2m(gfn, pfn, npages)
        return self._prepare_4k(gfn, pfn, pfn, pfn + npages)

    def _prepare_4k(self, gfn: int, pfn: int, start: int, end: int) -> tuple[int, int]:
        """4K entries for the unassigned pages of ``[start, end)`` (*gfn* backs *pfn*)."""
        rmp = self.host.rmp
        for s, e in list(rmp.unassigned(start, end)):
            gpa = (gfn + s - pfn) << PAGE_SHIFT
            self._adjust_direct_map(s, e - s)
            rc = rmp.make_private(s, gpa, uapi.PG_LEVEL_4K, self.asid, immutable=False, npages=e - s)
            self.vm.count("rmpupdate", e - s)
            if rc:
                return rc, s
        return RMP_SUCCESS, start

    def gmem_invalidate(self, start: int, end: int) -> None:
        """``sev_gmem_invalidate``: every assigned pfn back to shared, PSMASH where partial, clflush."""
        if not self.snp:
            return
        rmp = self.host.rmp
        self.host.freed.set(start, end, True)
        with self.host.acting(self.vm):
            for s, e, entry in list(rmp.runs(start, end)):
                if entry.immutable:
                    # RMPUPDATE FAIL_PERMISSION: WARN, the folio is freed anyway.
                    self._adjust_direct_map(s, e - s)
                    self.vm.count("rmpupdate", e - s)
                    self._rmp_failed("sev_gmem_invalidate", s, 2)
                    self.host.freed_while_assigned.set(s, e, True)
                    continue
                if entry.level == uapi.PG_LEVEL_4K:
                    self._make_shared_4k(s, e)
                    continue
                pos = s
                if pos % PTRS_PER_PMD:  # head of a partly freed 2M page
                    pos = self._psmash_and_share(pos, min(e, pos - pos % PTRS_PER_PMD + PTRS_PER_PMD))
                full_end = e - e % PTRS_PER_PMD
                if full_end > pos:
                    rc = rmp.make_shared(pos, uapi.PG_LEVEL_2M, npages=full_end - pos)
                    assert rc == RMP_SUCCESS
                    blocks = (full_end - pos) // PTRS_PER_PMD
                    self.vm.count("rmpupdate", blocks)
                    self.vm.count("clflush", blocks)
                    self.vm.count("clflush_bytes", (full_end - pos) * PAGE_SIZE)
                    pos = full_end
                if pos < e:  # tail of a partly freed 2M page
                    self._psmash_and_share(pos, e)

    def _psmash_and_share(self, start: int, end: int) -> int:
        rmp = self.host.rmp
        rc = rmp.psmash(start - start % PTRS_PER_PMD)
        self.vm.count("psmash")
        if rc:
            self._rmp_failed("snp_rmptable_psmash", start, rc)
        self._make_shared_4k(start, end)
        return end

    def _make_shared_4k(self, start: int, end: int) -> None:
        self._adjust_direct_map(start, end - start)
        rc = self.host.rmp.make_shared(start, uapi.PG_LEVEL_4K, npages=end - start)
        self.vm.count("rmpupdate", end - start)
        if rc:
            self._rmp_failed("rmp_make_shared", start, rc)
            self.host.freed_while_assigned.set(start, end, True)
            return
        self.vm.count("clflush", end - start)
        self.vm.count("clflush_bytes", (end - start) * PAGE_SIZE)

    def post_populate(self, gfn: int, pfn: int, src: bytes | None, order: int, opaque: Any) -> int:
        """``sev_gmem_post_populate``: per 4K page, copy, RMPUPDATE (Pre-Guest), LAUNCH_UPDATE.

        A failing page is left shared (the firmware's failure reclaims it); the pages of this
        folio launched before it go back to shared (kernel: ``err:``).
        """
        if not isinstance(opaque, _Populate):
            raise KvmError(errno.EINVAL, "P-5", "kvm_gmem_populate on an SNP VM outside LAUNCH_UPDATE")
        params = opaque.params
        if src is None and params.type != KVM_SEV_SNP_PAGE_TYPE_ZERO:
            raise KvmError(errno.EINVAL, "", "sev_gmem_post_populate: no source for a non-ZERO page")
        npages = 1 << order
        done = 0
        with self.host.acting(self.vm):
            try:
                for i in range(npages):
                    page = None if src is None else src[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
                    self._populate_one(params, gfn + i, pfn + i, page)
                    done += 1
            except KvmError:
                if done:
                    self._kvm_rmp_make_shared(pfn, done)
                raise
        return 0

    def _populate_one(self, params: SnpLaunchUpdate, gfn: int, pfn: int, src: bytes | None) -> None:
        rmp = self.host.rmp
        host = self.vm.host
        self.host.freed.erase(pfn, pfn + 1)
        if rmp.is_assigned(pfn):
            raise KvmError(errno.EEXIST, "", f"sev_gmem_post_populate: pfn {pfn:#x} is already assigned")
        page_type = params.type
        if src is not None:
            if len(src) < PAGE_SIZE:
                raise KvmError(errno.EFAULT, "", f"sev_gmem_post_populate: gfn {gfn:#x}: source unreadable")
            host.write(pfn, 0, src)
            self.vm.count("copied_bytes", PAGE_SIZE)
        self._adjust_direct_map(pfn, 1)
        rc = rmp.make_private(pfn, gfn << PAGE_SHIFT, uapi.PG_LEVEL_4K, self.asid, immutable=True)
        self.vm.count("rmpupdate")
        if rc:
            raise KvmError(
                errno.EFAULT, "", f"sev_gmem_post_populate: RMPUPDATE of pfn {pfn:#x} failed ({rc})"
            )
        self._psp("SNP_LAUNCH_UPDATE")
        fw_error = 0
        if self.snp_finished:
            fw_error = SEV_RET_INVALID_GUEST_STATE  # the guest context is no longer launching
        elif page_type == KVM_SEV_SNP_PAGE_TYPE_CPUID:
            (count,) = struct.unpack_from("<I", host.read(pfn, 0, 4))
            if count > SNP_CPUID_COUNT_MAX:
                fw_error = SEV_RET_INVALID_PARAM
        if fw_error:
            params.error = fw_error
            self._page_reclaim(pfn)
            raise KvmError(errno.EIO, "", f"SNP_LAUNCH_UPDATE of gfn {gfn:#x}: firmware error {fw_error:#x}")
        if page_type == KVM_SEV_SNP_PAGE_TYPE_ZERO:
            host.zero(pfn, 1)
            self.vm.count("zeroed_bytes", PAGE_SIZE)
        elif page_type == KVM_SEV_SNP_PAGE_TYPE_SECRETS:
            secrets = hashlib.sha384(b"snp-secrets" + struct.pack("<IQ", self.asid, gfn)).digest()
            host.zero(pfn, 1)
            host.write(pfn, 0, secrets)
        if page_type == KVM_SEV_SNP_PAGE_TYPE_NORMAL:
            contents = hashlib.sha384(host.read(pfn, 0, PAGE_SIZE)).digest()
        else:
            contents = bytes(_DIGEST_SIZE)
        rc = rmp.launch_update(pfn)
        assert rc == RMP_SUCCESS
        self.launch_digest = page_info_digest(self.launch_digest, contents, page_type, gfn << PAGE_SHIFT)

    def _leak(self, what: str, pfn: int, npages: int, rc: int, bug_vm: bool) -> bool:
        """``snp_leak_pages`` (never back to the host) and, for KVM's own paths, ``KVM_BUG``."""
        self._rmp_failed(what, pfn, rc)
        self.host.leaked.set(pfn, pfn + npages, True)
        if bug_vm:
            self.vm.kill(f"KVM_BUG: {what} of pfn {pfn:#x} failed ({rc})")
        return False

    def _kvm_rmp_make_shared(self, pfn: int, npages: int = 1, *, bug_vm: bool = True) -> bool:
        """``kvm_rmp_make_shared``: 4K RMPUPDATEs to shared; a failure bugs the VM, leaks the page."""
        self._adjust_direct_map(pfn, npages)
        rc = self.host.rmp.make_shared(pfn, uapi.PG_LEVEL_4K, npages=npages)
        self.vm.count("rmpupdate", npages)
        return self._leak("kvm_rmp_make_shared", pfn, npages, rc, bug_vm) if rc else True

    def _page_reclaim(self, pfn: int, npages: int = 1, *, bug_vm: bool = True) -> bool:
        """``snp_page_reclaim``: PAGE_RECLAIM then shared; a failure bugs the VM, leaks the pages.

        ``bug_vm=False`` is ``snp_reclaim_pages`` of the firmware driver (the guest context
        at teardown): leak, no VM to bug.
        """
        self._psp("SNP_PAGE_RECLAIM", npages)
        rc = self.host.rmp.page_reclaim(pfn, npages)
        if rc:
            return self._leak("snp_page_reclaim", pfn, npages, rc, bug_vm)
        return self._kvm_rmp_make_shared(pfn, npages, bug_vm=bug_vm)

    def fault_run(self, pfn: int, npages: int) -> int:
        """How many of the *npages* pages of a private fault run from *pfn* share its RMP
        page size, which ``max_mapping_level`` answers: the whole run before INIT2."""
        return self.host.rmp.level_run(pfn, npages) if self.snp_active else npages

    def max_mapping_level(self, pfn: int, is_private: bool) -> int | None:
        """``sev_gmem_max_mapping_level``: the RMP page size; unassigned -> 4K."""
        if not self.snp_active or not is_private:
            return None
        entry = self.host.rmp.lookup(pfn)
        return entry.level if entry.assigned else uapi.PG_LEVEL_4K

    def rmp_entry(self, pfn: int) -> RmpEntry:
        """The RMP entry of *pfn*."""
        return self.host.rmp.lookup(pfn)

    def host_write_verdict(self, pfn: int) -> str | None:
        """A host write to *pfn*: the RMP #PF verdict if it is assigned, else None."""
        return self.host.host_write_verdict(pfn)

    def host_kernel_write(self, pfn: int, data: bytes, offset: int = 0) -> None:
        """The host kernel stores *data* to *pfn* through its direct map.

        An RMP-assigned page takes an RMP #PF: the host goes down with that verdict
        (``HostCrash``), as ``guestmem_host_access`` reports it for host mappings.  The
        store is one page's: bytes ``[offset, offset + len(data))`` of page *pfn*, else
        :class:`HostWriteOutsidePage`.
        """
        data = cabi.buffer(data, "data")
        pfn, offset = cabi.index(pfn, "pfn"), cabi.index(offset, "offset")
        if pfn < 0 or offset < 0 or offset + len(data) > PAGE_SIZE:
            raise HostWriteOutsidePage(pfn, offset, len(data))
        self.vm.host.kernel_write(pfn, offset, data)

    def destroy(self) -> None:
        """``sev_vm_destroy``: guest-request pages and GCTX back to the host, ASID freed."""
        host = self.vm.host
        if self.guest_resp_pfn is not None:  # snp_guest_req_cleanup
            self._free_firmware_page(self.guest_resp_pfn)
            self.guest_resp_pfn = None
        if self.guest_req_pfn is not None:
            host.free(self.guest_req_pfn, 1)
            self.guest_req_pfn = None
        if self.gctx_pfn is not None:  # snp_decommission_context
            self._psp("SNP_DECOMMISSION")
            self._free_firmware_page(self.gctx_pfn)
            self.gctx_pfn = None
        if self.active:
            self.vm.count("wbinvd")  # WBNOINVD on the CPUs that ran the VM
            self.host.asids.free(self.asid)
            self.vm.trace("sev_asid_free", asid=self.asid)
            self.active = False


def no_sev_ioctl(vm: VmView, cmd: SevCmd) -> int:
    """``sev_mem_enc_ioctl`` on a VM that is no SEV type (DEFAULT, SW_PROTECTED): its
    ``kvm_sev_info`` is all zero, so INIT2 is EINVAL (no ``need_init``), the SNP launch
    commands ENOTTY or EINVAL as on an SEV VM before INIT2."""
    return SevVm(vm).ioctl(cmd)


def as_sev(vm: Any) -> SevVm:
    """``vm.arch`` of an SEV VM, or ``ENOTTY`` (``KVM_MEMORY_ENCRYPT_OP`` on another VM)."""
    try:
        arch = view(vm).arch
    except TypeError:
        arch = None
    if not isinstance(arch, SevVm):
        raise KvmError(errno.ENOTTY, "", f"{vm!r} is not an SEV/SEV-ES/SNP VM of the snp backend")
    return arch


class Sev:
    """A VMM's SEV commands on one VM: each is ``KVM_MEMORY_ENCRYPT_OP`` (or
    ``KVM_ENABLE_CAP``) on the uAPI ``Vm``; what they changed is read from :attr:`state`.
    """

    def __init__(self, vm: Any) -> None:
        self.vm = vm
        self.state: SevVm = as_sev(vm)

    def __repr__(self) -> str:
        return f"<Sev {self.state!r}>"

    def _op(self, cmd_id: int, data: Any) -> SevCmd:
        cmd = SevCmd(cmd_id, data)
        self.vm.memory_encrypt_op(cmd)
        return cmd

    # commands
    def enable_cap_exit_hypercall(self, mask: int) -> None:
        """``KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)``: which hypercalls exit to userspace."""
        self.vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, mask)

    def init2(self, vmsa_features: int = 0, ghcb_version: int = 0, flags: int = 0) -> None:
        """``KVM_SEV_INIT2``."""
        self._op(KVM_SEV_INIT2, KvmSevInit(vmsa_features, flags, ghcb_version))

    def snp_launch_start(self, policy: int = SNP_POLICY_DEFAULT, flags: int = 0) -> None:
        """``KVM_SEV_SNP_LAUNCH_START``."""
        self._op(KVM_SEV_SNP_LAUNCH_START, KvmSevSnpLaunchStart(policy, flags))

    def snp_launch_update(self, params: SnpLaunchUpdate) -> None:
        """``KVM_SEV_SNP_LAUNCH_UPDATE``; *params* advances on partial progress."""
        self._op(KVM_SEV_SNP_LAUNCH_UPDATE, params)

    def launch_update_data(
        self,
        gpa: int,
        data: bytes | None,
        page_type: int = KVM_SEV_SNP_PAGE_TYPE_NORMAL,
        *,
        length: int | None = None,
    ) -> None:
        """LAUNCH_UPDATE of bytes-like *data* (or *length* bytes of ZERO pages) at *gpa*,
        until done."""
        gpa = cabi.u64(gpa, "gpa")
        if data is not None:
            data = cabi.buffer(data, "data")
            size = len(data)
        elif length is not None:
            size = cabi.u64(length, "length")
        else:
            raise ValueError("ZERO pages need a length")
        params = SnpLaunchUpdate(gpa >> PAGE_SHIFT, data, size, page_type)
        while params.len:
            self.snp_launch_update(params)

    def snp_launch_finish(self, flags: int = 0) -> bytes:
        """``KVM_SEV_SNP_LAUNCH_FINISH``; returns the launch digest."""
        self._op(KVM_SEV_SNP_LAUNCH_FINISH, KvmSevSnpLaunchFinish(flags))
        return self.state.launch_digest

    def host_kernel_write(self, pfn: int, data: bytes, offset: int = 0) -> None:
        """The host kernel stores *data* to *pfn* (an RMP-assigned page crashes the host).

        A model-only helper, not a uAPI call: a non-integer *pfn* or *offset*, or *data*
        that is not bytes-like, is a TypeError naming it, and bytes that are not all within
        page *pfn* are :class:`HostWriteOutsidePage` (a ValueError), before anything is
        touched.
        """
        with self.state.vm.host.operation():
            self.state.host_kernel_write(pfn, data, offset)

    # what the commands left
    @property
    def host(self) -> SnpHost:
        """The host's RMP and ASIDs."""
        return self.state.host

    @property
    def asid(self) -> int:
        """The ASID (0 before INIT2)."""
        return self.state.asid

    @property
    def snp(self) -> bool:
        """An SNP VM."""
        return self.state.snp

    @property
    def policy(self) -> int:
        """The guest policy of LAUNCH_START."""
        return self.state.policy

    @property
    def gctx_pfn(self) -> int | None:
        """The guest context page."""
        return self.state.gctx_pfn

    @property
    def guest_resp_pfn(self) -> int | None:
        """The guest-request response page (a firmware page)."""
        return self.state.guest_resp_pfn

    @property
    def vmsa_pfns(self) -> dict[int, int]:
        """vCPU id -> its VMSA page, after LAUNCH_FINISH."""
        return self.state.vmsa_pfns

    @property
    def launch_digest(self) -> bytes:
        """The launch measurement so far."""
        return self.state.launch_digest

    def rmp_entry(self, pfn: int) -> RmpEntry:
        """The RMP entry of *pfn*."""
        with self.state.vm.host.operation():
            return self.state.rmp_entry(pfn)
