"""The ``pkvm`` backend's arch policy: the pKVM hypervisor hooked into the guestmem core.

What is modelled (backends.md section 3):

* ``KVM_VM_TYPE_ARM_PROTECTED`` VMs: every page the guest faults is **donated** by the host
  (host stage-2 unmapped, guest owns it); the guest converts explicitly and in place with
  the ``MEM_SHARE`` / ``MEM_UNSHARE`` / ``MEM_RELINQUISH`` hypercalls; pages come back to
  the host zeroed (reclaim at teardown, relinquish, force reclaim).
* Host mmap of guest_memfd follows the **restricted mapping** design of Fuad Tabba's series
  "KVM: Restricted mapping of guest_memfd at the host and arm64 support" (v7, not merged;
  backends.md 0.3): whether a page may be host-mapped is decided per page at fault time
  from the ownership tables, a private page is SIGBUS, and an unshare fails while the host
  still maps the page.  Choosing the protected VM type is what opts into this policy:
  Linux 6.18 has no per-page guest_memfd sharing and no protected VMs backed by it.
* ``KVM_VM_TYPE_ARM_IPA_SIZE(0)`` (a normal VM under pKVM): the host *shares* faulted pages
  with the guest and unshares them on MMU-notifier invalidation; host mmap follows 6.18
  (the core's whole-file INIT_SHARED rule, M-4).

Guest hypercall results are SMCCC return codes as the hypervisor hands them back: 0 on
success, ``SMCCC_RET_INVALID_PARAMETER`` for refused arguments or a refused transition (the
errno behind it is kept in :attr:`PkvmVm.last_error` and in the ``pkvm_hvc`` trace event),
``SMCCC_RET_NOT_SUPPORTED`` for an unknown function.  ``vcpu.hypercall`` returns x0; all of
x0..x3 (x1: pages converted) are in :attr:`PkvmVm.ret`.

The hypervisor belongs to the machine: ``guestmem_host_init`` makes one per
``guestmem.open("pkvm")``, which is that host's ``host.arch``; each VM's ``vm.arch`` is a
:class:`PkvmVm` naming it.  Every change of its tables reaches observers as a
``guestmem_ownership_update`` with the pKVM entries and their :func:`owner_of`.
"""

from __future__ import annotations

import errno
from typing import Any

import attrs

from guestmem import cabi, uapi
from guestmem.api import Vm
from guestmem.backend import (
    Fault,
    GfnRange,
    GmemView,
    HostFault,
    HostView,
    Owner,
    SlotView,
    VcpuView,
    VmTypeInfo,
    VmView,
    hookimpl,
    view,
)
from guestmem.errors import GuestExit, HostSigsegv, KvmError, MemoryFault
from guestmem_pkvm import abi
from guestmem_pkvm.exits import HypercallExit
from guestmem_pkvm.ownership import (
    GUEST_NOPAGE,
    GUEST_TABLE,
    HOST_TABLE,
    PAGE_SHIFT,
    PAGE_SIZE,
    Component,
    GuestPage,
    HostPage,
    HypError,
    Hypervisor,
    HypVm,
    PageState,
    Pvmfw,
)


def _arm64_vm_type(vm_type: int, name: str, *, readonly_mem: bool, protected: bool) -> VmTypeInfo:
    """An arm64 VM type as 6.18 sees it (spec CAP-3, S-7, S-16).

    No ``kvm_arch_has_private_mem`` and no ``KVM_SET_MEMORY_ATTRIBUTES`` on arm64 (x86
    only); INIT_SHARED is the ``__weak`` default (allowed); one memslot address space;
    ``KVM_PRE_FAULT_MEMORY`` is x86 only; a GUEST_MEMFD slot must be gmem-only (MMAP).
    The core runs arm64's generic code for it: no x86 hypercall emulation, and
    ``KVM_ENABLE_CAP`` of a capability the policy does not take is EINVAL.  A protected
    VM's guest converts in place (MEM_SHARE / MEM_UNSHARE, backends.md 3.3).
    """
    return VmTypeInfo(
        type=vm_type,
        name=name,
        has_private_mem=False,
        supports_init_shared=True,
        readonly_mem=readonly_mem,
        pre_fault_allowed=False,
        nr_memslot_as_ids=1,
        gmem_slot_requires_mmap=True,
        memory_attributes=False,
        arch="arm64",
        conversion="in_place" if protected else None,
    )


