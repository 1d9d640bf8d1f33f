"""The Gunyah resource manager (RM): VM identities and states, and memory parcels.

The RM is a privileged VM the host (HLOS) and guests talk to by RPC.  Modelled here, in
the order and with the error codes of ``quic/gunyah-resource-manager`` (12/2023):

* **VM management** (``src/vm_mgnt/vm_mgnt.c``, ``src/vm_creation/*.c``): VMIDs allocated
  from the dynamic range (``vm_mgnt_handle_allocate``) and freed
  (``vm_mgnt_handle_deallocate``), the state machine of ``vm_mgnt_state_change_valid``
  (LOAD -> INIT -> READY -> RUNNING -> EXITED -> RESETTING -> RESET), ``VM_CONFIG_IMAGE``,
  ``VM_INIT``, ``VM_START``, ``VM_STOP``, ``VM_EXIT``, ``VM_RESET`` (which releases the
  parcels the VM accepted, ``vm_reset_handle_release_memparcels``, and takes its
  hypervisor objects down).  ``VM_SET_DEMAND_PAGING``, ``VM_SET_ADDRESS_LAYOUT`` and
  ``VM_GET_HYP_RESOURCES`` are newer than the public RM: their checks are the model's
  [U], taken from how the Linux driver uses them.
* **Memory parcels** (``src/memparcel/memparcel.c``): ``MEM_LEND``/``MEM_SHARE``/
  ``MEM_DONATE`` (``memparcel_construct``, ``add_sgl_to_mp``), ``MEM_APPEND``
  (``memparcel_do_append``), ``MEM_ACCEPT`` (``memparcel_do_accept``), ``MEM_RELEASE``
  (``memparcel_do_release``), ``MEM_RECLAIM`` (``memparcel_do_reclaim``), ``MEM_NOTIFY``
  (``memparcel_notify``); states INIT (appends pending), SHARING (complete, nobody
  accepted), SHARED (``share_count`` borrowers accepted); sanitize at create, accept,
  release or reclaim (``sanitise_region`` -> ``memextent_zero_range``).

Every refusal raises :class:`RmCallError` carrying the RM's ``rm_error_t`` and the errno
Linux's ``gunyah_rm_error_remap`` makes of it.  Message-format errors
(``RM_ERROR_MSG_INVALID``) have no counterpart: calls are Python calls.  The RM answers
synchronously; its notifications go to the subscribers (:meth:`ResourceManager.subscribe`)
and to each VM's :attr:`RmVm.inbox`.
"""

from __future__ import annotations

import enum
import functools
import inspect
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, ParamSpec, TypeVar

import attrs

from guestmem import cabi
from guestmem.errors import KvmError
from guestmem_gunyah import abi
from guestmem_gunyah.abi import Access, Notification, RmError, Rpc, TransType, VmStatus
from guestmem_gunyah.hyp import HLOS_MEMORY, Extent, ExtentKind, Hypervisor, VmResources

#: Rule tags: VM identity and lifecycle (backends.md 4.1), parcel states (4.2).
VM_RULE = "Gunyah-4.1"
PARCEL_RULE = "Gunyah-4.2"
#: Where the RM's allocator puts a guest's accepted parcels when the guest names no IPA
#: [U: the RM's per-VM IPA allocator is platform configuration].
GUEST_IPA_ALLOC_BASE = 1 << 36
P = ParamSpec("P")
R = TypeVar("R")
#: The RPC arguments that are sequences of numbers (pairs or plain).
_SEQUENCES = frozenset({"acl", "sgl", "ranges", "vmids"})


def _integer_arguments(rpc: Callable[P, R]) -> Callable[P, R]:
    """An RPC whose number arguments are integers (guestmem.cabi: a TypeError naming the
    argument before the RM does anything); the RM's own checks decide the rest."""
    signature = inspect.signature(rpc)

    @functools.wraps(rpc)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            if name in _SEQUENCES:
                bound.arguments[name] = [
                    tuple(cabi.index(v, name) for v in item)
                    if isinstance(item, tuple)
                    else cabi.index(item, name)
                    for item in value
                ]
            elif name == "kw":
                bound.arguments[name] = {key: cabi.index(v, key) for key, v in value.items()}
            elif name not in ("self", "rpc", "trans"):
                bound.arguments[name] = cabi.index(value, name)
        return rpc(*bound.args, **bound.kwargs)

    return call


_PAGE_MASK = abi.PAGE_SIZE - 1


class RmCallError(KvmError):
    """An RM RPC was refused with ``error``; ``errno`` is ``gunyah_rm_error_remap(error)``."""

    def __init__(self, error: RmError, rpc: Rpc, why: str) -> None:
        self.error = error
        self.rpc = rpc
        rule = PARCEL_RULE if rpc.name.startswith("MEM_") else VM_RULE
        super().__init__(abi.rm_error_remap(error), rule, f"{rpc.name}: RM_ERROR_{error.name}: {why}")


class ParcelState(enum.Enum):
    """``memparcel_state_t``."""

    INIT = "init"
    SHARING = "sharing"
    SHARED = "shared"


@attrs.define(eq=False)
class VmInfo:
    """``vm_meminfo_t``: one ACL entry of a parcel and that VM's acceptance."""

    vmid: int
    rights: int
    shared: bool = False
    mapped: bool = False
    #: IPA of each region in this VM once allocated (``ipa_list``).
    ipas: list[int] = attrs.field(factory=list)
    contiguous: bool = False


@attrs.frozen
class Region:
    """``mem_region_t``: pages ``[pfn, pfn + npages)`` at the owner's IPA ``owner_ipa``."""

    pfn: int
    npages: int
    owner_ipa: int


@attrs.define(eq=False)
class Parcel:
    """``struct memparcel``."""

    handle: int
    owner: int
    trans: TransType
    mem_type: int
    label: int
    extent: Extent
    acl: list[VmInfo]
    state: ParcelState = ParcelState.INIT
    share_count: int = 0
    sanitize_create: bool = False
    sanitize_reclaim: bool = False
    locked: bool = False
    regions: list[Region] = attrs.field(factory=list)
    #: Where the owner's memory came from (HLOS memory, or a guest's extent).
    source: Extent = HLOS_MEMORY
    mem_info_tag: int | None = None

    @property
    def npages(self) -> int:
        """Pages in the parcel (``total_size``)."""
        return sum(r.npages for r in self.regions)

    def info(self, vmid: int) -> VmInfo | None:
        """``lookup_vm_info``."""
        return next((i for i in self.acl if i.vmid == vmid), None)


