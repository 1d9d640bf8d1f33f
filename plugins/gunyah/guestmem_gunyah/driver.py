"""The Linux Gunyah VM manager with guest_memfd-backed VMs (``drivers/virt/gunyah``).

:class:`GunyahVm` is ``struct gunyah_vm``: its status (the RM's, as the driver mirrors it),
VMID, DTB parcel, **bindings** of guest_memfd ranges with their lend/share policy
(``struct gunyah_gmem_binding``, ``gunyah_gmem_add_mapping``), and ``mm``, the folios it
provided to the guest (``ghvm->mm``, tagged share/write).  Its methods are the driver's
functions, named after them:

* ``gunyah_vm_start`` (:meth:`GunyahVm.start`): VMID, DTB parcel lent
  (``gunyah_gmem_share_parcel``), ``VM_CONFIG_IMAGE``, ``gunyah_gmem_setup_demand_paging``,
  ``VM_SET_ADDRESS_LAYOUT``, ``VM_INIT`` (READY), ``VM_GET_HYP_RESOURCES``,
  ``gunyah_vm_parcel_to_paged``, ``VM_START`` (RUNNING);
* ``gunyah_gmem_demand_page`` / ``gunyah_vm_provide_folio`` (:meth:`GunyahVm.demand_page`):
  donate (lend: ``DONATE_TO_PROTECTED``, share: ``DONATE_TO_SIBLING``) and
  ``addrspace_map`` with the binding's rights, lent folios out of the host's direct map;
* ``gunyah_vm_reclaim_range`` (:meth:`GunyahVm.reclaim_range`): ``addrspace_unmap`` and
  donate back, ``NOSYNC`` on every call but the last, direct map restored;
* ``_gunyah_vm_put`` (:meth:`GunyahVm.pre_destroy`, :meth:`GunyahVm.destroy`): stop,
  reclaim the DTB parcel, remove bindings, reclaim everything, reset, free the VMID.

Two driver generations differ in what a lent folio is to the host (:class:`Driver`):
Gunyah's own guest_memfd (``gunyah_gmem_host_fault`` launders: reclaims the folio from
the guest and maps it; lending refuses a folio the host maps) and the guest_memfd library
(``gmem_fault`` -> ``guest_memfd_make_accessible`` times out while the hypervisor holds
its reference: SIGBUS; lending unmaps the host first, ``guest_memfd_make_inaccessible``).
"""

from __future__ import annotations

import enum
import errno
from collections import Counter
from collections.abc import Iterator
from typing import Any

import attrs

from guestmem.backend import Fault, GmemView, HostView, Owner, RangeMap, VmView
from guestmem.errors import KvmError
from guestmem_gunyah import abi
from guestmem_gunyah.abi import Access, DonateType, HypError, Notification, VmStatus
from guestmem_gunyah.exits import PageFaultExit, SyncExternalAbort
from guestmem_gunyah.hyp import HLOS_MEMORY, Extent, ExtentKind, HypCallError, Hypervisor, VmResources
from guestmem_gunyah.rm import VM_RULE, ResourceManager, RmCallError

PAGE_SHIFT = abi.PAGE_SHIFT
#: Rule tag of the driver's binding and demand-paging refusals (backends.md 4.3).
BIND_RULE = "Gunyah-4.3"
#: Rule tag of host-mappability decisions (backends.md 4.5).
HOST_RULE = "Gunyah-4.5"


class Driver(enum.Enum):
    """Which generation of the Linux driver backs guest_memfd (backends.md 4.3, 4.5)."""

    #: Gunyah's own guest_memfd (``drivers/virt/gunyah/guest_memfd.c`` with
    #: ``gunyah_gmem_host_fault``/``gunyah_gmem_launder_folio``): a host fault on a lent
    #: folio reclaims it from the guest ("launder") and maps it; a folio the host maps is
    #: not lent (``folio_mapped``: EPERM).
    GMEM = "launder"
    #: The guest_memfd library (``mm/guest_memfd.c``, "mm: Introduce guest_memfd library"
    #: v2): a host fault on a lent folio is SIGBUS (``guest_memfd_make_accessible`` gives
    #: -EBUSY while the hypervisor holds its folio reference); lending first unmaps the
    #: folio from the host (``guest_memfd_make_inaccessible`` -> ``unmap_mapping_folio``).
    LIBRARY = "sigbus"


