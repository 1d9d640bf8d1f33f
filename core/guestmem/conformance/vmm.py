"""How the conformance kit drives one VM: through the backend's portable intents.

The kit tests a backend through the uAPI face, playing both the VMM (memslots,
guest_memfd, host mappings) and the guest (loads, stores, conversions).  What differs
between architectures (how a VM is created and launched, how its RAM is laid out, how the
guest converts and accepts memory, which exits the VMM answers and how) is what the
backend's :class:`~guestmem.intents.Intents` translate for scenario files and the pytest
plugin; :class:`KitVmm` drives a :class:`~guestmem.guestvm.GuestVm` with them, so that a
backend has one driver for every user.  A backend without intents gets the generic base
(QEMU's layout, implicit conversions where memory attributes decide privateness).

The kit's VM (:class:`KitVmm`):

* two RAM regions laid out by the intents: a firmware page at :data:`FIRMWARE_GPA` (what
  the launch puts in: a populated image, Gunyah's devicetree) and the RAM the kit's tests
  use, both private on a VM type with private memory;
* launched as the backend launches it (``launch.populate`` of the firmware page where the
  backend populates, then the end of the launch), after which the guest accepts its RAM
  where the architecture requires it (SNP's PVALIDATE, TDX's ACCEPT) and takes every page
  of it where privateness is ownership rather than an attribute (pKVM, Gunyah: the guest
  touches its RAM), so that the RAM starts in use and private;
* a guest that accepts a page again when the host took it away meanwhile
  (``accept_on_fault``);
* exits: requests the guest makes while converting or accepting are answered by QEMU's
  loop (:class:`~guestmem.vmm.QemuVmm`, with the backend's own exits first); a memory-fault
  exit of a plain load or store reaches the test, which asserts on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from guestmem import uapi
from guestmem.backend import VmTypeInfo
from guestmem.errors import HypercallExit, MemoryFault
from guestmem.guestvm import GuestVm
from guestmem.intents import NotApplicable, RamRegion
from guestmem.vmm import QemuVmm

PAGE = uapi.PAGE_SIZE
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
GMEM = uapi.KVM_MEM_GUEST_MEMFD
#: The kit's firmware page: below its RAM, 2 MiB aligned, below 4 GiB.
FIRMWARE_GPA = 0x0FE00000
#: What the launch puts there where the backend populates.
FIRMWARE_IMAGE = b"guestmem conformance kit firmware\n"


class Ram:
    """One region of guest RAM (a :class:`~guestmem.intents.RamRegion` the intents laid out)
    as the kit's tests use it.

    ``shared`` is the anonymous mapping behind ``userspace_addr`` (the shared side of a VM
    whose attributes decide privateness), or None for a gmem-only memslot, whose shared
    side is guest_memfd itself; ``uaddr_map`` is a mapping of guest_memfd given as
    ``userspace_addr`` of a gmem-only memslot, or None.
    """

    def __init__(self, vm: Any, region: RamRegion) -> None:
        self.vm = vm
        self.region = region

    @property
    def gmem(self) -> Any:
        """The region's guest_memfd."""
        return self.region.gmem

    @property
    def gpa(self) -> int:
        """Where the memslot is."""
        return self.region.gpa

    @property
    def size(self) -> int:
        """Bytes of RAM."""
        return self.region.size

    @property
    def slot(self) -> int:
        """The memslot id."""
        return self.region.slot

    @property
    def shared(self) -> Any:
        """The anonymous shared side, or None (gmem-only)."""
        return None if self.region.in_place else self.region.shared

    @property
    def uaddr_map(self) -> Any:
        """The guest_memfd mapping the memslot names as ``userspace_addr``, or None."""
        return self.region.shared if self.region.in_place and self.region.userspace_addr else None

    @property
    def npages(self) -> int:
        """Pages of RAM."""
        return self.size // PAGE

    @property
    def gmem_only(self) -> bool:
        """The shared side is guest_memfd itself (no anonymous memory)."""
        return self.region.in_place

    def gpa_of(self, page: int) -> int:
        """The guest physical address of RAM page *page*."""
        return self.gpa + page * PAGE

    def bind(self, gpa: int | None = None) -> None:
        """Create the memslot (again) at *gpa* (default: where it was)."""
        if gpa is not None:
            self.region.gpa = gpa
        self.vm.set_user_memory_region2(self.slot, GMEM, self.gpa, self.size, self.uaddr, self.gmem, 0)

    @property
    def uaddr(self) -> int:
        """The memslot's ``userspace_addr``."""
        return self.region.userspace_addr

    def unbind(self) -> None:
        """Delete the memslot (``memory_size == 0``)."""
        self.vm.set_user_memory_region2(self.slot, 0, self.gpa, 0, 0)

    def _mappings(self) -> list[Any]:
        return [] if self.region.shared is None else [self.region.shared]

    def release_gmem(self) -> None:
        """Drop every reference the VMM holds to guest_memfd (its fd, its mappings), so that
        the file is released (L-3) while the memslot still names it."""
        if self.region.in_place:
            for mapping in self._mappings():
                mapping.close()
        self.gmem.close()

    def close(self) -> None:
        """Unmap the RAM's host mappings and close guest_memfd (after the VM, as a VMM does)."""
        for mapping in self._mappings():
            mapping.close()
        self.gmem.close()

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

    def discard_private(self, page: int, npages: int) -> None:
        """QEMU's ``ram_block_discard_guest_memfd_range``: punch the private copy out."""
        self.gmem.fallocate(PUNCH, page * PAGE, npages * PAGE)