@attrs.define(eq=False)
class RmVm:
    """The RM's ``vm_t``: identity, owner, state, configuration."""

    vmid: int
    owner: int
    state: VmStatus = VmStatus.LOAD
    image_handle: int = abi.MEMPARCEL_INVALID_HANDLE
    image: tuple[int, int, int, int] = (0, 0, 0, 0)
    #: ``VM_SET_DEMAND_PAGING`` ranges, ``(ipa, size)``.
    demand_paging: list[tuple[int, int]] = attrs.field(factory=list)
    #: ``VM_SET_ADDRESS_LAYOUT`` by range id: ``(base, size)``.
    layout: dict[int, tuple[int, int]] = attrs.field(factory=dict)
    resources: VmResources | None = None
    #: Parcels this VM accepted, in order (``accepted_memparcels``).
    accepted: list[int] = attrs.field(factory=list)
    mp_count: int = 0
    next_ipa: int = GUEST_IPA_ALLOC_BASE
    #: Notifications the RM sent to this VM: ``(id, payload)``.
    inbox: list[tuple[Notification, dict[str, Any]]] = attrs.field(factory=list)

    def demand_paged(self, gfn: int) -> bool:
        """*gfn* lies in a range registered with ``VM_SET_DEMAND_PAGING``."""
        gpa = gfn << abi.PAGE_SHIFT
        return any(base <= gpa < base + size for base, size in self.demand_paging)


#: ``subscriber(vmid, notification, payload)``: the RM notified *vmid*.
Subscriber = Callable[[int, Notification, dict[str, Any]], None]
#: ``count(name, n, vmid)``: a cost counter of the VM concerned (None for the host).
CountFn = Callable[[str, int, "int | None"], None]
#: ``zero(pfn, npages)``: clear host pages.
ZeroFn = Callable[[int, int], None]