@attrs.frozen
class Binding:
    """``struct gunyah_gmem_binding``: gfns ``[gfn, gfn + nr)`` backed by file pages from
    ``i_off``, with ``flags`` (``GUNYAH_MEM_ALLOW_*`` and the access policy)."""

    gfn: int
    nr: int
    i_off: int
    flags: int
    #: The memslot standing for the binding on the uAPI face.
    slot: int = 0

    @property
    def end(self) -> int:
        """One past the last gfn."""
        return self.gfn + self.nr

    @property
    def lend(self) -> bool:
        """``gunyah_guest_mem_is_lend``: FORCE_LEND, or the default ("RM requires all VMs to
        be protected (isolated)"); FORCE_SHARE shares."""
        return self.flags & abi.GUNYAH_MEM_ACCESS_MASK != abi.GUNYAH_MEM_FORCE_SHARE

    @property
    def write(self) -> bool:
        """``GUNYAH_MEM_ALLOW_WRITE``."""
        return bool(self.flags & abi.GUNYAH_MEM_ALLOW_WRITE)

    def index(self, gfn: int) -> int:
        """``gunyah_gfn_to_off``."""
        return gfn - self.gfn + self.i_off


@attrs.frozen
class Provided:
    """An ``ghvm->mm`` entry: a folio run given to the guest (``pfn = gfn + delta``), with
    the driver's SHARE/WRITE tags."""

    delta: int
    share: bool
    write: bool


@attrs.define(eq=False)
class VmParcel:
    """A parcel the driver built from a binding's folios (``gunyah_gmem_share_parcel``)."""

    handle: int
    gfn: int
    nr: int
    lend: bool
    #: The folios' pfns, one per folio (``mem_entries``).
    pfns: list[int]
    n_acl_entries: int = 1
    write: bool = True


def access_of(share: bool, write: bool) -> Access:
    """The stage-2 rights ``gunyah_vm_provide_folio`` asks for."""
    if share:
        return Access.RW if write else Access.R
    return Access.RWX if write else Access.RX


def owner_of(extent: Extent) -> Owner:
    """Who a memdb owner gives the page to, in the core's terms: the HLOS's memory is the
    host's, a guest private extent the guest's, a guest shared extent or share parcel
    shared, a lend or donate parcel the hypervisor's (held by the RM until accepted)."""
    if extent.kind == ExtentKind.HLOS:
        return Owner.HOST
    if extent.kind == ExtentKind.GUEST_PRIVATE:
        return Owner.GUEST
    if extent.kind == ExtentKind.GUEST_SHARED or extent.shared:
        return Owner.SHARED
    return Owner.HYPERVISOR


@attrs.define(eq=False)
class GunyahHost:
    """``host.arch`` of a ``gunyah`` host: the hypervisor, the RM, the driver's settings."""

    host: HostView
    hyp: Hypervisor
    rm: ResourceManager
    #: The driver generation (host faults on lent folios: launder or SIGBUS).
    driver: Driver = Driver.GMEM
    #: ``can_set_direct_map()`` (arm64 ``rodata=full``): lending needs it
    #: (``gunyah_gmem_add_mapping``: EINVAL "Cannot lend memory without rodata=full").
    can_set_direct_map: bool = True
    #: The driver's VMs by VMID.
    vms: dict[int, GunyahVm] = attrs.field(factory=dict)
    #: Costs not owed to a modelled VM (RM and hypervisor calls of the HLOS itself).
    counters: Counter[str] = attrs.field(factory=Counter)
    #: ``WARN``s the driver would print (a reclaim that failed...).
    warnings: list[str] = attrs.field(factory=list)

    def count(self, name: str, n: int, vmid: int | None) -> None:
        """Charge *n* of cost *name* to VM *vmid*'s counters (``gunyah.`` prefix), else the host's."""
        vm = self.vms.get(vmid) if vmid is not None else None
        if vm is not None and not vm.view.destroyed:
            vm.view.count(f"gunyah.{name}", n)
        else:
            self.counters[name] += n

    def listener(self, table: str, pfn: int, npages: int, old: Any, new: Any, vmid: int | None) -> None:
        """Tell observers of a memdb change, for the VM it was made for if it is modelled."""
        vm = self.vms.get(vmid) if vmid is not None else None
        args = (table, pfn, npages, old, new)
        if vm is not None and not vm.view.destroyed:
            vm.view.ownership_update(*args, old_owner=owner_of(old), new_owner=owner_of(new))
        else:
            self.host.ownership_update(*args, old_owner=owner_of(old), new_owner=owner_of(new))

    def stage2_removed(self, vmid: int, gfn: int, npages: int) -> None:
        """The RM took pages out of a VM's stage-2 behind the driver (a guest released a
        parcel, a VM reset): the core's mirror of that stage-2 must not keep them."""
        vm = self.vms.get(vmid)
        if vm is not None and not vm.view.destroyed and next(vm.view.leaves(gfn, gfn + npages), None):
            vm.view.zap_gfn_range(gfn, gfn + npages)

    def warn(self, message: str) -> None:
        """A ``WARN``/``dev_err`` of the driver: kept, counted."""
        self.warnings.append(message)
        self.counters["warnings"] += 1


def _errno_of(exc: KvmError) -> int:
    return exc.errno or errno.EINVAL