# Protected VMs refuse read-only memslots (Android pKVM) [U: not in 6.18].
PROTECTED_VM = _arm64_vm_type(
    abi.KVM_VM_TYPE_ARM_PROTECTED, "KVM_VM_TYPE_ARM_PROTECTED", readonly_mem=False, protected=True
)
DEFAULT_VM = _arm64_vm_type(
    abi.KVM_VM_TYPE_ARM_DEFAULT, "KVM_VM_TYPE_ARM_IPA_SIZE(0)", readonly_mem=True, protected=False
)

#: Trace/ownership rule tag of this backend's own decisions.
RULE = "pKVM-3"

_HVC_NAMES = {
    abi.ARM_SMCCC_VENDOR_HYP_KVM_HYP_MEMINFO_FUNC_ID: "hyp_meminfo",
    abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_SHARE_FUNC_ID: "mem_share",
    abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_UNSHARE_FUNC_ID: "mem_unshare",
    abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_RELINQUISH_FUNC_ID: "mem_relinquish",
}
#: What the hypervisor answers for a non-protected guest (``kvm_hyp_handle_hvc64``).
_NP_VM_CALLS = (
    abi.ARM_SMCCC_VENDOR_HYP_KVM_HYP_MEMINFO_FUNC_ID,
    abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_RELINQUISH_FUNC_ID,
)


@attrs.define(eq=False)
class PkvmVm:
    """``vm.arch`` of a pKVM VM: its hypervisor, its hyp-side VM and host-side settings.

    The hypervisor learns of the VM at its first ``KVM_RUN`` (``kvm_arch_vcpu_run_pid_change``
    -> ``pkvm_create_hyp_vm`` -> ``__pkvm_init_vm``): until then ``hvm`` is None and
    ``handle`` 0, as ``kvm->arch.pkvm.handle`` is.
    """

    hyp: Hypervisor
    #: ``KVM_VM_TYPE_ARM_PROTECTED`` (``kvm->arch.pkvm.enabled``).
    protected: bool
    #: ``struct pkvm_hyp_vm``, once the first ``KVM_RUN`` created it.
    hvm: HypVm | None = None
    #: ``kvm->arch.pkvm.pvmfw_load_addr`` and the image, handed to the hypervisor with the VM.
    pvmfw: Pvmfw | None = None
    #: ``KVM_CAP_EXIT_HYPERCALL`` bits enabled by userspace (``1 << ARM_SMCCC_KVM_FUNC_*``).
    exit_mask: int = abi.KVM_EXIT_HYPERCALL_VALID_MASK
    #: The errno behind the last refused guest hypercall.
    last_error: KvmError | None = None
    #: x0..x3 the guest got back from its last KVM vendor hypercall (``smccc_set_retval``);
    #: ``vcpu.hypercall`` returns x0 only.  x1 is ``nr_shared``/``nr_unshared`` after
    #: MEM_SHARE/MEM_UNSHARE and ``KVM_FUNC_HAS_RANGE`` after HYP_MEMINFO.
    ret: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def handle(self) -> int:
        """The hypervisor's handle of this VM (``pkvm_handle_t``); 0 before its first run."""
        return 0 if self.hvm is None else self.hvm.handle

    @property
    def vmid(self) -> int:
        """The VMID the hypervisor gave this VM; 0 before its first run."""
        return 0 if self.hvm is None else self.hvm.vmid

    @property
    def running(self) -> HypVm:
        """The hyp VM of a VM that ran (every guest fault and hypercall comes from a run)."""
        assert self.hvm is not None, "the first KVM_RUN created the hyp VM"
        return self.hvm


def pkvm_state(vm: Any) -> PkvmVm:
    """The pKVM state of *vm*: a ``Vm`` of the ``pkvm`` backend or its view; TypeError otherwise."""
    try:
        arch = view(vm).arch
    except TypeError:
        arch = None
    if not isinstance(arch, PkvmVm):
        raise TypeError(f"{vm!r} is not a VM of the pkvm backend")
    return arch