class ResourceManager:
    """The RM of one machine, over its :class:`~guestmem_gunyah.hyp.Hypervisor`."""

    def __init__(self, hyp: Hypervisor, *, zero: ZeroFn | None = None, count: CountFn | None = None) -> None:
        self.hyp = hyp
        self._zero = zero
        #: Hears every cost (RPCs by kind).
        self.count_fn = count
        self.vms: dict[int, RmVm] = {abi.VMID_HLOS: RmVm(abi.VMID_HLOS, abi.VMID_RM, VmStatus.RUNNING)}
        self.parcels: dict[int, Parcel] = {}
        self._handles = itertools.count(0)
        self.free_dynamic = set(range(abi.VMID_DYNAMIC_BASE, abi.VMID_DYNAMIC_END))
        self.subscribers: list[Subscriber] = []
        #: Failures to inject, by RPC: the driver's ``ALLOW_ERROR_INJECTION`` on its RPC
        #: functions, so the RPC fails without reaching the RM (nothing changes here).
        self.inject: dict[Rpc, RmError] = {}
        #: Opens the span of one call (``HostView.operation`` on a model host), so observers
        #: see a whole RPC.
        self.operation: Callable[[], AbstractContextManager[None]] = nullcontext

    # --- plumbing ---------------------------------------------------------------------------
    def subscribe(self, subscriber: Subscriber) -> None:
        """Receive every notification (``gunyah_rm_notifier_register``)."""
        self.subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """``gunyah_rm_notifier_unregister``."""
        self.subscribers.remove(subscriber)

    def _notify(self, target: int, notification: Notification, **payload: Any) -> None:
        vm = self.vms.get(target)
        if vm is not None:
            vm.inbox.append((notification, payload))
        for subscriber in list(self.subscribers):
            subscriber(target, notification, payload)

    def count(self, name: str, n: int, vmid: int | None) -> None:
        """Add to a cost counter of *vmid*'s VM (the host's for None or a VM not modelled)."""
        if self.count_fn is not None:
            self.count_fn(name, n, vmid)

    @contextmanager
    def _rpc(self, rpc: Rpc, vmid: int | None) -> Iterator[None]:
        """One RPC: counted against *vmid*'s VM, failed if a failure was injected."""
        with self.operation():
            self.count(f"rm.{rpc.name}", 1, vmid)
            injected = self.inject.pop(rpc, None)
            if injected is not None:
                raise RmCallError(injected, rpc, "injected failure")
            yield

    def _charge(self, handle: int, caller: int) -> int:
        """Whom a parcel RPC is charged to: its first borrower, else the caller."""
        parcel = self.parcels.get(handle)
        return caller if parcel is None else _borrower(parcel)

    def _vm(self, rpc: Rpc, vmid: int) -> RmVm:
        vm = self.vms.get(vmid)
        if vm is None:
            raise RmCallError(RmError.VMID_INVALID, rpc, f"no VM {vmid:#x}")
        return vm

    def _set_state(self, vm: RmVm, state: VmStatus) -> None:
        """``vm_mgnt_update_vm_state``: the owner hears of it (``NOTIFY_VM_STATUS``)."""
        vm.state = state
        if vm.owner != abi.VMID_RM:
            self._notify(vm.owner, Notification.VM_STATUS, vmid=vm.vmid, vm_status=state)

    # --- VM management -------------------------------------------------------------------------
    @_integer_arguments
    def vm_alloc_vmid(self, caller: int, vmid: int = 0) -> int:
        """``VM_ALLOC_VMID`` (``vm_mgnt_handle_allocate``): HLOS only; 0 picks a free dynamic
        VMID (NORESOURCE when none is left)."""
        with self._rpc(Rpc.VM_ALLOC_VMID, None):
            if caller != abi.VMID_HLOS:
                raise RmCallError(RmError.DENIED, Rpc.VM_ALLOC_VMID, "only the HLOS allocates VMIDs")
            if vmid != 0:
                # No secondary VMIDs are configured on this platform (platform_get_secondary_vmids).
                raise RmCallError(RmError.NORESOURCE, Rpc.VM_ALLOC_VMID, f"VMID {vmid:#x} is not free")
            if not self.free_dynamic:
                raise RmCallError(RmError.NORESOURCE, Rpc.VM_ALLOC_VMID, "no free dynamic VMID")
            vmid = min(self.free_dynamic)
            self.free_dynamic.discard(vmid)
            self.vms[vmid] = RmVm(vmid, caller)
            return vmid

    @_integer_arguments
    def vm_dealloc_vmid(self, caller: int, vmid: int) -> None:
        """``VM_DEALLOC_VMID``: the owner frees a VM in LOAD or RESET (``vm_mgnt_delete_vm``)."""
        with self._rpc(Rpc.VM_DEALLOC_VMID, vmid):
            # The RM asserts the VM exists; an unknown VMID is refused here.
            vm = self._vm(Rpc.VM_DEALLOC_VMID, vmid)
            if caller != vm.owner:
                raise RmCallError(RmError.DENIED, Rpc.VM_DEALLOC_VMID, "not the VM's owner")
            if vm.state not in (VmStatus.LOAD, VmStatus.RESET):
                raise RmCallError(RmError.VM_STATE, Rpc.VM_DEALLOC_VMID, f"VM is {vm.state.name}")
            del self.vms[vmid]
            self.free_dynamic.add(vmid)

    def _creation_checks(self, rpc: Rpc, caller: int, vmid: int) -> RmVm:
        """The common head of the VM creation handlers: HLOS only, the VM, its owner."""
        if caller != abi.VMID_HLOS:
            raise RmCallError(RmError.DENIED, rpc, "only the HLOS creates VMs")
        vm = self._vm(rpc, vmid)
        if caller != vm.owner:
            raise RmCallError(RmError.DENIED, rpc, "not the VM's owner")
        return vm

    @_integer_arguments
    def vm_config_image(
        self,
        caller: int,
        vmid: int,
        auth: int,
        mem_handle: int,
        image_offset: int,
        image_size: int,
        dtb_offset: int,
        dtb_size: int,
    ) -> None:
        """``VM_CONFIG_IMAGE`` (``vm_creation_handle_config``, ``vm_creation_config_image``).

        The image parcel must be one shared with the VM (``memparcel_lookup_by_target_vmid``:
        MEM_INVALID) and hold both ranges (ARGUMENT_INVALID); either failure leaves the VM
        INIT_FAILED.  Authentication NONE goes to INIT.  ``MEMPARCEL_INVALID_HANDLE`` with
        empty ranges configures a VM without an image: the model's extension for a VM of the
        uAPI face (see README).
        """
        rpc = Rpc.VM_CONFIG_IMAGE
        with self._rpc(rpc, vmid):
            vm = self._creation_checks(rpc, caller, vmid)
            if vm.state not in (VmStatus.LOAD, VmStatus.RESET):  # -> AUTH must be valid
                raise RmCallError(RmError.VM_STATE, rpc, f"VM is {vm.state.name}")
            size = 0
            if mem_handle != abi.MEMPARCEL_INVALID_HANDLE or image_size or dtb_size:
                parcel = self.parcels.get(mem_handle)
                if parcel is None or parcel.info(vmid) is None:
                    self._set_state(vm, VmStatus.INIT_FAILED)
                    raise RmCallError(RmError.MEM_INVALID, rpc, f"no parcel {mem_handle:#x} for VM {vmid:#x}")
                size = parcel.npages << abi.PAGE_SHIFT
            if image_offset + image_size > size or dtb_offset + dtb_size > size:
                self._set_state(vm, VmStatus.INIT_FAILED)
                raise RmCallError(RmError.ARGUMENT_INVALID, rpc, "image or DTB range outside the parcel")
            if auth != abi.GUNYAH_RM_VM_AUTH_NONE:
                self._set_state(vm, VmStatus.INIT_FAILED)
                raise RmCallError(RmError.ARGUMENT_INVALID, rpc, f"auth mechanism {auth} is not modelled")
            vm.image_handle = mem_handle
            vm.image = (image_offset, image_size, dtb_offset, dtb_size)
            self._set_state(vm, VmStatus.INIT)

    @_integer_arguments
    def vm_set_demand_paging(self, caller: int, vmid: int, ranges: Sequence[tuple[int, int]]) -> None:
        """``VM_SET_DEMAND_PAGING`` [U]: ranges the hypervisor reports faults on to the owner;
        in INIT, page aligned."""
        rpc = Rpc.VM_SET_DEMAND_PAGING
        with self._rpc(rpc, vmid):
            vm = self._creation_checks(rpc, caller, vmid)
            if vm.state != VmStatus.INIT:
                raise RmCallError(RmError.VM_STATE, rpc, f"VM is {vm.state.name}")
            for base, size in ranges:
                if (base | size) & _PAGE_MASK or not size:
                    raise RmCallError(RmError.ARGUMENT_INVALID, rpc, f"range {base:#x}+{size:#x} unaligned")
            vm.demand_paging.extend(ranges)

    @_integer_arguments
    def vm_set_address_layout(self, caller: int, vmid: int, range_id: int, base: int, size: int) -> None:
        """``VM_SET_ADDRESS_LAYOUT`` [U]: where the image (or firmware) sits; in INIT."""
        rpc = Rpc.VM_SET_ADDRESS_LAYOUT
        with self._rpc(rpc, vmid):
            vm = self._creation_checks(rpc, caller, vmid)
            if vm.state != VmStatus.INIT:
                raise RmCallError(RmError.VM_STATE, rpc, f"VM is {vm.state.name}")
            if range_id not in (abi.GUNYAH_RM_RANGE_ID_IMAGE, abi.GUNYAH_RM_RANGE_ID_FIRMWARE):
                raise RmCallError(RmError.ARGUMENT_INVALID, rpc, f"range id {range_id}")
            if (base | size) & _PAGE_MASK:
                raise RmCallError(RmError.ARGUMENT_INVALID, rpc, "unaligned range")
            vm.layout[range_id] = (base, size)

    @_integer_arguments
    def vm_init(self, caller: int, vmid: int) -> None:
        """``VM_INIT`` (``vm_creation_handle_init``): INIT -> READY, the VM's hypervisor
        objects (addrspace, memextents) are created."""
        rpc = Rpc.VM_INIT
        with self._rpc(rpc, vmid):
            vm = self._creation_checks(rpc, caller, vmid)
            if vm.state != VmStatus.INIT:
                raise RmCallError(RmError.VM_STATE, rpc, f"VM is {vm.state.name}")
            vm.resources = self.hyp.create_vm_objects(vmid)
            self._set_state(vm, VmStatus.READY)

    @_integer_arguments
    def vm_get_hyp_resources(self, caller: int, vmid: int) -> VmResources:
        """``VM_GET_HYP_RESOURCES`` [U]: the capabilities of the VM's objects, for its owner."""
        rpc = Rpc.VM_GET_HYP_RESOURCES
        with self._rpc(rpc, vmid):
            vm = self._vm(rpc, vmid)
            if caller != vm.owner:
                raise RmCallError(RmError.DENIED, rpc, "not the VM's owner")
            if vm.resources is None:
                raise RmCallError(RmError.VM_STATE, rpc, f"VM is {vm.state.name}")
            return vm.resources

    @_integer_arguments
    def vm_start(self, caller: int, vmid: int) -> None:
        """``VM_START`` (``vm_mgnt_handle_start``): READY -> RUNNING, or INIT_FAILED.

        The image parcel stops being a parcel: the RM maps it into the VM at its address
        layout and its pages join the VM's private extent, demand-paged memory from now on
        (the driver converts its own records with ``gunyah_vm_parcel_to_paged`` before the
        call, and rolls that back if it fails, "because RM is still tracking the parcel").
        """
        rpc = Rpc.VM_START
        with self._rpc(rpc, vmid):
            if caller == abi.VMID_HYP:
                raise RmCallError(RmError.DENIED, rpc, "legacy VM_START from the hypervisor")
            vm = self._vm(rpc, vmid)
            if caller != vm.owner:
                raise RmCallError(RmError.DENIED, rpc, "not the VM's owner")
            if vm.state != VmStatus.READY:
                raise RmCallError(RmError.VM_STATE, rpc, f"VM is {vm.state.name}")
            parcel = self.parcels.get(vm.image_handle)
            if parcel is not None:
                base = vm.layout.get(abi.GUNYAH_RM_RANGE_ID_IMAGE, (parcel.regions[0].owner_ipa, 0))[0]
                target = Extent(ExtentKind.GUEST_PRIVATE, vmid)
                ipa = base
                for region in parcel.regions:
                    self.hyp.move_extent(parcel.extent, target, region.pfn, region.npages)
                    self.hyp.map_for(
                        vmid, target, ipa >> abi.PAGE_SHIFT, region.pfn, region.npages, Access.RWX
                    )
                    ipa += region.npages << abi.PAGE_SHIFT
                self._delete(parcel)
            self._set_state(vm, VmStatus.RUNNING)

    @_integer_arguments
    def vm_stop(self, caller: int, vmid: int, flags: int = abi.GUNYAH_RM_VM_STOP_FLAG_FORCE_STOP) -> None:
        """``VM_STOP`` (``vm_mgnt_handle_stop``): forced, RUNNING -> EXITED and the owner is
        told (``NOTIFY_VM_EXITED``); otherwise the VM is asked to shut down.  A caller that
        is not the owner gets VMID_INVALID, as the RM answers."""
        rpc = Rpc.VM_STOP
        with self._rpc(rpc, vmid):
            vm = self._vm(rpc, vmid)
            if caller != vm.owner:
                raise RmCallError(RmError.VMID_INVALID, rpc, "not the VM's owner")
            if vm.state not in (VmStatus.RUNNING, VmStatus.PAUSED):
                raise RmCallError(RmError.VM_STATE, rpc, f"VM is {vm.state.name}")
            if flags & abi.GUNYAH_RM_VM_STOP_FLAG_FORCE_STOP:
                self._set_state(vm, VmStatus.EXITED)
                self._notify(vm.owner, Notification.VM_EXITED, vmid=vmid, exit_type="VM_STOP_FORCED")
            else:
                self._notify(vmid, Notification.VM_STATUS, vmid=vmid, shutdown=True)

    @_integer_arguments
    def vm_exit(self, caller: int) -> None:
        """``VM_EXIT`` from a guest (``vm_mgnt_handle_exit``): RUNNING -> EXITED, the owner
        is told."""
        rpc = Rpc.VM_EXIT
        with self._rpc(rpc, caller):
            vm = self._vm(rpc, caller)
            if vm.state not in (VmStatus.RUNNING, VmStatus.PAUSED) or caller == abi.VMID_HLOS:
                raise RmCallError(RmError.VM_STATE, rpc, f"VM is {vm.state.name}")
            self._set_state(vm, VmStatus.EXITED)
            self._notify(vm.owner, Notification.VM_EXITED, vmid=caller, exit_type="VM_EXIT")

    @_integer_arguments
    def vm_reset(self, caller: int, vmid: int) -> None:
        """``VM_RESET`` (``vm_mgnt_handle_reset``, ``vm_reset_callback``): from EXITED, READY
        or INIT_FAILED; RESETTING, then every parcel the VM accepted is released (last
        first) and its owner told, the VM's hypervisor objects go (its extents' pages return
        to the HLOS), RESET."""
        rpc = Rpc.VM_RESET
        with self._rpc(rpc, vmid):
            vm = self._vm(rpc, vmid)
            if caller != vm.owner:
                raise RmCallError(RmError.VMID_INVALID, rpc, "not the VM's owner")
            if vm.state not in (VmStatus.EXITED, VmStatus.READY, VmStatus.INIT_FAILED):
                raise RmCallError(RmError.VM_STATE, rpc, f"VM is {vm.state.name}")
            self._set_state(vm, VmStatus.RESETTING)
            while vm.accepted:  # vm_reset_handle_release_memparcels
                parcel = self.parcels[vm.accepted[-1]]
                self._release(parcel, vmid, 0)
                self._notify(parcel.owner, Notification.MEM_RELEASED, handle=parcel.handle, vmid=vmid)
            self.hyp.destroy_vm_objects(vmid, vm.resources)
            vm.resources = None
            vm.demand_paging.clear()
            vm.layout.clear()
            vm.image_handle = abi.MEMPARCEL_INVALID_HANDLE
            self._set_state(vm, VmStatus.RESET)

    @_integer_arguments
    def get_vmid(self, caller: int) -> int:
        """``VM_GET_VMID``: the caller's own VMID."""
        with self._rpc(Rpc.VM_GET_VMID, None):
            return caller

    # --- memparcels --------------------------------------------------------------------------
    @_integer_arguments
    def mem_lend(
        self, caller: int, acl: Sequence[tuple[int, int]], sgl: Sequence[tuple[int, int]], **kw: Any
    ) -> int:
        """``MEM_LEND``: the owner loses access; see :meth:`mem_create`."""
        return self.mem_create(Rpc.MEM_LEND, caller, acl, sgl, **kw)

    @_integer_arguments
    def mem_share(
        self, caller: int, acl: Sequence[tuple[int, int]], sgl: Sequence[tuple[int, int]], **kw: Any
    ) -> int:
        """``MEM_SHARE``: the owner keeps access and is in the ACL; see :meth:`mem_create`."""
        return self.mem_create(Rpc.MEM_SHARE, caller, acl, sgl, **kw)

    @_integer_arguments
    def mem_donate(
        self, caller: int, acl: Sequence[tuple[int, int]], sgl: Sequence[tuple[int, int]], **kw: Any
    ) -> int:
        """``MEM_DONATE``: ownership moves to the one VM in the ACL on accept."""
        return self.mem_create(Rpc.MEM_DONATE, caller, acl, sgl, **kw)

    @_integer_arguments
    def mem_create(
        self,
        rpc: Rpc,
        caller: int,
        acl: Sequence[tuple[int, int]],
        sgl: Sequence[tuple[int, int]],
        *,
        mem_type: int = abi.MEM_TYPE_NORMAL,
        label: int = 0,
        flags: int = 0,
    ) -> int:
        """``memparcel_create`` -> ``memparcel_construct``: a new parcel of the caller's memory
        ``sgl`` (``(ipa, size)``; the HLOS's IPA is the physical address) for the VMs of
        ``acl`` (``(vmid, rights)``).  Returns its handle; SHARING unless ``APPEND`` is asked
        (INIT, more entries to come by ``MEM_APPEND``).  Checks in the RM's order.
        """
        trans = {
            Rpc.MEM_LEND: TransType.LEND,
            Rpc.MEM_SHARE: TransType.SHARE,
            Rpc.MEM_DONATE: TransType.DONATE,
        }[rpc]
        borrower = next((vmid for vmid, _ in acl if vmid != caller), caller)
        with self._rpc(rpc, borrower):
            owner = self._vm(rpc, caller)
            if not acl or not sgl:
                raise RmCallError(RmError.ARGUMENT_INVALID, rpc, "empty ACL or SGL")
            if trans == TransType.DONATE and len(acl) > 1:
                raise RmCallError(RmError.ARGUMENT_INVALID, rpc, "memory can only be donated to one VM")
            if owner.mp_count == abi.MAX_MEMPARCEL_PER_VM:
                raise RmCallError(RmError.DENIED, rpc, f"VM {caller:#x} reached its memparcel limit")
            if max(len(acl), len(sgl)) > abi.MAX_LIST_ENTRIES:
                raise RmCallError(RmError.ARGUMENT_INVALID, rpc, "list longer than MAX_LIST_ENTRIES")
            sanitize = bool(flags & abi.MEM_CREATE_FLAG_SANITIZE)
            if sanitize and mem_type == abi.MEM_TYPE_IO:
                raise RmCallError(RmError.ARGUMENT_INVALID, rpc, "IO memory cannot be sanitized")
            max_rights = abi.MEM_RIGHTS_RW if mem_type == abi.MEM_TYPE_IO else abi.MEM_RIGHTS_RWX
            infos: list[VmInfo] = []
            for vmid, rights in acl:
                if any(i.vmid == vmid for i in infos):
                    raise RmCallError(RmError.ARGUMENT_INVALID, rpc, f"ACL names VM {vmid:#x} twice")
                valid_rights = (abi.MEM_RIGHTS_R, abi.MEM_RIGHTS_RX, abi.MEM_RIGHTS_RW, abi.MEM_RIGHTS_RWX)
                if vmid not in self.vms or rights not in valid_rights:
                    raise RmCallError(RmError.ARGUMENT_INVALID, rpc, f"ACL entry {vmid:#x}/{rights:#x}")
                if mem_type == abi.MEM_TYPE_IO and rights & abi.MEM_RIGHTS_X:
                    raise RmCallError(RmError.ARGUMENT_INVALID, rpc, "IO memory cannot be executable")
                if trans == TransType.DONATE and rights != max_rights:
                    raise RmCallError(RmError.DENIED, rpc, "a donation must give full rights")
                infos.append(VmInfo(vmid, rights))
            owner_listed = any(i.vmid == caller for i in infos)
            if owner_listed != (trans == TransType.SHARE):
                raise RmCallError(
                    RmError.ARGUMENT_INVALID,
                    rpc,
                    "the owner belongs in the ACL of a share, and only of a share",
                )
            handle = next(
                h for h in self._handles if h not in self.parcels and h != abi.MEMPARCEL_INVALID_HANDLE
            )
            parcel = Parcel(
                handle,
                caller,
                trans,
                mem_type,
                label,
                Extent(ExtentKind.PARCEL, caller, handle, shared=trans == TransType.SHARE),
                infos,
                sanitize_create=sanitize,
            )
            self._add_sgl(rpc, parcel, sgl, done=not flags & abi.MEM_CREATE_FLAG_APPEND)
            self.parcels[handle] = parcel
            owner.mp_count += 1
            return handle

    def _lookup(self, rpc: Rpc, owner: int, ipa: int, npages: int) -> list[tuple[int, int, int, Extent]]:
        """``vm_memory_lookup``: ``(ipa_page, pfn, n, extent)`` runs of the owner's memory."""
        gfn = ipa >> abi.PAGE_SHIFT
        if owner == abi.VMID_HLOS:
            runs = []
            for s, e, extent in self.hyp.owner_runs(gfn, npages):
                if extent != HLOS_MEMORY:
                    raise RmCallError(RmError.MEM_INVALID, rpc, f"pfn {s:#x} is not the HLOS's memory")
                runs.append((s, s, e - s, extent))
            return runs
        stage2 = self.hyp.stage2(owner)
        runs, pos = [], gfn
        for s, e, entry in stage2.items(gfn, gfn + npages):
            if s != pos or entry.extent.kind not in (ExtentKind.GUEST_PRIVATE, ExtentKind.GUEST_SHARED):
                break
            runs.append((s, s + entry.delta, e - s, entry.extent))
            pos = e
        if pos != gfn + npages:
            raise RmCallError(RmError.MEM_INVALID, rpc, f"IPA {pos << abi.PAGE_SHIFT:#x} is not VM memory")
        return runs

    def _add_sgl(self, rpc: Rpc, parcel: Parcel, sgl: Sequence[tuple[int, int]], *, done: bool) -> None:
        """``add_sgl_to_mp``: donate each region into the parcel's extent, sanitize it if
        asked; a failure gives back what this call added."""
        added: list[Region] = []
        try:
            for ipa, size in sgl:
                if ipa & _PAGE_MASK or size & _PAGE_MASK or ipa >= abi.ADDR_LIMIT or size >= abi.ADDR_LIMIT:
                    raise RmCallError(RmError.ARGUMENT_INVALID, rpc, f"SGL entry {ipa:#x}+{size:#x}")
                for ipa_page, pfn, n, source in self._lookup(rpc, parcel.owner, ipa, size >> abi.PAGE_SHIFT):
                    self.hyp.donate_to_parcel(parcel.extent, source, pfn, n)
                    parcel.source = source
                    region = Region(pfn, n, ipa_page)
                    parcel.regions.append(region)
                    added.append(region)
                    if parcel.sanitize_create:
                        self.hyp.zero(pfn, n, self._zero, _borrower(parcel))
        except RmCallError:
            for region in reversed(added):
                self.hyp.donate_from_parcel(parcel.extent, parcel.source, region.pfn, region.npages)
                parcel.regions.remove(region)
            raise
        if done:
            parcel.state = ParcelState.SHARING

    def _parcel(self, rpc: Rpc, handle: int) -> Parcel:
        parcel = self.parcels.get(handle)
        if parcel is None:
            raise RmCallError(RmError.HANDLE_INVALID, rpc, f"no parcel {handle:#x}")
        return parcel

    @_integer_arguments
    def mem_append(self, caller: int, handle: int, sgl: Sequence[tuple[int, int]], flags: int = 0) -> None:
        """``MEM_APPEND`` (``memparcel_do_append``): more regions for a parcel in INIT, by its
        owner; ``MEM_APPEND_FLAG_DONE`` completes it (SHARING)."""
        rpc = Rpc.MEM_APPEND
        with self._rpc(rpc, self._charge(handle, caller)):
            if not sgl:
                raise RmCallError(RmError.ARGUMENT_INVALID, rpc, "empty SGL")
            parcel = self._parcel(rpc, handle)
            if caller != parcel.owner:
                raise RmCallError(RmError.DENIED, rpc, "not the parcel's owner")
            if parcel.state != ParcelState.INIT:
                raise RmCallError(RmError.DENIED, rpc, f"parcel is {parcel.state.name}")
            if len(sgl) > abi.MAX_LIST_ENTRIES:
                raise RmCallError(RmError.ARGUMENT_INVALID, rpc, "list longer than MAX_LIST_ENTRIES")
            self._add_sgl(rpc, parcel, sgl, done=bool(flags & abi.MEM_APPEND_FLAG_DONE))

    @_integer_arguments
    def mem_accept(
        self,
        caller: int,
        handle: int,
        *,
        trans: TransType,
        flags: int = abi.MEM_ACCEPT_FLAG_DONE,
        sgl: Sequence[tuple[int, int]] = (),
        acl: Sequence[tuple[int, int]] = (),
        label: int = 0,
        mem_type: int = abi.MEM_TYPE_NORMAL,
        map_vmid: int = 0,
    ) -> list[tuple[int, int]]:
        """``MEM_ACCEPT`` (``memparcel_do_accept``): a VM of the ACL takes the parcel.

        Validations asked by flags, then: only map to self, not the owner, not twice; IPAs
        given (one per region, or one for ``MAP_CONTIGUOUS``) or allocated; with ``DONE``
        the regions are mapped (a donation moves the pages to the acceptor and deletes the
        parcel).  The VM then shares the parcel (SHARED).  ``SANITIZE`` (write rights
        needed) asks for zeroing at reclaim.  Returns the ``(ipa, size)`` list.
        """
        rpc = Rpc.MEM_ACCEPT
        with self._rpc(rpc, self._charge(handle, caller)):
            parcel = self._parcel(rpc, handle)
            if mem_type != parcel.mem_type or trans != parcel.trans:
                raise RmCallError(RmError.ARGUMENT_INVALID, rpc, "memory or transaction type differs")
            if flags & abi.MEM_ACCEPT_FLAG_VALIDATE_SANITIZED and not parcel.sanitize_create:
                raise RmCallError(RmError.VALIDATE_FAILED, rpc, "parcel was not sanitized at creation")
            if flags & abi.MEM_ACCEPT_FLAG_VALIDATE_LABEL and label != parcel.label:
                raise RmCallError(RmError.VALIDATE_FAILED, rpc, f"label {label:#x} != {parcel.label:#x}")
            if flags & abi.MEM_ACCEPT_FLAG_VALIDATE_ACL_ATTR and list(acl) != [
                (i.vmid, i.rights) for i in parcel.acl
            ]:
                raise RmCallError(RmError.VALIDATE_FAILED, rpc, "ACL differs")
            if flags & abi.MEM_ACCEPT_FLAG_MAP_OTHER:
                raise RmCallError(RmError.DENIED, rpc, "mapping for another VM is not supported")
            if map_vmid != 0:
                raise RmCallError(RmError.ARGUMENT_INVALID, rpc, "map_vmid without MAP_OTHER")
            self._vm(rpc, caller)
            info = parcel.info(caller)
            if info is None:
                raise RmCallError(RmError.VMID_INVALID, rpc, f"VM {caller:#x} is not in the ACL")
            if caller == parcel.owner or info.mapped:
                raise RmCallError(RmError.DENIED, rpc, "the owner, or a VM that mapped it already")
            contiguous = bool(flags & abi.MEM_ACCEPT_FLAG_MAP_CONTIGUOUS)
            if contiguous and (mem_type != abi.MEM_TYPE_NORMAL or (info.ipas and not info.contiguous)):
                raise RmCallError(RmError.ARGUMENT_INVALID, rpc, "MAP_CONTIGUOUS not possible here")
            if flags & abi.MEM_ACCEPT_FLAG_SANITIZE:
                if parcel.mem_type == abi.MEM_TYPE_IO or not info.rights & abi.MEM_RIGHTS_W:
                    raise RmCallError(
                        RmError.ARGUMENT_INVALID, rpc, "sanitize needs normal memory and write rights"
                    )
                parcel.sanitize_reclaim = True
            ipas = self._allocate_ipas(rpc, parcel, info, sgl, contiguous)
            if flags & abi.MEM_ACCEPT_FLAG_DONE:
                if len(info.ipas) + len(ipas) != (1 if contiguous else len(parcel.regions)):
                    raise RmCallError(
                        RmError.ARGUMENT_INVALID, rpc, "all IPAs must be allocated before mapping"
                    )
                info.ipas.extend(ipas)
                info.contiguous = contiguous
                if parcel.trans == TransType.DONATE:
                    self._donate_accept(parcel, info)
                    return self._ipa_list(parcel, info)
                self._map(parcel, info)
                info.mapped = True
            else:
                info.ipas.extend(ipas)
                info.contiguous = contiguous
            if not info.shared:
                info.shared = True
                parcel.share_count += 1
                parcel.state = ParcelState.SHARED
                self.vms[caller].accepted.append(handle)
            return self._ipa_list(parcel, info)

    def _allocate_ipas(
        self, rpc: Rpc, parcel: Parcel, info: VmInfo, sgl: Sequence[tuple[int, int]], contiguous: bool
    ) -> list[int]:
        """``alloc_as_range`` for the regions not yet given an IPA (first region first)."""
        sizes = (
            [parcel.npages << abi.PAGE_SHIFT]
            if contiguous
            else [r.npages << abi.PAGE_SHIFT for r in parcel.regions][len(info.ipas) :]
        )
        sizes = sizes[: abi.MAX_LIST_ENTRIES]
        if sgl:
            if len(sgl) > len(sizes):
                raise RmCallError(RmError.ARGUMENT_INVALID, rpc, "more IPAs than regions")
            for (ipa, size), want in zip(sgl, sizes, strict=False):
                if ipa & _PAGE_MASK or ipa >= abi.ADDR_LIMIT or size != want:
                    raise RmCallError(RmError.ARGUMENT_INVALID, rpc, f"IPA {ipa:#x}+{size:#x}")
            return [ipa for ipa, _ in sgl]
        if info.vmid == abi.VMID_HLOS:  # the HLOS's IPA is the physical address
            regions = parcel.regions if not contiguous else parcel.regions[:1]
            return [r.pfn << abi.PAGE_SHIFT for r in regions[len(info.ipas) :]]
        vm = self.vms[info.vmid]
        out = []
        for size in sizes:
            out.append(vm.next_ipa)
            vm.next_ipa += size
        return out

    def _ipa_list(self, parcel: Parcel, info: VmInfo) -> list[tuple[int, int]]:
        if info.contiguous:
            return [(info.ipas[0], parcel.npages << abi.PAGE_SHIFT)] if info.ipas else []
        return [(ipa, r.npages << abi.PAGE_SHIFT) for ipa, r in zip(info.ipas, parcel.regions, strict=False)]

    def _region_ipas(self, parcel: Parcel, info: VmInfo) -> Iterator[tuple[Region, int]]:
        offset = 0
        for i, region in enumerate(parcel.regions):
            if info.contiguous:
                yield region, info.ipas[0] + offset
            else:
                yield region, info.ipas[i]
            offset += region.npages << abi.PAGE_SHIFT

    def _map(self, parcel: Parcel, info: VmInfo) -> None:
        """``map_memory_region`` of every region at the VM's IPAs."""
        for region, ipa in self._region_ipas(parcel, info):
            self.hyp.map_for(
                info.vmid,
                parcel.extent,
                ipa >> abi.PAGE_SHIFT,
                region.pfn,
                region.npages,
                Access(info.rights),
            )

    def _donate_accept(self, parcel: Parcel, info: VmInfo) -> None:
        """A donation completes on accept: the pages join the acceptor's memory, mapped at
        its IPAs, and the parcel is deleted."""
        target = HLOS_MEMORY if info.vmid == abi.VMID_HLOS else Extent(ExtentKind.GUEST_PRIVATE, info.vmid)
        for region, ipa in self._region_ipas(parcel, info):
            self.hyp.move_extent(parcel.extent, target, region.pfn, region.npages)
            if info.vmid != abi.VMID_HLOS:
                self.hyp.map_for(
                    info.vmid, target, ipa >> abi.PAGE_SHIFT, region.pfn, region.npages, Access.RWX
                )
        self._delete(parcel)

    @_integer_arguments
    def mem_release(self, caller: int, handle: int, flags: int = 0) -> None:
        """``MEM_RELEASE`` (``memparcel_do_release``): a borrower gives the parcel back; the
        last one makes it SHARING again.  ``SANITIZE`` (write rights needed) has the pages
        zeroed when the owner reclaims."""
        rpc = Rpc.MEM_RELEASE
        with self._rpc(rpc, self._charge(handle, caller)):
            parcel = self._parcel(rpc, handle)
            if parcel.locked:
                raise RmCallError(RmError.DENIED, rpc, "parcel is locked")
            self._vm(rpc, caller)
            info = parcel.info(caller)
            if info is None:
                raise RmCallError(RmError.HANDLE_INVALID, rpc, f"VM {caller:#x} is not in the ACL")
            if caller == parcel.owner:
                raise RmCallError(RmError.DENIED, rpc, "the owner reclaims, it does not release")
            if not info.shared:
                raise RmCallError(RmError.MEM_RELEASED, rpc, "not accepted, or released already")
            self._release(parcel, caller, flags)

    def _release(self, parcel: Parcel, vmid: int, flags: int) -> None:
        rpc = Rpc.MEM_RELEASE
        info = parcel.info(vmid)
        assert info is not None
        if flags & abi.MEM_RELEASE_FLAG_SANITIZE:
            if parcel.mem_type == abi.MEM_TYPE_IO or not info.rights & abi.MEM_RIGHTS_W:
                raise RmCallError(
                    RmError.ARGUMENT_INVALID, rpc, "sanitize needs normal memory and write rights"
                )
            parcel.sanitize_reclaim = True
        if info.mapped:
            for region, ipa in self._region_ipas(parcel, info):
                self.hyp.unmap_for(vmid, ipa >> abi.PAGE_SHIFT, region.pfn, region.npages)
        info.ipas.clear()
        info.contiguous = info.shared = info.mapped = False
        parcel.share_count -= 1
        if parcel.share_count == 0:
            parcel.state = ParcelState.SHARING
        self.vms[vmid].accepted.remove(parcel.handle)

    @_integer_arguments
    def mem_reclaim(self, caller: int, handle: int, flags: int = 0) -> None:
        """``MEM_RECLAIM`` (``memparcel_do_reclaim``): the owner takes a parcel nobody shares
        back (SHARED: MEM_INUSE); its pages are zeroed if a sanitize was asked, then donated
        back to the owner; the parcel is deleted."""
        rpc = Rpc.MEM_RECLAIM
        with self._rpc(rpc, self._charge(handle, caller)):
            parcel = self._parcel(rpc, handle)
            if caller != parcel.owner:
                raise RmCallError(RmError.DENIED, rpc, "not the parcel's owner")
            if parcel.state == ParcelState.SHARED:
                raise RmCallError(RmError.MEM_INUSE, rpc, f"{parcel.share_count} VM(s) accepted it")
            if parcel.locked:
                raise RmCallError(RmError.DENIED, rpc, "parcel is locked")
            if flags & abi.MEM_RECLAIM_FLAG_SANITIZE:
                if parcel.mem_type == abi.MEM_TYPE_IO:
                    raise RmCallError(RmError.ARGUMENT_INVALID, rpc, "IO memory cannot be sanitized")
                parcel.sanitize_reclaim = True
            self._vm(rpc, caller)
            for region in parcel.regions:  # region_list_cleanup_regions
                if parcel.sanitize_reclaim:
                    self.hyp.zero(region.pfn, region.npages, self._zero, _borrower(parcel))
                self.hyp.donate_from_parcel(parcel.extent, parcel.source, region.pfn, region.npages)
                if parcel.source != HLOS_MEMORY and not parcel.extent.shared:
                    self.hyp.map_for(
                        parcel.owner, parcel.source, region.owner_ipa, region.pfn, region.npages, Access.RWX
                    )
            self._delete(parcel)

    def _delete(self, parcel: Parcel) -> None:
        """``delete_memparcel``."""
        del self.parcels[parcel.handle]
        owner = self.vms.get(parcel.owner)
        if owner is not None:
            owner.mp_count -= 1

    @_integer_arguments
    def mem_notify(
        self, caller: int, handle: int, flags: int, vmids: Sequence[int] = (), mem_info_tag: int = 0
    ) -> None:
        """``MEM_NOTIFY`` (``memparcel_notify``): the owner tells borrowers of a parcel
        (``SHARED``, ``RECALL``), a borrower tells the owner (``ACCEPTED``, ``RELEASED``,
        which must match its state: MEM_INUSE / MEM_RELEASED otherwise)."""
        rpc = Rpc.MEM_NOTIFY
        with self._rpc(rpc, self._charge(handle, caller)):
            parcel = self._parcel(rpc, handle)
            if parcel.mem_info_tag is not None and parcel.mem_info_tag != mem_info_tag:
                raise RmCallError(RmError.ARGUMENT_INVALID, rpc, "mem-info tag mismatch")
            if flags in (abi.MEM_NOTIFY_FLAG_SHARED, abi.MEM_NOTIFY_FLAG_RECALL):
                if caller != parcel.owner:
                    raise RmCallError(RmError.DENIED, rpc, "only the owner notifies borrowers")
                if not vmids or len(vmids) > len(parcel.acl):
                    raise RmCallError(RmError.ARGUMENT_INVALID, rpc, "VMID list")
                for vmid in vmids:
                    self._vm(rpc, vmid)
                    if parcel.info(vmid) is None:
                        raise RmCallError(RmError.ARGUMENT_INVALID, rpc, f"VM {vmid:#x} is not in the ACL")
                if flags == abi.MEM_NOTIFY_FLAG_SHARED and parcel.mem_info_tag is None:
                    parcel.mem_info_tag = mem_info_tag
                kind = (
                    Notification.MEM_SHARED
                    if flags == abi.MEM_NOTIFY_FLAG_SHARED
                    else Notification.MEM_RECALL
                )
                for vmid in vmids:
                    self._notify(vmid, kind, handle=handle, owner=parcel.owner, trans=parcel.trans)
            elif flags in (abi.MEM_NOTIFY_FLAG_ACCEPTED, abi.MEM_NOTIFY_FLAG_RELEASED):
                accepted = flags == abi.MEM_NOTIFY_FLAG_ACCEPTED
                info = parcel.info(caller)
                if info is None:
                    raise RmCallError(RmError.HANDLE_INVALID, rpc, f"VM {caller:#x} is not in the ACL")
                if accepted != info.shared:
                    raise RmCallError(
                        RmError.MEM_INUSE if info.shared else RmError.MEM_RELEASED, rpc, "state"
                    )
                kind = Notification.MEM_ACCEPTED if accepted else Notification.MEM_RELEASED
                self._notify(parcel.owner, kind, handle=handle, vmid=caller)
            else:
                raise RmCallError(RmError.ARGUMENT_INVALID, rpc, f"flags {flags:#x}")

    def release_accepted(self, handle: int, vmid: int) -> None:
        """What ``vm_reset_handle_release_memparcels`` does for one parcel: release it for
        *vmid* and tell the owner.  The model's way to take back a parcel whose folio the
        core frees (see README); not an RPC."""
        parcel = self.parcels[handle]
        self._release(parcel, vmid, 0)
        self._notify(parcel.owner, Notification.MEM_RELEASED, handle=handle, vmid=vmid)

    def set_lock(self, handle: int, locked: bool) -> None:
        """``memparcel_set_lock``: platform code pins a parcel (no caller in the public RM)."""
        self.parcels[handle].locked = locked


def _borrower(parcel: Parcel) -> int:
    """The parcel's first VM that is not its owner (whom its costs are charged to)."""
    return next((i.vmid for i in parcel.acl if i.vmid != parcel.owner), parcel.owner)
