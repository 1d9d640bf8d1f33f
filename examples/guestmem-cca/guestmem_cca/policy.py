"""The arch policy of the ``cca`` backend: the hooks the core calls for its hosts and VMs.

Every hook a policy can implement is here, stubbed with what :mod:`guestmem.hookspecs`
says of it and the answer that keeps the core's default, so that the backend behaves as
arm64 KVM without an architecture of its own.  Fill in the hooks your architecture needs
and delete the others (an unimplemented hook costs nothing); ``guestmem hooks`` and
docs/backends.md of guestmem say where the kernel calls each one.

The observer hooks (``guestmem_ownership_update``, ``guestmem_trace``,
``guestmem_operation_done``) belong on an observer plugin, such as an invariant checker
of your own, not here.
"""

from __future__ import annotations

from typing import Any

from guestmem import uapi
from guestmem.backend import (
    Fault,
    GfnRange,
    GmemView,
    HostFault,
    HostView,
    Leaf,
    SlotView,
    VcpuView,
    VmView,
    hookimpl,
)


class CcaPolicy:
    """The hook implementations of the ``cca`` backend.

    One object serves every host: per-host state belongs in what ``guestmem_host_init``
    returns (``host.arch``), per-VM state in what ``guestmem_vm_init`` returns
    (``vm.arch``).
    """

    @hookimpl
    def guestmem_host_init(self, host: HostView) -> Any | None:
        """Set up the per-host architecture state and return it: it becomes ``host.arch``.

        Called once per ``guestmem.open()`` of the backend, before anything else (the kernel's
        ``hardware_setup`` / firmware init: an RMP table and ASID space, a TDX module with its
        KeyID pool and PAMT, a pKVM hypervisor, a Gunyah resource manager).

        Returning None leaves the answer to the core: what the kernel does without the arch hook.
        """
        return None

    @hookimpl
    def guestmem_vm_init(self, vm: VmView) -> Any | None:
        """``kvm_arch_init_vm``: set up per-VM architecture state and return it (``vm.arch``).

        Raise :class:`guestmem.KvmError` to refuse ``KVM_CREATE_VM``: it fails with that errno
        and nothing is left behind.

        Returning None leaves the answer to the core: what the kernel does without the arch hook.
        """
        return None

    @hookimpl
    def guestmem_vm_pre_destroy(self, vm: VmView) -> None:
        """``kvm_arch_pre_destroy_vm``: the last reference is gone; nothing is torn down yet.

        Called from ``kvm_destroy_vm`` before the MMU is zapped (``kvm_flush_shadow_all``)
        and before ``guestmem_vm_destroy``: TDX releases the HKID here, so the zap that
        follows reclaims private pages instead of removing them one by one.

        Doing nothing is what an architecture without this hook does.
        """

    @hookimpl
    def guestmem_vm_destroy(self, vm: VmView) -> None:
        """``kvm_arch_destroy_vm``: free per-VM resources (ASID, HKID, VMID, control pages).

        Called after ``guestmem_vm_pre_destroy``, after every stage-2 leaf was zapped and
        after ``guestmem_vcpu_destroy`` for each vCPU; the memslots are freed after it.

        Doing nothing is what an architecture without this hook does.
        """

    @hookimpl
    def guestmem_vcpu_init(self, vcpu: VcpuView) -> Any | None:
        """``kvm_arch_vcpu_create``: per-vCPU architecture state (``vcpu.arch``).

        Raise :class:`guestmem.KvmError` to make ``KVM_CREATE_VCPU`` fail (TDX before
        ``KVM_TDX_INIT_VM``); the id stays free.

        Returning None leaves the answer to the core: what the kernel does without the arch hook.
        """
        return None

    @hookimpl
    def guestmem_vcpu_destroy(self, vcpu: VcpuView) -> None:
        """``kvm_arch_vcpu_destroy``, called from ``kvm_arch_destroy_vm`` for each vCPU.

        Doing nothing is what an architecture without this hook does.
        """

    @hookimpl
    def guestmem_check_extension(self, host: HostView, vm: VmView | None, cap: int) -> int | None:
        """``KVM_CHECK_EXTENSION``: the backend's value for *cap*, or ``None`` for the core's.

        arm64 answers 0 where the core's defaults are x86's: ``KVM_CAP_VM_TYPES``,
        ``KVM_CAP_PRE_FAULT_MEMORY`` and ``KVM_CAP_MULTI_ADDRESS_SPACE`` exist on x86 only; None
        leaves every other capability to the core.
        """
        if cap in (uapi.KVM_CAP_VM_TYPES, uapi.KVM_CAP_PRE_FAULT_MEMORY, uapi.KVM_CAP_MULTI_ADDRESS_SPACE):
            return 0
        return None

    @hookimpl
    def guestmem_vm_ioctl(self, vm: VmView, request: int, arg: Any) -> int | None:
        """``kvm_arch_vm_ioctl``: an architecture VM ioctl (``KVM_MEMORY_ENCRYPT_OP``,
        ``KVM_ENABLE_CAP`` of an arch capability).

        Return the ioctl's non-negative result; raise :class:`guestmem.KvmError` for an error;
        ``None`` means the backend does not know the request (``ENOTTY``, ``EINVAL`` for an
        unknown capability).  *arg* is updated in place where the kernel copies back.

        Returning None leaves the answer to the core: what the kernel does without the arch hook.
        """
        return None

    @hookimpl
    def guestmem_vcpu_ioctl(self, vcpu: VcpuView, request: int, arg: Any) -> int | None:
        """``kvm_arch_vcpu_ioctl``: an architecture vCPU ioctl (``KVM_MEMORY_ENCRYPT_OP`` on a
        vCPU fd: ``KVM_TDX_INIT_VCPU``, ``KVM_TDX_INIT_MEM_REGION``).  As
        ``guestmem_vm_ioctl``.

        Returning None leaves the answer to the core: what the kernel does without the arch hook.
        """
        return None

    @hookimpl
    def guestmem_vcpu_pre_run(self, vcpu: VcpuView) -> None:
        """The checks of ``KVM_RUN`` before the guest is entered (``kvm_x86_ops.vcpu_pre_run``).

        Raise :class:`guestmem.KvmError` to fail ``KVM_RUN`` (a TD vCPU before
        ``KVM_TDX_INIT_VCPU``, an SEV-ES vCPU before its VMSA is encrypted...).  Called for
        every guest access and hypercall of the vCPU.

        Doing nothing is what an architecture without this hook does.
        """

    @hookimpl
    def guestmem_prepare_memory_region(
        self, vm: VmView, old: SlotView | None, new: SlotView | None, change: str
    ) -> None:
        """``kvm_arch_prepare_memory_region``: a memslot update passed the generic checks.

        Raise :class:`guestmem.KvmError` to refuse it (nothing is changed; a MOVE that is
        refused leaves the old slot active with its mappings zapped, as the kernel does).

        Doing nothing is what an architecture without this hook does.
        """

    @hookimpl
    def guestmem_gmem_bind(self, vm: VmView, slot: SlotView, gmem: GmemView, pgoff: int, npages: int) -> None:
        """``kvm_gmem_bind``: gmem pages ``[pgoff, pgoff + npages)`` are about to back *slot*.

        Called after the generic checks (B-1..B-6); raise :class:`guestmem.KvmError` to
        refuse the memslot (Gunyah: a page bound to another VM).

        Doing nothing is what an architecture without this hook does.
        """

    @hookimpl
    def guestmem_gmem_unbind(self, vm: VmView, slot: SlotView, gmem: GmemView) -> None:
        """``kvm_gmem_unbind``: *slot* no longer uses *gmem* (memslot deleted or VM destroyed).

        Not called when the file was released first (the release unbinds, L-3).

        Doing nothing is what an architecture without this hook does.
        """

    @hookimpl
    def guestmem_gmem_prepare(self, vm: VmView, gfn: int, pfn: int, order: int, npages: int) -> None:
        """``kvm_arch_gmem_prepare``: gmem folios are about to be mapped for the first time.

        Called from ``kvm_gmem_get_pfn`` after the folio was zeroed, only while it is not yet
        prepared ("uptodate", G-11).  Covers pages ``[gfn, gfn + npages)`` backed by pfns
        ``[pfn, pfn + npages)`` made of folios of *order*; *npages* is one folio (``1 <<
        order``, or what is left of a split one) unless the backend declares ``range_faults``.
        SNP assigns the RMP entries here.  Raise :class:`guestmem.KvmError` to fail the fault.

        Doing nothing is what an architecture without this hook does.
        """

    @hookimpl
    def guestmem_gmem_invalidate(self, vm: VmView, start_pfn: int, end_pfn: int) -> None:
        """``kvm_arch_gmem_invalidate``: host pfns ``[start_pfn, end_pfn)`` leave guest_memfd.

        Called from ``kvm_gmem_free_folio`` when folios are freed (punch hole, inode
        eviction; L-5), after their mappings were zapped, once per contiguous run.  SNP
        reclaims the RMP entries to shared here.  Must not fail: the kernel only WARNs.

        Doing nothing is what an architecture without this hook does.
        """

    @hookimpl
    def guestmem_max_mapping_level(self, vm: VmView, pfn: int, is_private: bool) -> int | None:
        """``gmem_max_mapping_level``: the largest level (``PG_LEVEL_*``) *pfn* may be mapped at.

        Called from ``kvm_mmu_max_mapping_level`` on the gmem path, only when a level above
        4 KiB is possible.  ``None`` or 0 means no extra limit (H-2).

        Returning None leaves the answer to the core: what the kernel does without the arch hook.
        """
        return None

    @hookimpl
    def guestmem_fault(self, vm: VmView, fault: Fault) -> None:
        """The architecture's part of a guest stage-2 fault, once its pfn is known.

        Called from the end of ``kvm_mmu_faultin_pfn`` (arm64: ``gmem_abort`` before the map):
        after the retry checks of rule 3.3 and before the mapping level is chosen.  pKVM
        donates the page here, Gunyah demand-pages it.  Raise :class:`guestmem.MemoryFault` or
        :class:`guestmem.KvmError` to fail the fault; lower ``fault.max_level`` (or, with
        ``range_faults``, ``fault.npages``) to map less.

        Doing nothing is what an architecture without this hook does.
        """

    @hookimpl
    def guestmem_set_external_spte(self, vm: VmView, leaf: Leaf) -> None:
        """``kvm_x86_ops.set_external_spte``: private leaves are being installed in the mirror
        root (VM types with ``has_mirrored_tdp``).

        Called after the mapping level was chosen, before the leaves become visible; TDX
        issues TDH.MEM.PAGE.AUG (or counts a pre-mapped page before finalize) here.  Raise
        :class:`guestmem.KvmError` to fail the fault (nothing is installed).

        Doing nothing is what an architecture without this hook does.
        """

    @hookimpl
    def guestmem_remove_external_spte(self, vm: VmView, leaf: Leaf) -> None:
        """``kvm_x86_ops.remove_external_spte``: private leaves of the mirror root are zapped.

        Called for every zap that reaches the mirror root: an invalidation whose
        ``attr_filter`` includes ``KVM_FILTER_PRIVATE``, a memslot delete or move, VM
        teardown.  TDX runs BLOCK, TRACK, REMOVE, WBINVD and clears the page (or RECLAIMs it
        after the HKID is gone).  Must not fail: on a hardware error the backend marks the
        VM bugged (``vm.bug``) and leaks the page.

        Doing nothing is what an architecture without this hook does.
        """

    @hookimpl
    def guestmem_unmap_gfn_range(self, vm: VmView, range: GfnRange) -> bool | None:  # noqa: A002
        """``kvm_unmap_gfn_range``: the arch part of an unmap of ``[range.start, range.end)``.

        Reached from punch hole, release and memory failure (inside the guest_memfd
        invalidation), from the host mmu notifier and attribute changes (inside an MMU
        invalidation), and from memslot deletion and moves (under the MMU lock alone).  The
        core has zapped its leaves first.  pKVM reclaims guest pages here, Gunyah launders.
        Return ``True`` if a TLB flush is needed.

        Returning None is what an architecture without this hook answers.
        """
        return None

    @hookimpl
    def guestmem_pre_set_memory_attributes(self, vm: VmView, range: GfnRange) -> bool | None:  # noqa: A002
        """``kvm_arch_pre_set_memory_attributes``: attributes of *range* are about to change.

        Called inside the MMU invalidation, once per memslot overlapping the change (A-10),
        after the core's x86 pre pass.  Return ``True`` if a flush is needed.

        Returning None is what an architecture without this hook answers.
        """
        return None

    @hookimpl
    def guestmem_post_set_memory_attributes(self, vm: VmView, range: GfnRange) -> None:  # noqa: A002
        """``kvm_arch_post_set_memory_attributes``: *range* now holds ``range.attributes``.

        Doing nothing is what an architecture without this hook does.
        """

    @hookimpl
    def guestmem_gmem_fault_user_mapping(self, vm: VmView, gmem: GmemView, index: int) -> HostFault | None:
        """``kvm_gmem_fault_user_mapping``: may the host map gmem page *index*?

        ``None`` leaves it to the core rule (M-4: mappable iff the file is INIT_SHARED).  The
        index-beyond-i_size check (M-3) runs first; a poisoned folio is SIGBUS after it (E-1).
        :attr:`~guestmem.backend.HostFault.RECLAIM` takes the page back from the guest and
        asks again.

        Returning None leaves the answer to the core: what the kernel does without the arch hook.
        """
        return None

    @hookimpl
    def guestmem_host_access(self, host: HostView, pfn: int, write: bool) -> str | None:
        """The host touched page *pfn* of guest_memfd or, through its direct map, any page.

        Return ``None`` if the access is fine, or a verdict for a modelled hardware outcome
        that takes the host down (an RMP #PF on a write to an assigned page).  The core
        records it and raises :class:`guestmem.HostCrash`.  A backend whose hardware does not
        stop the access but remembers it (TDX poisons the line) records that and returns None.

        Returning None leaves the answer to the core: what the kernel does without the arch hook.
        """
        return None

    @hookimpl
    def guestmem_guest_access(self, vcpu: VcpuView, gfn: int, pfn: int, write: bool, private: bool) -> None:
        """A guest load or store reaches host page *pfn* through a present leaf.

        Called for every page of every guest access, mapped before or just faulted in: the
        hardware's own checks of a mapped page (a TDX PENDING page, an unvalidated SNP page).
        Raise :class:`guestmem.KvmError` or :class:`guestmem.GuestExit` to stop the access.

        Doing nothing is what an architecture without this hook does.
        """

    @hookimpl
    def guestmem_hypercall(self, vcpu: VcpuView, nr: int, args: tuple[int, ...]) -> int | None:
        """A guest hypercall (``vmcall``/``vmmcall``/``hvc``/``tdcall``) number *nr*.

        Return the value placed in the guest's return register.  ``None`` leaves it to the
        architecture's generic code (x86 ``__kvm_emulate_hypercall``: ``KVM_HC_MAP_GPA_RANGE``
        exits when enabled, unknown calls are ``-KVM_ENOSYS``).  Raise
        :class:`guestmem.HypercallExit` to leave to userspace.

        Returning None leaves the answer to the core: what the kernel does without the arch hook.
        """
        return None

    @hookimpl
    def guestmem_post_populate(
        self, vm: VmView, gfn: int, pfn: int, src: bytes | None, order: int, opaque: Any
    ) -> int | None:
        """The ``post_populate`` callback of ``kvm_gmem_populate`` (P-5).

        Called per folio under the invalidate lock.  Return 0 (or ``None``) on success, a
        negative errno, or raise :class:`guestmem.KvmError`; on success the core marks the
        folio prepared.

        Returning None leaves the answer to the core: what the kernel does without the arch hook.
        """
        return None
