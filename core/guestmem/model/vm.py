"""The VM (``struct kvm``): lifetime, references and the VM ioctls (spec 2.A-2.I).

The jobs behind the ioctls live next to their kernel counterparts: memslots in
:mod:`~guestmem.model.memslots`, attributes in :mod:`~guestmem.model.attributes`, the
stage-2 fault in :mod:`~guestmem.model.fault`, guest_memfd and populate in
:mod:`~guestmem.model.gmem`.  Every ioctl runs under the host lock, which stands for the
kernel's slots_lock, invalidate lock and mmu_lock (docs/model.md, "Locking"); the kernel's
order of checks, invalidations and retries is kept, so a hook that changes state in the
middle of an operation sees what it would see in the kernel.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from guestmem import api, cabi, uapi
from guestmem.backend import GmemLocation, VmView
from guestmem.errors import KvmError
from guestmem.model import attributes, fault, gmem
from guestmem.model.events import Counters
from guestmem.model.gmem import GmemFile, GmemInode
from guestmem.model.memslots import Memslots, guest_phys_shift
from guestmem.model.mmu import Mmu
from guestmem.model.operation import uapi_call
from guestmem.ranges import RangeMap

if TYPE_CHECKING:
    from guestmem.backend import VmTypeInfo
    from guestmem.model.files import ModelGuestMemfd
    from guestmem.model.kvm import ModelKvm
    from guestmem.model.memslots import Memslot
    from guestmem.model.vcpu import ModelVcpu
    from guestmem.snapshot import VmSnapshot

PAGE_SHIFT = uapi.PAGE_SHIFT
PAGE_SIZE = uapi.PAGE_SIZE
_MAX_VCPU_ID = 4096  # x86 KVM_MAX_VCPU_IDS


class ModelVm(api.Vm):
    """A VM of the model: the uAPI ``Vm`` a user holds.  Hooks see its :attr:`view`."""

    def __init__(self, kvm: ModelKvm, type_info: VmTypeInfo, vm_id: int) -> None:
        self.kvm = kvm
        self.host = kvm.host
        self.backend = kvm.backend_info
        self.profile = kvm.profile
        self.hooks = kvm.hooks
        self.type_info = type_info
        self.vm_type = type_info.type
        self.vm_id = vm_id
        self.counters = Counters()
        self._slots_lock_owner: int | None = None  # the thread holding kvm->slots_lock
        self.refs = 1  # the VM fd
        self.fd_closed = False
        self.fd = kvm.fd_install(self)  # a VM fd passed as guest_memfd is not one (B-2)
        self.dead = False
        self.bugged = False
        self.dead_reason = ""
        self.destroyed = False
        self.slots = Memslots(self)
        self.attributes: RangeMap[int] = RangeMap()
        self.mmu = Mmu(self)
        self.vcpus: dict[int, ModelVcpu] = {}
        #: The last gfn a memslot may reach (x86 ``kvm_mmu_max_gfn``, arm64
        #: ``kvm_phys_size >> PAGE_SHIFT`` minus one; S-7).
        self.max_gfn = (1 << (guest_phys_shift(type_info, self.profile.phys_bits) - PAGE_SHIFT)) - 1
        #: ``kvm->arch.pre_fault_allowed``: from the VM type; a backend may change it (SNP
        #: allows pre-faulting once the launch is finished).
        self.pre_fault_allowed = type_info.pre_fault_allowed
        #: x86 ``kvm->arch.hypercall_exit_enabled`` (``KVM_CAP_EXIT_HYPERCALL``).
        self.hypercall_exit_enabled = 0
        self.view = VmView(self)
        self.arch: Any = None
        try:
            self.arch = self.hooks.vm_init(self.view)
        except BaseException:
            kvm.fd_remove(self.fd)  # put_unused_fd: a refused VM leaves no descriptor
            raise

    def __repr__(self) -> str:
        return f"<ModelVm {self.vm_id} {self.type_info.name} on {self.backend.name}>"

    # --- what the rest of the model uses ----------------------------------------------------
    @property
    def memslots(self) -> dict[tuple[int, int], Memslot]:
        """The memslots by ``(as_id, id)``."""
        return self.slots.by_id

    @property
    def has_private_mem(self) -> bool:
        """``kvm_arch_has_private_mem`` (CAP-5)."""
        return self.type_info.has_private_mem

    @property
    def tracing(self) -> bool:
        """Somebody listens to trace events (an observer, a recording, a configured log)."""
        return self.kvm.tracing

    def count(self, name: str, n: int = 1) -> None:
        """Add *n* to cost counter *name*."""
        if n:
            self.counters[name] += n

    def trace(self, kind: str, **fields: Any) -> None:
        """Emit a trace event of this VM."""
        self.kvm.trace(self, kind, fields)

    def kill(self, reason: str, *, bugged: bool = False) -> None:
        """``kvm_vm_dead`` (or ``kvm_vm_bugged``): every ioctl fails with EIO from now on (CAP-9)."""
        self.bugged |= bugged
        if not self.dead:
            self.dead = True
            self.dead_reason = reason
            self.trace("vm_dead", reason=reason, bugged=bugged)

    def is_private(self, gfn: int) -> bool:
        """``kvm_mem_is_private``."""
        return attributes.is_private(self, gfn)

    def slot_for_gfn(self, gfn: int, as_id: int = 0) -> Memslot | None:
        """``gfn_to_memslot``."""
        return self.slots.for_gfn(gfn, as_id)

    def supported_attributes(self) -> int:
        """``kvm_supported_mem_attributes`` (CAP-4)."""
        return attributes.supported(self)

    # --- references and destruction -----------------------------------------------------------
    def get(self) -> None:
        """``kvm_get_kvm``."""
        self.refs += 1

    def put(self) -> None:
        """``kvm_put_kvm``: the last reference destroys the VM (L-9)."""
        self.refs -= 1
        if self.refs == 0:
            self._destroy()

    def _destroy(self) -> None:
        """``kvm_destroy_vm``: pre-destroy, zap every root, the vCPUs, the arch, the memslots."""
        view = self.view
        try:
            self.hooks.vm_pre_destroy(view)
            self.mmu.zap_all()  # mmu_notifier_unregister -> kvm_flush_shadow_all
            for vcpu_id in sorted(self.vcpus):
                self.hooks.vcpu_destroy(self.vcpus[vcpu_id].view)
            self.hooks.vm_destroy(view)
        finally:
            self.slots.free_all()
            self.destroyed = True
            self.trace("vm_destroy")
            self.kvm.vm_destroyed(self)

    def _ioctl(self) -> None:
        """The checks of ``kvm_vm_ioctl`` before any command (fd open; CAP-9)."""
        if self.fd_closed:
            raise KvmError(errno.EBADF, "", "VM file descriptor is closed")
        self.host.check_alive()
        if self.dead:
            raise KvmError(errno.EIO, "CAP-9", f"VM is dead: {self.dead_reason}")

    def check_ioctl(self) -> None:
        """The checks of ``kvm_vm_ioctl``, for a backend's own command that is a VM ioctl
        in the kernel (:meth:`guestmem.backend.VmView.check_ioctl`)."""
        self._ioctl()

    # --- api.Vm -------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.fd_closed

    @property
    def backend_view(self) -> VmView:
        """:func:`guestmem.backend.view` of this VM."""
        return self.view

    def fileno(self) -> int:
        """The VM's descriptor number in the model's fd table."""
        if self.fd_closed:
            raise ValueError("I/O operation on closed VM fd")
        return self.fd

    @uapi_call
    def close(self) -> None:
        """``close(fd)``: the descriptor goes at once; the VM file's release
        (``kvm_vm_release`` -> ``kvm_put_kvm``) when the operation under way ends."""
        if self.fd_closed:
            return
        self.fd_closed = True
        self.kvm.fd_remove(self.fd)
        for vcpu in list(self.vcpus.values()):
            vcpu.close()
        self.kvm.fput(self.put, held=True)

    @uapi_call
    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd: *cap* is the ``long`` of
        ``kvm_vm_ioctl_check_extension_generic``."""
        cap = cabi.long(cap, "cap")
        self._ioctl()
        return self.kvm.extension(self, cap)

    @uapi_call
    def create_guest_memfd(self, size: int, flags: int = 0) -> ModelGuestMemfd:
        """``KVM_CREATE_GUEST_MEMFD`` (C-3, C-4, C-7..C-9); the arguments are the fields of
        :class:`guestmem.uapi.KvmCreateGuestMemfd`."""
        from guestmem.model.files import ModelGuestMemfd

        size, flags = uapi.KvmCreateGuestMemfd.of(size, flags)
        self._ioctl()
        supported = self.kvm.gmem_supported_flags(self)
        if flags & ~supported:
            raise KvmError(
                errno.EINVAL, "C-3", f"guest_memfd flags {flags:#x} not in supported {supported:#x}"
            )
        if size <= 0 or size > uapi.LOFF_MAX or size % PAGE_SIZE:
            raise KvmError(errno.EINVAL, "C-4", f"guest_memfd size {size:#x} is zero, negative or unaligned")
        inode = GmemInode(self, size, flags, self.type_info.gmem_folio_order)
        file = GmemFile(self, inode)
        self.trace("gmem_create", ino=inode.ino, size=size, flags=flags)
        return ModelGuestMemfd(self.kvm, file)

    @uapi_call
    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` (S-2; the rest as v2): the first five fields of
        :class:`guestmem.uapi.KvmUserspaceMemoryRegion2`, the others zero."""
        mem = uapi.KvmUserspaceMemoryRegion2.of(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        self._ioctl()
        v1_flags = uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_READONLY
        if mem.flags & ~v1_flags:
            raise KvmError(
                errno.EINVAL, "S-2", f"flags {mem.flags:#x} not allowed in KVM_SET_USER_MEMORY_REGION"
            )
        self._set_region(mem)

    @uapi_call
    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int = 0,
        guest_memfd: Any = None,
        guest_memfd_offset: int = 0,
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION2`` (S-3..S-16, B-1..B-11): the arguments are the
        fields of :class:`guestmem.uapi.KvmUserspaceMemoryRegion2`."""
        mem = uapi.KvmUserspaceMemoryRegion2.of(
            slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset, guest_memfd
        )
        if isinstance(guest_memfd, api.GuestMemfd) and not self.kvm.owns(guest_memfd):
            # A guest_memfd of another process/model: this process has no such file.
            mem = mem._replace(guest_memfd=cabi.CLOSED_FD)
        self._ioctl()
        self._set_region(mem)

    def _set_region(self, mem: uapi.KvmUserspaceMemoryRegion2) -> None:
        """``kvm_vm_ioctl_set_memory_region`` after the struct was read."""
        if mem.id >= uapi.KVM_USER_MEM_SLOTS:
            raise KvmError(errno.EINVAL, "S-3", f"slot id {mem.id} >= KVM_USER_MEM_SLOTS")
        with self.slots_lock("KVM_SET_USER_MEMORY_REGION2"):
            self.slots.set_region(mem)

    @contextmanager
    def slots_lock(self, what: str) -> Iterator[None]:
        """``kvm->slots_lock`` for *what*: a hook of this task calling back into a uAPI that
        needs it while it is held would deadlock the kernel (3.7): EDEADLK, nothing changes.
        Other threads are serialised by the host's lock (docs/model.md, Locking)."""
        me = threading.get_ident()
        if self._slots_lock_owner == me:
            raise KvmError(
                errno.EDEADLK,
                "3.7",
                f"{what} from inside an operation that holds kvm->slots_lock (the kernel would deadlock)",
            )
        owner, self._slots_lock_owner = self._slots_lock_owner, me
        try:
            yield
        finally:
            self._slots_lock_owner = owner

    @uapi_call
    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES`` (A-1..A-12): the arguments are the fields of
        :class:`guestmem.uapi.KvmMemoryAttributes`."""
        attrs = uapi.KvmMemoryAttributes.of(address, size, attributes, flags)
        self._ioctl()
        from guestmem.model.attributes import set_memory_attributes

        with self.slots_lock("KVM_SET_MEMORY_ATTRIBUTES"):
            set_memory_attributes(self, *attrs)

    @uapi_call
    def create_vcpu(self, vcpu_id: int) -> ModelVcpu:
        """``KVM_CREATE_VCPU``: *vcpu_id* is the ``unsigned long`` of
        ``kvm_vm_ioctl_create_vcpu``."""
        from guestmem.model.vcpu import ModelVcpu

        vcpu_id = cabi.ulong(vcpu_id, "vcpu_id")
        self._ioctl()
        if vcpu_id >= _MAX_VCPU_ID:
            raise KvmError(errno.EINVAL, "", f"vcpu id {vcpu_id} out of range")
        if vcpu_id in self.vcpus:
            raise KvmError(errno.EEXIST, "", f"vcpu {vcpu_id} already exists")
        vcpu = ModelVcpu(self, vcpu_id)
        self.vcpus[vcpu_id] = vcpu
        self.trace("vcpu_create", vcpu=vcpu_id)
        return vcpu

    @uapi_call
    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> int:
        """``KVM_ENABLE_CAP`` on the VM fd: x86 ``KVM_CAP_EXIT_HYPERCALL`` here, the rest
        through the backend (``guestmem_vm_ioctl``); an unknown capability is EINVAL.  The
        arguments are the fields of :class:`guestmem.uapi.KvmEnableCap`."""
        request = uapi.KvmEnableCap.of(cap, flags, args)
        self._ioctl()
        if request.flags:  # kvm_vm_ioctl_enable_cap, x86 and arm64 alike
            raise KvmError(errno.EINVAL, "", f"KVM_ENABLE_CAP: flags must be 0, got {request.flags:#x}")
        result = self.hooks.vm_ioctl(self.view, uapi.KVM_ENABLE_CAP, request)
        if result is not None:
            return result
        if self.type_info.arch == "x86" and request.cap == uapi.KVM_CAP_EXIT_HYPERCALL:
            mask = request.args[0] if request.args else 0
            if mask & ~uapi.KVM_EXIT_HYPERCALL_VALID_MASK:
                raise KvmError(errno.EINVAL, "", f"KVM_CAP_EXIT_HYPERCALL: mask {mask:#x} has unknown bits")
            self.hypercall_exit_enabled = mask
            self.trace("enable_cap", cap=request.cap, args=list(request.args))
            return 0
        raise KvmError(
            errno.EINVAL, "", f"KVM_ENABLE_CAP: capability {request.cap} cannot be enabled on this VM"
        )

    @uapi_call
    def memory_encrypt_op(self, cmd: Any) -> int:
        """``KVM_MEMORY_ENCRYPT_OP`` on the VM fd: the backend's command (``guestmem_vm_ioctl``);
        ENOTTY where the backend has none."""
        self._ioctl()
        result = self.hooks.vm_ioctl(self.view, uapi.KVM_MEMORY_ENCRYPT_OP, cmd)
        if result is None:
            raise KvmError(errno.ENOTTY, "", "KVM_MEMORY_ENCRYPT_OP is not supported on this VM")
        return result

    def snapshot(self) -> VmSnapshot:
        """The VM's state as values (:class:`guestmem.snapshot.VmSnapshot`): memslots,
        attributes, leaves, vCPUs, its guest_memfd inodes, the backend's tables for it.
        Readable whatever state the VM is in (closed, dead: it reads, it changes nothing)."""
        from guestmem.model.snapshot import vm_snapshot

        with self.kvm.operation():
            return vm_snapshot(self)

    # --- services of the core -------------------------------------------------------------------
    def fault_range(
        self, gfn: int, npages: int, *, private: bool, write: bool = False, vcpu: ModelVcpu | None = None
    ) -> int:
        """:func:`guestmem.model.fault.fault_range` on this VM.

        The accesses of a vCPU run inside its ``KVM_RUN``: a closed vCPU fd is EBADF, a dead
        VM EIO (:meth:`ModelVcpu.check_run`).  A destroyed VM has no fd left to reach it
        (EBADF).  After a vCPU's faults the vCPU enters the guest again, running the
        releases deferred meanwhile first (``task_work``, as :meth:`ModelVcpu.access` does):
        a file closed by another thread during the faults is released then, and what it
        zapped is no longer mapped when the caller looks.
        """
        if self.destroyed:
            raise KvmError(errno.EBADF, "", "the VM was destroyed")
        if vcpu is not None:
            vcpu.check_run()
        mapped = fault.fault_range(self, gfn, npages, private=private, write=write, vcpu=vcpu)
        if vcpu is not None and self.kvm.task_work:
            self.kvm.run_task_work(guest_entry=True)
        return mapped

    def gmem_populate(self, gfn: int, src: bytes | None, npages: int, opaque: Any = None) -> int:
        """``kvm_gmem_populate`` (P-1..P-5); returns the number of pages populated."""
        return gmem.populate(self, gfn, src, npages, opaque)

    def gfn_to_gmem(self, gfn: int) -> GmemLocation | None:
        """Memslot, inode and page index of *gfn* in guest_memfd (as views), or None."""
        return self.view.gfn_to_gmem(gfn)

    def gmem_pfn(self, gfn: int) -> int | None:
        """The host pfn backing *gfn* in guest_memfd, or None if not allocated."""
        slot = self.slots.for_gfn(gfn)
        if slot is None or slot.gmem_file is None:
            return None
        return slot.gmem_file.inode.pfn(slot.gfn_to_index(gfn))

    def mapping_level(self, gfn: int) -> int | None:
        """Level of the stage-2 leaf mapping *gfn*, or None."""
        found = self.mmu.lookup(gfn)
        return None if found is None else found[1].level

    def is_mapped(self, gfn: int) -> bool:
        """True iff stage-2 has a leaf for *gfn*."""
        return self.mmu.lookup(gfn) is not None

    def zap_gfn_range(self, start: int, end: int) -> None:
        """``kvm_zap_gfn_range``: one MMU invalidation zapping every root's leaves in
        ``[start, end)`` (no ``kvm_unmap_gfn_range``, so no arch unmap hook)."""
        mmu = self.mmu
        mmu.invalidate_begin()
        try:
            mmu.invalidate_range_add(start, end)
            if mmu.zap(start, end):
                self.count("remote_tlb_flushes")
        finally:
            mmu.invalidate_end()

    def mmu_notifier_invalidate_range(self, start: int, end: int) -> None:
        """``kvm_mmu_notifier_invalidate_range_start``/``_end`` for host ``[start, end)``.

        ``__kvm_handle_hva_range``: every memslot (each address space) whose userspace range
        overlaps is unmapped with ``KVM_FILTER_SHARED``, inside one MMU invalidation that
        begins at the first such slot; no overlapping slot, no invalidation.
        """
        from guestmem.backend import GfnRange

        slots = sorted(self.slots.by_id.values(), key=lambda slot: (slot.as_id, slot.userspace_addr))
        found = flush = False
        try:
            for slot in slots:
                lo = max(start, slot.userspace_addr)
                hi = min(end, slot.userspace_addr + (slot.npages << PAGE_SHIFT))
                if lo >= hi:
                    continue
                if not found:
                    found = True
                    self.mmu.invalidate_begin()
                first = slot.base_gfn + ((lo - slot.userspace_addr) >> PAGE_SHIFT)
                last = slot.base_gfn + ((hi + PAGE_SIZE - 1 - slot.userspace_addr) >> PAGE_SHIFT)
                rng = GfnRange(slot.view, first, last, attr_filter=uapi.KVM_FILTER_SHARED)
                flush |= self.mmu.unmap_gfn_range(rng)
            if flush:
                self.count("remote_tlb_flushes")
        finally:
            if found:
                self.mmu.invalidate_end()
