"""The backend author's API: everything a guestmem backend plugin may use.

A backend is a plugin that registers :class:`Backend` objects and implements, on its
``policy`` object, the arch hooks of :mod:`guestmem.hookspecs` its architecture needs.
This module is the whole surface it sees of the core, in the kernel's terms:

* the markers :data:`hookimpl` (and :data:`hookspec`, for the spec module itself);
* what a plugin registers: :class:`Backend` and :class:`VmTypeInfo`;
* the values hooks receive: :class:`Fault` (``struct kvm_page_fault``), :class:`GfnRange`
  (``struct kvm_gfn_range``), :class:`Leaf` (a stage-2 leaf), :class:`OwnershipEvent`
  with :class:`Owner`, :class:`TraceEvent`, and what a hook may answer
  (:class:`HostFault`);
* narrow views of the model, each what the kernel's arch code may see of the object
  it stands for: :class:`HostView` (the machine: physical memory, the host kernel's
  direct map, per-host architecture state), :class:`VmView` (``struct kvm``),
  :class:`VcpuView` (``struct kvm_vcpu``), :class:`SlotView` (``struct
  kvm_memory_slot``) and :class:`GmemView` (a guest_memfd inode);
* :func:`view`, which turns a uAPI object a user holds (a ``Vm`` from
  ``kvm.create_vm``) into its view, for a plugin's own user-facing functions;
* :class:`RangeMap`, the range-keyed map the core stores everything in, for the plugin's
  own tables;
* the portable intents a backend translates (:mod:`guestmem.intents`): :class:`Intents`,
  :class:`X86Intents` (those of the core's x86 VM types, for a backend offering them next
  to its own), :class:`NotApplicable`, :class:`RamRegion`, the :class:`GuestVm` they act
  on, and the QEMU-style VMM loop (:mod:`guestmem.vmm`: :class:`QemuVmm`,
  :func:`convert_memory`).

Constants come from :mod:`guestmem.uapi`, exceptions from :mod:`guestmem.errors`.  A
plugin never imports ``guestmem.model`` and never touches a private attribute; the
project's tests check both for every plugin it ships.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import attrs
import pluggy

from guestmem import cabi, uapi
from guestmem.guestvm import GuestVm
from guestmem.intents import Intents, NotApplicable, RamRegion, X86Intents
from guestmem.ranges import RangeMap
from guestmem.vmm import QemuVmm, convert_memory

if TYPE_CHECKING:
    from guestmem.api import Kvm
    from guestmem.model.gmem import GmemInode
    from guestmem.model.kvm import ModelKvm
    from guestmem.model.memslots import Memslot
    from guestmem.model.vcpu import ModelVcpu
    from guestmem.model.vm import ModelVm

__all__ = [
    "PROJECT",
    "X86_DEFAULT_VM",
    "X86_SW_PROTECTED_VM",
    "Backend",
    "Conversion",
    "Fault",
    "Folio",
    "GfnRange",
    "GmemLocation",
    "GmemView",
    "GuestVm",
    "HostFault",
    "HostView",
    "Intents",
    "Leaf",
    "NotApplicable",
    "Owner",
    "OwnershipEvent",
    "QemuVmm",
    "RamRegion",
    "RangeMap",
    "SlotView",
    "TraceEvent",
    "VcpuView",
    "VmTypeInfo",
    "VmView",
    "X86Intents",
    "convert_memory",
    "hookimpl",
    "hookspec",
    "view",
]

PROJECT = "guestmem"
#: Marks the hook specifications of :mod:`guestmem.hookspecs`.
hookspec = pluggy.HookspecMarker(PROJECT)
#: Marks a plugin's implementation of a hook (``@hookimpl def guestmem_fault(...)``).
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Which kernel architecture a VM type belongs to; decides the arch code the core runs.
Arch = Literal["x86", "arm64"]
#: What a conversion between private and shared does to a page's contents
#: (:attr:`VmTypeInfo.conversion`).
Conversion = Literal["destructive", "in_place"]


# --- what a plugin registers ----------------------------------------------------------------
def _default_conversion(info: VmTypeInfo) -> Conversion | None:
    return "destructive" if info.has_private_mem else None


def _check_conversion(value: object) -> None:
    if value not in (None, "destructive", "in_place"):
        raise ValueError(f"VmTypeInfo.conversion must be 'destructive', 'in_place' or None, not {value!r}")


@attrs.frozen
class VmTypeInfo:
    """What the core needs to know about one VM type a backend offers.

    The flags mirror the kernel's per-VM predicates (rules CAP-3..CAP-6, S-4, S-7, PF-2).
    """

    #: The ``KVM_CREATE_VM`` type value.
    type: int
    #: Its kernel name (``KVM_X86_SNP_VM``).
    name: str
    #: ``kvm_arch_has_private_mem`` (CAP-5): attributes decide privateness, gmem is private.
    has_private_mem: bool = False
    #: ``kvm_arch_supports_gmem_init_shared``; None: the x86 rule, ``not has_private_mem``.
    supports_init_shared: bool | None = None
    #: ``kvm_arch_has_readonly_mem`` (x86: ``not has_protected_state``).
    readonly_mem: bool = True
    #: ``KVM_PRE_FAULT_MEMORY`` allowed from creation (``kvm->arch.pre_fault_allowed``).
    pre_fault_allowed: bool = True
    #: ``kvm_arch_nr_memslot_as_ids`` (x86: 2 with SMM, 1 for private-mem VMs).
    nr_memslot_as_ids: int = 2
    #: Folio order of this VM type's gmem files (0 in 6.18; 9 models hugepage gmem).
    gmem_folio_order: int = 0
    #: arm64 ``kvm_arch_prepare_memory_region``: GUEST_MEMFD slots must be gmem-only (S-16).
    gmem_slot_requires_mmap: bool = False
    #: ``KVM_CAP_MEMORY_ATTRIBUTES`` exists on this architecture (x86 only in 6.18).
    memory_attributes: bool = True
    #: The architecture whose generic KVM code the core runs for this VM type.
    arch: Arch = "x86"
    #: ``kvm_has_mirrored_tdp`` (TDX): private leaves live in a mirror root whose changes
    #: reach the backend through ``guestmem_set_external_spte``/``_remove_external_spte``,
    #: and a zap touches only the roots its ``attr_filter`` names.
    has_mirrored_tdp: bool = False
    #: What a conversion between private and shared does to a page's contents; None for a
    #: VM type without private memory.  ``"destructive"`` (x86 CoCo: SW_PROTECTED, SNP,
    #: TDX; Arm CCA): the private and shared sides are different memory and nothing crosses
    #: from one to the other; the side converted to reads zero once the VMM has discarded
    #: the old side, as QEMU's ``kvm_convert_memory`` does (backends.md 0.2).
    #: ``"in_place"`` (pKVM, Gunyah): the same page changes hands with its contents, and the
    #: host sees what the guest wrote once it is shared (backends.md 3.3, 4.3).  Unless
    #: given, a type with ``has_private_mem`` converts destructively (the mainline rule) and
    #: any other has nothing to convert.  The conformance kit holds the backend to it.
    conversion: Conversion | None = attrs.field(
        default=attrs.Factory(_default_conversion, takes_self=True),
        validator=lambda _, __, value: _check_conversion(value),
    )

    @property
    def private(self) -> bool:
        """The VM type has guest-private memory the guest converts (``conversion`` is set)."""
        return self.conversion is not None

    @property
    def init_shared_allowed(self) -> bool:
        """Resolved ``kvm_arch_supports_gmem_init_shared``."""
        if self.supports_init_shared is None:
            return not self.has_private_mem
        return self.supports_init_shared


#: x86 ``KVM_X86_DEFAULT_VM`` as Linux 6.18 has it.  A backend modelling an x86 host offers
#: it next to its own VM types (every x86 host's /dev/kvm does, CAP-6); its policy leaves
#: such VMs alone (``guestmem_vm_init`` returns None for them), so they behave exactly as
#: on the built-in ``sw`` backend.
X86_DEFAULT_VM = VmTypeInfo(type=uapi.KVM_X86_DEFAULT_VM, name="KVM_X86_DEFAULT_VM", nr_memslot_as_ids=2)
#: x86 ``KVM_X86_SW_PROTECTED_VM`` (needs the TDP MMU): private memory decided by attributes
#: alone, no hardware behind it.
X86_SW_PROTECTED_VM = VmTypeInfo(
    type=uapi.KVM_X86_SW_PROTECTED_VM,
    name="KVM_X86_SW_PROTECTED_VM",
    has_private_mem=True,
    nr_memslot_as_ids=1,
    conversion="destructive",
)


def _as_tuple(types: Iterable[VmTypeInfo]) -> tuple[VmTypeInfo, ...]:
    return tuple(types)


@attrs.frozen
class Backend:
    """A backend, as a plugin registers it in ``guestmem_register_backends``."""

    #: The name ``guestmem.open(name)`` takes.
    name: str
    #: One line for ``guestmem backends``.
    summary: str
    #: The VM types its ``/dev/kvm`` offers (``KVM_CAP_VM_TYPES``).
    vm_types: tuple[VmTypeInfo, ...] = attrs.field(converter=_as_tuple)
    #: The object carrying the arch policy hookimpls; reached only by this backend's hosts
    #: and VMs, before any observer.
    policy: object | None = None
    #: Builds the :class:`guestmem.api.Kvm` for :func:`guestmem.open`; None means the core
    #: model, driven by ``policy``.
    opener: Callable[..., Kvm] | None = None
    #: The policy's ``guestmem_fault`` and ``guestmem_gmem_prepare`` accept runs of pages
    #: (``npages`` > 1), and its ``guestmem_max_mapping_level`` answers for a whole run;
    #: otherwise every call covers one page (one folio for prepare).
    range_faults: bool = False
    #: The backend's translation of the portable intents (launch, conversion, acceptance)
    #: that scenario files and the pytest plugin use; None: the generic KVM base
    #: (:class:`Intents`), which converts, accepts and populates nothing.
    intents: Intents | None = None
    #: Filled in by the registry.
    distribution: str = ""
    #: Filled in by the registry (the distribution's version unless set).
    version: str = ""

    def vm_type(self, vm_type: int) -> VmTypeInfo | None:
        """The info of *vm_type*, or None if the backend does not offer it."""
        for info in self.vm_types:
            if info.type == vm_type:
                return info
        return None

    @property
    def default_vm_type(self) -> VmTypeInfo:
        """The VM type a tool uses for plain guest memory: the first one without private
        memory (``KVM_X86_DEFAULT_VM``, ``KVM_VM_TYPE_ARM_IPA_SIZE(0)``), else the first."""
        for info in self.vm_types:
            if not info.private:
                return info
        if not self.vm_types:
            raise LookupError(f"backend {self.name!r} offers no VM type")
        return self.vm_types[0]

    @property
    def private_vm_types(self) -> tuple[VmTypeInfo, ...]:
        """The VM types whose guests convert private memory (``conversion`` set), in order."""
        return tuple(info for info in self.vm_types if info.private)


# --- values hooks receive and answer --------------------------------------------------------
class HostFault(enum.Enum):
    """What a host userspace fault on a guest_memfd page becomes
    (``guestmem_gmem_fault_user_mapping``)."""

    #: Map the page.
    ALLOW = "allow"
    #: ``VM_FAULT_SIGBUS``: the access raises :class:`guestmem.HostSigbus`.
    SIGBUS = "sigbus"
    #: Take the page back from the guest first ("launder": the core invalidates the
    #: folio's guest mappings, which reach the backend's ``guestmem_unmap_gfn_range``),
    #: then ask again; still not allowed is SIGBUS.
    RECLAIM = "reclaim"


class Owner(enum.Enum):
    """Who a hardware ownership-table entry gives a page to, in terms every backend shares."""

    #: The host kernel may use the page (RMP shared, PAMT NDA, pKVM host OWNED...).
    HOST = "host"
    #: Private to one guest.
    GUEST = "guest"
    #: Mapped by both the host and a guest.
    SHARED = "shared"
    #: Held by the hypervisor, firmware or security module (control pages, page tables).
    HYPERVISOR = "hypervisor"


@attrs.frozen
class OwnershipEvent:
    """A backend changed its hardware ownership table over ``[pfn, pfn + npages)``."""

    #: The table's name (``"rmp"``, ``"sept"``, ``"pamt"``, ``"pkvm.host"``...).
    table: str
    #: First host pfn (or, for a per-guest table keyed by gfn, first gfn: see ``table``).
    pfn: int
    #: Number of pages changed.
    npages: int
    #: The backend's own entry values before and after (``None`` for "no entry").
    old: Any
    new: Any
    #: The same entries in the terms of :class:`Owner`.
    old_owner: Owner
    new_owner: Owner
    #: The VM the change was made for, if any.
    vm_id: int | None = None


@attrs.frozen
class TraceEvent:
    """One modelled event: ``kind`` (``"fault"``, ``"punch_hole"``...) and its fields.

    ``seq`` orders the events of a process; ``ts`` is ``time.monotonic_ns()`` when it was
    made; ``vm`` is the VM id (None for host-level events).
    """

    seq: int
    kind: str
    vm: int | None
    fields: dict[str, Any] = attrs.field(factory=dict)
    ts: int = 0


@attrs.frozen
class Leaf:
    """Stage-2 leaves mapping ``[gfn, gfn + npages)`` to ``[pfn, pfn + npages)``.

    One value stands for a run of leaves of the same *level*, privateness and
    writability; ``npages`` is a multiple of the level's page count.
    """

    gfn: int
    npages: int
    pfn: int
    #: ``PG_LEVEL_4K`` / ``PG_LEVEL_2M`` / ``PG_LEVEL_1G``.
    level: int
    #: Which table holds it: private (gmem) or shared.
    private: bool
    writable: bool = True

    @property
    def end_gfn(self) -> int:
        """One past the last gfn."""
        return self.gfn + self.npages


@attrs.define(slots=True, eq=False)
class Fault:
    """``struct kvm_page_fault``: a guest stage-2 fault being resolved.

    ``guestmem_fault`` sees it once the pfn is known and may lower ``max_level`` and (for a
    backend with ``range_faults``) ``npages``, or set ``map_writable`` False; a value
    raised above what the core computed is ignored.
    """

    #: The faulting gfn.
    gfn: int
    #: The access is private (the guest's C-bit/shared-bit says so).
    is_private: bool
    #: A store.
    write: bool
    #: An instruction fetch.
    exec: bool = False
    #: ``KVM_PRE_FAULT_MEMORY`` (no vCPU access behind it).
    prefetch: bool = False
    #: The faulting vCPU, None for faults not taken by one.
    vcpu: VcpuView | None = None
    #: Pages ``[gfn, gfn + npages)`` this fault maps at once, with pfns contiguous from
    #: ``pfn``; always 1 unless the backend declares ``range_faults``.
    npages: int = 1
    #: The memslot holding ``gfn`` (set before the hook runs).
    slot: SlotView | None = None
    #: The host pfn backing ``gfn``.
    pfn: int | None = None
    #: The folio order the pfn belongs to (gmem path), 0 on the hva path.
    order: int = 0
    #: The largest leaf level allowed so far (``PG_LEVEL_*``).
    max_level: int = uapi.PG_LEVEL_1G
    #: The leaf may be writable.
    map_writable: bool = True

    @property
    def gpa(self) -> int:
        """The faulting guest physical address (page aligned)."""
        return self.gfn << uapi.PAGE_SHIFT


@attrs.frozen
class GfnRange:
    """``struct kvm_gfn_range``: gfns ``[start, end)`` of ``slot`` being invalidated."""

    slot: SlotView
    start: int
    end: int
    #: Which mappings go: ``KVM_FILTER_PRIVATE``, ``KVM_FILTER_SHARED`` or both.
    attr_filter: int = uapi.KVM_FILTER_SHARED | uapi.KVM_FILTER_PRIVATE
    #: The new attribute value (attribute changes only).
    attributes: int = 0


@attrs.frozen
class Folio:
    """A run of guest_memfd pages ``[start, end)`` (page indices) with the same state."""

    start: int
    end: int
    #: Host pfn of ``start``; the run is contiguous.
    pfn: int
    #: Zeroed and handed to ``guestmem_gmem_prepare`` ("uptodate" in 6.18).
    prepared: bool
    #: Hardware-poisoned (E-1).
    poisoned: bool


@attrs.frozen
class GmemLocation:
    """Where a gfn lives in guest_memfd: its memslot, the file's inode and the page index."""

    slot: SlotView
    gmem: GmemView
    index: int


