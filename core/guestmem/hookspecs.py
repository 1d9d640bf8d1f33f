"""Hook specifications: the backend author's reference.

A guestmem plugin is an object (usually a module or a class instance) whose functions are
marked with :data:`guestmem.backend.hookimpl` and named after a spec below.  Plugins are
found through the ``guestmem`` entry-point group; the core never imports a plugin.

Two kinds of plugin:

* A **backend** registers :class:`~guestmem.backend.Backend` objects in
  :func:`guestmem_register_backends`.  A backend's ``policy`` object carries the *arch
  policy* hooks (every hook below but registration).  They are called only for hosts and
  VMs opened through that backend: installing ten backends never slows or changes one VM.
* An **observer** (tracer, cost counter, invariant checker) is any other plugin.  It sees
  the hook calls of every host and VM, always *after* the backend's policy, and never
  answers: return values of observers are ignored, and an exception an observer raises
  is reported when the operation that triggered it has finished (an
  :class:`~guestmem.invariants.InvariantViolation` as itself, anything else as
  :class:`guestmem.ObserverError` naming the plugin).

Arguments are passed by keyword; an implementation may accept any subset of them.
``firstresult`` hooks are answered by the policy alone: ``None`` means "not handled"
and the core does what the kernel does without the arch hook.

The hooks keep the kernel's names and are called where the kernel calls the function they
are named after, with the same meaning of their arguments ("Called from" in each
docstring).  An implementation that must fail the operation raises
:class:`guestmem.KvmError` with the errno the kernel would return (or a
:class:`guestmem.GuestExit`; a command struct with a field of the wrong type raises
:class:`guestmem.cabi.ArgumentTypeError`, the caller's TypeError); any other exception is
reported as a
:class:`guestmem.BackendError` naming the backend and its distribution, and the core
leaves no invalidation open behind it.

The arguments are the views and values of :mod:`guestmem.backend`, documented there field
by field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from guestmem.backend import (
    Backend,
    Fault,
    GfnRange,
    GmemView,
    HostFault,
    HostView,
    Leaf,
    OwnershipEvent,
    SlotView,
    TraceEvent,
    VcpuView,
    VmTypeInfo,
    VmView,
    hookspec,
)


# --- registration --------------------------------------------------------------------------
@hookspec
def guestmem_register_backends(register: Callable[[Backend], None]) -> None:
    """Register backends by calling ``register(Backend(...))`` once per backend.

    Called when the registry is first used (lazily, once per collection).  The registry
    records the distribution the plugin came from; a backend whose name another
    distribution registered first is skipped with a warning naming both.

    :param register: the callback taking one :class:`~guestmem.backend.Backend`.
    """


@hookspec(firstresult=True)
def guestmem_conformance_options(backend: Backend, vm_type: VmTypeInfo) -> dict[str, Any] | None:
    """The conformance kit's settings for *vm_type* of *backend*, which this plugin registered.

    Called by :func:`guestmem.conformance.kit_for` (``pytest --guestmem-kit``, the kit's
    own pytest plugin, ``guestmem fuzz``) when it builds the kit for an installed backend,
    only on the plugin that registered *backend*.  The kit reads what it can from the
    declarations (:class:`~guestmem.backend.VmTypeInfo`: conversion semantics, gmem-only
    memslots, memory attributes) and from ``KVM_CHECK_EXTENSION``; this hook says the rest.
    Implement it next to ``guestmem_register_backends``, never on a policy object.
    ``None`` (or no implementation) keeps the kit's defaults.

    Keys (each optional; an unknown key is an error naming the plugin):

    * the kit's capability flags: ``guest_access``, ``private_access``,
      ``gmem_only_from_gmem``, ``init_shared_coherent``, ``slot_gmem_flags``,
      ``private_unmap``, ``memslot_change_errno``, ``host_private_access``,
      ``open_options``, ``machine_examples``, ``machine_steps``, ``machine_shrink``,
      ``hostile_steps`` (see :class:`guestmem.conformance.GmemConformance`);
    * ``observers``: callables returning observer plugins (the backend's own invariant
      checkers) the kit registers while it runs;
    * ``skip``: a reason to leave this VM type out of the kit;
    * ``hostile_ops``: the backend's arch face for ``guestmem fuzz --hostile``,
      ``{name: (kind, call, params[, partial])}``: *kind* ``"vm"`` or ``"vcpu"`` is the
      object ``call(obj, *args)`` takes first, *params* the kinds of its arguments,
      *partial* True where a failure may leave progress behind as the kernel's does (see
      ``guestmem.conformance.hostile``); e.g. guestmem-snp's SEV commands and
      ``SnpGuest`` instructions;
    * ``hostile_outcomes``: exception types that are this backend's modelled hardware
      verdicts, or the documented usage errors of its model-only helpers (calls that are
      no uAPI call and so have no errno); counted as such by a hostile run, never as
      crashes;
    * ``leaks``: a callable ``leaks(kvm) -> list[str]`` naming what the host still holds
      (ASIDs, KeyIDs...) once every object is closed: the kit's machine fails its leak
      check on anything named.

    How the kit launches and drives a VM (the launch, the guest's accesses, conversions and
    acceptance, the exits its VMM answers) is not configured here: it is the backend's
    :class:`~guestmem.intents.Intents` (``Backend(intents=...)``), the driver scenario
    files and the VMM-testing pytest plugin use too.

    :param backend: the backend, as registered.
    :param vm_type: one of its VM types.
    """


# --- host and VM lifetime ------------------------------------------------------------------
@hookspec(firstresult=True)
def guestmem_host_init(host: HostView) -> Any | None:
    """Set up the per-host architecture state and return it: it becomes ``host.arch``.

    Called once per ``guestmem.open()`` of the backend, before anything else (the kernel's
    ``hardware_setup`` / firmware init: an RMP table and ASID space, a TDX module with its
    KeyID pool and PAMT, a pKVM hypervisor, a Gunyah resource manager).

    :param host: the new machine.
    """


@hookspec(firstresult=True)
def guestmem_vm_init(vm: VmView) -> Any | None:
    """``kvm_arch_init_vm``: set up per-VM architecture state and return it (``vm.arch``).

    Raise :class:`guestmem.KvmError` to refuse ``KVM_CREATE_VM``: it fails with that errno
    and nothing is left behind.

    :param vm: the VM being created (no memslots, vCPUs or files yet).
    """


@hookspec
def guestmem_vm_pre_destroy(vm: VmView) -> None:
    """``kvm_arch_pre_destroy_vm``: the last reference is gone; nothing is torn down yet.

    Called from ``kvm_destroy_vm`` before the MMU is zapped (``kvm_flush_shadow_all``)
    and before ``guestmem_vm_destroy``: TDX releases the HKID here, so the zap that
    follows reclaims private pages instead of removing them one by one.

    :param vm: the dying VM; every guest_memfd file of it was already released (L-1).
    """


@hookspec
def guestmem_vm_destroy(vm: VmView) -> None:
    """``kvm_arch_destroy_vm``: free per-VM resources (ASID, HKID, VMID, control pages).

    Called after ``guestmem_vm_pre_destroy``, after every stage-2 leaf was zapped and
    after ``guestmem_vcpu_destroy`` for each vCPU; the memslots are freed after it.

    :param vm: the dying VM.
    """


@hookspec(firstresult=True)
def guestmem_vcpu_init(vcpu: VcpuView) -> Any | None:
    """``kvm_arch_vcpu_create``: per-vCPU architecture state (``vcpu.arch``).

    Raise :class:`guestmem.KvmError` to make ``KVM_CREATE_VCPU`` fail (TDX before
    ``KVM_TDX_INIT_VM``); the id stays free.

    :param vcpu: the vCPU being created.
    """


@hookspec
def guestmem_vcpu_destroy(vcpu: VcpuView) -> None:
    """``kvm_arch_vcpu_destroy``, called from ``kvm_arch_destroy_vm`` for each vCPU.

    :param vcpu: a vCPU of the dying VM.
    """


@hookspec(firstresult=True)
def guestmem_check_extension(host: HostView, vm: VmView | None, cap: int) -> int | None:
    """``KVM_CHECK_EXTENSION``: the backend's value for *cap*, or ``None`` for the core's.

    :param host: the machine.
    :param vm: the VM for a VM-fd query, ``None`` for ``/dev/kvm``.
    :param cap: the ``KVM_CAP_*`` number.
    """


# --- arch ioctls -----------------------------------------------------------------------------
@hookspec(firstresult=True)
def guestmem_vm_ioctl(vm: VmView, request: int, arg: Any) -> int | None:
    """``kvm_arch_vm_ioctl``: an architecture VM ioctl (``KVM_MEMORY_ENCRYPT_OP``,
    ``KVM_ENABLE_CAP`` of an arch capability).

    Return the ioctl's non-negative result; raise :class:`guestmem.KvmError` for an error;
    ``None`` means the backend does not know the request (``ENOTTY``, ``EINVAL`` for an
    unknown capability).  *arg* is updated in place where the kernel copies back.

    :param vm: the VM.
    :param request: ``uapi.KVM_MEMORY_ENCRYPT_OP`` or ``uapi.KVM_ENABLE_CAP``.
    :param arg: the backend's command value (e.g. an SEV or TDX command) or a
        :class:`guestmem.uapi.KvmEnableCap`.
    """


@hookspec(firstresult=True)
def guestmem_vcpu_ioctl(vcpu: VcpuView, request: int, arg: Any) -> int | None:
    """``kvm_arch_vcpu_ioctl``: an architecture vCPU ioctl (``KVM_MEMORY_ENCRYPT_OP`` on a
    vCPU fd: ``KVM_TDX_INIT_VCPU``, ``KVM_TDX_INIT_MEM_REGION``).  As
    ``guestmem_vm_ioctl``.

    :param vcpu: the vCPU.
    :param request: the ioctl.
    :param arg: the backend's command value.
    """


@hookspec
def guestmem_vcpu_pre_run(vcpu: VcpuView) -> None:
    """The checks of ``KVM_RUN`` before the guest is entered (``kvm_x86_ops.vcpu_pre_run``).

    Raise :class:`guestmem.KvmError` to fail ``KVM_RUN`` (a TD vCPU before
    ``KVM_TDX_INIT_VCPU``, an SEV VM before ``KVM_SEV_INIT2``...), or a
    :class:`guestmem.GuestExit` for an exit the hardware makes instead of entering the guest
    (:class:`guestmem.FailEntryExit`: an SNP vCPU whose VMSA was never launched).  Called
    for every guest access and hypercall of the vCPU.

    :param vcpu: the vCPU about to run.
    """


# --- memslots and bindings -----------------------------------------------------------------
@hookspec
def guestmem_prepare_memory_region(
    vm: VmView, old: SlotView | None, new: SlotView | None, change: str
) -> None:
    """``kvm_arch_prepare_memory_region``: a memslot update passed the generic checks.

    Raise :class:`guestmem.KvmError` to refuse it (nothing is changed; a MOVE that is
    refused leaves the old slot active with its mappings zapped, as the kernel does).

    :param vm: the VM.
    :param old: the slot as it is (None for a create).
    :param new: the slot as it will be (None for a delete).
    :param change: ``"create"``, ``"delete"``, ``"move"`` or ``"flags_only"``.
    """


@hookspec
def guestmem_gmem_bind(vm: VmView, slot: SlotView, gmem: GmemView, pgoff: int, npages: int) -> None:
    """``kvm_gmem_bind``: gmem pages ``[pgoff, pgoff + npages)`` are about to back *slot*.

    Called after the generic checks (B-1..B-6); raise :class:`guestmem.KvmError` to
    refuse the memslot (Gunyah: a page bound to another VM).

    :param vm: the VM.
    :param slot: the new memslot.
    :param gmem: the file's inode.
    :param pgoff: first page index bound.
    :param npages: number of pages bound.
    """


@hookspec
def guestmem_gmem_unbind(vm: VmView, slot: SlotView, gmem: GmemView) -> None:
    """``kvm_gmem_unbind``: *slot* no longer uses *gmem* (memslot deleted or VM destroyed).

    Not called when the file was released first (the release unbinds, L-3).

    :param vm: the VM.
    :param slot: the memslot going away.
    :param gmem: the file's inode.
    """


# --- gmem folio lifetime -------------------------------------------------------------------
@hookspec
def guestmem_gmem_prepare(vm: VmView, gfn: int, pfn: int, order: int, npages: int) -> None:
    """``kvm_arch_gmem_prepare``: gmem folios are about to be mapped for the first time.

    Called from ``kvm_gmem_get_pfn`` after the folio was zeroed, only while it is not yet
    prepared ("uptodate", G-11).  Covers pages ``[gfn, gfn + npages)`` backed by pfns
    ``[pfn, pfn + npages)`` made of folios of *order*; *npages* is one folio (``1 <<
    order``, or what is left of a split one) unless the backend declares ``range_faults``:
    then a run of folios of that order, each to be prepared as if it came alone.  SNP
    assigns the RMP entries here.  Raise :class:`guestmem.KvmError` to fail the fault.

    :param vm: the VM of the faulting memslot.
    :param gfn: first gfn.
    :param pfn: first host pfn.
    :param order: folio order.
    :param npages: pages to prepare.
    """


@hookspec
def guestmem_gmem_invalidate(vm: VmView, start_pfn: int, end_pfn: int) -> None:
    """``kvm_arch_gmem_invalidate``: host pfns ``[start_pfn, end_pfn)`` leave guest_memfd.

    Called from ``kvm_gmem_free_folio`` when folios are freed (punch hole, inode
    eviction; L-5), after their mappings were zapped, once per contiguous run.  SNP
    reclaims the RMP entries to shared here.  Must not fail: the kernel only WARNs.

    :param vm: the VM that created the file.
    :param start_pfn: first pfn freed.
    :param end_pfn: one past the last.
    """


@hookspec(firstresult=True)
def guestmem_max_mapping_level(vm: VmView, pfn: int, is_private: bool) -> int | None:
    """``gmem_max_mapping_level``: the largest level (``PG_LEVEL_*``) *pfn* may be mapped at.

    Called from ``kvm_mmu_max_mapping_level`` on the gmem path, only when a level above
    4 KiB is possible.  ``None`` or 0 means no extra limit (H-2).  A backend declaring
    ``range_faults`` is asked once per fault run, for its first pfn: the answer must hold
    for every page of the run its ``guestmem_fault`` left (``fault.npages``), so a backend
    whose answer changes inside a run ends the run there (SNP: the RMP page size).

    :param vm: the VM.
    :param pfn: the folio's pfn.
    :param is_private: a private mapping.
    """


# --- the MMU ---------------------------------------------------------------------------------
@hookspec
def guestmem_fault(vm: VmView, fault: Fault) -> None:
    """The architecture's part of a guest stage-2 fault, once its pfn is known.

    Called from the end of ``kvm_mmu_faultin_pfn`` (arm64: ``gmem_abort`` before the map):
    after the retry checks of rule 3.3 and before the mapping level is chosen.  pKVM
    donates the page here, Gunyah demand-pages it.  Raise :class:`guestmem.MemoryFault` or
    :class:`guestmem.KvmError` to fail the fault; lower ``fault.max_level`` (or, with
    ``range_faults``, ``fault.npages``) to map less.

    :param vm: the VM.
    :param fault: the fault (see :class:`~guestmem.backend.Fault`).
    """


@hookspec
def guestmem_set_external_spte(vm: VmView, leaf: Leaf) -> None:
    """``kvm_x86_ops.set_external_spte``: private leaves are being installed in the mirror
    root (VM types with ``has_mirrored_tdp``).

    Called after the mapping level was chosen, before the leaves become visible; TDX
    issues TDH.MEM.PAGE.AUG (or counts a pre-mapped page before finalize) here.  Raise
    :class:`guestmem.KvmError` to fail the fault (nothing is installed).

    :param vm: the VM.
    :param leaf: the leaves (a run of one level; the kernel calls once per leaf).
    """


@hookspec
def guestmem_remove_external_spte(vm: VmView, leaf: Leaf) -> None:
    """``kvm_x86_ops.remove_external_spte``: private leaves of the mirror root are zapped.

    Called for every zap that reaches the mirror root: an invalidation whose
    ``attr_filter`` includes ``KVM_FILTER_PRIVATE``, a memslot delete or move, VM
    teardown.  TDX runs BLOCK, TRACK, REMOVE, WBINVD and clears the page (or RECLAIMs it
    after the HKID is gone).  Must not fail: on a hardware error the backend marks the
    VM bugged (``vm.bug``) and leaks the page.

    :param vm: the VM.
    :param leaf: the leaves removed.
    """


@hookspec
def guestmem_unmap_gfn_range(vm: VmView, range: GfnRange) -> bool | None:  # noqa: A002
    """``kvm_unmap_gfn_range``: the arch part of an unmap of ``[range.start, range.end)``.

    Reached from punch hole, release and memory failure (inside the guest_memfd
    invalidation), from the host mmu notifier and attribute changes (inside an MMU
    invalidation), and from memslot deletion and moves (under the MMU lock alone).  The
    core has zapped its leaves first.  pKVM reclaims guest pages here, Gunyah launders.
    Return ``True`` if a TLB flush is needed.

    :param vm: the VM.
    :param range: the range; ``range.attr_filter`` says which mappings go.
    """


@hookspec
def guestmem_pre_set_memory_attributes(vm: VmView, range: GfnRange) -> bool | None:  # noqa: A002
    """``kvm_arch_pre_set_memory_attributes``: attributes of *range* are about to change.

    Called inside the MMU invalidation, once per memslot overlapping the change (A-10),
    after the core's x86 pre pass.  Return ``True`` if a flush is needed.

    :param vm: the VM.
    :param range: the range; ``range.attributes`` is the new value.
    """


@hookspec
def guestmem_post_set_memory_attributes(vm: VmView, range: GfnRange) -> None:  # noqa: A002
    """``kvm_arch_post_set_memory_attributes``: *range* now holds ``range.attributes``.

    :param vm: the VM.
    :param range: the range.
    """


# --- host side -------------------------------------------------------------------------------
@hookspec(firstresult=True)
def guestmem_gmem_fault_user_mapping(vm: VmView, gmem: GmemView, index: int) -> HostFault | None:
    """``kvm_gmem_fault_user_mapping``: may the host map gmem page *index*?

    ``None`` leaves it to the core rule (M-4: mappable iff the file is INIT_SHARED).  The
    index-beyond-i_size check (M-3) runs first; a poisoned folio is SIGBUS after it (E-1).
    :attr:`~guestmem.backend.HostFault.RECLAIM` takes the page back from the guest and
    asks again.

    :param vm: the VM that created the file.
    :param gmem: the file's inode.
    :param index: the page index faulted.
    """


@hookspec(firstresult=True)
def guestmem_host_access(
    host: HostView, pfn: int, write: bool, address: int | None, offset: int, length: int
) -> str | None:
    """The host touched bytes ``[offset, offset + length)`` of page *pfn*: a load or store of
    host userspace through one of its mappings (at host virtual *address*), or the host
    kernel's own store through its direct map (*address* ``None``).

    Called for every page of every host userspace access (anonymous memory and guest_memfd
    mappings alike) once the page is faulted in, and for every host kernel store
    (:meth:`~guestmem.backend.HostView.kernel_write`); not for the host's page-table walks
    (get_user_pages of KVM's hva fault path), which touch no data.

    Return ``None`` if the access is fine, or a verdict for a modelled hardware outcome
    that takes the host down (an RMP #PF on a write to an assigned page): the core records
    it and raises :class:`guestmem.HostCrash`.  A backend whose hardware does not stop the
    access but remembers it (TDX poisons the lines written) records that and returns None.  A
    userspace access the host kernel answers with a signal to the process raises
    :class:`guestmem.HostSigsegv` (or :class:`guestmem.HostSigbus`) with *address*: the
    access does not happen and the host goes on (arm64 pKVM: ``host_inject_abort``, then
    ``do_page_fault`` sends ``SIGSEGV``/``SEGV_ACCERR``).

    :param host: the machine.
    :param pfn: the page touched.
    :param write: a store.
    :param address: the host virtual address of a userspace access; None for the host kernel.
    :param offset: the first byte of the page touched.
    :param length: how many bytes from *offset*.
    """


# --- the guest -------------------------------------------------------------------------------
@hookspec
def guestmem_guest_access(
    vcpu: VcpuView, gfn: int, pfn: int, write: bool, private: bool, offset: int, length: int
) -> None:
    """A guest load or store reaches host page *pfn* through a present leaf.

    Called for every page of every guest access, mapped before or just faulted in: the
    hardware's own checks of a mapped page (a TDX PENDING page, an unvalidated SNP page,
    a poisoned line).  Raise :class:`guestmem.KvmError` or :class:`guestmem.GuestExit` to
    stop the access.

    :param vcpu: the accessing vCPU.
    :param gfn: the gfn accessed.
    :param pfn: the page it maps to.
    :param write: a store.
    :param private: a private access.
    :param offset: the first byte of the page accessed.
    :param length: how many bytes from *offset*; 0 for an instruction that walks to the
        page without loading or storing it (``VcpuView.translate``: PVALIDATE, ACCEPT).
    """


@hookspec(firstresult=True)
def guestmem_hypercall(vcpu: VcpuView, nr: int, args: tuple[int, ...]) -> int | None:
    """A guest hypercall (``vmcall``/``vmmcall``/``hvc``/``tdcall``) number *nr*.

    Return the value placed in the guest's return register.  ``None`` leaves it to the
    architecture's generic code (x86 ``__kvm_emulate_hypercall``: ``KVM_HC_MAP_GPA_RANGE``
    exits when enabled, unknown calls are ``-KVM_ENOSYS``).  Raise
    :class:`guestmem.HypercallExit` to leave to userspace.

    :param vcpu: the calling vCPU.
    :param nr: the hypercall number (the SMCCC function id on arm64).
    :param args: its arguments.
    """


@hookspec(firstresult=True)
def guestmem_post_populate(
    vm: VmView, gfn: int, pfn: int, src: bytes | None, order: int, opaque: Any
) -> int | None:
    """The ``post_populate`` callback of ``kvm_gmem_populate`` (P-5).

    Called per folio under the invalidate lock.  Return 0 (or ``None``) on success, a
    negative errno, or raise :class:`guestmem.KvmError`; on success the core marks the
    folio prepared.

    :param vm: the VM.
    :param gfn: first gfn of the folio.
    :param pfn: its first pfn.
    :param src: the source bytes of this folio, ``None`` for a zero page.
    :param order: pages ``1 << order``.
    :param opaque: what the caller of ``gmem_populate`` passed.
    """


# --- snapshots -------------------------------------------------------------------------------
@hookspec(firstresult=True)
def guestmem_snapshot(host: HostView, vm: VmView | None) -> Any | None:
    """The backend's hardware tables for ``kvm.snapshot()`` / ``vm.snapshot()``.

    Not a kernel function: what the hardware would show of its tables at this moment (SNP's
    RMP, TDX's S-EPT, PAMT and KeyIDs, pKVM's stage-2 ownership, Gunyah's memory parcels,
    a realm's granules and RIPAS), so that two snapshots differ iff the tables changed: the
    no-half-applied tests hold a failed call to leaving them as they were.  With *vm* None,
    the host-wide part (the whole table of a host-wide structure); with a VM, what belongs
    to that VM (its entries of a host-wide table, its own tables).

    Return an attrs value (frozen classes of the backend's own, runs rather than pages, as
    the backend stores them: a table over a terabyte costs what its runs cost), a dict or
    list of JSON values, or ``None`` for nothing.  The core turns it into JSON data through
    guestmem's one converter (``VmSnapshot.arch``, ``HostSnapshot.arch``); a value that
    does not convert is a :class:`guestmem.BackendError`.  Called inside an operation,
    with the host lock held; the hook must not change anything.

    :param host: the machine.
    :param vm: the VM snapshotted, or None for the host.
    """


# --- observers -------------------------------------------------------------------------------
@hookspec
def guestmem_ownership_update(host: HostView, vm: VmView | None, event: OwnershipEvent) -> None:
    """A backend changed its hardware ownership table (RMP, S-EPT/PAMT, pKVM stage-2...).

    For observers (tracing, invariant checking); backends emit it through
    ``vm.ownership_update`` or ``host.ownership_update``.

    :param host: the machine.
    :param vm: the VM the change was for, or None.
    :param event: what changed.
    """


@hookspec
def guestmem_trace(host: HostView, vm: VmView | None, event: TraceEvent) -> None:
    """Every modelled event (ioctl, fault, exit, invalidation, counter change).

    For tracers and cost counters.

    :param host: the machine.
    :param vm: the VM, or None for a host-level event.
    :param event: the event.
    """


@hookspec
def guestmem_operation_done(host: HostView, operation: str) -> None:
    """One call of the uAPI face finished: a syscall (an ioctl, ``fallocate``, ``mmap``,
    ``close``...), a guest access or a host access, with all it caused.

    Not a kernel function: the point where the model is consistent again (no MMU
    invalidation open, nothing half done), for invariant checkers.  Called whether the
    call succeeded or failed, before what observers raised is reported.

    :param host: the machine.
    :param operation: what ran, e.g. ``"ModelVm.set_memory_attributes"``.
    """
