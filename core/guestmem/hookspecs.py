"""Hook specifications: the plugin author's reference.

A guestmem plugin is any object (usually a module) whose functions are marked with
:data:`guestmem.hookimpl` and named after a spec below.  Plugins are found through the
``guestmem`` entry-point group; the core itself never imports a plugin.

There are two kinds of plugin:

* A **backend** registers one or more :class:`guestmem.Backend` objects in
  :func:`guestmem_register_backends`.  A backend's ``policy`` object carries the *arch
  policy* hooks (everything below taking a ``vm``).  Those are called only for VMs created
  through that backend: installing ten backends never slows or changes one VM.
* An **observer** (tracer, cost counter, invariant checker) is a plugin that is not a
  backend's policy.  It sees the hook calls of every VM, after the backend's own
  implementation has run (observers should use ``trylast=True`` when they return values).

Arguments are passed by keyword; an implementation may accept any subset of them.
Unless a spec says ``firstresult``, every implementation is called and return values are
ignored; ``firstresult`` specs stop at the first non-``None`` result.

Kernel names are kept: the hook named after a kernel function is called where the kernel
calls that function (spec section 3.6), with the same meaning of its arguments.  An
implementation that must fail the operation raises :class:`guestmem.KvmError` with the
errno the kernel would return.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from guestmem.model.events import TraceEvent
    from guestmem.model.mmu import Fault, GfnRange
    from guestmem.model.vcpu import ModelVcpu
    from guestmem.model.vm import ModelVm
    from guestmem.registry import Backend

PROJECT = "guestmem"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- registration -----------------------------------------------------------------------
@hookspec
def guestmem_register_backends(register: Callable[[Backend], None]) -> None:
    """Register backends by calling ``register(Backend(...))`` once per backend.

    Called once, when the registry is first used (lazily, idempotently).  The registry
    records the distribution the plugin came from; a second backend with the same name is
    a :class:`guestmem.PluginError` naming both distributions.
    """


# --- VM lifetime ------------------------------------------------------------------------
@hookspec(firstresult=True)
def guestmem_vm_init(vm: ModelVm) -> Any | None:
    """``kvm_arch_init_vm``: set up per-VM architecture state and return it.

    The first non-``None`` result becomes ``vm.arch`` (the place for an ASID, a VMID, a
    launch state machine, an ownership table...).  Raise :class:`guestmem.KvmError` to refuse
    creation (``KVM_CREATE_VM`` then fails with that errno and nothing is left behind).
    """


@hookspec
def guestmem_vm_destroy(vm: ModelVm) -> None:
    """``kvm_arch_destroy_vm``: the last reference to *vm* is gone (L-1, L-9).

    Called after every gmem file of the VM was released and its memslots freed; release
    per-VM resources here (ASID back to the pool, VMID, ...).
    """


@hookspec(firstresult=True)
def guestmem_check_extension(vm: ModelVm | None, cap: int) -> int | None:
    """``KVM_CHECK_EXTENSION``: the backend's value for *cap*, or ``None`` for the core's.

    *vm* is ``None`` for the system (``/dev/kvm``) query.
    """


# --- gmem folio lifetime (spec 3.6) -------------------------------------------------------
@hookspec
def guestmem_gmem_prepare(vm: ModelVm, gfn: int, pfn: int, order: int) -> None:
    """``kvm_arch_gmem_prepare``: a gmem folio is about to be mapped for the first time.

    Called from ``kvm_gmem_get_pfn`` after the folio was zeroed, only while it is not yet
    "prepared" (uptodate) in 6.18 (G-11).  *gfn* is the folio's first gfn in the faulting
    memslot, *pfn* its first host pfn, *order* its folio order.  SNP assigns the RMP entries
    here.  Raise :class:`guestmem.KvmError` to fail the fault with that errno.
    """


@hookspec
def guestmem_gmem_invalidate(vm: ModelVm, start_pfn: int, end_pfn: int) -> None:
    """``kvm_arch_gmem_invalidate``: host pfns ``[start_pfn, end_pfn)`` leave guest_memfd.

    Called when a gmem folio is freed (punch hole, inode eviction; L-5), after the
    mappings were zapped.  SNP reclaims the RMP entries to shared here, TDX clears pages.
    *vm* is the VM that created the gmem file.  Must not fail: the kernel only WARNs.
    """


@hookspec(firstresult=True)
def guestmem_max_mapping_level(vm: ModelVm, pfn: int, is_private: bool) -> int | None:
    """``.gmem_max_mapping_level``: the largest level (``PG_LEVEL_*``) *pfn* may be mapped at.

    ``None`` or 0 means no extra restriction (H-2).  Only consulted for mappings larger
    than 4 KiB.
    """


# --- MMU notifier protocol (spec 3.1-3.3, 3.5) ---------------------------------------------
@hookspec
def guestmem_unmap_gfn_range(vm: ModelVm, range: GfnRange) -> bool | None:  # noqa: A002
    """``kvm_unmap_gfn_range``: stage-2 mappings of *range* are being zapped.

    The "invalidate" hook.  Reached from punch hole, release and memory failure (inside
    the guest_memfd ``invalidate_begin``/``end``), from the host mmu notifier and
    attribute changes (inside an MMU invalidation), and from memslot deletion and moves,
    which zap under the MMU lock without an invalidation (``kvm_mmu_zap_memslot``).
    ``range.attr_filter`` tells which of private/shared mappings go.  TDX removes
    Secure-EPT leaves here.  Return ``True`` if a TLB flush is needed.
    """


@hookspec
def guestmem_fault(vm: ModelVm, fault: Fault) -> None:
    """A guest stage-2 fault resolved its pfn and is about to install the mapping.

    This is the architecture's private-fault operation (TDX PAGE.AUG, pKVM donation,
    Gunyah demand paging).  It runs after the retry checks of spec 3.3 and before the
    mapping is installed.  Raise :class:`guestmem.MemoryFault` or
    :class:`guestmem.KvmError` to make the fault fail; set ``fault.max_level`` lower to
    restrict the mapping size.

    ``fault.npages`` is 1 unless the policy object declares ``guestmem_range_faults =
    True``: then :meth:`ModelVm.fault_range` may hand it a run of pages
    ``[fault.gfn, fault.gfn + fault.npages)`` with contiguous pfns from ``fault.pfn``, and
    the hook may lower ``fault.npages`` to map fewer.
    """


@hookspec
def guestmem_pre_set_memory_attributes(vm: ModelVm, range: GfnRange) -> bool | None:  # noqa: A002
    """``kvm_arch_pre_set_memory_attributes``: attributes of *range* are about to change.

    ``range.attributes`` holds the new value.  Called inside the invalidation, once per
    memslot overlapping the change (A-10).  Return ``True`` if a flush is needed.
    """


@hookspec
def guestmem_post_set_memory_attributes(vm: ModelVm, range: GfnRange) -> None:  # noqa: A002
    """``kvm_arch_post_set_memory_attributes``: *range* now holds ``range.attributes``."""


# --- host side -------------------------------------------------------------------------
@hookspec(firstresult=True)
def guestmem_host_mappable(vm: ModelVm, inode: Any, index: int) -> bool | None:
    """May the host map gmem page *index* of *inode* (``kvm_gmem_fault_user_mapping``)?

    ``None`` leaves it to the core rule (M-3..M-5: mappable iff the file is INIT_SHARED
    and the index is below i_size).  Returning ``False`` makes the host access SIGBUS.
    The index-beyond-i_size check (M-3) always runs first.
    """


@hookspec(firstresult=True)
def guestmem_host_access(vm: ModelVm, pfn: int, write: bool) -> str | None:
    """The host touched gmem-backed host page *pfn*.

    Return ``None`` if the access is fine, or a verdict string for a modelled hardware
    outcome that takes the host down (an SNP RMP #PF on a write to an assigned page).
    The core records the verdict on the host and raises :class:`guestmem.HostCrash`.
    """


# --- population and hypercalls -----------------------------------------------------------
@hookspec(firstresult=True)
def guestmem_post_populate(
    vm: ModelVm, gfn: int, pfn: int, src: bytes | None, order: int, opaque: Any
) -> int | None:
    """The ``post_populate`` callback of ``kvm_gmem_populate`` (P-5).

    Called per folio under the invalidate lock, *src* is the source bytes of this folio
    (``None`` for a zero page).  Return 0 (or ``None``) on success or raise
    :class:`guestmem.KvmError`; the core then marks the folio prepared.
    """


@hookspec(firstresult=True)
def guestmem_hypercall(vcpu: ModelVcpu, nr: int, args: tuple[int, ...]) -> int | None:
    """A guest hypercall (``vmcall``/``vmmcall``/``hvc``) number *nr* with *args*.

    Return the value placed in the guest's return register.  ``None`` means unhandled:
    the core answers ``-KVM_ENOSYS``.  Raise :class:`guestmem.GuestExit` subclasses to
    leave to userspace.
    """


# --- observers -------------------------------------------------------------------------
@hookspec
def guestmem_ownership_update(vm: ModelVm, table: str, pfn: int, npages: int, old: Any, new: Any) -> None:
    """A backend changed its hardware ownership table (RMP, Secure-EPT, pKVM stage-2...).

    Backends call :meth:`ModelVm.ownership_update`, which fans this out to observers
    (tracing, invariant checking).  *table* names the table (``"rmp"``, ``"sept"``...),
    *old*/*new* are the backend's entry values.
    """


@hookspec
def guestmem_trace(vm: ModelVm | None, event: TraceEvent) -> None:
    """Every modelled event (ioctl, fault, exit, invalidation, counter change) of *vm*.

    For tracers and cost counters.  Must not raise.
    """