def hypervisor(host: HostView) -> Hypervisor:
    """The EL2 hypervisor of *host* (``host.arch`` of a ``pkvm`` host); TypeError otherwise."""
    hyp = host.arch
    if not isinstance(hyp, Hypervisor):
        raise TypeError(f"{host!r} is not a host of the pkvm backend")
    return hyp


def owner_of(table: str, entry: Any) -> Owner:
    """Who an entry of one of the hypervisor's tables gives its page to, in the core's terms.

    Host table: ``OWNED`` is the host's, ``SHARED_OWNED``/``SHARED_BORROWED`` shared, and
    ``NOPAGE`` belongs to whoever the host stage-2 annotation names (a guest or the
    hypervisor).  Guest table (reported by host pfn): ``OWNED`` is the guest's,
    ``SHARED_*`` shared, no page (or a poisoned PTE) leaves the page with the host.  Hyp
    table: ``OWNED`` is the hypervisor's, ``SHARED_*`` shared, ``NOPAGE`` the host's.
    """
    if table == HOST_TABLE:
        assert isinstance(entry, HostPage)
        if entry.state == PageState.OWNED:
            return Owner.HOST
        if entry.state != PageState.NOPAGE:
            return Owner.SHARED
        return Owner.HYPERVISOR if entry.owner == Component.HYP else Owner.GUEST
    state = entry.state if isinstance(entry, GuestPage) else entry
    if state in (PageState.SHARED_OWNED, PageState.SHARED_BORROWED):
        return Owner.SHARED
    if state == PageState.OWNED:
        return Owner.GUEST if table == GUEST_TABLE else Owner.HYPERVISOR
    return Owner.HOST


def set_pvmfw(vm: Any, ipa: int, image: bytes) -> None:
    """Place the protected-VM firmware at guest address *ipa* (Android's
    ``KVM_CAP_ARM_PROTECTED_VM_FLAGS_SET_FW_IPA``, ``pkvm_vm_ioctl_set_fw_ipa``).

    The hypervisor copies the image into each page of that range when the guest first
    faults it (``pkvm_load_pvmfw_pages``).  A VM ioctl: EBADF once the VM fd is closed, EIO
    on a dead VM (``kvm_vm_ioctl``); EBUSY once the VM ran (the hyp VM exists, pKVM-3.4);
    EINVAL for a non-protected VM, an unaligned *ipa* or an empty image.  *ipa* is the
    capability's ``__u64`` argument, *image* bytes-like (guestmem.cabi: a TypeError naming
    either before anything is checked).
    """
    ipa, image = cabi.u64(ipa, "ipa"), cabi.buffer(image, "image")
    state = pkvm_state(vm)
    vm_view = view(vm)
    with vm_view.host.operation():  # one ioctl: no other thread's first run comes in between
        vm_view.check_ioctl()
        if state.hvm is not None:
            raise KvmError(
                errno.EBUSY,
                "pKVM-3.4",
                "the VM ran: its firmware address is fixed (pkvm_vm_ioctl_set_fw_ipa)",
            )
        state.pvmfw = Pvmfw.checked(state.protected, ipa, image)


def enable_exit_hypercall(vm: Vm, mask: int) -> None:
    """``KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL, mask)`` on *vm*: which conversions exit to
    userspace (``vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, mask)``).

    EINVAL for bits outside ``KVM_EXIT_HYPERCALL_VALID_MASK`` and on a non-protected VM.  By
    default both share and unshare exit, so that userspace hears of every conversion (a
    model choice, see README).
    """
    vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, mask)