# --- views ----------------------------------------------------------------------------------
def _page_span(pfn: object, offset: object, *, n: object) -> tuple[int, int, int]:
    """``(pfn, offset, n)`` of an access to bytes ``[offset, offset + n)`` of one page."""
    pfn, offset, n = cabi.index(pfn, "pfn"), cabi.index(offset, "offset"), cabi.index(n, "n")
    if pfn < 0 or offset < 0 or n < 0 or offset + n > uapi.PAGE_SIZE:
        raise ValueError(f"pfn {pfn:#x}: bytes [{offset:#x}, +{n:#x}) are not within one page")
    return pfn, offset, n


class HostView:
    """The machine behind one ``guestmem.open()``: physical memory, the host kernel's
    direct map and the per-host architecture state (``arch``, from
    ``guestmem_host_init``)."""

    __slots__ = ("_kvm", "arch")

    def __init__(self, kvm: ModelKvm) -> None:
        self._kvm = kvm
        #: What the backend's ``guestmem_host_init`` returned (an RMP, a KeyID pool...).
        self.arch: Any = None

    def __repr__(self) -> str:
        return f"<HostView of {self._kvm!r}>"

    @property
    def backend(self) -> str:
        """The backend name this host was opened with."""
        return self._kvm.backend

    # physical memory
    def alloc(self, npages: int) -> int:
        """Allocate *npages* contiguous zeroed pages (2 MiB aligned for whole 2 MiB runs)."""
        return self._kvm.host.alloc(npages)

    def free(self, pfn: int, npages: int) -> None:
        """Give ``[pfn, pfn + npages)`` back to the page allocator."""
        self._kvm.host.free(pfn, npages)

    def is_allocated(self, pfn: int) -> bool:
        """True iff *pfn* is allocated."""
        return self._kvm.host.is_allocated(pfn)

    @property
    def allocated_pages(self) -> int:
        """Pages allocated now: what closing every file of a scenario should bring to 0
        (a page still allocated then was leaked, or is still held by a live object)."""
        return self._kvm.host.allocated_pages

    def read(self, pfn: int, offset: int, n: int) -> bytes:
        """Bytes ``[offset, offset + n)`` of page *pfn* (must not cross the page).

        Integers only (:func:`guestmem.cabi.index`: TypeError naming the argument); a span outside
        the page is ValueError.
        """
        pfn, offset, n = _page_span(pfn, offset, n=n)
        return self._kvm.host.read(pfn, offset, n)

    def write(self, pfn: int, offset: int, data: bytes) -> None:
        """Store *data* at *offset* of page *pfn* as hardware would: no hardware checks.

        The arguments are checked first as :meth:`read`'s; *data* is any bytes-like object.
        """
        data = cabi.buffer(data, "data")
        pfn, offset, _ = _page_span(pfn, offset, n=len(data))
        self._kvm.host.write(pfn, offset, data)

    def zero(self, pfn: int, npages: int) -> None:
        """Clear whole pages (``clear_highpage``, MOVDIR64B...)."""
        self._kvm.host.zero(pfn, npages)

    def copy(self, dst: int, src: int, npages: int) -> None:
        """Copy whole pages from pfn *src* to pfn *dst*."""
        self._kvm.host.copy(dst, src, npages)

    def is_zero(self, pfn: int, npages: int = 1) -> bool:
        """True iff every byte of ``[pfn, pfn + npages)`` is zero."""
        return self._kvm.host.is_zero(pfn, npages)

    def unallocated(self, start_pfn: int, end_pfn: int) -> Iterator[tuple[int, int]]:
        """The runs ``[s, e)`` of ``[start_pfn, end_pfn)`` that are not allocated."""
        return self._kvm.host.unallocated(start_pfn, end_pfn)

    def vms(self) -> list[VmView]:
        """Every VM of the host not yet destroyed, by id."""
        return [vm.view for vm in self._kvm.vms if not vm.destroyed]

    # the host kernel's direct map
    def set_direct_map_invalid(self, pfn: int, npages: int) -> None:
        """``set_direct_map_invalid_noflush``: the host kernel loses its mapping of the pages."""
        self._kvm.host.direct_map_invalid.set(pfn, pfn + npages, True)
        self.count("direct_map_changes")

    def set_direct_map_default(self, pfn: int, npages: int) -> None:
        """``set_direct_map_default_noflush``: the host kernel maps the pages again."""
        self._kvm.host.direct_map_invalid.erase(pfn, pfn + npages)
        self.count("direct_map_changes")

    def direct_map_valid(self, pfn: int) -> bool:
        """True iff the host kernel's direct map covers *pfn*."""
        return self._kvm.host.direct_map_invalid.get(pfn) is None

    def kernel_write(self, pfn: int, offset: int, data: bytes) -> None:
        """The host kernel stores *data* to *pfn* through its direct map.

        A page out of the direct map is a kernel page fault, and a page the backend's
        ``guestmem_host_access`` refuses is that backend's verdict (an RMP #PF...): either
        takes the host down (:class:`guestmem.HostCrash`).  The arguments are checked
        first, as :meth:`write`'s: a non-integer *pfn* or *offset* is a TypeError naming it,
        before the host kernel touches anything.
        """
        data = cabi.buffer(data, "data")
        pfn, offset, _ = _page_span(pfn, offset, n=len(data))
        self._kvm.kernel_access(pfn, offset, data)

    def operation(self) -> AbstractContextManager[None]:
        """One operation of the uAPI face, for a backend's own user-facing calls.

        A backend's functions that change or read the model or its own tables outside any
        ioctl (a guest instruction, a firmware or resource-manager call a VMM makes, a
        guest's call to a service VM) run inside it (``with host.operation(): ...``): it
        holds the host lock, so another thread's ioctls, faults and hooks wait until it
        ends (the backend's tables need no lock of their own), and observers' failures are
        reported, and ``guestmem_operation_done`` runs, when it ends, as for an ioctl.  It
        nests in operations already under way (the lock is re-entrant).
        """
        return self._kvm.operation()

    # verdicts and events
    @property
    def crashed(self) -> str | None:
        """The verdict the host went down with, or None."""
        return self._kvm.host.crashed

    def crash(self, verdict: str) -> NoReturn:
        """Record that the host went down with *verdict* and raise :class:`guestmem.HostCrash`."""
        if self._kvm.host.crashed is None:
            self._kvm.trace(None, "host_crash", {"verdict": verdict})
        self._kvm.host.crash(verdict)

    def check_alive(self) -> None:
        """Raise :class:`guestmem.HostCrash` again if the host went down."""
        self._kvm.host.check_alive()

    def trace(self, kind: str, **fields: Any) -> None:
        """A host-level trace event (no VM)."""
        self._kvm.trace(None, kind, fields)

    def warn(self, logger: str, event: str, **fields: Any) -> None:
        """The kernel's ``pr_warn``: *event* logged on *logger* (``"guestmem.tdx"``) once the
        application configured structlog, silent otherwise.  structlog is never imported
        for it: a backend that warns costs no import until somebody listens."""
        self._kvm.warn(logger, event, fields)

    @property
    def counters(self) -> dict[str, int]:
        """The host's own cost counters (a copy): work no single VM is charged with."""
        return dict(self._kvm.counters)

    def count(self, name: str, n: int = 1) -> None:
        """Add *n* to the host's cost counter *name*."""
        self._kvm.counters[name] += n

    def ownership_update(
        self, table: str, pfn: int, npages: int, old: Any, new: Any, *, old_owner: Owner, new_owner: Owner
    ) -> None:
        """Tell observers a host-wide table changed for no particular VM."""
        event = OwnershipEvent(table, pfn, npages, old, new, old_owner, new_owner, None)
        self._kvm.ownership_update(None, event)


