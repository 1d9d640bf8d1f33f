"""Gunyah's own calls: the arch face next to the guestmem uAPI face.

A Gunyah VMM talks to ``/dev/gunyah``, not ``/dev/kvm``.  These functions give it its
calls on a VM of the ``gunyah`` backend:

* :func:`create_guest_mem`: ``GUNYAH_CREATE_GUEST_MEM`` (a guest_memfd the host may map
  wherever nothing is lent);
* :func:`gunyah` -> :class:`GunyahFace`: the VM fd's ``GUNYAH_VM_SET_DTB_CONFIG``,
  ``GUNYAH_VM_START``, ``GUNYAH_VM_SET_BOOT_CONTEXT`` (as ``KVM_MEMORY_ENCRYPT_OP``,
  :class:`~guestmem_gunyah.policy.GunyahIoctl`), ``GUNYAH_VM_MAP_MEM`` (a binding with its
  lend/share policy: a memslot of the uAPI face, whose bind hook reads the policy), the
  driver's parcels (``gunyah_gmem_share_parcel`` / ``gunyah_gmem_reclaim_parcel``) and
  ``GUNYAH_VCPU_RESUME_FAULT``;
* :func:`rm`: the machine's resource manager (RPCs by VMID: the host's and the guests');
* :func:`set_driver`: which driver generation the host runs (launder or SIGBUS).
"""

from __future__ import annotations

import errno
from typing import NoReturn

from guestmem import cabi, uapi
from guestmem.api import GuestMemfd, Kvm, Vm
from guestmem.backend import VmView, view
from guestmem.errors import KvmError
from guestmem_gunyah import abi
from guestmem_gunyah.driver import BIND_RULE, Binding, Driver, GunyahVm, VmParcel
from guestmem_gunyah.exits import PageFaultExit, SyncExternalAbort
from guestmem_gunyah.policy import UAPI_RULE, GunyahIoctl, gunyah_host, gunyah_state
from guestmem_gunyah.rm import ResourceManager

PAGE_SHIFT = abi.PAGE_SHIFT
_GMEM = uapi.KVM_MEM_GUEST_MEMFD


def create_guest_mem(vm: Vm, size: int, flags: int = 0) -> GuestMemfd:
    """``GUNYAH_CREATE_GUEST_MEM`` (``gunyah_guest_mem_create``): EINVAL for an unaligned
    size or unknown flags; the file is mmap-able and host-accessible until lent
    (``GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED`` of the uAPI face).
    ``GHMF_ALLOW_HUGEPAGE`` is accepted; folios stay 4 KiB (README).  *size* and *flags*
    are the ``__u64`` fields of ``struct gunyah_create_mem_args``."""
    size, flags = cabi.u64(size, "size"), cabi.u64(flags, "flags")
    if size % abi.PAGE_SIZE:
        raise KvmError(errno.EINVAL, BIND_RULE, f"size {size:#x} is not page aligned")
    if flags & ~(abi.GHMF_CLOEXEC | abi.GHMF_ALLOW_HUGEPAGE):
        raise KvmError(errno.EINVAL, BIND_RULE, f"guest memory flags {flags:#x}")
    return vm.create_guest_memfd(size, uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED)


def set_driver(kvm: Kvm, driver: Driver) -> None:
    """Choose the driver generation of *kvm*'s host (:class:`~guestmem_gunyah.driver.Driver`)."""
    gunyah_host(kvm).driver = driver


def rm(kvm: Kvm) -> ResourceManager:
    """The resource manager of *kvm*'s machine.  Its RPCs take the caller's VMID first (the
    HLOS is ``abi.VMID_HLOS``; a guest calls with its own VMID, :attr:`GunyahFace.vmid`);
    each is one operation for observers."""
    return gunyah_host(kvm).rm


def gunyah(vm: Vm) -> GunyahFace:
    """Gunyah's VM calls on *vm* (a ``Vm`` of the ``gunyah`` backend)."""
    return GunyahFace(vm)