def create_vm(kvm: Any, info: VmTypeInfo) -> Any:
    """``KVM_CREATE_VM`` of *info*'s type on *kvm*, then what the backend's intents do right
    after it (:meth:`~guestmem.intents.Intents.vm_init`), as a VMM creates a VM."""
    from guestmem.intents import Intents
    from guestmem.registry import get_registry

    backend = get_registry().backend(kvm.backend)
    intents = backend.intents if backend.intents is not None else Intents()
    vm = kvm.create_vm(info.type)
    guest = GuestVm(kvm, backend, intents, vm, info, "private" if info.private else "default", "none")
    try:
        intents.vm_init(guest)
    except BaseException:
        vm.close()
        raise
    return vm


class KitExits:
    """The kit's exit handling (a :class:`guestmem.vmm.ExitHandler`): QEMU's loop answers
    what the guest asks of the VMM while it converts or accepts memory; a memory-fault exit
    of a plain load or store reaches the test."""

    def __init__(self, guest: GuestVm) -> None:
        self.qemu = QemuVmm(guest)
        #: The guest is converting or accepting: memory-fault exits are requests too
        #: (an implicit conversion, CCA's RIPAS change).
        self.converting = False

    def handle_hypercall(self, exit: HypercallExit, vcpu: Any) -> int:  # noqa: A002
        return self.qemu.handle_hypercall(exit, vcpu)

    def handle_memory_fault(self, exit: MemoryFault, vcpu: Any) -> None:  # noqa: A002
        if not self.converting:
            raise exit
        self.qemu.handle_memory_fault(exit, vcpu)