class VmView:
    """``struct kvm`` as an architecture's code sees it.

    Hooks receive it as ``vm``; ``arch`` holds what ``guestmem_vm_init`` returned.
    """

    __slots__ = ("_vm",)

    def __init__(self, vm: ModelVm) -> None:
        self._vm = vm

    def __repr__(self) -> str:
        return f"<VmView {self._vm!r}>"

    # identity
    @property
    def vm_id(self) -> int:
        """The VM's number on its host (1, 2, ...)."""
        return self._vm.vm_id

    @property
    def vm_type(self) -> int:
        """The ``KVM_CREATE_VM`` type."""
        return self._vm.vm_type

    @property
    def type_info(self) -> VmTypeInfo:
        """The backend's description of the VM type."""
        return self._vm.type_info

    @property
    def host(self) -> HostView:
        """The machine the VM runs on."""
        return self._vm.kvm.view

    @property
    def backend(self) -> Backend:
        """The backend the VM was created through."""
        return self._vm.backend

    @property
    def arch(self) -> Any:
        """Per-VM architecture state (what ``guestmem_vm_init`` returned)."""
        return self._vm.arch

    @property
    def has_private_mem(self) -> bool:
        """``kvm_arch_has_private_mem`` (CAP-5)."""
        return self._vm.has_private_mem

    # costs and events
    @property
    def counters(self) -> dict[str, int]:
        """The VM's cost counters (a copy)."""
        return dict(self._vm.counters)

    def count(self, name: str, n: int = 1) -> None:
        """Add *n* to cost counter *name* (``count(name, 0)`` makes it exist, reading 0)."""
        self._vm.counters[name] += n

    def trace(self, kind: str, **fields: Any) -> None:
        """Emit a trace event of this VM to the observers (and the recorded trace)."""
        self._vm.trace(kind, **fields)

    def ownership_update(
        self, table: str, pfn: int, npages: int, old: Any, new: Any, *, old_owner: Owner, new_owner: Owner
    ) -> None:
        """Tell observers the backend changed its hardware ownership *table* for this VM."""
        event = OwnershipEvent(table, pfn, npages, old, new, old_owner, new_owner, self._vm.vm_id)
        self._vm.kvm.ownership_update(self, event)

    # lifetime
    @property
    def closed(self) -> bool:
        """Userspace closed the VM fd: the VM goes when its last reference does."""
        return self._vm.fd_closed

    @property
    def destroyed(self) -> bool:
        """The last reference went and the VM was torn down."""
        return self._vm.destroyed

    def check_ioctl(self) -> None:
        """The checks ``kvm_vm_ioctl`` makes before any command: EBADF once the VM fd is
        closed, :class:`guestmem.HostCrash` on a crashed host, EIO (CAP-9) on a dead VM.

        For a backend's own user-facing command that is a VM ioctl in the kernel but has no
        uAPI method here (Android pKVM's ``KVM_CAP_ARM_PROTECTED_VM`` firmware address).
        """
        with self._vm.kvm.operation():
            self._vm.check_ioctl()

    @property
    def mmu_invalidate_in_progress(self) -> int:
        """``kvm->mmu_invalidate_in_progress``: MMU invalidations under way."""
        return self._vm.mmu.invalidate_in_progress

    @property
    def dead(self) -> bool:
        """``kvm->vm_dead``: every ioctl fails with EIO (CAP-9)."""
        return self._vm.dead

    @property
    def dead_reason(self) -> str:
        """Why the VM died (empty while alive)."""
        return self._vm.dead_reason

    @property
    def bugged(self) -> bool:
        """``kvm->vm_bugged``: a KVM_BUG_ON fired."""
        return self._vm.bugged

    def kill(self, reason: str) -> None:
        """``kvm_vm_dead``: from now on every ioctl of the VM fails with EIO."""
        self._vm.kill(reason)

    def bug(self, reason: str) -> None:
        """``KVM_BUG_ON`` / ``kvm_vm_bugged``: the VM is dead and marked bugged."""
        self._vm.kill(reason, bugged=True)

    @property
    def pre_fault_allowed(self) -> bool:
        """``kvm->arch.pre_fault_allowed`` (PF-2); a backend may set it (SNP, TDX at finalize)."""
        return self._vm.pre_fault_allowed

    @pre_fault_allowed.setter
    def pre_fault_allowed(self, value: bool) -> None:
        self._vm.pre_fault_allowed = value

    @property
    def hypercall_exit_enabled(self) -> int:
        """x86 ``kvm->arch.hypercall_exit_enabled``: ``KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)``."""
        return self._vm.hypercall_exit_enabled

    # memslots and attributes
    def slot_for_gfn(self, gfn: int, as_id: int = 0) -> SlotView | None:
        """``gfn_to_memslot``."""
        slot = self._vm.slots.for_gfn(gfn, as_id)
        return None if slot is None else slot.view

    def memslots(self) -> list[SlotView]:
        """Every memslot, by address space and gfn."""
        return [slot.view for slot in self._vm.slots.in_order()]

    def bound_gmem(self) -> list[GmemView]:
        """The guest_memfd files the memslots bind, each once, in memslot order."""
        files: dict[int, GmemView] = {}
        for slot in self.memslots():
            gmem = slot.gmem
            if gmem is not None:
                files.setdefault(gmem.ino, gmem)
        return list(files.values())

    def is_private(self, gfn: int) -> bool:
        """``kvm_mem_is_private``."""
        return self._vm.is_private(gfn)

    def attribute_runs(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """``(s, e, attributes)`` over ``[start, end)``, gaps included with value 0."""
        pos = start
        for s, e, value in self._vm.attributes.items(start, end):
            if s > pos:
                yield pos, s, 0
            yield s, e, value
            pos = e
        if pos < end:
            yield pos, end, 0

    # guest_memfd
    def gfn_to_gmem(self, gfn: int) -> GmemLocation | None:
        """Memslot, gmem inode and page index of *gfn*, or None (no gmem binding)."""
        slot = self._vm.slots.for_gfn(gfn)
        if slot is None or slot.gmem_file is None:
            return None
        return GmemLocation(slot.view, slot.gmem_file.inode.view, slot.gfn_to_index(gfn))

    def gmem_pfn(self, gfn: int) -> int | None:
        """The host pfn backing *gfn* in guest_memfd, or None if none is allocated."""
        return self._vm.gmem_pfn(gfn)

    def gmem_populate(self, gfn: int, src: bytes | None, npages: int, opaque: Any = None) -> int:
        """``kvm_gmem_populate`` (P-1..P-5): ``guestmem_post_populate`` per folio; the pages done."""
        return self._vm.gmem_populate(gfn, src, npages, opaque)

    # stage 2
    def leaf(self, gfn: int) -> Leaf | None:
        """The stage-2 leaf run holding *gfn*, or None."""
        return self._vm.mmu.leaf(gfn)

    def leaves(self, start: int = 0, end: int | None = None) -> Iterator[Leaf]:
        """The stage-2 leaves in ``[start, end)``, clipped to it, in gfn order."""
        return self._vm.mmu.leaves(start, end)

    def zap_gfn_range(self, start: int, end: int) -> None:
        """``kvm_zap_gfn_range``: one MMU invalidation zapping every leaf in ``[start, end)``.

        The arch unmap hook is not called (the kernel's zap does not go through
        ``kvm_unmap_gfn_range``); mirrored private leaves reach ``remove_external_spte``.
        """
        with self._vm.kvm.operation():
            self._vm.zap_gfn_range(start, end)

    def fault_range(
        self, gfn: int, npages: int, *, private: bool, write: bool = False, vcpu: VcpuView | None = None
    ) -> int:
        """Map ``[gfn, gfn + npages)`` as that many guest accesses in order would.

        Pages already mapped for the access are passed over; every other run takes the
        stage-2 fault with all its checks and hooks.  Returns the pages mapped from *gfn*
        on; the first page's failure raises (:class:`guestmem.MemoryFault`,
        :class:`guestmem.KvmError`, :class:`guestmem.MmioExit`), a later one ends the range.
        With *vcpu* the accesses are that vCPU's, inside its ``KVM_RUN``: first the checks
        of :meth:`VcpuView.check_run` (EBADF once its fd is closed).  A destroyed VM is EBADF.
        """
        with self._vm.kvm.operation():
            model_vcpu = None if vcpu is None else vcpu._vcpu
            return self._vm.fault_range(gfn, npages, private=private, write=write, vcpu=model_vcpu)

    # vCPUs
    def vcpus(self) -> list[VcpuView]:
        """Every vCPU of the VM, by id."""
        return [self._vm.vcpus[i].view for i in sorted(self._vm.vcpus)]


class VcpuView:
    """``struct kvm_vcpu`` as an architecture's code sees it; ``arch`` is what
    ``guestmem_vcpu_init`` returned."""

    __slots__ = ("_vcpu", "arch")

    def __init__(self, vcpu: ModelVcpu) -> None:
        self._vcpu = vcpu
        #: Per-vCPU architecture state (what ``guestmem_vcpu_init`` returned).
        self.arch: Any = None

    def __repr__(self) -> str:
        return f"<VcpuView {self._vcpu!r}>"

    @property
    def vcpu_id(self) -> int:
        """The ``KVM_CREATE_VCPU`` id."""
        return self._vcpu.vcpu_id

    @property
    def vm(self) -> VmView:
        """The VM."""
        return self._vcpu.vm.view

    @property
    def closed(self) -> bool:
        """Userspace closed the vCPU fd."""
        return self._vcpu.closed

    def check_run(self) -> None:
        """The checks ``KVM_RUN`` makes before the guest is entered: EBADF once the vCPU fd is
        closed, :class:`guestmem.HostCrash` on a crashed host, EIO (CAP-9) on a dead VM, then
        the backend's ``guestmem_vcpu_pre_run``.

        For a backend's guest-side functions that run inside ``KVM_RUN`` of this vCPU
        without a uAPI call of their own (an instruction of the guest, a re-entry after an
        exit to userspace).
        """
        with self._vcpu.vm.kvm.operation():
            self._vcpu.check_run()

    def translate(self, gpa: int, *, write: bool = False, private: bool | None = None) -> int:
        """The host pfn the guest reaches at *gpa*, faulting it in as a guest access would.

        This is the guest's page walk for an instruction that names a gpa (PVALIDATE,
        TDG.MEM.PAGE.ACCEPT): exits raise as from :meth:`guestmem.api.Vcpu.access`, and a
        negative *gpa* is EINVAL as there.
        """
        with self._vcpu.vm.kvm.operation():
            return self._vcpu.translate(gpa, write=write, private=private)


class SlotView:
    """``struct kvm_memory_slot``, read-only."""

    __slots__ = ("_slot",)

    def __init__(self, slot: Memslot) -> None:
        self._slot = slot

    def __repr__(self) -> str:
        return f"<SlotView {self._slot.describe()}>"

    @property
    def as_id(self) -> int:
        """Address space id (bits 31:16 of the ioctl's ``slot``)."""
        return self._slot.as_id

    @property
    def id(self) -> int:
        """Slot id (bits 15:0)."""
        return self._slot.id

    @property
    def base_gfn(self) -> int:
        """First gfn."""
        return self._slot.base_gfn

    @property
    def npages(self) -> int:
        """Number of pages."""
        return self._slot.npages

    @property
    def end_gfn(self) -> int:
        """One past the last gfn."""
        return self._slot.end_gfn

    @property
    def flags(self) -> int:
        """``KVM_MEM_*`` flags (``KVM_MEMSLOT_INVALID`` while being deleted or moved)."""
        return self._slot.flags

    @property
    def userspace_addr(self) -> int:
        """Host virtual address of the first page (the shared side)."""
        return self._slot.userspace_addr

    @property
    def has_gmem(self) -> bool:
        """``kvm_slot_has_gmem``: created with ``KVM_MEM_GUEST_MEMFD``."""
        return self._slot.has_gmem

    @property
    def gmem_only(self) -> bool:
        """``KVM_MEMSLOT_GMEM_ONLY``: its guest_memfd is mmap-able and serves shared faults."""
        return self._slot.gmem_only

    @property
    def gmem_pgoff(self) -> int:
        """The gmem page index of ``base_gfn``."""
        return self._slot.gmem_pgoff

    @property
    def gmem(self) -> GmemView | None:
        """The bound guest_memfd's inode, None once the file was released (L-3)."""
        file = self._slot.gmem_file
        return None if file is None else file.inode.view

    def gfn_to_index(self, gfn: int) -> int:
        """``kvm_gmem_get_index``."""
        return self._slot.gfn_to_index(gfn)

    def describe(self) -> str:
        """``slot AS:ID gpa [a, b)``."""
        return self._slot.describe()


class GmemView:
    """A guest_memfd inode: its pages, folio state and host mappings, read-only."""

    __slots__ = ("_inode",)

    def __init__(self, inode: GmemInode) -> None:
        self._inode = inode

    def __repr__(self) -> str:
        return f"<GmemView ino={self._inode.ino:#x} size={self._inode.size:#x}>"

    @property
    def ino(self) -> int:
        """Inode number (``st_ino``)."""
        return self._inode.ino

    @property
    def size(self) -> int:
        """``i_size`` in bytes."""
        return self._inode.size

    @property
    def npages(self) -> int:
        """``i_size`` in pages."""
        return self._inode.npages

    @property
    def flags(self) -> int:
        """``GUEST_MEMFD_FLAG_*`` it was created with."""
        return self._inode.flags

    @property
    def init_shared(self) -> bool:
        """``GUEST_MEMFD_FLAG_INIT_SHARED``."""
        return self._inode.init_shared

    @property
    def owner(self) -> VmView:
        """The VM that created the file."""
        return self._inode.owner.view

    def pfn(self, index: int) -> int | None:
        """The host pfn backing page *index*, or None (a hole)."""
        return self._inode.pfn(index)

    def is_prepared(self, index: int) -> bool:
        """Page *index* has a folio that was zeroed and prepared."""
        return self._inode.is_prepared(index)

    def is_poisoned(self, index: int) -> bool:
        """Page *index* has a hardware-poisoned folio."""
        return self._inode.is_poisoned(index)

    def folios(self, start: int = 0, end: int | None = None) -> Iterator[Folio]:
        """Allocated page runs in ``[start, end)``, clipped, in index order."""
        for s, e, folio in self._inode.pages.items(start, end):
            yield Folio(s, e, s + folio.delta, folio.uptodate, folio.hwpoison)

    def host_mapped(self, index: int) -> bool:
        """Some host userspace mapping has page *index* faulted in."""
        return self._inode.host_mapped(index)

    def allocate(self, start: int, end: int) -> None:
        """``kvm_gmem_allocate``: folios over page indices ``[start, end)``, as
        ``fallocate(FALLOC_FL_KEEP_SIZE)`` instantiates them (existing ones untouched, new
        ones neither zeroed nor prepared: the first use does that).

        For a backend that hands guest_memfd pages to firmware outside a guest fault (a
        Gunyah memparcel built from the file's folios).
        """
        self._inode.allocate(start, end)

    def unmap_mapping_range(self, start: int, end: int) -> None:
        """``unmap_mapping_range``: host userspace mappings drop pages ``[start, end)``.

        What ``unmap_mapping_folio`` does before a folio becomes inaccessible to the host
        (the guest_memfd library's ``guest_memfd_make_inaccessible``): the pages stay in the
        file, the next host touch faults again (``guestmem_gmem_fault_user_mapping``).
        Guest mappings through ``userspace_addr`` see the MMU notifier.
        """
        for vma in list(self._inode.vmas):
            vma.zap_indices(start, end)

    def host_mapped_folios(self) -> Iterator[Folio]:
        """The folio runs host userspace mappings have faulted in, clipped to the faulted
        runs (per mapping, as :meth:`host_mapped_ranges`): the guest memory the host can
        reach, which each architecture's "the host never maps private memory" check walks."""
        for s, e in self.host_mapped_ranges():
            yield from self.folios(s, e)

    def host_mapped_ranges(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Page index runs ``[s, e)`` faulted into host userspace mappings, clipped to
        ``[start, end)``: per mapping, in index order (mappings may overlap).  O(log n + k)
        per mapping for a bounded range, so a backend checks a run of pages at once."""
        for vma in self._inode.vmas:
            items = vma.faulted.items() if start == 0 and end is None else vma.faulted.items(start, end)
            for s, e, _ in items:
                yield s, e


def view(obj: Any) -> Any:
    """The view of a uAPI object of a model backend.

    ``Vm`` -> :class:`VmView`, ``Vcpu`` -> :class:`VcpuView`, ``GuestMemfd`` ->
    :class:`GmemView`, ``Kvm`` -> :class:`HostView`; a view is returned as it is.
    ``TypeError`` for anything else (the real kernel's objects have no view).
    """
    if isinstance(obj, HostView | VmView | VcpuView | GmemView | SlotView):
        return obj
    found = getattr(type(obj), "backend_view", None)
    if found is None:
        raise TypeError(f"{obj!r} is not an object of a guestmem model backend")
    return found.__get__(obj)
