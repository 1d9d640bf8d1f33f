"""The ``gunyah`` backend's arch policy: the Gunyah driver, RM and hypervisor hooked into
the guestmem core.

Where each hook stands in the Gunyah stack (backends.md 4, 6.1):

==============================  =================================================================
hook                            Gunyah
==============================  =================================================================
``guestmem_host_init``          the machine's hypervisor and RM (:class:`GunyahHost`)
``guestmem_vm_init``            ``GUNYAH_CREATE_VM`` -> ``gunyah_vm_alloc`` (no VMID yet)
``guestmem_gmem_bind``/unbind   ``GUNYAH_VM_MAP_MEM`` -> ``gunyah_gmem_add_mapping`` / removal
``guestmem_vcpu_pre_run``       ``GUNYAH_VCPU_RUN`` -> ``gunyah_vm_ensure_started``
``guestmem_fault``              the hypervisor's fault, ``gunyah_gmem_demand_page``
``guestmem_unmap_gfn_range``    ``gunyah_vm_reclaim_range`` (launder: punch hole, release,
                                memory failure, memslot deletion)
``guestmem_gmem_invalidate``    a folio leaves the file: nothing of it may stay with a guest
``guestmem_gmem_fault_user_...`` ``gunyah_gmem_host_fault`` (launder) or ``gmem_fault`` (SIGBUS)
``guestmem_guest_access``       the hypervisor's stage-2 check (synchronous external abort)
``guestmem_host_access``        the HLOS's stage-2 check
``guestmem_vm_ioctl``           ``GUNYAH_VM_SET_DTB_CONFIG``, ``GUNYAH_VM_START``,
                                ``GUNYAH_VM_SET_BOOT_CONTEXT`` as ``KVM_MEMORY_ENCRYPT_OP``
``guestmem_vm_pre_destroy``     ``_gunyah_vm_put``: stop, DTB parcel
``guestmem_vm_destroy``         ``_gunyah_vm_put``: bindings, reclaim, reset, VMID
==============================  =================================================================
"""

from __future__ import annotations

import errno
from typing import Any

import attrs

from guestmem import cabi, uapi
from guestmem.backend import (
    Fault,
    GfnRange,
    GmemView,
    HostFault,
    HostView,
    SlotView,
    VcpuView,
    VmTypeInfo,
    VmView,
    hookimpl,
    view,
)
from guestmem.errors import KvmError
from guestmem_gunyah import abi
from guestmem_gunyah.abi import Access, VmStatus
from guestmem_gunyah.driver import Driver, GunyahHost, GunyahVm
from guestmem_gunyah.exits import SyncExternalAbort, VmStatusExit
from guestmem_gunyah.hyp import ExtentKind, Hypervisor
from guestmem_gunyah.rm import VM_RULE, ResourceManager

#: Rule tag of a uAPI call with no Gunyah counterpart.
UAPI_RULE = "Gunyah-uapi"

#: The one VM type: an arm64 VM as Linux 6.18 sees one (no memory attributes, one memslot
#: address space, guest_memfd memslots must be gmem-only, no ``KVM_PRE_FAULT_MEMORY``).
#: Its guests' memory is private where lent and shared where shared, and a page changes
#: between the two with its contents (lend and share move the same folio; only a sanitize
#: asked for zeroes it: backends.md 4.3): ``conversion="in_place"``.
GUNYAH_VM = VmTypeInfo(
    type=abi.GUNYAH_VM_TYPE,
    name="GUNYAH_VM",
    has_private_mem=False,
    supports_init_shared=True,
    readonly_mem=False,
    pre_fault_allowed=False,
    nr_memslot_as_ids=1,
    gmem_slot_requires_mmap=True,
    memory_attributes=False,
    arch="arm64",
    conversion="in_place",
)


@attrs.frozen
class GunyahIoctl:
    """A ``/dev/gunyah`` VM ioctl carried by ``KVM_MEMORY_ENCRYPT_OP``: ``request`` is a
    ``GUNYAH_VM_*`` number, ``arg`` its argument (``(guest_phys_addr, size)`` for
    ``GUNYAH_VM_SET_DTB_CONFIG``, ``(reg, value)`` for ``GUNYAH_VM_SET_BOOT_CONTEXT``)."""

    request: int
    arg: Any = None


def gunyah_host(host: Any) -> GunyahHost:
    """The Gunyah machine of *host* (a ``Kvm`` of the ``gunyah`` backend or its view)."""
    arch = view(host).arch
    if not isinstance(arch, GunyahHost):
        raise TypeError(f"{host!r} is not a host of the gunyah backend")
    return arch


def gunyah_state(vm: Any) -> GunyahVm:
    """The driver's ``struct gunyah_vm`` of *vm* (a ``Vm`` of the ``gunyah`` backend or its view)."""
    try:
        arch = view(vm).arch
    except TypeError:
        arch = None
    if not isinstance(arch, GunyahVm):
        raise TypeError(f"{vm!r} is not a VM of the gunyah backend")
    return arch


