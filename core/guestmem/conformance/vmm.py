"""How the conformance kit drives one VM: the VMM's part and the guest's.

The kit tests a backend through the uAPI face alone, playing both the VMM (memslots,
guest_memfd, host mappings, ``KVM_SET_MEMORY_ATTRIBUTES``) and the guest (loads, stores,
conversion requests).  What differs between architectures (how a VM is launched, how the
guest asks for a conversion, what the VMM does about it) lives in a :class:`KitVmm`.

The default is generic KVM as QEMU drives it: a VM type with memory attributes converts
with ``KVM_SET_MEMORY_ATTRIBUTES`` followed by QEMU's discard of the old side
(``kvm_convert_memory``: to-shared punches the range out of guest_memfd, to-private drops
the shared copy), which is what makes x86 conversions destructive (backends.md 0.2).  A
backend whose guests convert otherwise (pKVM's MEM_SHARE hypercalls, a launch before the
first run) hands the kit a subclass, or any class with the same methods, through
``guestmem_conformance_options`` (``{"vmm": MyVmm}``).
"""

from __future__ import annotations

from typing import Any

from guestmem import uapi
from guestmem.backend import VmTypeInfo

PAGE = uapi.PAGE_SIZE
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
GMEM = uapi.KVM_MEM_GUEST_MEMFD


class Ram:
    """Guest RAM as the kit lays it out: one memslot over one guest_memfd.

    ``shared`` is the anonymous mapping behind ``userspace_addr`` (the shared side of a VM
    whose attributes decide privateness), or None for a gmem-only slot, whose shared side
    is guest_memfd itself.
    """

    def __init__(
        self, vm: Any, gmem: Any, gpa: int, size: int, shared: Any, slot: int = 0, uaddr_map: Any = None
    ) -> None:
        self.vm = vm
        self.gmem = gmem
        self.gpa = gpa
        self.size = size
        self.shared = shared
        self.slot = slot
        #: A mapping of guest_memfd given as ``userspace_addr`` of a gmem-only memslot, on a
        #: kernel whose gmem-only memslots take shared faults from it (``kvm_pvm``), or None.
        self.uaddr_map = uaddr_map

    @property
    def npages(self) -> int:
        """Pages of RAM."""
        return self.size // PAGE

    @property
    def gmem_only(self) -> bool:
        """The shared side is guest_memfd itself (no ``userspace_addr`` memory)."""
        return self.shared is None

    def gpa_of(self, page: int) -> int:
        """The guest physical address of RAM page *page*."""
        return self.gpa + page * PAGE

    def bind(self, gpa: int | None = None) -> None:
        """Create the memslot (again) at *gpa* (default: where it was)."""
        if gpa is not None:
            self.gpa = gpa
        self.vm.set_user_memory_region2(self.slot, GMEM, self.gpa, self.size, self.uaddr, self.gmem, 0)

    @property
    def uaddr(self) -> int:
        """The memslot's ``userspace_addr``."""
        shared = self.shared if self.shared is not None else self.uaddr_map
        return 0 if shared is None else int(shared.address)

    def release_gmem(self) -> None:
        """Drop every reference the VMM holds to guest_memfd (its fd, its mapping), so that
        the file is released (L-3) while the memslot still names it."""
        if self.uaddr_map is not None:
            self.uaddr_map.close()
        self.gmem.close()

    def close(self) -> None:
        """Unmap the RAM's host mappings and close guest_memfd (after the VM, as a VMM does)."""
        for mapping in (self.shared, self.uaddr_map):
            if mapping is not None:
                mapping.close()
        self.gmem.close()

    def unbind(self) -> None:
        """Delete the memslot (``memory_size == 0``)."""
        self.vm.set_user_memory_region2(self.slot, 0, self.gpa, 0, 0)

    # --- the host's accesses ------------------------------------------------------------------
    def host_read(self, page: int, n: int, offset: int = 0) -> bytes:
        """What the host reads of RAM page *page* on its shared side: the anonymous memory,
        or (gmem-only) guest_memfd through a mapping made for this access alone, so that no
        host mapping outlives it (a guest fault may need the page unmapped, pKVM-3.5).
        ``guestmem.HostSigbus`` where the host may not map the page."""
        if self.shared is not None:
            data: bytes = self.shared.read(page * PAGE + offset, n)
            return data
        return self.gmem_read(page, n, offset)

    def host_write(self, page: int, data: bytes, offset: int = 0) -> None:
        """The host stores *data* on the shared side of RAM page *page* (as :meth:`host_read`)."""
        if self.shared is not None:
            self.shared.write(page * PAGE + offset, data)
            return
        with self.gmem.mmap(self.size) as mapping:
            mapping.write(page * PAGE + offset, data)

    def gmem_read(self, page: int, n: int, offset: int = 0) -> bytes:
        """The host reads guest_memfd page *page* through a mapping of the file made for this
        access alone: ``guestmem.HostSigbus`` unless the host may map it (M-4)."""
        with self.gmem.mmap(self.size) as mapping:
            data: bytes = mapping.read(page * PAGE + offset, n)
            return data

    @property
    def gmem_mappable(self) -> bool:
        """The RAM's guest_memfd was created with ``GUEST_MEMFD_FLAG_MMAP``."""
        return bool(self.gmem.flags & MMAP)

    # --- the VMM's discards ------------------------------------------------------------------
    def discard_shared(self, page: int, npages: int) -> None:
        """QEMU's ``ram_block_discard_range`` of the shared copy: ``MADV_REMOVE`` where the
        mapping offers it (the model's), else zeroes written, which the guest sees alike."""
        discard = getattr(self.shared, "discard", None)
        if discard is not None:
            discard(page * PAGE, npages * PAGE)
        else:
            self.shared.write(page * PAGE, bytes(npages * PAGE))

    def discard_private(self, page: int, npages: int) -> None:
        """QEMU's ``ram_block_discard_guest_memfd_range``: punch the private copy out."""
        self.gmem.fallocate(PUNCH, page * PAGE, npages * PAGE)