class GunyahFace:
    """The ``/dev/gunyah`` VM fd of a VM of the uAPI face."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.state: GunyahVm = gunyah_state(vm)

    @property
    def vmid(self) -> int:
        """The VM's VMID (``GUNYAH_VMID_INVAL`` until it starts)."""
        return self.state.vmid

    @property
    def status(self) -> abi.VmStatus:
        """``ghvm->vm_status``."""
        return self.state.status

    @property
    def bindings(self) -> list[Binding]:
        """The VM's bindings, by guest address."""
        with self.state.view.host.operation():
            return [b for _, _, b in self.state.bindings.items()]

    # --- VM fd ioctls --------------------------------------------------------------------------
    def set_dtb_config(self, guest_phys_addr: int, size: int) -> None:
        """``GUNYAH_VM_SET_DTB_CONFIG``: where the devicetree will be (lent at start);
        ``struct gunyah_vm_dtb_config``'s ``__u64`` fields."""
        guest_phys_addr, size = cabi.u64(guest_phys_addr, "guest_phys_addr"), cabi.u64(size, "size")
        self.vm.memory_encrypt_op(GunyahIoctl(abi.GUNYAH_VM_SET_DTB_CONFIG, (guest_phys_addr, size)))

    def start(self) -> None:
        """``GUNYAH_VM_START`` (``gunyah_vm_ensure_started``)."""
        self.vm.memory_encrypt_op(GunyahIoctl(abi.GUNYAH_VM_START))

    def set_boot_context(self, reg: int, value: int) -> None:
        """``GUNYAH_VM_SET_BOOT_CONTEXT`` (recorded; the model runs no guest code):
        ``struct gunyah_vm_boot_context``'s ``__u32 reg`` and ``__u64 value``."""
        reg, value = cabi.u32(reg, "reg"), cabi.u64(value, "value")
        self.vm.memory_encrypt_op(GunyahIoctl(abi.GUNYAH_VM_SET_BOOT_CONTEXT, (reg, value)))

    def map_mem(self, guest_mem: GuestMemfd, guest_addr: int, offset: int, size: int, flags: int) -> None:
        """``GUNYAH_VM_MAP_MEM`` (``gunyah_gmem_modify_mapping``), checks in its order:
        the file (EINVAL), flags (EINVAL), some guest rights (EINVAL), the access policy
        (EINVAL), alignment (EINVAL).  ``GUNYAH_MEM_UNMAP`` removes (or trims) a binding
        (ENOENT if none matches); otherwise the file range must not be bound already
        (EEXIST), and the binding becomes a memslot of the uAPI face.  The numbers are the
        fields of ``struct gunyah_map_mem_args`` (``__u64 guest_addr, offset, size``,
        ``__u32 flags``); *guest_mem* is a file (TypeError for anything else)."""
        with view(self.vm).host.operation():
            self._map_mem(guest_mem, guest_addr, offset, size, flags)

    def _map_mem(self, guest_mem: GuestMemfd, guest_addr: int, offset: int, size: int, flags: int) -> None:
        cabi.fd(guest_mem, "guest_mem")
        guest_addr, offset = cabi.u64(guest_addr, "guest_addr"), cabi.u64(offset, "offset")
        size, flags = cabi.u64(size, "size"), cabi.u32(flags, "flags")
        view(self.vm).check_ioctl()  # a VM ioctl: EBADF once the VM fd is closed
        state = self.state
        if not isinstance(guest_mem, GuestMemfd) or guest_mem.closed:
            raise KvmError(errno.EINVAL, BIND_RULE, "guest_mem_fd is not an open file")
        try:
            inode = view(guest_mem)
        except TypeError:
            raise KvmError(errno.EINVAL, BIND_RULE, "not a Gunyah guest memory file") from None
        if inode.owner.vm_id != state.view.vm_id:
            raise KvmError(errno.EINVAL, BIND_RULE, "guest memory of another VM")
        if flags & ~(abi.GUNYAH_MEM_ALLOW_RWX | abi.GUNYAH_MEM_UNMAP | abi.GUNYAH_MEM_ACCESS_MASK):
            raise KvmError(errno.EINVAL, BIND_RULE, f"flags {flags:#x}")
        if not flags & abi.GUNYAH_MEM_ALLOW_RWX:
            raise KvmError(errno.EINVAL, BIND_RULE, "the VM needs some permission to the memory")
        access = flags & abi.GUNYAH_MEM_ACCESS_MASK
        if access not in (
            abi.GUNYAH_MEM_DEFAULT_ACCESS,
            abi.GUNYAH_MEM_FORCE_LEND,
            abi.GUNYAH_MEM_FORCE_SHARE,
        ):
            raise KvmError(errno.EINVAL, BIND_RULE, f"access {access:#x}")
        if (guest_addr | offset | size) % abi.PAGE_SIZE:
            raise KvmError(errno.EINVAL, BIND_RULE, "address, offset or size not page aligned")
        gfn, nr, i_off = guest_addr >> PAGE_SHIFT, size >> PAGE_SHIFT, offset >> PAGE_SHIFT
        if flags & abi.GUNYAH_MEM_UNMAP:
            self._remove_mapping(guest_mem, gfn, nr, i_off, flags & ~abi.GUNYAH_MEM_UNMAP)
            return
        if flags & abi.GUNYAH_MEM_FORCE_SHARE == 0 and not gunyah_host(state.view.host).can_set_direct_map:
            raise KvmError(errno.EINVAL, BIND_RULE, "Cannot lend memory without rodata=full")
        for b in self.bindings:
            loc = state.view.gfn_to_gmem(b.gfn)
            if (
                loc is not None
                and loc.gmem.ino == inode.ino
                and b.i_off < i_off + nr
                and i_off < b.i_off + b.nr
            ):
                raise KvmError(
                    errno.EEXIST, BIND_RULE, f"file pages [{i_off:#x}, +{nr:#x}) are bound already"
                )
        self._bind(guest_mem, gfn, nr, i_off, flags)

    def _bind(self, guest_mem: GuestMemfd, gfn: int, nr: int, i_off: int, flags: int) -> None:
        used = {slot.id for slot in self.state.view.memslots()}
        slot = next(i for i in range(uapi.KVM_USER_MEM_SLOTS) if i not in used)
        self.state.pending[slot] = flags
        try:
            self.vm.set_user_memory_region2(
                slot, _GMEM, gfn << PAGE_SHIFT, nr << PAGE_SHIFT, 0, guest_mem, i_off << PAGE_SHIFT
            )
        finally:
            self.state.pending.pop(slot, None)

    def _remove_mapping(self, guest_mem: GuestMemfd, gfn: int, nr: int, i_off: int, flags: int) -> None:
        """``gunyah_gmem_remove_mapping`` / ``gunyah_gmem_trim_binding``: the binding with the
        same flags holding the range, at the same file offset; the whole of it, its start or
        its end (a hole in the middle: EINVAL)."""
        for b in self.bindings:
            if b.flags != flags or b.gfn > gfn or b.end < gfn + nr:
                continue
            start_delta = gfn - b.gfn
            if i_off - b.i_off != start_delta:
                break
            end_delta = b.end - gfn - nr
            if start_delta and end_delta:
                raise KvmError(errno.EINVAL, BIND_RULE, "cannot split a binding in two")
            self.vm.set_user_memory_region2(b.slot, _GMEM, b.gfn << PAGE_SHIFT, 0)
            if start_delta:  # keep the start
                self._bind(guest_mem, b.gfn, start_delta, b.i_off, b.flags)
            elif end_delta:  # keep the end
                self._bind(guest_mem, b.end - end_delta, end_delta, b.i_off + b.nr - end_delta, b.flags)
            return
        raise KvmError(
            errno.ENOENT, BIND_RULE, f"no binding of gfns [{gfn:#x}, +{nr:#x}) with flags {flags:#x}"
        )

    # --- the driver's parcels ------------------------------------------------------------------
    def share_parcel(self, guest_addr: int, size: int, *, sanitize: bool = False) -> VmParcel:
        """``gunyah_gmem_share_parcel`` of a binding's pages (lend or share, as the binding
        says), for the VM to accept through the RM.  The VM must have its VMID (started)."""
        guest_addr, size = cabi.u64(guest_addr, "guest_addr"), cabi.u64(size, "size")
        view(self.vm).check_ioctl()
        with view(self.vm).host.operation():
            return self.state.share_parcel(guest_addr >> PAGE_SHIFT, size >> PAGE_SHIFT, sanitize=sanitize)

    def reclaim_parcel(self, parcel: VmParcel | int, flags: int = 0) -> None:
        """``gunyah_gmem_reclaim_parcel`` (``MEM_RECLAIM``; ``MEM_RECLAIM_FLAG_SANITIZE`` zeroes)
        of a parcel :meth:`share_parcel` made for this VM, or of its handle (a ``__u32``):
        ENOENT for one this VM's driver does not hold (reclaimed already, another VM's)."""
        handle = parcel.handle if isinstance(parcel, VmParcel) else cabi.u32(parcel, "parcel")
        flags = cabi.u32(flags, "flags")
        view(self.vm).check_ioctl()
        with view(self.vm).host.operation():
            self.state.reclaim_parcel(handle, flags)

    # --- vCPU run -------------------------------------------------------------------------------
    def resume_fault(self, exit: PageFaultExit) -> NoReturn:  # noqa: A002
        """``GUNYAH_VCPU_RESUME_FAULT`` after a page-fault exit: the fault goes back into the
        guest as a synchronous external abort (raised: the modelled outcome)."""
        state = self.state
        with view(self.vm).host.operation():
            state.count("aborts_injected")
            state.view.trace("gunyah_inject_abort", gpa=exit.phys_addr, attempt=exit.attempt)
        raise SyncExternalAbort(
            state.vmid, exit.phys_addr, exit.write, f"the VMM resumed with FAULT ({exit.attempt})"
        )

    def touch(self, guest_addr: int, size: int, *, write: bool = False) -> int:
        """The guest touching ``[guest_addr, guest_addr + size)`` in order, each page it
        reaches taking the demand-paging path: a boot.  Returns the bytes mapped, in whole
        pages from the page of *guest_addr* (runs cost one call each).  Starts the VM first,
        as a vCPU run would.  Integers, checked as ``Vcpu.access`` checks an access: a
        negative address or a size that is not positive is EINVAL (no guest instruction
        touches that), before the VM starts."""
        guest_addr, size = cabi.index(guest_addr, "guest_addr"), cabi.index(size, "size")
        v: VmView = view(self.vm)
        v.check_ioctl()  # GUNYAH_VCPU_RUN of a VM whose fd is closed: EBADF
        if guest_addr < 0 or size <= 0:
            raise KvmError(errno.EINVAL, UAPI_RULE, f"a guest touch of {size:#x} bytes at {guest_addr:#x}")
        first = guest_addr >> PAGE_SHIFT
        end = (guest_addr + size + abi.PAGE_SIZE - 1) >> PAGE_SHIFT
        with v.host.operation():
            self.state.ensure_started()
            pages = v.fault_range(first, end - first, private=False, write=write)
        return pages << PAGE_SHIFT