class GunyahPolicy:
    """The arch policy hooks of the ``gunyah`` backend; each host has its own machine."""

    @hookimpl
    def guestmem_snapshot(self, host: HostView, vm: VmView | None) -> Any:
        """The memdb and memparcels of the host, or a VM's driver state and address space
        (:mod:`guestmem_gunyah.snapshot`)."""
        from guestmem_gunyah import snapshot

        return snapshot.host_state(host) if vm is None else snapshot.vm_state(vm)

    # --- host and VM lifetime ----------------------------------------------------------------
    @hookimpl
    def guestmem_host_init(self, host: HostView) -> GunyahHost:
        """The machine: a hypervisor and its RM; the HLOS is VM 3, running."""
        hyp = Hypervisor()
        rm = ResourceManager(hyp, zero=host.zero)
        state = GunyahHost(host, hyp, rm)
        hyp.listener = state.listener
        hyp.count_fn = rm.count_fn = state.count
        rm.operation = host.operation
        hyp.on_unmap = state.stage2_removed
        return state

    @hookimpl
    def guestmem_vm_init(self, vm: VmView) -> GunyahVm:
        """``gunyah_vm_alloc``: status NO_STATE, no VMID until the VM starts."""
        state = GunyahVm(vm, gunyah_host(vm.host))
        vm.count("gunyah.demand_paged_pages", 0)
        vm.trace("gunyah_create_vm")
        return state

    @hookimpl
    def guestmem_vm_pre_destroy(self, vm: VmView) -> None:
        """``_gunyah_vm_put``, head: stop, DTB parcel."""
        gunyah_state(vm).pre_destroy()

    @hookimpl
    def guestmem_vm_destroy(self, vm: VmView) -> None:
        """``_gunyah_vm_put``, the rest: bindings, reclaim, reset, VMID."""
        gunyah_state(vm).destroy()

    @hookimpl
    def guestmem_check_extension(self, vm: VmView | None, cap: int) -> int | None:
        """arm64 answers where they differ from the x86-shaped core defaults."""
        if cap in (
            uapi.KVM_CAP_VM_TYPES,
            uapi.KVM_CAP_PRE_FAULT_MEMORY,
            uapi.KVM_CAP_MULTI_ADDRESS_SPACE,
            uapi.KVM_CAP_EXIT_HYPERCALL,
        ):
            return 0
        return None

    # --- arch ioctls ---------------------------------------------------------------------------
    @hookimpl
    def guestmem_vm_ioctl(self, vm: VmView, request: int, arg: Any) -> int | None:
        """``gunyah_vm_ioctl`` for the calls that are not memslots: ``SET_DTB_CONFIG``
        (EOVERFLOW if ``guest_phys_addr + size`` overflows), ``START``
        (``gunyah_vm_ensure_started``), ``SET_BOOT_CONTEXT`` (kept); any other request is
        ENOTTY."""
        if request != uapi.KVM_MEMORY_ENCRYPT_OP or not isinstance(arg, GunyahIoctl):
            return None
        state = gunyah_state(vm)
        if arg.request == abi.GUNYAH_VM_SET_DTB_CONFIG:
            gpa, size = arg.arg
            gpa, size = cabi.u64(gpa, "guest_phys_addr"), cabi.u64(size, "size")
            if gpa + size > uapi.U64_MAX:
                raise KvmError(errno.EOVERFLOW, VM_RULE, "guest_phys_addr + size overflows")
            state.dtb_config = (gpa, size)
        elif arg.request == abi.GUNYAH_VM_START:
            state.ensure_started()
        elif arg.request == abi.GUNYAH_VM_SET_BOOT_CONTEXT:
            reg, value = arg.arg
            boot = (cabi.u32(reg, "reg"), cabi.u64(value, "value"))
            state.exit_info.setdefault("boot_context", []).append(boot)
        else:
            raise KvmError(errno.ENOTTY, UAPI_RULE, f"unknown Gunyah VM ioctl {arg.request:#x}")
        vm.trace("gunyah_ioctl", request=arg.request)
        return 0

    @hookimpl
    def guestmem_vcpu_pre_run(self, vcpu: VcpuView) -> None:
        """``GUNYAH_VCPU_RUN``: the VM is started on the first run; a VM that exited gives a
        status exit, one that could not start ENODEV."""
        state = gunyah_state(vcpu.vm)
        if state.status == VmStatus.EXITED:
            state.count("exits.status")
            raise VmStatusExit(abi.GUNYAH_VM_STATUS_EXITED, "the VM exited")
        state.ensure_started()

    # --- memslots and bindings -----------------------------------------------------------------
    @hookimpl
    def guestmem_prepare_memory_region(
        self, vm: VmView, old: SlotView | None, new: SlotView | None, change: str
    ) -> None:
        """Gunyah binds guest_memfd only: a memslot on plain host memory has no counterpart
        (EINVAL); a binding cannot move (EINVAL)."""
        if change == "create" and new is not None and not new.has_gmem:
            raise KvmError(
                errno.EINVAL, UAPI_RULE, "Gunyah guest memory comes from guest_memfd bindings only"
            )
        if change == "move":
            raise KvmError(errno.EINVAL, UAPI_RULE, "a Gunyah binding cannot move")

    @hookimpl
    def guestmem_gmem_bind(self, vm: VmView, slot: SlotView, gmem: GmemView, pgoff: int, npages: int) -> None:
        """``gunyah_gmem_add_mapping`` with the policy the arch face set for this slot."""
        gunyah_state(vm).add_binding(slot.base_gfn, npages, pgoff, slot.id)

    @hookimpl
    def guestmem_gmem_unbind(self, vm: VmView, slot: SlotView, gmem: GmemView) -> None:
        """``gunyah_gmem_remove_binding``."""
        gunyah_state(vm).remove_binding(slot.base_gfn)

    # --- guest faults and reclaim ------------------------------------------------------------------
    @hookimpl
    def guestmem_fault(self, vm: VmView, fault: Fault) -> None:
        """Demand paging (``gunyah_gmem_demand_page``)."""
        state = gunyah_state(vm)
        if state.resources is None:
            raise KvmError(errno.ENODEV, VM_RULE, "the VM has not started: no addrspace to map into")
        state.demand_page(fault)

    @hookimpl
    def guestmem_unmap_gfn_range(self, vm: VmView, range: GfnRange) -> bool:  # noqa: A002
        """Reclaim the provided folios of the range (``gunyah_vm_reclaim_range``)."""
        state = gunyah_state(vm)
        if state.resources is None or not state.mm.overlaps(range.start, range.end):
            return False
        state.reclaim_range(range.start, range.end - range.start)
        return True

    @hookimpl
    def guestmem_gmem_invalidate(self, vm: VmView, start_pfn: int, end_pfn: int) -> None:
        """Folios leave guest_memfd: a parcel still holding one is reclaimed first (see
        README: the driver's folio reference would have kept it)."""
        host = gunyah_host(vm.host)
        for parcel_vm in list(host.vms.values()):
            for handle, parcel in list(parcel_vm.parcels.items()):
                if any(start_pfn <= pfn < end_pfn for pfn in parcel.pfns):
                    parcel_vm.force_reclaim_parcel(handle)

    # --- host side -----------------------------------------------------------------------------
    @hookimpl
    def guestmem_gmem_fault_user_mapping(self, vm: VmView, gmem: GmemView, index: int) -> HostFault | None:
        """``gunyah_gmem_host_fault`` (launder) or the library's ``gmem_fault`` (SIGBUS) for a
        lent folio; a folio that is not lent follows guest_memfd's rule (M-4)."""
        pfn = gmem.pfn(index)
        if pfn is None:
            return None
        host = gunyah_host(vm.host)
        if host.hyp.host_accessible(pfn):
            return None
        if host.driver == Driver.LIBRARY:
            return HostFault.SIGBUS
        state = gunyah_state(vm)
        if host.hyp.owner(pfn).kind == ExtentKind.PARCEL:
            # folio_test_private(folio): gunyah_gmem_launder_folio finds no mm entry for a
            # parcel's folio, returns 0, and the private bit is still set.
            vm.host.crash(
                f"kernel BUG at gunyah_gmem_host_fault: BUG_ON(folio_test_private(folio)) for pfn {pfn:#x}"
                f" (gmem page {index:#x}, lent in a memparcel of VM {state.vmid:#x})"
            )
        state.count("host_fault_launders")
        return HostFault.RECLAIM

    @hookimpl
    def guestmem_host_access(self, host: HostView, pfn: int, write: bool) -> str | None:
        """The HLOS touching a page its stage-2 does not map: the hypervisor injects a
        synchronous external abort into the HLOS (Linux avoids it by keeping lent folios out
        of its direct map and its user mappings)."""
        machine = gunyah_host(host)
        if machine.hyp.host_accessible(pfn):
            return None
        owner = machine.hyp.owner(pfn)
        return (
            f"synchronous external abort injected into the HLOS (VM {abi.VMID_HLOS:#x}): pfn {pfn:#x} "
            f"belongs to {owner.kind.value} of VM {owner.vmid:#x}"
        )

    # --- the guest -----------------------------------------------------------------------------
    @hookimpl
    def guestmem_guest_access(self, vcpu: VcpuView, gfn: int, pfn: int, write: bool, private: bool) -> None:
        """The hypervisor's stage-2 must map the page, writable for a store; otherwise the VM
        gets a synchronous external abort (``inject_inst_data_abort``)."""
        state = gunyah_state(vcpu.vm)
        hit = state.hyp.lookup(state.vmid, gfn)
        why = ""
        if hit is None:
            why = "the IPA is not in the VM's stage-2"
        elif hit[0] != pfn:
            why = f"the stage-2 maps pfn {hit[0]:#x}, not {pfn:#x}"
        elif write and not hit[1].access & Access.W:
            why = "the stage-2 mapping is read-only"
        if why:
            state.count("aborts_injected")
            raise SyncExternalAbort(state.vmid, gfn << abi.PAGE_SHIFT, write, why)