class KitVmm:
    """The default driver: a VMM and guest of generic KVM (QEMU's conversions).

    One instance per VM, made right after ``KVM_CREATE_VM``.  Subclasses override what
    their architecture does differently; every method has the kit's call order in its
    docstring.
    """

    #: Gmem-only memslots take shared faults from guest_memfd with ``userspace_addr`` 0
    #: (the kit's ``gmem_only_from_gmem``; set by the kit after construction).
    gmem_only_from_gmem: bool = True

    def __init__(self, kvm: Any, vm: Any, vm_type: VmTypeInfo) -> None:
        self.kvm = kvm
        self.vm = vm
        self.vm_type = vm_type

    # --- the VM and its memory ------------------------------------------------------------
    def gmem_flags(self) -> int:
        """guest_memfd flags of the kit's RAM.

        A VM whose attributes decide privateness gets a file without
        ``GUEST_MEMFD_FLAG_MMAP``: an mmap-able file would make its memslot gmem-only (6.18
        ``kvm_gmem_bind``), and the shared side must be the VMM's anonymous memory.  Every
        other VM type gets a gmem-only memslot, so ``MMAP`` where reported, with
        ``INIT_SHARED`` where the VM type has no private memory (plain memory host and guest
        share, M-7).
        """
        if not self.gmem_only():
            return 0
        supported: int = self.vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        flags = supported & MMAP
        if flags and not self.vm_type.private:
            flags |= supported & INIT_SHARED
        return flags

    def gmem_only(self) -> bool:
        """RAM is a gmem-only memslot (its shared side is guest_memfd, no anonymous memory):
        unless the VM's attributes decide privateness and the VM type allows other memslots
        (arm64 requires gmem-only ones, S-16)."""
        return self.vm_type.gmem_slot_requires_mmap or not self.attributes()

    def attributes(self) -> bool:
        """The VM converts with ``KVM_SET_MEMORY_ATTRIBUTES`` (A-1)."""
        value: int = self.vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES)
        return bool(value & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE) and self.vm_type.has_private_mem

    def setup(self) -> None:
        """After ``KVM_CREATE_VM``, before guest_memfd, memslots and vCPUs (SEV's INIT2)."""

    def add_ram(self, gpa: int, size: int, slot: int = 0) -> Ram:
        """Create guest_memfd and the memslot of ``[gpa, gpa + size)``; the RAM starts private
        (:meth:`make_private`) on a VM type with private memory."""
        gmem = self.vm.create_guest_memfd(size, self.gmem_flags())
        shared = None if self.gmem_only() else self.kvm.mmap_anonymous(size)
        uaddr_map = None
        if shared is None and not self.gmem_only_from_gmem and gmem.flags & MMAP:
            uaddr_map = gmem.mmap(size)
        ram = Ram(self.vm, gmem, gpa, size, shared, slot, uaddr_map)
        ram.bind()
        return ram

    def add_vcpu(self, vcpu: Any) -> None:
        """A vCPU of the guest besides the one :meth:`start` gets, created after the RAM and
        before :meth:`start` (an SMP guest: the kit's thread stress test gives each thread a
        vCPU): what the VMM does for it before the launch (TDX's ``KVM_TDX_INIT_VCPU``).
        The default does nothing."""

    def start(self, vcpu: Any, ram: Ram) -> None:
        """Before the first guest access: the RAM exists, the vCPU too (a launch, a realm
        activation).  The default makes all RAM private on a VM type with private memory,
        as a confidential guest's firmware finds it."""
        if self.vm_type.private and self.attributes():
            self.vm.set_memory_attributes(ram.gpa, ram.size, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)

    # --- the guest --------------------------------------------------------------------------
    def _private_arg(self, private: bool) -> bool | None:
        # Without kvm_arch_has_private_mem there is no private/shared access bit: the guest's
        # accesses go where the backend maps them.
        return private if self.vm_type.has_private_mem else None

    def guest_write(self, vcpu: Any, gpa: int, data: bytes, *, private: bool) -> None:
        """A guest store of *data* at *gpa*, private or shared as the guest means it."""
        vcpu.access(gpa, data=data, private=self._private_arg(private))

    def guest_read(self, vcpu: Any, gpa: int, n: int, *, private: bool) -> bytes:
        """A guest load of *n* bytes at *gpa*."""
        data: bytes = vcpu.access(gpa, n, private=self._private_arg(private))
        return data

    def convert(self, vcpu: Any, ram: Ram, page: int, npages: int, *, private: bool) -> None:
        """The guest converts RAM pages ``[page, page + npages)`` to *private* or shared and
        the VMM carries it out; on return the guest may use the pages on their new side.

        The default is QEMU's ``kvm_convert_memory`` answering the guest's request
        (``KVM_HC_MAP_GPA_RANGE``, a memory-fault exit): set the attribute, then discard
        the old side.
        """
        gpa = ram.gpa_of(page)
        attributes = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
        self.vm.set_memory_attributes(gpa, npages * PAGE, attributes)
        if private:
            if ram.shared is not None:
                ram.discard_shared(page, npages)
        else:
            ram.discard_private(page, npages)