class PkvmPolicy:
    """The arch policy hooks of the ``pkvm`` backend; each host has its own hypervisor."""

    @hookimpl
    def guestmem_snapshot(self, host: HostView, vm: VmView | None) -> Any:
        """The hypervisor's host and hyp tables, or a VM's settings and guest stage-2
        ownership (:mod:`guestmem_pkvm.snapshot`)."""
        from guestmem_pkvm import snapshot

        return snapshot.host_state(host) if vm is None else snapshot.vm_state(vm)

    # --- host and VM lifetime ----------------------------------------------------------------
    @hookimpl
    def guestmem_host_init(self, host: HostView) -> Hypervisor:
        """The machine's EL2 hypervisor: it becomes ``host.arch``.

        Changes of the host and hyp tables made for no VM (host <-> hyp transitions) are
        reported to observers as the host's.
        """

        def listener(table: str, pfn: int, npages: int, old: Any, new: Any) -> None:
            host.ownership_update(
                table, pfn, npages, old, new, old_owner=owner_of(table, old), new_owner=owner_of(table, new)
            )

        return Hypervisor(zero=host.zero, write=host.write, listener=listener)

    @hookimpl
    def guestmem_vm_init(self, vm: VmView) -> PkvmVm:
        """``kvm_arch_init_vm`` / ``pkvm_init_host_vm``: the hypervisor hears of the VM only
        at its first ``KVM_RUN`` (``guestmem_vcpu_pre_run``)."""
        # Conversions never copy: shown as an explicit zero (see _convert).
        vm.count("pkvm.copies", 0)
        return PkvmVm(hypervisor(vm.host), protected=bool(vm.vm_type & abi.KVM_VM_TYPE_ARM_PROTECTED))

    @hookimpl
    def guestmem_vcpu_pre_run(self, vcpu: VcpuView) -> None:
        """``kvm_arch_vcpu_run_pid_change`` -> ``pkvm_create_hyp_vm``: the first ``KVM_RUN``
        of any vCPU creates the hypervisor's VM (``__pkvm_init_vm``: a handle and VMID, ENOMEM
        when the VM table is full, which fails that ``KVM_RUN``) with the firmware set so far."""
        vm = vcpu.vm
        state = pkvm_state(vm)
        if state.hvm is not None:
            return
        hvm = state.hyp.init_vm(protected=state.protected)

        def count(name: str, n: int) -> None:
            vm.count(f"pkvm.{name}", n)

        def listener(table: str, pfn: int, npages: int, old: Any, new: Any) -> None:
            vm.ownership_update(
                table, pfn, npages, old, new, old_owner=owner_of(table, old), new_owner=owner_of(table, new)
            )

        hvm.count = count
        hvm.listener = listener
        hvm.pvmfw = state.pvmfw
        state.hvm = hvm
        vm.trace("pkvm_init_vm", handle=hvm.handle, vmid=hvm.vmid, protected=hvm.protected)

    @hookimpl
    def guestmem_vm_destroy(self, vm: VmView) -> None:
        """``pkvm_destroy_hyp_vm``: reclaim what is left, then ``__pkvm_finalize_teardown_vm``;
        nothing for a VM that never ran (no handle)."""
        state = pkvm_state(vm)
        if state.hvm is None:
            return
        if not state.hvm.dying:
            state.hyp.start_teardown_vm(state.hvm)
        self._reclaim(vm, state, 0, 1 << 64)
        state.hyp.finalize_teardown_vm(state.hvm)
        vm.trace("pkvm_teardown_vm", handle=state.handle)

    @hookimpl
    def guestmem_check_extension(self, vm: VmView | None, cap: int) -> int | None:
        """arm64 answers where they differ from the x86-shaped core defaults."""
        if cap in (uapi.KVM_CAP_VM_TYPES, uapi.KVM_CAP_PRE_FAULT_MEMORY, uapi.KVM_CAP_MULTI_ADDRESS_SPACE):
            return 0  # x86-only capabilities
        if cap == uapi.KVM_CAP_EXIT_HYPERCALL:
            protected = vm is None or pkvm_state(vm).protected
            return abi.KVM_EXIT_HYPERCALL_VALID_MASK if protected else 0
        return None

    # --- arch ioctls ---------------------------------------------------------------------------
    @hookimpl
    def guestmem_vm_ioctl(self, vm: VmView, request: int, arg: Any) -> int | None:
        """``KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)``: the conversions that exit to userspace.

        ``args[0]`` is the mask (the core refused non-zero flags already); EINVAL for bits
        outside ``KVM_EXIT_HYPERCALL_VALID_MASK`` and on a non-protected VM (whose
        ``KVM_CHECK_EXTENSION`` answers 0).  Anything else is not this backend's.
        """
        if request != uapi.KVM_ENABLE_CAP or not isinstance(arg, uapi.KvmEnableCap):
            return None
        if arg.cap != uapi.KVM_CAP_EXIT_HYPERCALL:
            return None
        state = pkvm_state(vm)
        mask = arg.args[0] if arg.args else 0
        if not state.protected:
            raise KvmError(errno.EINVAL, RULE, "KVM_CAP_EXIT_HYPERCALL is offered to protected VMs only")
        if mask & ~abi.KVM_EXIT_HYPERCALL_VALID_MASK:
            raise KvmError(errno.EINVAL, RULE, f"exit mask {mask:#x} has unsupported bits")
        state.exit_mask = mask
        vm.trace("enable_cap", cap=arg.cap, args=list(arg.args))
        return 0

    # --- memslots ------------------------------------------------------------------------------
    @hookimpl
    def guestmem_prepare_memory_region(
        self, vm: VmView, old: SlotView | None, new: SlotView | None, change: str
    ) -> None:
        """Android's ``kvm_arch_prepare_memory_region`` under pKVM ("KVM: arm64: Do not allow
        changes to private memory slots"): once a protected VM's hypervisor VM exists (its
        first ``KVM_RUN``), its memslots may not be deleted or moved; no memslot of a
        protected VM may log dirty pages (nor be read-only, which the protected VM type
        already refuses earlier, S-4).  Both are EPERM (pKVM-3.6)."""
        state = pkvm_state(vm)
        if not state.protected:
            return
        if change in ("delete", "move") and state.hvm is not None:
            raise KvmError(
                errno.EPERM, "pKVM-3.6", f"a protected VM that ran keeps its memslots (no {change})"
            )
        if new is not None and new.flags & (uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_READONLY):
            raise KvmError(errno.EPERM, "pKVM-3.6", "a protected VM's memslots log no dirty pages")

    # --- guest stage-2 faults: donation (pVM) or share (normal VM) ------------------------------
    @hookimpl
    def guestmem_fault(self, vm: VmView, fault: Fault) -> None:
        """Give the faulting pages to the guest before KVM maps them (``gmem_abort``, 4K only).

        A run of faults (``range_faults``) is what the faults of its pages one by one do:
        it ends where the hypervisor's answer for a page would differ from its first page's
        (another guest state or mapping, a page the host still maps, one a donation or
        share refuses), and that page's own fault raises what it raises.
        """
        state = pkvm_state(vm)
        hvm = state.running
        gfn, pfn, npages = fault.gfn, fault.pfn, fault.npages
        assert pfn is not None
        entry = hvm.guest.entry(gfn)
        page = GUEST_NOPAGE if entry is None else entry[2]
        if page.state == PageState.POISON:
            # __pkvm_vcpu_in_poison_fault: KVM_RUN returns -EFAULT, no memory-fault exit.
            vm.count("pkvm.poison_faults")
            raise KvmError(errno.EFAULT, "pKVM-3.2", f"gfn {gfn:#x}: the host force-reclaimed this page")
        if entry is not None:
            if page.pfn(gfn) != pfn:
                raise KvmError(errno.EFAULT, RULE, f"gfn {gfn:#x} is owned at another pfn")
            # the hypervisor already gave these pages: only the stage-2 leaves are rebuilt
            fault.npages = min(npages, entry[1] - gfn)
            return
        fault.max_level = uapi.PG_LEVEL_4K
        if not state.protected:
            fault.npages = state.hyp.host_share_guest_pages(hvm, pfn, gfn, npages)
            return
        mapped = host_mapped_gfn(vm, gfn, npages)
        if mapped == gfn:
            # The donation would leave a host mapping of a guest-private page: userspace
            # must drop its mapping (munmap / MADV_DONTNEED) and run again.
            vm.count("pkvm.userspace_exits")
            raise MemoryFault(
                errno.EFAULT, gfn << PAGE_SHIFT, PAGE_SIZE, 0, "pKVM-3.5", "the host still maps this page"
            )
        if mapped is not None:
            npages = mapped - gfn
        fault.npages = state.hyp.host_donate_guest_pages(hvm, pfn, gfn, npages)

    @hookimpl
    def guestmem_max_mapping_level(self, vm: VmView, pfn: int, is_private: bool) -> int:
        """arm64 ``gmem_abort`` maps 4K pages only (backends.md 3.3)."""
        return uapi.PG_LEVEL_4K

    # --- invalidation and reclaim --------------------------------------------------------------
    @hookimpl
    def guestmem_unmap_gfn_range(self, vm: VmView, range: GfnRange) -> bool:  # noqa: A002
        """The host removes guest pages: reclaim (VM closing) or force reclaim (VM alive).

        Not when a memslot of a protected VM is deleted or moved: ``kvm_set_memslot`` zaps
        the slot (``kvm_arch_flush_shadow_memslot`` -> ``kvm_stage2_unmap_range``) before
        ``kvm_arch_prepare_memory_region`` refuses the change (pKVM-3.6), and the host
        cannot unmap a protected guest's memory (``pkvm_pgtable_stage2_unmap`` refuses a
        protected VM): the pages stay the guest's, the zapped leaves are refaulted.
        """
        state = pkvm_state(vm)
        if state.protected and range.slot.flags & uapi.KVM_MEMSLOT_INVALID:
            return False
        return self._reclaim(vm, state, range.start, range.end)

    def _reclaim(self, vm: VmView, state: PkvmVm, start: int, end: int) -> bool:
        hyp, hvm = state.hyp, state.hvm
        if hvm is None:  # never ran: the hypervisor gave the VM nothing
            return False
        if vm.closed and not hvm.dying and hvm.guest.overlaps(start, end):
            hyp.start_teardown_vm(hvm)  # the VM is going away: a normal reclaim
        return hyp.reclaim_guest_range(hvm, start, end) > 0

    @hookimpl
    def guestmem_gmem_invalidate(self, vm: VmView, start_pfn: int, end_pfn: int) -> None:
        """A gmem folio is freed: no page may still belong to a guest (else reclaim it first)."""
        hyp = pkvm_state(vm).hyp
        for s, e, page in list(hyp.host_entries(start_pfn, end_pfn - start_pfn)):
            if page.state == PageState.NOPAGE and page.handle:
                owner = hyp.vm(page.handle)
                # one host entry is a run of pages; the reclaim hypercalls take one page each
                for pfn in range(s, e):
                    vm.count("pkvm.late_reclaims")
                    if owner.dying:
                        hyp.host_reclaim_page_guest(owner, page.gfn(pfn))
                    else:
                        hyp.host_force_reclaim_page_guest(owner, page.gfn(pfn))

    # --- host side -----------------------------------------------------------------------------
    @hookimpl
    def guestmem_gmem_fault_user_mapping(self, vm: VmView, gmem: GmemView, index: int) -> HostFault | None:
        """Restricted mapping (protected VMs): per page, from the host's ownership state.

        The file's INIT_SHARED flag is the initial state of its pages: without it a page
        the guest never shared stays SIGBUS (M-4); with it a page is mappable until the
        guest owns it.  Either way a page the guest shares is mappable, one it owns is not.
        """
        state = pkvm_state(vm)
        if not state.protected:
            return None  # 6.18: whole-file INIT_SHARED (M-4)
        pfn = gmem.pfn(index)
        if pfn is None:
            mappable = gmem.init_shared
        else:
            page = state.hyp.host_state(pfn).state
            mappable = page == PageState.SHARED_BORROWED or (gmem.init_shared and page != PageState.NOPAGE)
        return HostFault.ALLOW if mappable else HostFault.SIGBUS

    @hookimpl
    def guestmem_host_access(self, host: HostView, pfn: int, write: bool, address: int | None) -> str | None:
        """A host access to a page not in the host stage-2 is a stage-2 abort (3.2).

        ``handle_host_mem_abort``: ``host_stage2_idmap`` refuses a page another component
        owns (-EPERM) and ``host_inject_abort`` hands the abort back to the host kernel,
        marked with ``ESR_ELx_S1PTW``.  arm64 ``do_page_fault`` then sends a userspace
        access ``SIGSEGV``/``SEGV_ACCERR`` ("stage-2 fault"): the process is told, the host
        goes on.  The host kernel's own access has no context to fix it up
        (``__do_kernel_fault``): it dies with "access to hypervisor-protected memory".
        """
        page = hypervisor(host).host_state(pfn)
        if page.state != PageState.NOPAGE:
            return None
        owner = f"{page.owner.name.lower()} handle {page.handle:#x}"
        if address is not None:
            host.count("pkvm.host_stage2_aborts")
            host.trace("pkvm_host_abort", pfn=pfn, address=address, write=write, owner=owner)
            raise HostSigsegv(address, "pKVM-3.2", f"stage-2 fault: pfn {pfn:#x} belongs to {owner}")
        why = "access to hypervisor-protected memory"
        return f"pKVM host stage-2 abort: pfn {pfn:#x} belongs to {owner} ({why})"

    # --- guest hypercalls ---------------------------------------------------------------------
    @hookimpl
    def guestmem_hypercall(self, vcpu: VcpuView, nr: int, args: tuple[int, ...]) -> int:
        """The KVM vendor-hypervisor SMCCC services a pKVM guest uses for memory.

        The function ID is the low 32 bits of x0 (``smccc_get_function`` returns a ``u32``).
        """
        vm = vcpu.vm
        state = pkvm_state(vm)
        nr = cabi.u32(nr, "nr")
        name = _HVC_NAMES.get(nr)
        if name is not None:
            vm.count(f"pkvm.hvc.{name}")
        if name is None or (not state.protected and nr not in _NP_VM_CALLS):
            # Unknown here, or MEM_SHARE/UNSHARE from a non-protected guest: the host's
            # handler answers SMCCC_RET_NOT_SUPPORTED.
            state.ret = (abi.SMCCC_RET_NOT_SUPPORTED, 0, 0, 0)
            return abi.SMCCC_RET_NOT_SUPPORTED
        # x1..x3; a guest passing fewer leaves the rest zero.
        ipa, arg2, arg3 = (*args, 0, 0, 0)[:3]
        nr_pages = arg2 or 1  # "Legacy guests have arg2 set to 0"
        done = 0
        try:
            if nr == abi.ARM_SMCCC_VENDOR_HYP_KVM_HYP_MEMINFO_FUNC_ID:
                if ipa or arg2 or arg3:
                    raise HypError(errno.EINVAL, name, "HYP_MEMINFO arguments must be zero")
                state.last_error = None
                state.ret = (PAGE_SIZE, abi.KVM_FUNC_HAS_RANGE, 0, 0)
                return PAGE_SIZE  # the sharing granule
            if nr == abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_RELINQUISH_FUNC_ID and (arg2 or arg3):
                raise HypError(errno.EINVAL, name, "MEM_RELINQUISH takes one page: x2 and x3 must be zero")
            if arg3:
                raise HypError(errno.EINVAL, name, "x3 must be zero")
            if ipa & (PAGE_SIZE - 1) or ipa < 0:
                raise HypError(errno.EINVAL, name, f"ipa {ipa:#x} is not page aligned")
            if nr == abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_RELINQUISH_FUNC_ID:
                nr_pages = 1
                self._relinquish(vm, state, ipa >> PAGE_SHIFT)
                exit_bit = 0
            else:
                share = nr == abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_SHARE_FUNC_ID
                done = self._convert(vcpu, state, ipa >> PAGE_SHIFT, nr_pages, share=share)
                exit_bit = 1 << (
                    abi.ARM_SMCCC_KVM_FUNC_MEM_SHARE if share else abi.ARM_SMCCC_KVM_FUNC_MEM_UNSHARE
                )
        except MemoryFault:
            # The host's fault-in for MEM_SHARE ended KVM_RUN: the HVC is retried later.
            raise
        except KvmError as exc:
            state.last_error = exc
            state.ret = (abi.SMCCC_RET_INVALID_PARAMETER, 0, 0, 0)
            vm.count("pkvm.hvc_refused")
            vm.trace("pkvm_hvc", call=name, ipa=ipa, npages=nr_pages, errno=exc.errno, rule=exc.rule)
            return abi.SMCCC_RET_INVALID_PARAMETER
        state.last_error = None
        state.ret = (abi.SMCCC_RET_SUCCESS, done, 0, 0)
        vm.trace("pkvm_hvc", call=name, ipa=ipa, npages=nr_pages, done=done, errno=0)
        if state.exit_mask & exit_bit:
            # Userspace is told what was converted: the pages the hypervisor actually did.
            vm.count("pkvm.userspace_exits")
            raise HypercallExit(nr, (ipa, done, 0), ret=abi.SMCCC_RET_SUCCESS)
        return abi.SMCCC_RET_SUCCESS

    def _convert(self, vcpu: VcpuView, state: PkvmVm, gfn: int, nr_pages: int, *, share: bool) -> int:
        """MEM_SHARE / MEM_UNSHARE from *gfn*: same pages, contents kept.

        Converts the run the hypervisor's walker accepts (``Hypervisor.guest_request``: it
        may stop short of *nr_pages*) and returns its length, the guest's x1.
        """
        vm = vcpu.vm
        hyp, hvm = state.hyp, state.running
        before = {g: _leaf_pfn(vm, g) for g in (gfn, gfn + nr_pages - 1)}
        if share:
            try:
                done = hyp.guest_share_host(hvm, gfn, nr_pages)
            except HypError as exc:
                if exc.errno != errno.EFAULT:
                    raise
                # Not faulted yet: the hypervisor asks the host to map the range
                # (KVM_HYP_REQ_TYPE_MAP), the host donates the pages, the HVC is retried.
                self._fault_in(vcpu, hvm, gfn, gfn + nr_pages)
                done = hyp.guest_share_host(hvm, gfn, nr_pages)
        else:
            done = hyp.guest_request(hvm, gfn, nr_pages, PageState.SHARED_OWNED, "__pkvm_guest_unshare_host")[
                1
            ]
            mapped = host_mapped_gfn(vm, gfn, done)
            if mapped is not None:
                # Restricted mapping: to-private is refused while the folio is mapped.
                vm.count("pkvm.unshare_refused_mapped")
                raise KvmError(errno.EAGAIN, "pKVM-3.3", f"gfn {mapped:#x}: the host still maps this page")
            hyp.guest_unshare_host(hvm, gfn, done)
        # In place: a page mapped before the call is the same page after it.
        pfns = {g: (before[g], _leaf_pfn(vm, g)) for g in before if g < gfn + done}
        moved = sum(1 for old, new in pfns.values() if old is not None and new is not None and old != new)
        vm.count("pkvm.copies", moved * PAGE_SIZE)
        vm.count("pkvm.converted_pages", done)
        return done

    @staticmethod
    def _fault_in(vcpu: VcpuView, hvm: HypVm, start: int, end: int) -> None:
        """The host handles the hypervisor's map request for gfns ``[start, end)``.

        Each page is a stage-2 fault (counted in ``pkvm.memshare_fault_in``), taken as runs:
        a memory-fault exit (a page the VMM still maps) leaves ``KVM_RUN`` with the guest's
        HVC not done, to be retried.
        """
        vm = vcpu.vm
        for gap_start, gap_end in list(hvm.guest.gaps(start, end)):
            pos = gap_start
            while pos < gap_end:
                try:
                    done = vm.fault_range(pos, gap_end - pos, private=False, vcpu=vcpu)
                except GuestExit as exc:  # no memory there (an MMIO exit): nothing to share
                    vm.count("pkvm.memshare_fault_in")
                    raise HypError(errno.EFAULT, "pkvm_memshare_call", str(exc)) from None
                except KvmError:
                    vm.count("pkvm.memshare_fault_in")
                    raise
                vm.count("pkvm.memshare_fault_in", done)
                pos += done

    def _relinquish(self, vm: VmView, state: PkvmVm, gfn: int) -> None:
        pfn = state.hyp.guest_relinquish_to_host(state.running, gfn)
        if pfn is not None:
            vm.zap_gfn_range(gfn, gfn + 1)  # the guest's leaf is gone (KVM's copy of stage-2)


def host_mapped_gfn(vm: VmView, gfn: int, npages: int = 1) -> int | None:
    """The first gfn of ``[gfn, gfn + npages)`` whose guest_memfd page some host userspace
    mapping of *vm* has faulted in, or None: one range query per memslot crossed."""
    pos, end = gfn, gfn + npages
    while pos < end:
        loc = vm.gfn_to_gmem(pos)
        if loc is None:
            slot = vm.slot_for_gfn(pos)
            if slot is None:
                return None
            pos = slot.end_gfn
            continue
        stop = min(end, loc.slot.end_gfn)
        first = min(
            (s for s, _ in loc.gmem.host_mapped_ranges(loc.index, loc.index + stop - pos)), default=None
        )
        if first is not None:
            return pos + first - loc.index
        pos = stop
    return None


def _leaf_pfn(vm: VmView, gfn: int) -> int | None:
    """The pfn *gfn*'s stage-2 leaf maps, or None."""
    leaf = vm.leaf(gfn)
    return None if leaf is None else leaf.pfn + (gfn - leaf.gfn)