class KitVmm:
    """One VM of the backend under test, launched and driven through its intents (see the
    module docstring), with the kit's RAM of *size* bytes at *gpa* and *vcpus* vCPUs (the
    kit's guest runs on the first)."""

    def __init__(self, kvm: Any, info: VmTypeInfo, gpa: int, size: int, *, vcpus: int = 1) -> None:
        self.kvm = kvm
        self.info = info
        exits: list[KitExits] = []

        def handler(guest: GuestVm) -> KitExits:
            exits.append(KitExits(guest))
            return exits[0]

        self.guest = GuestVm.launch(
            kvm,
            kind="private" if info.private else "default",
            memory=[(FIRMWARE_GPA, PAGE), (gpa, size)],
            vcpus=vcpus,
            vm_type=info.type,
            handle_exits=handler,
            accept_on_fault=True,
        )
        self.exits = exits[0]
        self.vm = self.guest.vm
        self.vcpu = self.guest.vcpu()
        self.firmware, self.ram = (Ram(self.vm, region) for region in self.guest.regions)
        try:
            self._boot()
        except BaseException:
            self.close()
            raise

    def _boot(self) -> None:
        guest, caps = self.guest, self.guest.capabilities
        if "populate" in caps:
            guest.populate(FIRMWARE_GPA, FIRMWARE_IMAGE)
        guest.finish_launch()
        with self.converting():
            if "acceptance" in caps:
                guest.accept(self.ram.gpa, self.ram.size)
            if self.info.private and not self.attributes():
                guest.touch(self.ram.gpa, self.ram.size)

    @contextlib.contextmanager
    def converting(self) -> Iterator[None]:
        """The guest converts or accepts memory: the VMM answers its memory-fault exits."""
        self.exits.converting = True
        try:
            yield
        finally:
            self.exits.converting = False

    # --- what the VM is ---------------------------------------------------------------------
    def attributes(self) -> bool:
        """Memory attributes decide privateness (``KVM_SET_MEMORY_ATTRIBUTES``, A-1)."""
        value: int = self.vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES)
        return bool(value & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE) and self.info.has_private_mem

    def conversion_not_applicable(self) -> str | None:
        """Why the guest cannot convert (the intents' reason), or None if it can.

        A backend whose intents report no ``conversion`` capability must say why: its
        ``guest.convert`` raises :class:`~guestmem.intents.NotApplicable` (probed on the
        firmware page); converting anyway is an ``AssertionError``.
        """
        if "conversion" in self.guest.capabilities:
            return None
        try:
            with self.converting():
                self.guest.convert(FIRMWARE_GPA, PAGE, private=not self.info.private)
        except NotApplicable as exc:
            return exc.reason
        raise AssertionError(
            f"backend {self.guest.backend.name!r} reports no 'conversion' capability for "
            f"{self.info.name}, yet its guest.convert converted"
        )

    # --- the guest ----------------------------------------------------------------------------
    def _private_arg(self, private: bool) -> bool | None:
        # Without kvm_arch_has_private_mem there is no private/shared access bit: the guest's
        # accesses go where the backend maps them.
        return private if self.info.has_private_mem else None

    def write(self, gpa: int, data: bytes, *, private: bool) -> None:
        """A guest store of *data* at *gpa*, private or shared as the guest means it."""
        self.guest.write(gpa, data, private=self._private_arg(private))

    def read(self, gpa: int, n: int, *, private: bool) -> bytes:
        """A guest load of *n* bytes at *gpa*."""
        return self.guest.read(gpa, n, private=self._private_arg(private))

    def convert(self, gpa: int, size: int, *, private: bool) -> None:
        """``guest.convert``: the guest turns ``[gpa, gpa + size)`` private or shared and the
        VMM carries it out; on return the guest may use the pages on their new side.
        :class:`~guestmem.intents.NotApplicable` where the guest has no conversion."""
        with self.converting():
            self.guest.convert(gpa, size, private=private)

    # --- more memory --------------------------------------------------------------------------
    def add_ram(self, gmem: Any, gpa: int, size: int, slot: int) -> Ram:
        """Bind *size* bytes of *gmem* as a gmem-only memslot at *gpa* with no
        ``userspace_addr`` and make it guest RAM the VMM converts (a region of the guest)."""
        region = RamRegion(gpa, size, gmem, 0, None, in_place=True, slot=slot)
        ram = Ram(self.vm, region)
        ram.bind()
        self.guest.regions.append(region)
        return ram

    def close(self) -> None:
        """vCPUs, VM, then the RAM's mappings and files, as a VMM exits."""
        for vcpu in self.guest.vcpus:
            vcpu.close()
        self.vm.close()
        self.ram.close()
        self.firmware.close()