class GunyahVm:
    """``struct gunyah_vm`` for one VM (``vm.arch``)."""

    def __init__(self, view: VmView, host: GunyahHost) -> None:
        self.view = view
        self.host = host
        self.status = VmStatus.NO_STATE
        self.vmid = abi.GUNYAH_VMID_INVAL
        #: ``GUNYAH_VM_SET_DTB_CONFIG``: ``(guest_phys_addr, size)``.
        self.dtb_config: tuple[int, int] | None = None
        #: The kernel needs a DTB to start; False lets a VM of the uAPI face start without
        #: one (see README: the model's RM then takes no image).
        self.require_dtb = False
        self.dtb: VmParcel | None = None
        self.bindings: RangeMap[Binding] = RangeMap()
        #: Access flags the arch face asks for the next binding of a memslot id.
        self.pending: dict[int, int] = {}
        self.mm: RangeMap[Provided] = RangeMap()
        self.parcels: dict[int, VmParcel] = {}
        self.resources: VmResources | None = None
        self.exit_info: dict[str, Any] = {}
        self.subscribed = False

    def __repr__(self) -> str:
        return f"<GunyahVm vmid={self.vmid:#x} {self.status.name}>"

    # --- plumbing -------------------------------------------------------------------------------
    @property
    def hyp(self) -> Hypervisor:
        """The machine's hypervisor."""
        return self.host.hyp

    @property
    def rm(self) -> ResourceManager:
        """The machine's resource manager."""
        return self.host.rm

    def count(self, name: str, n: int = 1) -> None:
        """Add *n* to the VM's ``gunyah.<name>`` counter."""
        self.view.count(f"gunyah.{name}", n)

    def notification(self, vmid: int, notification: Notification, payload: dict[str, Any]) -> None:
        """``gunyah_vm_rm_notification``: only RESET (status) and EXITED concern the driver;
        every other transition is synchronous to one of its own RM calls."""
        if payload.get("vmid") != self.vmid or vmid != abi.VMID_HLOS:
            return
        if notification == Notification.VM_STATUS and payload.get("vm_status") == VmStatus.RESET:
            self.status = VmStatus.RESET
        elif notification == Notification.VM_EXITED:
            self.status = VmStatus.EXITED
            self.exit_info = dict(payload)

    def _extents(self, share: bool) -> tuple[int, int, int]:
        """``(addrspace, guest extent, host extent)`` capabilities (``__first_resource``)."""
        res = self.resources
        if res is None:
            raise KvmError(errno.ENODEV, VM_RULE, "no hypervisor resources: the VM was not started")
        if share:
            return res.addrspace, res.guest_shared, res.host_shared
        return res.addrspace, res.guest_private, res.host_private

    def gmem_of(self, binding: Binding) -> GmemView:
        """The guest_memfd inode of *binding*."""
        loc = self.view.gfn_to_gmem(binding.gfn)
        assert loc is not None, "a binding without its memslot"
        return loc.gmem

    # --- bindings (gunyah_gmem_add_mapping / gunyah_gmem_remove_binding) -------------------------
    def add_binding(self, gfn: int, nr: int, i_off: int, slot: int) -> Binding:
        """``gunyah_gmem_add_mapping`` for a memslot the core is binding: the policy the arch
        face asked for (``GUNYAH_VM_MAP_MEM``) or the default (lend, RWX)."""
        flags = self.pending.pop(slot, abi.GUNYAH_MEM_ALLOW_RWX | abi.GUNYAH_MEM_DEFAULT_ACCESS)
        binding = Binding(gfn, nr, i_off, flags, slot)
        if binding.lend and not self.host.can_set_direct_map:
            raise KvmError(errno.EINVAL, BIND_RULE, "Cannot lend memory without rodata=full")
        if self.bindings.overlaps(gfn, gfn + nr):  # mtree_insert_range
            raise KvmError(errno.EEXIST, BIND_RULE, f"gfns [{gfn:#x}, {gfn + nr:#x}) are bound already")
        self.bindings.set(gfn, gfn + nr, binding)
        self.view.trace("gunyah_map_mem", gfn=gfn, nr=nr, offset=i_off, flags=flags, lend=binding.lend)
        return binding

    def remove_binding(self, gfn: int) -> None:
        """``gunyah_gmem_remove_binding``: reclaim what the guest holds of it, forget it."""
        ent = self.bindings.entry(gfn)
        if ent is None:
            return
        binding = ent[2]
        err = self.reclaim_range(binding.gfn, binding.nr)
        if err:
            self.host.warn(f"gunyah_gmem_remove_binding: reclaim of gfn {binding.gfn:#x} failed: {err}")
        self.bindings.erase(binding.gfn, binding.end)
        self.view.trace("gunyah_unmap_mem", gfn=binding.gfn, nr=binding.nr)

    # --- VM start (gunyah_vm_start) ---------------------------------------------------------------
    def start(self) -> None:
        """``gunyah_vm_start``: a no-op unless the VM has no state yet; on a failure the VM
        keeps the status it reached (``_gunyah_vm_put`` cleans up by it)."""
        if self.status != VmStatus.NO_STATE:
            return
        rm, hlos = self.rm, abi.VMID_HLOS
        if not self.subscribed:
            rm.subscribe(self.notification)
            self.subscribed = True
        try:
            self.vmid = rm.vm_alloc_vmid(hlos, 0)
        except RmCallError:
            rm.unsubscribe(self.notification)
            self.subscribed = False
            raise
        self.host.vms[self.vmid] = self
        self.status = VmStatus.LOAD
        handle, dtb_offset, dtb_size = abi.MEMPARCEL_INVALID_HANDLE, 0, 0
        if self.dtb_config is not None or self.require_dtb:
            gpa, size = self.dtb_config or (0, 0)
            # "RM requires the DTB parcel to be lent to guard against malicious
            # modifications while starting VM. Force it so."
            self.dtb = self.share_parcel(gpa >> PAGE_SHIFT, size >> PAGE_SHIFT, force_lend=True)
            handle = self.dtb.handle
            dtb_offset, dtb_size = gpa - (self.dtb.gfn << PAGE_SHIFT), size
        rm.vm_config_image(hlos, self.vmid, abi.GUNYAH_RM_VM_AUTH_NONE, handle, 0, 0, dtb_offset, dtb_size)
        self.setup_demand_paging()
        if self.dtb is not None:
            rm.vm_set_address_layout(
                hlos,
                self.vmid,
                abi.GUNYAH_RM_RANGE_ID_IMAGE,
                self.dtb.gfn << PAGE_SHIFT,
                self.dtb.nr << PAGE_SHIFT,
            )
        try:
            rm.vm_init(hlos, self.vmid)
        except RmCallError:
            self.status = VmStatus.INIT_FAILED
            raise
        self.status = VmStatus.READY
        self.resources = rm.vm_get_hyp_resources(hlos, self.vmid)
        if self.dtb is not None:
            self.parcel_to_paged(self.dtb)
        try:
            rm.vm_start(hlos, self.vmid)
        except RmCallError:
            if self.dtb is not None:  # "RM is still tracking the parcel"
                self.mm_erase_range(self.dtb.gfn, self.dtb.nr)
            raise
        if self.dtb is not None:  # the RM no longer tracks it: its folios are paged memory
            del self.parcels[self.dtb.handle]
        self.status = VmStatus.RUNNING
        self.view.trace("gunyah_vm_start", vmid=self.vmid)

    def ensure_started(self) -> None:
        """``gunyah_vm_ensure_started``: start a VM without state, then it must be running
        (ENODEV otherwise)."""
        if self.status == VmStatus.NO_STATE:
            self.start()
        if self.status != VmStatus.RUNNING:
            raise KvmError(errno.ENODEV, VM_RULE, f"the VM is {self.status.name}, not RUNNING")

    def setup_demand_paging(self) -> None:
        """``gunyah_gmem_setup_demand_paging``: the lent bindings' ranges go to the RM
        (``VM_SET_DEMAND_PAGING``), none if there is no lent binding."""
        ranges = [(b.gfn << PAGE_SHIFT, b.nr << PAGE_SHIFT) for _, _, b in self.bindings.items() if b.lend]
        if ranges:
            self.rm.vm_set_demand_paging(abi.VMID_HLOS, self.vmid, ranges)

    # --- parcels (gunyah_gmem_share_parcel / gunyah_gmem_reclaim_parcel) ----------------------------
    def share_parcel(
        self, gfn: int, nr: int, *, force_lend: bool = False, sanitize: bool = False
    ) -> VmParcel:
        """``gunyah_gmem_share_parcel``: a parcel of the binding's folios for this VM.

        The folios are grabbed (allocated); a lent one must be safe to lend (not host
        mapped, or unmapped first, per :class:`Driver`) and leaves the direct map.  One
        memory entry per folio; ``gunyah_rm_mem_share`` sends LEND (one ACL entry) or SHARE
        (the VM and the host, RWX) with at most 512 entries, the rest in ``MEM_APPEND``
        messages.  *sanitize* asks the RM to zero the pages at creation (the driver never
        does; a VMM building its own parcels may).

        When the RM refuses, the folios grabbed stay in the file (``gunyah_gmem_get_folio``
        is ``filemap_grab_folio``; the rollback only drops the driver's reference), and
        the folios this call took out of the direct map come back to it; a folio lent
        already (``PG_private``: demand paged to the guest, or held by another parcel)
        stays out of it.  The Android driver's rollback restores every ``PG_private``
        folio of the range, but only ``gunyah_vm_start`` shares a parcel there, before
        demand paging lends anything; the model's face can reach the case (README, "Model
        choices").
        """
        if nr == 0:
            raise KvmError(errno.EINVAL, BIND_RULE, "a parcel of no pages")
        ent = self.bindings.entry(gfn)
        if ent is None or gfn + nr > ent[2].end:
            raise KvmError(errno.ENOENT, BIND_RULE, f"gfns [{gfn:#x}, {gfn + nr:#x}) are not one binding")
        binding = ent[2]
        lend = force_lend or binding.lend
        gmem = self.gmem_of(binding)
        first = binding.index(gfn)
        gmem.allocate(first, first + nr)  # GUEST_MEMFD_GRAB_UPTODATE
        if lend and self._make_inaccessible(gmem, first, first + nr, gfn << PAGE_SHIFT) != first + nr:
            raise KvmError(
                errno.EPERM, HOST_RULE, f"a folio of gfns [{gfn:#x}, {gfn + nr:#x}) is host mapped"
            )
        pfns = [self._pfn(gmem, first + i) for i in range(nr)]
        # gunyah_folio_lend_safe: the folios not lent yet leave the direct map
        taken = [pfn for pfn in pfns if self.host.host.direct_map_valid(pfn)] if lend else []
        for pfn in taken:
            self.host.host.set_direct_map_invalid(pfn, 1)
        if taken:
            self.count("direct_map_invalid", len(taken))
        perms = binding.flags & abi.GUNYAH_MEM_ALLOW_RWX  # GUNYAH_RM_ACL_R/W/X match these bits
        acl = [(self.vmid, _rights(perms))]
        if not lend:
            acl.append((self.rm.get_vmid(abi.VMID_HLOS), abi.MEM_RIGHTS_RWX))
        parcel = VmParcel(-1, gfn, nr, lend, pfns, len(acl), binding.write)
        try:
            parcel.handle = self.mem_share(acl, pfns, lend=lend, sanitize=sanitize)
        except RmCallError:
            for pfn in taken:  # gunyah_folio_host_reclaim of what this call lent
                self.host.host.set_direct_map_default(pfn, 1)
            if taken:
                self.count("direct_map_default", len(taken))
            raise
        self.parcels[parcel.handle] = parcel
        self.view.trace("gunyah_share_parcel", handle=parcel.handle, gfn=gfn, nr=nr, lend=lend)
        return parcel

    def mem_share(self, acl: list[tuple[int, int]], pfns: list[int], *, lend: bool, sanitize: bool) -> int:
        """``gunyah_rm_mem_share``: the first 512 entries with the create message, the rest in
        ``MEM_APPEND`` messages; a failed append reclaims the parcel."""
        sgl = [(pfn << PAGE_SHIFT, abi.PAGE_SIZE) for pfn in pfns]
        first, rest = sgl[: abi.GUNYAH_RM_MAX_MEM_ENTRIES], sgl[abi.GUNYAH_RM_MAX_MEM_ENTRIES :]
        flags = (abi.MEM_CREATE_FLAG_APPEND if rest else 0) | (
            abi.MEM_CREATE_FLAG_SANITIZE if sanitize else 0
        )
        create = self.rm.mem_lend if lend else self.rm.mem_share
        handle = create(abi.VMID_HLOS, acl, first, flags=flags)
        try:
            while rest:
                chunk, rest = rest[: abi.GUNYAH_RM_MAX_MEM_ENTRIES], rest[abi.GUNYAH_RM_MAX_MEM_ENTRIES :]
                self.rm.mem_append(abi.VMID_HLOS, handle, chunk, 0 if rest else abi.MEM_APPEND_FLAG_DONE)
        except RmCallError:
            self.rm.mem_reclaim(abi.VMID_HLOS, handle)
            raise
        return handle

    def reclaim_parcel(self, handle: int, flags: int = 0) -> None:
        """``gunyah_gmem_reclaim_parcel``: ``MEM_RECLAIM``; on success the lent folios return to
        the direct map.  A refusal keeps the pages ("we don't know what state the memory is
        in").  The kernel function takes the parcel itself; a *handle* that names no parcel
        this driver holds is ENOENT (an errno the model chooses, README)."""
        parcel = self.parcels.get(handle)
        if parcel is None:
            raise KvmError(errno.ENOENT, BIND_RULE, f"the VM's driver holds no parcel {handle:#x}")
        self.rm.mem_reclaim(abi.VMID_HLOS, handle, flags)
        del self.parcels[handle]
        if self.dtb is parcel:
            self.dtb = None
        if parcel.lend:
            for pfn in parcel.pfns:
                self.host.host.set_direct_map_default(pfn, 1)
            self.count("direct_map_default", parcel.nr)
        self.view.trace("gunyah_reclaim_parcel", handle=handle, gfn=parcel.gfn, nr=parcel.nr)

    def force_reclaim_parcel(self, handle: int) -> None:
        """The core frees a folio a parcel still holds (the driver's folio reference would
        have kept it): the borrowers lose the parcel as at a VM reset, then it is reclaimed
        (sanitized if asked).  A model-only path (README)."""
        parcel = self.rm.parcels.get(handle)
        if parcel is not None:
            for info in list(parcel.acl):
                if info.shared:
                    self.rm.release_accepted(handle, info.vmid)
        self.count("forced_parcel_reclaims")
        self.reclaim_parcel(handle)

    def parcel_to_paged(self, parcel: VmParcel) -> None:
        """``gunyah_vm_parcel_to_paged``: the parcel's folios become ``mm`` entries, tagged
        SHARE for more than one ACL entry and WRITE for a writable one."""
        for i, pfn in enumerate(parcel.pfns):
            gfn = parcel.gfn + i
            self.mm.set(gfn, gfn + 1, Provided(pfn - gfn, parcel.n_acl_entries > 1, parcel.write))

    def mm_erase_range(self, gfn: int, nr: int) -> None:
        """``gunyah_vm_mm_erase_range``: roll ``parcel_to_paged`` back."""
        self.mm.erase(gfn, gfn + nr)

    # --- demand paging (gunyah_gmem_demand_page, gunyah_vm_provide_folio) ---------------------------
    def demand_page(self, fault: Fault) -> None:
        """The hypervisor and then ``gunyah_gmem_demand_page`` resolving a guest fault on a
        run of pages ``[fault.gfn, fault.gfn + fault.npages)`` backed by ``fault.pfn...``.

        A page the VM's stage-2 maps already (a parcel it accepted, its image) needs nothing;
        an IPA no lent binding registered for demand paging and no shared binding covers is
        an abort the hypervisor injects.  Then, in the driver's order: the binding (ENOENT),
        write permission (EPERM), a lent folio the host maps (refused, or unmapped first),
        ``gunyah_vm_provide_folio``.  Refusals end the run as a page-fault exit.
        """
        gfn, pfn = fault.gfn, fault.pfn
        assert pfn is not None
        gpa = gfn << PAGE_SHIFT
        hit = self.hyp.lookup(self.vmid, gfn)
        if hit is not None:
            self._mapped_already(fault, hit[0], hit[1].access)
            return
        ent = self.bindings.entry(gfn)
        binding = None if ent is None else ent[2]
        rm_vm = self.rm.vms.get(self.vmid)
        paged = rm_vm is not None and rm_vm.demand_paged(gfn)
        if not paged and (binding is None or binding.lend):
            self.count("aborts_injected")
            raise SyncExternalAbort(
                self.vmid, gpa, fault.write, "the IPA is neither mapped nor demand paged nor VMMIO"
            )
        if binding is None:
            raise self._page_fault_exit(fault, errno.ENOENT, "no binding")
        if fault.write and not binding.write:
            raise self._page_fault_exit(fault, errno.EPERM, "a store to a read-only binding")
        if self.mm.get(gfn) is not None:  # provided, not mapped yet: another path is at it
            raise KvmError(errno.EAGAIN, BIND_RULE, f"gfn {gfn:#x} is being provided")
        end = min(gfn + fault.npages, binding.end)
        for table in (self.hyp.stage2(self.vmid), self.mm):
            nxt = next(table.items(gfn, end), None)
            if nxt is not None:
                end = nxt[0]
        if binding.lend:
            gmem = self.gmem_of(binding)
            first = binding.index(gfn)
            try:
                last = self._make_inaccessible(gmem, first, first + end - gfn, gpa)
            except KvmError as exc:
                raise self._page_fault_exit(fault, _errno_of(exc), exc.detail) from None
            end = gfn + (last - first)
        npages = end - gfn
        try:
            self.provide(gfn, pfn, npages, share=not binding.lend, write=binding.write)
        except KvmError as exc:
            raise self._page_fault_exit(fault, _errno_of(exc), exc.detail) from None
        fault.npages = npages
        fault.map_writable = binding.write
        self.count("demand_paged_pages", npages)
        self.view.trace("gunyah_demand_page", gpa=gpa, npages=npages, lend=binding.lend, pfn=pfn)

    def _mapped_already(self, fault: Fault, mapped_pfn: int, access: Access) -> None:
        """The stage-2 maps the page: the core only mirrors it (same page, same rights)."""
        if mapped_pfn != fault.pfn:
            raise KvmError(
                errno.EFAULT,
                BIND_RULE,
                f"gfn {fault.gfn:#x} maps pfn {mapped_pfn:#x}, its guest_memfd page is {fault.pfn:#x}",
            )
        writable = bool(access & Access.W)
        if fault.write and not writable:
            bound = self.bindings.get(fault.gfn)
            if bound is not None and not bound.write:
                # The permission fault reaches gunyah_gmem_demand_page like any other.
                raise self._page_fault_exit(fault, errno.EPERM, "a store to a read-only binding")
            self.count("aborts_injected")
            raise SyncExternalAbort(self.vmid, fault.gpa, True, "permission fault: the mapping is read-only")
        mapping = self.hyp.stage2(self.vmid).entry(fault.gfn)
        assert mapping is not None
        fault.npages = min(fault.npages, mapping[1] - fault.gfn)
        fault.map_writable = writable

    def _page_fault_exit(self, fault: Fault, err: int, why: str) -> PageFaultExit:
        """``gunyah_handle_page_fault``: the VMM hears of a fault Linux could not resolve."""
        self.count("exits.page_fault")
        self.view.trace("gunyah_page_fault_exit", gpa=fault.gpa, attempt=-err, write=fault.write)
        return PageFaultExit(fault.gpa, -err, fault.write, why)

    def _make_inaccessible(self, gmem: GmemView, start: int, end: int, gpa: int) -> int:
        """Lending folios ``[start, end)`` of *gmem* (one run): returns how far it may go.

        Gunyah's guest_memfd refuses a folio the host maps (``folio_mapped``: EPERM) and ends
        the run before the first one; the library unmaps them from the host first
        (``guest_memfd_make_inaccessible`` -> ``unmap_mapping_folio``).
        """
        mapped = sorted(
            (max(s, start), min(e, end)) for s, e in gmem.host_mapped_ranges() if s < end and e > start
        )
        if not mapped:
            return end
        if self.host.driver == Driver.LIBRARY:
            for s, e in mapped:
                gmem.unmap_mapping_range(s, e)
            self.count("host_unmaps", sum(e - s for s, e in mapped))
            return end
        if mapped[0][0] == start:
            raise KvmError(
                errno.EPERM, HOST_RULE, f"gmem page {start:#x} (IPA {gpa:#x}) is mapped by the host"
            )
        return mapped[0][0]

    @staticmethod
    def _pfn(gmem: GmemView, index: int) -> int:
        pfn = gmem.pfn(index)
        assert pfn is not None
        return pfn

    def provide(self, gfn: int, pfn: int, npages: int, *, share: bool, write: bool) -> None:
        """``gunyah_vm_provide_folio`` for a run of folios: record it in ``mm`` (EAGAIN if a
        vCPU raced us there), donate, map; a failed map donates back.  A lent run leaves the
        host's direct map first (``gunyah_folio_lend_safe``)."""
        addrspace, guest, host_extent = self._extents(share)
        if self.mm.overlaps(gfn, gfn + npages):
            raise KvmError(errno.EAGAIN, BIND_RULE, f"gfn {gfn:#x} was provided already")
        if not self.hyp.owned_by(pfn, npages, HLOS_MEMORY):
            # A folio lent already (PG_private: a parcel holds it) is not lent again.
            raise HypCallError(
                HypError.MEMDB_NOT_OWNER, "memextent_donate", f"pfn {pfn:#x} is not the host's"
            )
        if not share:
            self.host.host.set_direct_map_invalid(pfn, npages)
            self.count("direct_map_invalid", npages)
        self.mm.set(gfn, gfn + npages, Provided(pfn - gfn, share, write))
        donate = DonateType.TO_SIBLING if share else DonateType.TO_PROTECTED
        flags = 1 << abi.GUNYAH_ADDRSPACE_MAP_FLAG_PARTIAL
        flags |= 1 << (
            abi.GUNYAH_ADDRSPACE_MAP_FLAG_VMMIO if share else abi.GUNYAH_ADDRSPACE_MAP_FLAG_PRIVATE
        )
        try:
            self.hyp.memextent_donate(donate, host_extent, guest, pfn, npages, calls=npages)
            try:
                access = access_of(share, write)
                self.hyp.addrspace_map(addrspace, guest, gfn, access, flags, pfn, npages, calls=npages)
            except HypCallError:
                back = DonateType.TO_SIBLING if share else DonateType.FROM_PROTECTED
                self.hyp.memextent_donate(back, guest, host_extent, pfn, npages, calls=npages)
                raise
        except HypCallError:
            self.mm.erase(gfn, gfn + npages)
            if not share:
                self.host.host.set_direct_map_default(pfn, npages)
                self.count("direct_map_default", npages)
            raise

    # --- reclaim (gunyah_vm_reclaim_range) --------------------------------------------------------
    def provided_runs(self, gfn: int, end: int) -> Iterator[tuple[int, int, Provided]]:
        """``mm`` runs in ``[gfn, end)``."""
        return self.mm.items(gfn, end)

    def reclaim_range(self, gfn: int, nr: int) -> int:
        """``gunyah_vm_reclaim_range``: every provided folio in ``[gfn, gfn + nr)`` is unmapped
        and donated back; all calls but the very last are ``NOSYNC`` (one sync at the end:
        the Android driver's ``sync = !mt_find_after(...)``).  Returns 0 or the first errno
        (the driver goes on past a failure)."""
        runs = list(self.provided_runs(gfn, gfn + nr))
        err = 0
        for i, (s, e, entry) in enumerate(runs):
            try:
                self._reclaim_run(s, e - s, entry, sync=i == len(runs) - 1)
            except KvmError as exc:
                err = err or _errno_of(exc)
                self.host.warn(f"gunyah_vm_reclaim_range: gfn {s:#x}: {exc.detail}")
        if runs:
            self.view.trace("gunyah_reclaim", gfn=gfn, npages=sum(e - s for s, e, _ in runs))
        return err

    def _reclaim_run(self, gfn: int, npages: int, entry: Provided, *, sync: bool) -> None:
        """``__gunyah_vm_reclaim_folio_locked`` for a run of folios."""
        addrspace, guest, host_extent = self._extents(entry.share)
        pfn = gfn + entry.delta
        flags = 1 << abi.GUNYAH_ADDRSPACE_MAP_FLAG_PARTIAL
        flags |= 1 << (
            abi.GUNYAH_ADDRSPACE_MAP_FLAG_VMMIO if entry.share else abi.GUNYAH_ADDRSPACE_MAP_FLAG_PRIVATE
        )
        if not sync:
            flags |= 1 << abi.GUNYAH_ADDRSPACE_MAP_FLAG_NOSYNC
        self.hyp.addrspace_unmap(addrspace, guest, gfn, flags, pfn, npages, calls=npages)
        donate = DonateType.TO_SIBLING if entry.share else DonateType.FROM_PROTECTED
        options = donate | (0 if sync else abi.GUNYAH_MEMEXTENT_OPTION_NOSYNC)
        self.hyp.memextent_donate(options, guest, host_extent, pfn, npages, calls=npages)
        if not entry.share:  # gunyah_folio_host_reclaim
            self.host.host.set_direct_map_default(pfn, npages)
            self.count("direct_map_default", npages)
        self.mm.erase(gfn, gfn + npages)
        self.count("reclaimed_pages", npages)

    # --- teardown (_gunyah_vm_put) --------------------------------------------------------------
    def pre_destroy(self) -> None:
        """The head of ``_gunyah_vm_put``: stop a running VM (``VM_STOP``, forced), reclaim
        the DTB parcel of a VM that never ran (LOAD, READY, INIT_FAILED)."""
        if self.status == VmStatus.RUNNING:
            try:
                self.rm.vm_stop(abi.VMID_HLOS, self.vmid)
            except RmCallError as exc:
                self.host.warn(f"Failed to stop VM: {exc.detail}")
        dtb = self.dtb
        if self.status in (VmStatus.LOAD, VmStatus.READY, VmStatus.INIT_FAILED) and dtb is not None:
            try:
                self.reclaim_parcel(dtb.handle)
            except RmCallError as exc:
                self.host.warn(f"Failed to reclaim DTB parcel: {exc.detail}")

    def destroy(self) -> None:
        """The rest of ``_gunyah_vm_put``: bindings removed (reclaimed), everything left
        reclaimed, resources dropped, ``VM_RESET`` (EXITED, READY, INIT_FAILED), the VMID
        freed."""
        for _, _, binding in list(self.bindings.items()):
            self.remove_binding(binding.gfn)
        err = self.reclaim_range(0, 1 << 64)
        if err:
            self.host.warn(f"_gunyah_vm_put: reclaim of everything failed: {err}")
        self.resources = None
        if self.status in (VmStatus.EXITED, VmStatus.READY, VmStatus.INIT_FAILED):
            try:
                self.rm.vm_reset(abi.VMID_HLOS, self.vmid)
            except RmCallError as exc:
                self.host.warn(f"Failed to reset the vm: {exc.detail}")
        for handle in list(self.parcels):  # parcels the VMM built; the reset released them
            try:
                self.reclaim_parcel(handle)
            except RmCallError as exc:
                self.host.warn(f"Failed to reclaim parcel {handle:#x}: {exc.detail}")
        if self.mm:
            self.host.warn("_gunyah_vm_put: mm not empty")
        if self.status > VmStatus.NO_STATE:
            if self.subscribed:
                self.rm.unsubscribe(self.notification)
                self.subscribed = False
            try:
                self.rm.vm_dealloc_vmid(abi.VMID_HLOS, self.vmid)
            except RmCallError as exc:
                self.host.warn(f"Failed to deallocate vmid: {exc.detail}")
        self.view.trace("gunyah_vm_put", vmid=self.vmid, status=self.status.name)


def _rights(perms: int) -> int:
    """``GUNYAH_MEM_ALLOW_*`` -> ``GUNYAH_RM_ACL_*`` (R 4, W 2, X 1)."""
    rights = 0
    if perms & abi.GUNYAH_MEM_ALLOW_READ:
        rights |= abi.MEM_RIGHTS_R
    if perms & abi.GUNYAH_MEM_ALLOW_WRITE:
        rights |= abi.MEM_RIGHTS_W
    if perms & abi.GUNYAH_MEM_ALLOW_EXEC:
        rights |= abi.MEM_RIGHTS_X
    return rights
